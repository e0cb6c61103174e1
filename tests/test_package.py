"""Package format: manifest contract, round trip, checksums/version refusal, atomic and deterministic writes."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

pytest.importorskip("tvm")

import psq_tvm  # noqa: E402
from psq_tvm.core.crossbar import CrossbarSpec, preset  # noqa: E402
from psq_tvm.runtime.package import FORMAT, VERSION, PackageError, load  # noqa: E402
from psq_tvm.runtime.session import dequantized_weight  # noqa: E402
from psq_tvm.core.tables import decode_tile  # noqa: E402

from test_onnx_models import small_cnn  # noqa: E402

LAYER_KEYS = {"id", "name", "op", "weight_shape", "matrix_shape", "groups", "strides", "padding", "dilation",
              "bias", "tiles"}
TILE_KEYS = {"id", "group", "row0", "col0", "nrows", "ncols", "bits", "scale", "slices", "crossbars", "row_off",
             "col_off"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkg")
    spec = preset("isaac", rows=32, cols=32)
    pkg = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4", emit_c_header=True)
    path = pkg.save(d / "m.tar")
    return pkg, path


def _rewrite(src, dst, edit):
    """Copy a tar, passing every member's bytes through edit(name, data)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = edit(m.name, tin.extractfile(m).read())
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_manifest_contract(built):
    pkg, path = built
    man = load(path).manifest
    assert man["format"] == FORMAT == "psq-tvm-package" and man["version"] == VERSION == 1
    assert CrossbarSpec.from_dict(man["spec"]).rows == 32
    cb = man["blobs"]["crossbars"]
    assert cb["dtype"] == "uint8" and cb["byte_order"] == "little" and len(cb["sha256"]) == 64
    assert cb["shape"][1:] == [32, 32] and cb["shape"][0] == man["report"]["crossbars"]["psq"]
    assert [h["name"] for h in man["host_layers"]] == ["dw"] and man["host_layers"][0]["reason"]
    for lay in man["layers"]:
        assert LAYER_KEYS <= set(lay)
        assert lay["op"] in ("conv2d", "dense")
        if lay["bias"] is not None:
            b = man["blobs"][lay["bias"]]
            assert b["dtype"] == "float32" and b["shape"] == [lay["matrix_shape"][1] * lay["groups"]]
        for t in lay["tiles"]:
            assert TILE_KEYS <= set(t)
            assert np.asarray(t["crossbars"]).shape == (t["slices"], 1)   # offset encoding: one polarity
    rep = man["report"]
    assert {"crossbars", "reduction_vs_uniform16", "reduction_vs_uniform8", "avg_bits", "pim_layers",
            "host_layers"} <= set(rep)


def test_round_trip_cells_decode_to_search_result(built):
    pkg, path = built
    back = load(path)
    cells = back.blob("crossbars")
    np.testing.assert_array_equal(cells, pkg.blob("crossbars"))
    spec = back.spec
    for li, lay in enumerate(back.layers):
        # weights decoded from the stored cells == scale * levels, within each tile's quantisation step
        w = back.blob(lay["float_weight"])
        wq = dequantized_weight(lay, cells, spec)
        assert wq.shape == tuple(lay["weight_shape"])
        for t in lay["tiles"]:
            ids = np.asarray(t["crossbars"])
            r, c, nr, nc = t["row_off"], t["col_off"], t["nrows"], t["ncols"]
            q = decode_tile(cells[ids.ravel(), r:r + nr, c:c + nc].reshape(ids.shape + (nr, nc)), t["bits"],
                            spec.encoding, spec.cell_bits)
            assert np.abs(q).max() <= 2 ** (t["bits"] - 1) - 1
        # exactly the search's fake-quantised weight (float32 rounding of scale * q aside)
        np.testing.assert_allclose(wq, pkg.quant_result.dequantized(li), rtol=1e-6, atol=1e-7)
        assert np.abs(wq - w).max() < 0.5 * np.abs(w).max()
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_array_equal(back.run({"x": x}, "fake-quant")[0], pkg.run({"x": x}, "fake-quant")[0])


def test_checksum_refusal(built, tmp_path):
    _, path = built
    bad = tmp_path / "bad.tar"

    def flip(name, data):
        if name == "crossbars.bin":
            data = bytearray(data)
            data[len(data) // 2] ^= 1
            data = bytes(data)
        return data
    _rewrite(path, bad, flip)
    with pytest.raises(PackageError, match="checksum mismatch for blob 'crossbars'"):
        load(bad)


def test_version_and_foreign_refusal(built, tmp_path):
    _, path = built
    newer = tmp_path / "v2.tar"

    def bump(name, data):
        if name == "manifest.json":
            m = json.loads(data)
            m["version"] = 2
            data = json.dumps(m).encode()
        return data
    _rewrite(path, newer, bump)
    with pytest.raises(PackageError, match="version 2"):
        load(newer)
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(foreign, "w") as t:
        data = b'{"format": "something-else"}'
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with pytest.raises(PackageError, match="not a psq-tvm package"):
        load(foreign)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PackageError, match="not a readable"):
        load(junk)
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(open(path, "rb").read()[:3000])
    with pytest.raises(PackageError):
        load(trunc)


def test_deterministic_bytes(tmp_path):
    a = psq_tvm.compile(small_cnn(), budget="avg-bits=4").save(tmp_path / "a.tar")
    b = psq_tvm.compile(small_cnn(), budget="avg-bits=4").save(tmp_path / "b.tar")

    def members(p):
        with tarfile.open(p) as t:
            return {m.name: (m.mtime, m.uid, m.gid, m.mode, t.extractfile(m).read()) for m in t.getmembers()}
    ma, mb = members(a), members(b)
    assert sorted(ma) == sorted(mb) and list(ma) == sorted(ma)          # sorted member order
    assert {v[0] for v in ma.values()} == {0}                           # fixed mtime
    diff = [k for k in ma if ma[k] != mb[k]]
    assert diff in ([], ["timing.json"])      # only the measured durations may differ


def test_atomic_write_leaves_nothing_on_failure(built, tmp_path, monkeypatch):
    pkg, _ = built
    out = tmp_path / "out.tar"

    def boom(*a, **k):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(tarfile.TarFile, "addfile", boom)
    with pytest.raises(OSError):
        pkg.save(out)
    assert os.listdir(tmp_path) == []


def test_c_header(built):
    pkg, path = built
    src = pkg.c_sources                               # emit_c_header=True: in memory, not a package member
    h, c = src["pim_psq_tables.h"].decode(), src["pim_psq_tables.c"].decode()
    assert "#define PIM_PSQ_ROWS 32u" in h and "extern const pim_psq_tile_t pim_psq_tiles[" in h
    assert "pim_psq_cells[" in c and "pim_psq_tables.h" not in load(path).extras
    n_tiles = sum(len(l["tiles"]) for l in pkg.layers)
    assert f"#define PIM_PSQ_N_TILES {n_tiles}u" in h


def test_per_column_scales_roundtrip_and_sim_exact(tmp_path):
    """Per-column scales survive the manifest, decode to the searched weights, and the simulator stays exact."""
    from psq_tvm.runtime.simulator import golden_layer, run_layer
    spec = preset("isaac", rows=32, cols=32, adc_bits=None)
    pkg = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4", granularity="column")
    back = load(pkg.save(tmp_path / "col.tar"))
    res = pkg.quant_result
    assert res.per_column and back.manifest["search"]["granularity"] == "column"
    cells = back.blob("crossbars")
    rng = np.random.default_rng(0)
    for li, lay in enumerate(back.layers):
        for t in lay["tiles"]:
            assert isinstance(t["scale"], list) and len(t["scale"]) == t["ncols"]
        np.testing.assert_allclose(dequantized_weight(lay, cells, back.spec), res.dequantized(li), rtol=1e-6)
        shape = [2, lay["weight_shape"][1] * lay["groups"], 7, 7] if lay["op"] == "conv2d" \
            else [3, lay["matrix_shape"][0]]
        x = rng.normal(size=shape).astype(np.float32)
        y, g = run_layer(x, lay, cells, back.spec), golden_layer(x, lay, cells, back.spec)
        np.testing.assert_allclose(y, g, rtol=1e-5, atol=1e-6 * np.abs(g).max())


def test_synthetic_sensitivity_compiles_deterministically(tmp_path):
    from psq_tvm.targets.input_stats import synthetic_input_moments
    spec = preset("isaac", rows=32, cols=32)
    a = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4", sensitivity="synthetic")
    b = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4", sensitivity="synthetic")
    assert a.manifest["search"]["sensitivity"] == "synthetic"
    assert a.quant_result.avg_bits <= 4
    assert a.blob("crossbars").tobytes() == b.blob("crossbars").tobytes()
    ms = synthetic_input_moments(a)
    assert len(ms) == len(a.layers) and all(m is not None and np.all(np.isfinite(m)) and np.all(m >= 0) for m in ms)
    for m, lay in zip(ms, a.layers):
        cin = lay["weight_shape"][1] * lay["groups"] if lay["op"] == "conv2d" else lay["matrix_shape"][0]
        assert m.shape == (cin,)
    # the stored tables are the re-searched ones, and they still decode to the result's weights
    cells = a.blob("crossbars")
    for li, lay in enumerate(a.layers):
        np.testing.assert_allclose(dequantized_weight(lay, cells, a.spec), a.quant_result.dequantized(li), rtol=1e-6)


@pytest.mark.parametrize("fold", [True, False])
def test_synthetic_sensitivity_with_batchnorm(fold):
    """Sensitivity weights are finite, positive and deterministic on a conv -> BatchNorm -> conv model,
    whether the BatchNorm is folded into the conv (default) or kept on the host."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from psq_tvm.core.sensitivity import input_weighted_importance
    from psq_tvm.targets.input_stats import synthetic_input_moments
    from test_onnx_models import model, vi

    r = np.random.default_rng(11)
    inits = [nh.from_array(r.standard_normal((8, 3, 3, 3)).astype(np.float32), "W1"),
             nh.from_array(r.standard_normal((6, 8, 3, 3)).astype(np.float32), "W2")]
    for name, v in (("g", r.uniform(0.1, 5, 8)), ("b", r.standard_normal(8)), ("m", r.standard_normal(8)),
                    ("v", r.uniform(0.5, 2, 8))):
        inits.append(nh.from_array(v.astype(np.float32), name))
    nodes = [h.make_node("Conv", ["x", "W1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn", epsilon=1e-3),
             h.make_node("Relu", ["n"], ["a"], name="relu"),
             h.make_node("Conv", ["a", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    m = model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", [2, 6, 6, 6])], inits)
    spec = preset("isaac", rows=32, cols=32)
    pkgs = [psq_tvm.compile(m, spec=spec, budget="avg-bits=4", sensitivity="synthetic", fold_batchnorm=fold)
            for _ in range(2)]
    ms = synthetic_input_moments(pkgs[0])
    assert [x.shape for x in ms] == [(3,), (8,)]
    assert all(np.all(np.isfinite(x)) and np.all(x >= 0) for x in ms)
    imp = input_weighted_importance(pkgs[0].quant_result.tiles, ms)
    assert np.all(np.isfinite(imp)) and np.all(imp > 0)
    assert not np.allclose(imp, 1.0)                 # the BN'd, ReLU'd input of conv2 is not white
    np.testing.assert_array_equal(imp, input_weighted_importance(pkgs[1].quant_result.tiles,
                                                                 synthetic_input_moments(pkgs[1])))
    assert pkgs[0].blob("crossbars").tobytes() == pkgs[1].blob("crossbars").tobytes()


def test_output_sensitivity_finite_deterministic_no_leak():
    """Synthetic output sensitivity (eval option): one finite positive factor per PIM layer, geometric
    mean 1, the same on a second call."""
    from psq_tvm.targets.input_stats import output_sensitivity
    spec = preset("isaac", rows=32, cols=32)
    pkg = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=3")
    a = output_sensitivity(pkg, pkg.quant_result)
    b = output_sensitivity(pkg, pkg.quant_result)
    assert a.shape == (len(pkg.layers),) and np.all(np.isfinite(a)) and np.all(a > 0)
    np.testing.assert_allclose(np.exp(np.log(a).mean()), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(a, b)
    # the probe must not leak into later float runs
    x = np.random.default_rng(0).standard_normal(pkg.manifest["inputs"][0]["shape"]).astype(np.float32)
    y1 = pkg.run([x], "float")[0]
    fresh = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=3")
    np.testing.assert_array_equal(y1, fresh.run([x], "float")[0])


def test_bias_correction_cancels_mean_shift_on_its_inputs(tmp_path):
    """With --psq-bias-correction synthetic every PIM layer's mean output shift (quantised minus float
    weights, same inputs: the synthetic ones the correction was computed from) is cancelled to float
    precision, including padded convs; float mode is unchanged; the package round-trips."""
    from psq_tvm.runtime.session import Session
    from psq_tvm.targets.input_stats import SYNTHETIC_SAMPLES, synthetic_feeds

    spec = preset("isaac", rows=32, cols=32)
    plain = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=3", bias_correction="none")
    bc = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=3", bias_correction="synthetic")
    assert bc.manifest["search"]["bias_correction"] == "synthetic"
    assert all(l["bias_correction"] == f"bias_correction_{l['id']}" for l in bc.layers)
    assert bc.blob("crossbars").tobytes() == plain.blob("crossbars").tobytes()   # same tables, new biases
    feeds = synthetic_feeds(bc, SYNTHETIC_SAMPLES, 0)
    for li, lay in enumerate(bc.layers):
        shift = {"plain": [], "bc": []}
        for f in feeds:
            _, tr = bc.run(f, "float", trace=True)
            lid, x, y = tr[li]
            for name, pkg in (("plain", plain), ("bc", bc)):
                with Session(pkg, "fake-quant") as s:
                    d = s.run_layer(lid, x).astype(np.float64) - y
                shift[name].append(d.mean(axis=(0, 2, 3)) if d.ndim == 4 else d.reshape(-1, d.shape[-1]).mean(0))
        before, after = (np.abs(np.mean(shift[k], axis=0)).max() for k in ("plain", "bc"))
        scale = np.abs(y).max()
        assert before > 1e-4 * scale, (lay["name"], before)
        assert after < 1e-5 * scale, (lay["name"], after, before)
    x = np.random.default_rng(3).standard_normal(bc.manifest["inputs"][0]["shape"]).astype(np.float32)
    np.testing.assert_array_equal(bc.run([x], "float")[0], plain.run([x], "float")[0])
    assert not np.array_equal(bc.run([x], "fake-quant")[0], plain.run([x], "fake-quant")[0])
    for mode in ("sim", "fake-quant"):                    # the crossbar modes add the correction
        with Session(bc, mode) as s:
            for lay in bc.layers:
                want = bc.blob(lay["bias_correction"]) + (0 if lay["bias"] is None else bc.blob(lay["bias"]))
                np.testing.assert_array_equal(s.bias(lay), want.astype(np.float32))
    assert not np.array_equal(bc.run([x], "sim")[0], plain.run([x], "sim")[0])
    p = bc.save(tmp_path / "bc.tar")
    back = psq_tvm.load(p)
    assert back.layers[0]["bias_correction"] == bc.layers[0]["bias_correction"]
    np.testing.assert_array_equal(back.run([x], "fake-quant")[0], bc.run([x], "fake-quant")[0])
    again = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=3", bias_correction="synthetic")
    for lay in bc.layers:
        assert bc.blob(lay["bias_correction"]).tobytes() == again.blob(lay["bias_correction"]).tobytes()


def test_bias_correction_without_float_weights_and_bad_value():
    spec = preset("isaac", rows=32, cols=32)
    pkg = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=3", bias_correction="synthetic",
                          float_weights=False)
    assert all(l["float_weight"] is None and l["bias_correction"] for l in pkg.layers)
    assert not any(n.startswith("weight_") for n in pkg.blobs)
    with pytest.raises(ValueError, match="bias correction"):
        psq_tvm.compile(small_cnn(), spec=spec, bias_correction="calibration")
