"""psq_tvm.runtime.verify, function by function: parse_max_loss, compare, losses, is_exact, layer_errors and
verify_package (exit codes and lines) on small packages compiled once per module.

Expected values come from hand-worked numbers or from numpy written out here, never from verify itself.
"""

from __future__ import annotations

import math
import re
import types

import numpy as np
import pytest

pytest.importorskip("tvm")

import psq_tvm  # noqa: E402
from psq_tvm.core.crossbar import CrossbarSpec  # noqa: E402
from psq_tvm.runtime import simulator  # noqa: E402
from psq_tvm.runtime import verify as V  # noqa: E402
from psq_tvm.runtime.package import Package  # noqa: E402
from psq_tvm.runtime.simulator import SimOptions  # noqa: E402
from psq_tvm.runtime.verify import (EXACT_RTOL, EXIT_SIM_MISMATCH, EXIT_TOO_FAR_FROM_FLOAT, VerifyError,  # noqa: E402
                                    compare, is_exact, layer_errors, losses, parse_max_loss, verify_package)

from onnx import helper as oh, numpy_helper as onh  # noqa: E402

from test_onnx_models import act_matmul_model, matmul_model, model, small_cnn, vi  # noqa: E402

KINDS = "('top1', 'cosine', 'accuracy')"
SUMMARY = re.compile(r"max abs err (?P<err>\S+), max rel err (?P<rel>\S+), cosine (?P<cos>-?\d+\.\d{6})"
                     r"(?:, top-1 agreement (?P<top1>\d\.\d{3}))?$")
FIRST_LINE = ("verify on {n} sample(s) (per-layer errors on the first batch): float, golden (fake-quantised "
              "weights and activations, float64), sim")


def parse_summary(line: str) -> dict:
    m = SUMMARY.search(line)
    assert m, line
    return {k: (None if v is None else float(v)) for k, v in m.groupdict().items()}


def independent_summary(a, b) -> dict:
    """max |a-b|, that over max |b|, cosine and (2-D [N, C>1]) row-wise top-1 agreement, written out."""
    a2, b2 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x, y = a2.reshape(-1), b2.reshape(-1)
    err = max(abs(p - q) for p, q in zip(x.tolist(), y.tolist()))
    res = {"err": err, "rel": err / max(abs(q) for q in y.tolist()),
           "cos": sum(x * y) / math.sqrt(sum(x * x) * sum(y * y)), "top1": None}
    if a2.ndim == 2 and a2.shape[1] > 1:
        res["top1"] = sum(int(np.argmax(r) == np.argmax(s)) for r, s in zip(a2, b2)) / len(a2)
    return res


def assert_summary(line: str, a, b) -> None:
    got, want = parse_summary(line), independent_summary(a, b)
    assert got["err"] == pytest.approx(want["err"], rel=1e-3, abs=1e-12)
    assert got["rel"] == pytest.approx(want["rel"], rel=1e-3, abs=1e-12)
    assert got["cos"] == pytest.approx(want["cos"], abs=1e-6)
    assert got["top1"] == (None if want["top1"] is None else pytest.approx(want["top1"], abs=1e-3))


def cosine_loss(out, ref) -> float:
    a = np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in out])
    b = np.concatenate([np.asarray(r, np.float64).reshape(-1) for r in ref])
    return 1.0 - float(np.sum(a * b)) / math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))


# ------------------------------------------------------------------------------------------ parse_max_loss
@pytest.mark.parametrize("text,want", [
    ("top1=0.01", ("top1", 0.01)),
    ("cosine=0.5", ("cosine", 0.5)),
    ("accuracy=0.005", ("accuracy", 0.005)),
    ("  cosine =  0.25  ", ("cosine", 0.25)),          # whitespace around the kind and the value
    ("top1=0", ("top1", 0.0)),                          # 0 is a bound (nothing may change)
    ("accuracy=0.0", ("accuracy", 0.0)),
    ("cosine=3", ("cosine", 3.0)),                      # no upper limit
    ("top1=1e-3", ("top1", 0.001)),
    ("top1=-0", ("top1", 0.0)),                         # -0.0 >= 0: a zero bound
])
def test_parse_max_loss_accepts_every_kind(text, want):
    got = parse_max_loss(text)
    assert got == want and type(got) is tuple and type(got[1]) is float


def test_parse_max_loss_none_stays_none():
    assert parse_max_loss(None) is None


@pytest.mark.parametrize("text", [
    "top1",                 # no "="
    "top1 0.1",
    "top1=-0.1",            # negative
    "cosine=nan",
    "cosine=inf",
    "cosine=-inf",
    "accuracy=",            # empty value
    "top1=  ",
    "mse=0.1",              # unknown kind
    "=0.1",
    "Top1=0.1",             # kinds are case-sensitive
    "top-1=0.1",
    "top1==0.1",
    "top1=0.1=0.2",
    "top1=ten",
    "",
])
def test_parse_max_loss_refuses_with_the_text_and_the_kinds(text):
    with pytest.raises(VerifyError) as e:
        parse_max_loss(text)
    msg = str(e.value)
    assert msg == (f"cannot parse --max-loss {text!r}: expected KIND=VALUE with KIND one of {KINDS} and VALUE >= 0, "
                   "e.g. top1=0.01 (at most 1 % of items change their top-1 class)")
    assert isinstance(e.value, ValueError)


def test_parse_max_loss_takes_any_object_by_its_text():
    class Bound:
        def __str__(self):
            return "top1=0.2"
    assert parse_max_loss(Bound()) == ("top1", 0.2)


# ------------------------------------------------------------------------------------------------ compare
def test_compare_hand_worked_2d_class_vectors():
    a = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    b = np.array([[1, 2, 4], [4, 6, 5]], np.float32)
    rel, line = compare(a, b)
    # |a-b| max = 1; max |b| = 6; a.b = 93, |a|^2 = 91, |b|^2 = 98; row argmax [2, 2] vs [2, 1]
    assert rel == pytest.approx(1 / 6, rel=1e-12) and type(rel) is float
    cos = 93 / math.sqrt(91 * 98)
    assert line == f"max abs err 1.000e+00, max rel err 1.667e-01, cosine {cos:.6f}, top-1 agreement 0.500"
    assert parse_summary(line)["cos"] == pytest.approx(0.984803, abs=1e-6)


def test_compare_relative_error_is_over_max_abs_of_b():
    # err = 1; max |b| = 4 (not max b = 1, not max |a| = 3)
    rel, line = compare(np.array([1.0, -3.0]), np.array([1.0, -4.0]))
    assert rel == 0.25
    assert line.startswith("max abs err 1.000e+00, max rel err 2.500e-01, ")
    # a larger than b: the denominator is still b's
    rel, _ = compare(np.array([10.0, 0.0]), np.array([9.0, -2.0]))
    assert rel == pytest.approx(2 / 9, rel=1e-12)


def test_compare_top1_only_for_2d_with_more_than_one_column():
    a = np.array([[0, 1, 0], [1, 0, 0]], np.float64)      # row argmax [1, 0]; column argmax [1, 0, 0]
    b = np.array([[0, 1, 0], [0, 0, 1]], np.float64)      # row argmax [1, 2]; column argmax [0, 0, 1]
    assert compare(a, b)[1].endswith(", top-1 agreement 0.500")
    assert compare(a[:, :2], b[:, :2])[1].endswith(", top-1 agreement 1.000")              # C = 2
    assert "top-1" not in compare(a[:, :1], b[:, :1])[1]                                     # C = 1
    assert "top-1" not in compare(a.ravel(), b.ravel())[1]                                   # 1-D
    assert "top-1" not in compare(a[None], b[None])[1]                                       # 3-D
    assert "top-1" not in compare(a.reshape(2, 3, 1), b.reshape(2, 3, 1))[1]
    # 4 samples, 3 agree
    c = np.array([[3, 1], [0, 2], [5, 4], [1, 9]], np.float32)
    d = np.array([[2, 1], [1, 3], [0, 4], [0, 7]], np.float32)
    assert parse_summary(compare(c, d)[1])["top1"] == 0.75


def test_compare_numbers_match_an_independent_computation():
    r = np.random.default_rng(7)
    for shape in [(5, 4), (3,), (2, 3, 4), (6, 1)]:
        a = r.standard_normal(shape).astype(np.float32)
        b = (a + 0.1 * r.standard_normal(shape)).astype(np.float32)
        rel, line = compare(a, b)
        want = independent_summary(a, b)
        assert rel == pytest.approx(want["rel"], rel=1e-9)
        assert_summary(line, a, b)


def test_compare_zero_size_and_zero_arrays():
    e = np.zeros((0,), np.float32)
    assert compare(e, e) == (0.0, "max abs err 0.000e+00, max rel err 0.000e+00, cosine 0.000000")
    # b all zero: rel err is err / 1e-30, cosine 0 (not NaN)
    rel, line = compare(np.array([1.0, 2.0]), np.zeros(2))
    assert rel == pytest.approx(2e30, rel=1e-12)
    assert line == "max abs err 2.000e+00, max rel err 2.000e+30, cosine 0.000000"
    rel, line = compare(np.zeros(3), np.zeros(3))
    assert rel == 0.0 and line == "max abs err 0.000e+00, max rel err 0.000e+00, cosine 0.000000"


def test_compare_is_computed_in_float64():
    # in float32, a - b and a . b overflow to inf
    a = np.array([3e38, 1e38], np.float32)
    b = np.array([-3e38, 1e38], np.float32)
    rel, line = compare(a, b)
    assert rel == pytest.approx(2.0, rel=1e-6)
    assert parse_summary(line)["cos"] == pytest.approx(-0.8, abs=1e-6)     # (-9 + 1) / 10
    # unit vectors: the 1e-30 guard does not change the cosine
    u = np.array([0.6, 0.8])
    assert compare(u, u)[1].endswith("cosine 1.000000")
    assert compare(u, -u)[1].endswith("cosine -1.000000")


# ------------------------------------------------------------------------------------------------- losses
def test_losses_hand_worked_with_labels():
    out = [np.array([[1, 0, 0], [0, 2, 0]], np.float32)]      # argmax [0, 1]
    ref = [np.array([[1, 0, 0], [0, 0, 2]], np.float32)]      # argmax [0, 2]
    # a.b = 1, |a| = |b| = sqrt(5): cosine 1/5
    assert losses(out, ref) == {"cosine": pytest.approx(0.8, abs=1e-12), "top1": 0.5}
    got = losses(out, ref, np.array([0, 2]))                  # float right twice, compiled once
    assert got == {"cosine": pytest.approx(0.8, abs=1e-12), "top1": 0.5, "accuracy": 0.5}
    got = losses(out, ref, [0, 1])                            # compiled better than float: negative
    assert got["accuracy"] == -0.5
    assert losses(out, ref, np.array([1, 0]))["accuracy"] == 0.0
    assert all(type(v) is float for v in got.values())


def test_losses_labels_of_the_wrong_length_are_ignored():
    out = [np.array([[1, 0], [0, 1], [1, 0]], np.float32)]
    ref = [np.array([[1, 0], [1, 0], [1, 0]], np.float32)]
    assert set(losses(out, ref, np.array([0, 0]))) == {"cosine", "top1"}
    assert set(losses(out, ref, np.array([0, 0, 0, 0]))) == {"cosine", "top1"}
    # out argmax [0, 1, 0], ref argmax [0, 0, 0]
    assert losses(out, ref, np.array([0, 0, 1]))["accuracy"] == pytest.approx(2 / 3 - 1 / 3)
    assert losses(out, ref, np.array([0, 1, 0]))["accuracy"] == pytest.approx(2 / 3 - 1.0)
    assert losses(out, ref)["top1"] == pytest.approx(1 / 3)


def test_losses_top1_and_accuracy_only_for_class_vectors():
    r = np.random.default_rng(1)
    for shape in [(4,), (4, 1), (2, 3, 4), (1, 2, 3, 3)]:
        o, f = r.standard_normal(shape), r.standard_normal(shape)
        got = losses([o], [f], np.zeros(shape[0]))
        assert set(got) == {"cosine"}, shape
        assert got["cosine"] == pytest.approx(cosine_loss([o], [f]), abs=1e-12)
    # N != C, so that a column-wise argmax would give another answer
    o = np.array([[0, 5, 1], [2, 0, 1]], np.float64)          # rows [1, 0]; columns [1, 0, 0]
    f = np.array([[0, 5, 1], [0, 1, 2]], np.float64)          # rows [1, 2]; columns [1, 0, 1]
    assert losses([o], [f])["top1"] == 0.5


def test_losses_zero_vectors():
    z, v = np.zeros((2, 3)), np.array([[1.0, 0, 0], [0, 1, 0]])
    assert losses([z], [z])["cosine"] == 0.0          # both zero: identical
    assert losses([z], [v])["cosine"] == 1.0          # one zero: nothing in common
    assert losses([v], [z])["cosine"] == 1.0
    assert type(losses([z], [z])["cosine"]) is float
    assert losses([v], [v])["cosine"] == pytest.approx(0.0, abs=1e-15)
    assert losses([v], [-v])["cosine"] == pytest.approx(2.0, abs=1e-15)
    # norms below 1 are not zero: (0.3, 0.4) . (0.4, 0.3) = 0.24, norms 0.5 -> cosine 0.96
    assert losses([np.array([[0.3, 0.4]])], [np.array([[0.4, 0.3]])])["cosine"] == pytest.approx(0.04, abs=1e-12)
    assert losses([np.array([[3.0, 4.0]])], [np.array([[0.04, 0.03]])])["cosine"] == pytest.approx(0.04, abs=1e-12)


def test_losses_concatenate_outputs_for_cosine_top1_from_the_first():
    o1 = r1 = np.array([[1.0, 0.0], [0.0, 1.0]])              # first outputs agree: top1 loss 0
    o2, r2 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])   # second disagrees completely
    got = losses([o1, o2], [r1, r2], labels=np.array([0, 1]))
    # a = [1,0,0,1,1,0], b = [1,0,0,1,0,1]: a.b = 2, |a|^2 = |b|^2 = 3
    assert got["cosine"] == pytest.approx(1 / 3, abs=1e-12)
    assert got["top1"] == 0.0 and got["accuracy"] == 0.0
    got = losses([o2, o1], [r2, r1])
    assert got["top1"] == 1.0 and got["cosine"] == pytest.approx(1 / 3, abs=1e-12)
    # labels must match the first output's length, not the second's
    assert "accuracy" not in losses([o2, o1], [r2, r1], labels=np.array([0, 1]))


def test_losses_in_float64():
    big = [np.array([[3e38, 1e38]], np.float32)]
    assert losses(big, big)["cosine"] == pytest.approx(0.0, abs=1e-12)
    small = [np.array([[1e-30, 2e-30]], np.float32)]          # squares underflow in float32
    assert losses(small, small)["cosine"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------- is_exact
class _Spec:
    def __init__(self, lossless):
        self.lossless = lossless

    def adc_lossless(self):
        return self.lossless


def _pkg(lossless=True):
    return types.SimpleNamespace(spec=_Spec(lossless))


def test_is_exact_lossless_adc_and_ideal_devices():
    assert is_exact(_pkg()) == (True, "")
    assert is_exact(_pkg(), SimOptions()) == (True, "")
    assert is_exact(_pkg(), {}) == (True, "")
    # options that change what is computed but keep sim == golden
    assert is_exact(_pkg(), SimOptions(act_bits=4, force_bitserial=True, seed=3, chunk_elements=10)) == (True, "")


def test_is_exact_lossy_adc():
    assert is_exact(_pkg(False)) == (False, "the ADC is lossy")
    assert is_exact(_pkg(), SimOptions(adc_full_scale=100.0)) == (False, "the ADC is lossy")
    assert is_exact(_pkg(), {"adc_full_scale": 1e9}) == (False, "the ADC is lossy")
    # the ADC reason comes first
    assert is_exact(_pkg(False), SimOptions(conductance_sigma=0.1)) == (False, "the ADC is lossy")


def test_is_exact_with_a_real_spec():
    # default spec: 128 rows x (2**1 - 1) DAC x (2**2 - 1) cell = peak 384; 9 bits (511) resolve it, 8 (255) not
    assert CrossbarSpec().adc_bits == 9
    assert is_exact(types.SimpleNamespace(spec=CrossbarSpec())) == (True, "")
    assert is_exact(types.SimpleNamespace(spec=CrossbarSpec(adc_bits=8))) == (False, "the ADC is lossy")
    assert is_exact(types.SimpleNamespace(spec=CrossbarSpec(adc_bits=None))) == (True, "")


@pytest.mark.parametrize("opt", [{"conductance_sigma": 0.01}, {"stuck_at_min": 0.001}, {"stuck_at_max": 0.001},
                                 {"adc_offset": 0.5}, {"adc_offset": -0.25}])
def test_is_exact_each_device_non_ideality(opt):
    assert is_exact(_pkg(), SimOptions(**opt)) == (False, "device non-idealities are on")
    assert is_exact(_pkg(), opt) == (False, "device non-idealities are on")


def test_is_exact_refuses_bad_options():
    with pytest.raises(TypeError):
        is_exact(_pkg(), 3)
    with pytest.raises(ValueError, match="unknown simulator option"):
        is_exact(_pkg(), {"sigma": 1})


# ------------------------------------------------------------------------------- compiled packages (module)
@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    """small_cnn (conv1 and fc on PIM, a depthwise conv on the host) with a lossless ADC, saved and loaded;
    the same without float weights; a left-operand MatMul; a right MatMul with a 3-D output; a host-only model."""
    d = tmp_path_factory.mktemp("verify")
    opts = dict(preset="prime", rows=64, adc_bits="none", budget="avg-bits=4.5", bits="2-6")
    psq_tvm.compile(small_cnn(), output=d / "cnn.tar", **opts)
    return {
        "cnn": psq_tvm.load(d / "cnn.tar"),
        "nofloat": psq_tvm.compile(small_cnn(), float_weights=False, **opts),
        "left": psq_tvm.compile(matmul_model(left=True), budget="avg-bits=5", adc_bits="none"),
        "right": psq_tvm.compile(matmul_model(), budget="avg-bits=5", adc_bits="none"),
        "host": psq_tvm.compile(act_matmul_model(), adc_bits="none"),
        "left3": psq_tvm.compile(_left_batched_matmul(), budget="avg-bits=5", adc_bits="none"),
    }


def _left_batched_matmul():
    """Y[2, 5, 3] = C[5, 24] @ X[2, 24, 3]: a left operand with a batch dim."""
    c = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    return model([oh.make_node("MatMul", ["C", "x"], ["y"], name="mm_left3")], [vi("x", [2, 24, 3])],
                 [vi("y", None)], [onh.from_array(c, "C")])


@pytest.fixture(scope="module")
def x3():
    return np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)


@pytest.fixture
def drift(monkeypatch):
    """A simulator that drifts from the tables by a factor on the named layers."""
    real = simulator.run_layer

    def make(factor, names=("fc",)):
        def run_layer(x, layer, *a, **k):
            y = real(x, layer, *a, **k)
            return y * np.float32(factor) if layer["name"] in names else y
        monkeypatch.setattr(simulator, "run_layer", run_layer)
    return make


def test_the_fixture_packages(pkgs):
    cnn = pkgs["cnn"]
    assert cnn.spec.adc_bits is None and cnn.spec.adc_lossless()
    assert [l["name"] for l in cnn.layers] == ["conv1", "fc"]
    assert all(l["float_weight"] for l in cnn.layers) and not any(l["float_weight"] for l in pkgs["nofloat"].layers)
    assert all(np.abs(cnn.blob(l["bias_correction"])).max() > 1e-4 for l in cnn.layers)
    assert pkgs["left"].layers[0]["operand"] == "left"
    assert pkgs["host"].layers == []


# --------------------------------------------------------------------------------------------- layer_errors
def test_layer_errors_lossless_every_layer_matches_golden(pkgs, x3):
    errs = layer_errors(pkgs["cnn"], {"x": x3[:1]})
    assert [n for n, _, _ in errs] == ["conv1", "fc"]
    for name, rel, line in errs:
        assert 0 <= rel <= EXACT_RTOL, (name, rel)
        got = parse_summary(line)
        assert got["rel"] == pytest.approx(rel, rel=1e-3, abs=1e-12) and got["cos"] == pytest.approx(1.0, abs=1e-6)
    assert parse_summary(errs[0][2])["top1"] is None            # conv output [1, 16, 12, 12]
    assert parse_summary(errs[1][2])["top1"] == 1.0             # fc output [1, 10]


def test_layer_errors_see_the_layer_that_drifts_only(pkgs, x3, drift):
    drift(1.001, ("fc",))
    errs = dict((n, r) for n, r, _ in layer_errors(pkgs["cnn"], {"x": x3[:1]}))
    assert errs["conv1"] <= EXACT_RTOL
    assert errs["fc"] == pytest.approx(1e-3, rel=0.02)          # |y| 0.001 / max |g| with y ~ g
    drift(1.001, ("conv1",))                                    # fc gets conv1's drifted output as its input:
    errs = dict((n, r) for n, r, _ in layer_errors(pkgs["cnn"], {"x": x3[:1]}))
    assert errs["conv1"] == pytest.approx(1e-3, rel=0.02)       # golden runs fc on the same input, so fc matches
    assert errs["fc"] <= EXACT_RTOL


def test_layer_errors_include_the_bias_correction(pkgs, x3):
    """Golden with the bias only (no bias correction) would differ by the correction: the check uses both."""
    cnn = pkgs["cnn"]
    _, trace = cnn.run({"x": x3[:1]}, "sim", trace=True)
    fc = cnn.layers[1]
    lid, x, y = trace[1]
    assert lid == str(fc["id"])
    no_corr = simulator.golden_layer(x, fc, cnn.blob("crossbars"), cnn.spec, cnn.blob(fc["bias"]))
    assert np.abs(y - no_corr).max() > 1e-3                      # the correction is visible
    with_corr = simulator.golden_layer(x, fc, cnn.blob("crossbars"), cnn.spec,
                                       cnn.blob(fc["bias"]) + cnn.blob(fc["bias_correction"]))
    assert np.abs(y - with_corr).max() <= 1e-5 * np.abs(with_corr).max()
    assert layer_errors(cnn, {"x": x3[:1]})[1][1] <= EXACT_RTOL


def test_layer_errors_left_operand_transposes_in_and_out(pkgs):
    x = np.random.default_rng(3).standard_normal((24, 3)).astype(np.float32)
    (name, rel, line), = layer_errors(pkgs["left"], {"x": x})
    assert name == "mm_left" and rel <= EXACT_RTOL
    assert parse_summary(line)["top1"] == 1.0                   # output [5, 3]


def test_layer_errors_left_operand_with_a_batch_dim(pkgs):
    assert pkgs["left3"].layers[0]["operand"] == "left"
    x = np.random.default_rng(1).standard_normal((2, 24, 3)).astype(np.float32)
    (name, rel, line), = layer_errors(pkgs["left3"], {"x": x})
    assert name == "mm_left3" and rel <= EXACT_RTOL and parse_summary(line)["top1"] is None


def test_layer_errors_pass_the_sim_options(pkgs, x3):
    errs = layer_errors(pkgs["cnn"], {"x": x3[:1]}, SimOptions(conductance_sigma=0.05, seed=1))
    assert all(rel > 1e-3 for _, rel, _ in errs)
    errs = layer_errors(pkgs["cnn"], {"x": x3[:1]}, {"act_bits": 4})      # golden quantises the same way
    assert all(rel <= EXACT_RTOL for _, rel, _ in errs)


# ------------------------------------------------------------------------------------------- verify_package
def _outputs(pkg, x, mode, opts=None):
    """Whole-model outputs, sample by sample (independent of run_batched)."""
    b = pkg.manifest["inputs"][0]["shape"][0]
    return np.concatenate([pkg.run({"x": x[k:k + b]}, mode, opts)[0] for k in range(0, len(x), b)])


def test_verify_package_unbatched_lines(pkgs, x3):
    cnn = pkgs["cnn"]
    x = x3[:1]
    code, lines = verify_package(cnn, {"x": x}, False)
    assert code == 0
    s, g, f = (_outputs(cnn, x, m) for m in ("sim", "golden", "float"))
    assert lines[0] == FIRST_LINE.format(n=1)
    assert lines[1].startswith("  layer conv1                        sim vs golden: max abs err ")
    assert lines[2].startswith("  layer fc                           sim vs golden: max abs err ")
    assert [l.split(":")[0] for l in lines[3:6]] == ["  output_0 sim vs golden", "  output_0 sim vs float",
                                                      "  output_0 golden vs float"]
    assert lines[4].startswith("  output_0 sim vs float:  max abs err ")
    assert_summary(lines[3], s, g)
    assert_summary(lines[4], s, f)
    assert_summary(lines[5], g, f)
    m = re.fullmatch(r"verify: PASS sim vs golden \(lossless ADC: every PIM layer matches golden, max rel err "
                     r"(\S+) <= 1e-05\)", lines[6])
    assert m and 0 <= float(m.group(1)) <= EXACT_RTOL
    worst = max(r for _, r, _ in layer_errors(cnn, {"x": x}))
    assert m.group(1) == f"{worst:.2e}"
    cos = cosine_loss([s], [f])
    top1 = 1.0 - float(np.mean(s.argmax(1) == f.argmax(1)))
    assert cos > 0
    assert lines[7] == f"verify: sim vs float loss: cosine {cos:.4g}, top1 {top1:.4g}"
    assert len(lines) == 8


def test_verify_package_batched_every_sample_and_labels(pkgs, x3):
    cnn = pkgs["cnn"]
    labels = np.array([0, 1, 2])
    code, lines = verify_package(cnn, {"x": x3}, True, labels=labels)
    assert code == 0 and lines[0] == FIRST_LINE.format(n=3)
    s, g, f = (_outputs(cnn, x3, m) for m in ("sim", "golden", "float"))
    assert_summary(lines[3], s, g)
    assert_summary(lines[4], s, f)
    assert_summary(lines[5], g, f)
    # per-layer errors on the first batch: the same lines as unbatched on the first sample
    assert lines[1:3] == verify_package(cnn, {"x": x3[:1]}, False)[1][1:3]
    acc = float(np.mean(f.argmax(1) == labels)) - float(np.mean(s.argmax(1) == labels))
    cos = cosine_loss([s], [f])
    top1 = 1.0 - float(np.mean(s.argmax(1) == f.argmax(1)))
    assert lines[-1] == f"verify: sim vs float loss: accuracy {acc:.4g}, cosine {cos:.4g}, top1 {top1:.4g}"
    # labels of another length: no accuracy
    assert "accuracy" not in verify_package(cnn, {"x": x3}, True, labels=labels[:2])[1][-1]


def test_verify_package_batched_and_unbatched_agree(pkgs, x3):
    one = verify_package(pkgs["cnn"], {"x": x3[:1]}, False, max_loss="cosine=1")
    bat = verify_package(pkgs["cnn"], {"x": x3[:1]}, True, max_loss="cosine=1")
    assert one == bat and one[0] == 0


def test_verify_package_max_loss_pass_and_fail(pkgs, x3):
    cnn = pkgs["cnn"]
    s, f = _outputs(cnn, x3, "sim"), _outputs(cnn, x3, "float")
    cos = cosine_loss([s], [f])
    code, lines = verify_package(cnn, {"x": x3}, True, max_loss="cosine=0.5")
    assert code == 0 and lines[-1] == f"verify: PASS sim vs float: cosine loss {cos:.4g} <= --max-loss 0.5"
    code, lines = verify_package(cnn, {"x": x3}, True, max_loss="cosine=0.0001")
    assert code == EXIT_TOO_FAR_FROM_FLOAT == 4
    assert lines[-1] == (f"verify: FAIL sim vs float: cosine loss {cos:.4g} > --max-loss 0.0001 (exit code 4); "
                         "compile with a smaller reduction or --psq-budget auto")
    assert lines[-2].startswith("verify: sim vs float loss: ") and lines[-3].startswith("verify: PASS sim vs golden")
    code, lines = verify_package(cnn, {"x": x3}, True, max_loss="top1=0", labels=np.array([0, 1, 2]))
    top1 = 1.0 - float(np.mean(s.argmax(1) == f.argmax(1)))
    assert (code == 0) == (top1 == 0)
    code, lines = verify_package(cnn, {"x": x3}, True, max_loss="accuracy=1", labels=np.array([0, 1, 2]))
    assert code == 0 and lines[-1].startswith("verify: PASS sim vs float: accuracy loss ")


def test_verify_package_loss_bound_is_inclusive(pkgs, x3, monkeypatch):
    monkeypatch.setattr(V, "losses", lambda out, ref, labels=None: {"top1": 0.5, "cosine": 0.25})
    code, lines = verify_package(pkgs["cnn"], {"x": x3[:1]}, False, max_loss="cosine=0.25")
    assert code == 0 and lines[-1] == "verify: PASS sim vs float: cosine loss 0.25 <= --max-loss 0.25"
    assert lines[-2] == "verify: sim vs float loss: cosine 0.25, top1 0.5"          # sorted by kind
    code, lines = verify_package(pkgs["cnn"], {"x": x3[:1]}, False, max_loss="top1=0.4999")
    assert code == 4 and lines[-1].startswith("verify: FAIL sim vs float: top1 loss 0.5 > --max-loss 0.4999 ")


def test_verify_package_passes_outputs_and_labels_to_losses(pkgs, x3, monkeypatch):
    seen = {}

    def fake(out, ref, labels=None):
        seen.update(out=out, ref=ref, labels=labels)
        return {"cosine": 0.0}
    monkeypatch.setattr(V, "losses", fake)
    labels = np.array([2, 1, 0])
    verify_package(pkgs["cnn"], {"x": x3}, True, labels=labels)
    assert seen["labels"] is labels
    np.testing.assert_array_equal(seen["out"][0], _outputs(pkgs["cnn"], x3, "sim"))
    np.testing.assert_array_equal(seen["ref"][0], _outputs(pkgs["cnn"], x3, "float"))


def test_verify_package_exact_bound_on_the_worst_layer(pkgs, x3, monkeypatch):
    def with_layers(*rels):
        monkeypatch.setattr(V, "layer_errors", lambda *a, **k: [(f"l{i}", r, "x") for i, r in enumerate(rels)])
        return verify_package(pkgs["cnn"], {"x": x3[:1]}, False)

    code, lines = with_layers(0.0, EXACT_RTOL, 0.0)
    assert code == 0 and "verify: PASS sim vs golden (lossless ADC: every PIM layer matches golden, max rel err " \
                         "1.00e-05 <= 1e-05)" in lines
    code, lines = with_layers(0.0, 2e-5, 1e-6)
    assert code == EXIT_SIM_MISMATCH == 3
    assert ("verify: FAIL sim vs golden (lossless ADC, but a PIM layer differs from golden by max rel err 2.00e-05 "
            "> 1e-05)") in lines
    code, lines = with_layers(np.nextafter(EXACT_RTOL, 1.0))
    assert code == 3
    code, lines = with_layers()                                  # no PIM layer: nothing differs
    assert code == 0 and lines[-2].endswith("max rel err 0.00e+00 <= 1e-05)")


def test_verify_package_sim_mismatch_exit_3(pkgs, x3, drift):
    drift(1.001)
    code, lines = verify_package(pkgs["cnn"], {"x": x3}, True)
    assert code == EXIT_SIM_MISMATCH
    m = [re.fullmatch(r"verify: FAIL sim vs golden \(lossless ADC, but a PIM layer differs from golden by max rel "
                      r"err (\S+) > 1e-05\)", l) for l in lines]
    (hit,) = [x for x in m if x]
    assert float(hit.group(1)) == pytest.approx(1e-3, rel=0.02)
    assert not any("PASS sim vs golden" in l for l in lines)


def test_verify_package_mismatch_wins_over_loss(pkgs, x3, drift):
    drift(1.001)
    code, lines = verify_package(pkgs["cnn"], {"x": x3}, True, max_loss="cosine=0")
    assert code == EXIT_SIM_MISMATCH
    assert any(l.startswith("verify: FAIL sim vs golden") for l in lines)
    assert lines[-1].startswith("verify: FAIL sim vs float: cosine loss ") and "(exit code 4)" in lines[-1]


def test_verify_package_not_exact_by_design(pkgs, x3, drift):
    cnn = pkgs["cnn"]
    for opts, why in [(SimOptions(conductance_sigma=0.05), "device non-idealities are on"),
                      ({"adc_offset": 0.5}, "device non-idealities are on"),
                      (SimOptions(adc_full_scale=200.0), "the ADC is lossy")]:
        code, lines = verify_package(cnn, {"x": x3[:1]}, False, opts)
        assert code == 0
        assert (f"verify: sim is not exact by design ({why}); errors above are the hardware model's cost") in lines
        assert not any(l.startswith(("verify: PASS sim vs golden", "verify: FAIL sim vs golden")) for l in lines)
    # the noisy sim really differs, and its outputs are the ones compared
    code, lines = verify_package(cnn, {"x": x3[:1]}, False, SimOptions(conductance_sigma=0.05))
    opts = SimOptions(conductance_sigma=0.05)
    assert_summary(lines[4], _outputs(cnn, x3[:1], "sim", opts), _outputs(cnn, x3[:1], "float"))
    assert parse_summary(lines[1])["rel"] > 1e-3
    drift(1.001)                                                 # a drift on a lossy run is no mismatch
    assert verify_package(cnn, {"x": x3[:1]}, False, {"stuck_at_max": 0.01})[0] == 0


def test_verify_package_without_float_weights(pkgs, x3):
    nf = pkgs["nofloat"]
    with pytest.raises(VerifyError) as e:
        verify_package(nf, {"x": x3}, True, max_loss="top1=0.1")
    assert str(e.value) == ("--max-loss needs the float weights, but this package was compiled with "
                            "--no-float-weights")
    for x, batched in [(x3, True), (x3[:1], False)]:
        code, lines = verify_package(nf, {"x": x}, batched)
        assert code == 0 and len(lines) == 5 and lines[0] == FIRST_LINE.format(n=len(x))
        assert not any("float" in l for l in lines[1:])
        assert lines[3].startswith("  output_0 sim vs golden: ") and lines[4].startswith("verify: PASS sim vs golden")


def test_verify_package_bound_that_cannot_be_measured(pkgs, x3):
    with pytest.raises(VerifyError) as e:
        verify_package(pkgs["cnn"], {"x": x3}, True, max_loss="accuracy=0.01")
    assert str(e.value) == "--max-loss accuracy cannot be measured here: accuracy needs labels in the inputs file"
    with pytest.raises(VerifyError) as e:                       # labels of the wrong length: the same
        verify_package(pkgs["cnn"], {"x": x3}, True, max_loss="accuracy=0.01", labels=np.array([0]))
    assert "accuracy needs labels" in str(e.value)
    xr = np.random.default_rng(3).standard_normal((1, 3, 24)).astype(np.float32)
    with pytest.raises(VerifyError) as e:                       # output [1, 3, 10]: no class vector
        verify_package(pkgs["right"], {"x": xr}, False, max_loss="top1=0.01")
    assert str(e.value) == "--max-loss top1 cannot be measured here: the first output is not a class vector [N, C]"
    code, lines = verify_package(pkgs["right"], {"x": xr}, False, max_loss="cosine=1")
    assert code == 0 and lines[-2].startswith("verify: sim vs float loss: cosine ") and "top1" not in lines[-2]
    with pytest.raises(VerifyError, match="cannot parse --max-loss 'cos=1'"):
        verify_package(pkgs["cnn"], {"x": x3}, True, max_loss="cos=1")


def test_verify_package_left_operand_and_host_only(pkgs):
    x = np.random.default_rng(3).standard_normal((24, 3)).astype(np.float32)
    code, lines = verify_package(pkgs["left"], {"x": x}, False)
    assert code == 0 and lines[0] == FIRST_LINE.format(n=24)
    assert lines[1].startswith("  layer mm_left ") and any(l.startswith("verify: PASS sim vs golden") for l in lines)
    # no PIM layer at all: nothing to compare per layer, float still there (x @ x^T computed on the host)
    h = np.arange(24, dtype=np.float32).reshape(4, 6) / 10
    code, lines = verify_package(pkgs["host"], {"x": h}, False)
    assert code == 0 and lines[0] == FIRST_LINE.format(n=4)
    assert lines[1].startswith("  output_0 sim vs golden: max abs err 0.000e+00")
    assert lines[-2].endswith("max rel err 0.00e+00 <= 1e-05)")
    m = re.fullmatch(r"verify: sim vs float loss: cosine (\S+), top1 0", lines[-1])
    assert m and abs(float(m.group(1))) < 1e-12


def test_a_corrupted_cell_is_followed_by_sim_and_golden_alike(pkgs, x3):
    """verify checks the simulator against the tables: a damaged cell changes both (PASS) -- and shows
    in the loss against float."""
    cnn = pkgs["cnn"]
    cells = cnn.blob("crossbars").copy()
    k = tuple(np.argwhere(cells > 0)[0])
    cells[k] = 0
    bad = Package(cnn.manifest, {**cnn.blobs, "crossbars": cells}, cnn.host_library)
    code, lines = verify_package(bad, {"x": x3[:1]}, False)
    assert code == 0 and any(l.startswith("verify: PASS sim vs golden") for l in lines)
    assert lines[-1] != verify_package(cnn, {"x": x3[:1]}, False)[1][-1]


@pytest.mark.parametrize("batched", [False, True])
def test_verify_package_runs_sim_and_golden_with_the_options(pkgs, x3, batched):
    """act_bits keeps sim == golden (both quantise the activations to 4 bits) and changes both outputs;
    the device noise reaches the whole-model sim outputs too."""
    cnn = pkgs["cnn"]
    x = x3 if batched else x3[:1]
    opts = SimOptions(act_bits=4)
    code, lines = verify_package(cnn, {"x": x}, batched, opts)
    assert code == 0 and lines[-2].startswith("verify: PASS sim vs golden")
    s, g, f = _outputs(cnn, x, "sim", opts), _outputs(cnn, x, "golden", opts), _outputs(cnn, x, "float")
    assert np.abs(s - _outputs(cnn, x, "sim")).max() > 1e-3      # 4 bits is not the spec's 6
    assert_summary(lines[3], s, g)
    assert_summary(lines[4], s, f)
    assert_summary(lines[5], g, f)
    opts = SimOptions(conductance_sigma=0.05, seed=2)
    code, lines = verify_package(cnn, {"x": x}, batched, opts)
    s, g = _outputs(cnn, x, "sim", opts), _outputs(cnn, x, "golden")
    assert_summary(lines[3], s, g)
    assert_summary(lines[4], s, f)
    assert lines[-1] == f"verify: sim vs float loss: cosine {cosine_loss([s], [f]):.4g}, " \
                        f"top1 {1.0 - float(np.mean(s.argmax(1) == f.argmax(1))):.4g}"
