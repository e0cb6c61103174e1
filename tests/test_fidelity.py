"""The fidelity guard and --psq-budget auto: what the compile measures is what the package computes, the
auto budget is the fewest crossbars that meet the threshold, and a far-from-float compile warns."""

import math

import numpy as np
import pytest

pytest.importorskip("tvm")

import psq_tvm  # noqa: E402
from psq_tvm.core.crossbar import preset  # noqa: E402
from psq_tvm.targets import fidelity as F  # noqa: E402
from psq_tvm.targets.input_stats import synthetic_feeds  # noqa: E402

from test_onnx_models import small_cnn  # noqa: E402

SPEC = preset("isaac", rows=32, cols=32)


def _sqnr(ref, out):
    """Independent SQNR: numpy over every output value."""
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in ref])
    o = np.concatenate([np.asarray(a, np.float64).ravel() for a in out])
    return 10 * math.log10((r @ r) / ((o - r) @ (o - r)))


@pytest.fixture(scope="module")
def auto_pkg():
    warnings = []
    # BatchNorm-only bias correction (a no-op here): the guard then measures exactly what the package computes
    pkg = psq_tvm.compile(small_cnn(), spec=SPEC, min_fidelity="25", bias_correction="bn", warn=warnings.append)
    return pkg, warnings


def test_guard_leaves_out_corrections_fitted_to_synthetic_inputs():
    """With synthetic-statistics bias correction the package carries the corrections, but the guard's measure
    is that of the uncorrected weights (a correction fitted to inputs like the probe's would credit itself);
    with --calib-inputs (inputs not drawn like the statistics) it counts them."""
    kw = dict(spec=SPEC, budget="reduction=3", rounding="nearest")
    none = psq_tvm.compile(small_cnn(), bias_correction="none", **kw)
    syn = psq_tvm.compile(small_cnn(), bias_correction="synthetic", **kw)
    assert any(l.get("bias_correction") for l in syn.manifest["layers"])
    assert syn.report["fidelity"]["output"]["sqnr_db"] == pytest.approx(none.report["fidelity"]["output"]["sqnr_db"])
    assert "bias_correction_measured" in syn.report["fidelity"]
    feeds = synthetic_feeds(syn, F.FIDELITY_SAMPLES, seed=1)
    ref = [syn.run(f, "float")[0] for f in feeds]
    out = [syn.run(f, "fake-quant")[0] for f in feeds]            # corrected: better on these inputs
    assert _sqnr(ref, out) > syn.report["fidelity"]["output"]["sqnr_db"] + 0.1
    calib = {"x": np.random.default_rng(5).standard_normal((8, 3, 12, 12)).astype(np.float32)}
    cal = psq_tvm.compile(small_cnn(), bias_correction="synthetic", calib_inputs=calib, **kw)
    assert "bias_correction_measured" not in cal.report["fidelity"]


def test_reported_fidelity_is_what_the_package_computes(auto_pkg):
    """Re-run the saved package's float and fake-quant modes on the guard's inputs (same seed and count)
    and recompute SQNR and top-1 agreement in the test: they equal the report."""
    pkg, _ = auto_pkg
    fid = pkg.report["fidelity"]
    feeds = synthetic_feeds(pkg, F.FIDELITY_SAMPLES, seed=1)
    ref = [pkg.run(f, "float")[0] for f in feeds]
    out = [pkg.run(f, "fake-quant")[0] for f in feeds]
    assert fid["samples"] == sum(len(f[0]) for f in feeds)
    assert fid["output"]["sqnr_db"] == pytest.approx(_sqnr(ref, out), abs=1e-2)   # the probe accumulates in float32
    agree = np.mean([np.argmax(a, 1) == np.argmax(b, 1) for a, b in zip(ref, out)])
    assert fid["output"]["top1_agreement"] == pytest.approx(agree)
    assert {l["name"] for l in fid["layers"]} == {l["name"] for l in pkg.layers}


def test_auto_budget_is_the_fewest_crossbars_meeting_the_threshold(auto_pkg):
    pkg, warnings = auto_pkg
    rep = pkg.report
    auto = rep["fidelity"]["auto_budget"]
    assert rep["fidelity"]["threshold"]["sqnr_db"] == 25.0 and rep["fidelity"]["meets_threshold"]
    assert auto["chosen_crossbars"] == rep["crossbars"]["psq"] and not warnings
    pts = {p["crossbars"]: p["sqnr_db"] for p in auto["points"]}
    assert pts[rep["crossbars"]["psq"]] >= 25.0
    # every point tried with more crossbars met it (the scan went down) and the next one below failed,
    # unless the smallest bitwidths already meet it
    above = [v for n, v in pts.items() if n > rep["crossbars"]["psq"]]
    below = [v for n, v in pts.items() if n < rep["crossbars"]["psq"]]
    assert all(v >= 25.0 for v in above)
    assert below and max(n for n in pts if n < rep["crossbars"]["psq"]) >= 0.97 * rep["crossbars"]["psq"] - 1
    assert pts[max(n for n in pts if n < rep["crossbars"]["psq"])] < 25.0


def test_a_stricter_threshold_never_gives_fewer_crossbars(auto_pkg):
    loose = psq_tvm.compile(small_cnn(), spec=SPEC, min_fidelity="12")
    strict, _ = auto_pkg
    assert loose.report["crossbars"]["psq"] <= strict.report["crossbars"]["psq"]
    assert loose.report["fidelity"]["output"]["sqnr_db"] >= 12.0


def test_explicit_budget_far_from_float_warns_naming_the_worst_layers(capsys, tmp_path):
    """--psq-budget given and fidelity under the threshold: compile still writes the package (the user
    asked for it) but says so on stderr, even with -q, naming the worst layers."""
    import onnx

    from psq_tvm.cli import main

    onnx.save(small_cnn(), tmp_path / "m.onnx")
    rc = main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.tar"), "-q", "--psq-bits", "2",
               "--psq-budget", "avg-bits=2", "--psq-min-fidelity", "40"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning: the quantised model is far from float" in err and "worst PIM layers: " in err
    assert "conv1" in err or "fc" in err
    pkg = psq_tvm.load(tmp_path / "m.tar")
    assert pkg.report["fidelity"]["meets_threshold"] is False


def test_calib_inputs_are_what_the_guard_measures_on():
    x = np.random.default_rng(7).uniform(0, 1, size=(5, 3, 12, 12)).astype(np.float32)
    pkg = psq_tvm.compile(small_cnn(), spec=SPEC, budget="reduction=3", calib_inputs={"x": x})
    fid = pkg.report["fidelity"]
    assert fid["inputs"] == "5 calibration input(s)" and fid["samples"] == 5
    ref = [pkg.run({"x": x[k:k + 1]}, "float")[0] for k in range(5)]
    out = [pkg.run({"x": x[k:k + 1]}, "fake-quant")[0] for k in range(5)]
    assert fid["output"]["sqnr_db"] == pytest.approx(_sqnr(ref, out), abs=1e-2)   # the probe accumulates in float32
    with pytest.raises(Exception, match="calib-inputs"):
        psq_tvm.compile(small_cnn(), spec=SPEC, calib_inputs={"x": x[:, :, :5]})


def test_rtn8_reference_weights_match_a_per_channel_loop():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 4, 3, 3)) * rng.uniform(0.01, 3, (6, 1, 1, 1))).astype(np.float32)
    w[2] = 0.0
    rec = {"op": "conv2d", "groups": 2}
    got = F.rtn8_channel_matrices(rec, w)
    for g in range(2):
        for co in range(3):
            ch = w[g * 3 + co].reshape(-1).astype(np.float64)
            s = np.abs(ch).max() / 127 if np.abs(ch).max() > 0 else 1.0
            want = np.array([max(-127, min(127, round(v / s))) * s for v in ch])
            np.testing.assert_allclose(got[g][:, co], want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("text,want", [("rtn8", [("rtn8", 0.0)]), ("rtn8-3", [("rtn8", -3.0)]),
                                       ("rtn8+1.5", [("rtn8", 1.5)]), ("22", [("db", 22.0)]),
                                       ("22.5dB", [("db", 22.5)]), ("23, rtn8-2", [("db", 23.0), ("rtn8", -2.0)])])
def test_parse_min_fidelity(text, want):
    assert F.parse_min_fidelity(text) == want
    assert F.parse_min_fidelity(None) == F.parse_min_fidelity(F.DEFAULT_MIN_FIDELITY)


def test_threshold_is_the_lowest_rule():
    """Two rules: the threshold is the lower one, and the report says which (rtn8 measured independently)."""
    from psq_tvm.targets.pipeline import CompileContext, CompileOptions, Pipeline

    ctx = CompileContext(small_cnn(), CompileOptions(spec=SPEC, budget="reduction=3", min_fidelity="200,rtn8-1"))
    Pipeline.default().run(ctx)
    ref = ctx.reference_rtn8()["sqnr_db"]
    assert ctx.fidelity["threshold"]["sqnr_db"] == pytest.approx(ref - 1)
    assert "lowest of" in ctx.fidelity["threshold"]["rule"]
    ctx2 = CompileContext(small_cnn(), CompileOptions(spec=SPEC, budget="reduction=3", min_fidelity="5,rtn8"))
    Pipeline.default().run(ctx2)
    assert ctx2.fidelity["threshold"]["sqnr_db"] == 5.0


@pytest.mark.parametrize("bad", ["rtn4", "fast", "inf", "rtn8-", "23,"])
def test_parse_min_fidelity_refuses(bad):
    with pytest.raises(F.FidelityError, match="psq-min-fidelity"):
        F.parse_min_fidelity(bad)
