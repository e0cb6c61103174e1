"""Calibrated ADC ranges: the full-scale choice, the bitline-sum histograms, the simulator reading stored full
scales, and the compile stage that stores them and warns."""

from __future__ import annotations

import numpy as np
import pytest

from psq_tvm import Layer, preset
from psq_tvm.core.adc_range import calibrated_full_scale, read_error
from psq_tvm.core.tables import crossbar_cells, decode_tile
from psq_tvm.runtime.simulator import SimError, SimOptions, compile_layer, golden_layer, layer_program, run_layer
from psq_tvm.runtime.simulator import quantize_activations

from test_simulator import hand_case, random_result


# ------------------------------------------------------------------ the choice of full scale
def test_read_error_matches_sampled_adc():
    """read_error over a histogram equals the squared error of explicit reads of the samples."""
    rng = np.random.default_rng(0)
    v = rng.poisson(40, size=5000)
    hist = np.bincount(v).astype(float)
    for fs, bits in ((63.0, 6), (100.0, 6), (37.5, 3), (500.0, 4)):
        top = 2 ** bits - 1
        d = fs / top
        reads = d * np.clip(np.rint(v / d), 0, top)
        assert read_error(hist, fs, bits) == pytest.approx(float(((reads - v) ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("seed,bits", [(1, 6), (2, 4), (3, 3), (4, 6)])
def test_calibrated_full_scale_near_the_brute_force_optimum(seed, bits):
    """Within 2 % of the error of the best full scale found by trying every value on a fine grid."""
    rng = np.random.default_rng(seed)
    peak = 3000
    v = np.minimum(rng.gamma(2.0, rng.uniform(20, 200), size=20000).astype(int), peak)
    hist = np.bincount(v, minlength=peak + 1).astype(float) * rng.uniform(0.5, 2.0)
    top = 2 ** bits - 1
    fs = calibrated_full_scale(hist, bits, peak, rule="mse")
    assert top <= fs <= peak
    brute = min(read_error(hist, f, bits) for f in np.arange(top, peak + 1, 0.5))
    assert read_error(hist, fs, bits) <= 1.02 * brute
    # far better than the worst case on sums that are a small fraction of it
    assert read_error(hist, fs, bits) < 0.5 * read_error(hist, peak, bits)


def test_max_rule_is_the_largest_sum_seen():
    """The default rule: the largest sum with nonzero weight, within [2**n - 1, peak]."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        v = rng.integers(0, rng.integers(1, 3000), size=rng.integers(1, 50))
        hist = np.zeros(4000)
        np.add.at(hist, v, rng.uniform(0.1, 4.0, size=v.size))
        want = min(max(int(v.max()), 63), 2000)
        assert calibrated_full_scale(hist, 6, 2000) == want
    with pytest.raises(ValueError, match="rule"):
        calibrated_full_scale(np.ones(3), 6, 100, rule="p99")


def test_calibrated_full_scale_edge_cases():
    assert calibrated_full_scale(np.zeros(0), 6, 1000) == 1000.0          # nothing seen: the worst case
    h = np.zeros(50)
    h[[3, 10, 40]] = 1.0
    assert calibrated_full_scale(h, 6, 1000) == 63.0                       # all sums exact with delta = 1
    big = np.zeros(2001)
    big[2000] = 1.0
    assert calibrated_full_scale(big, 6, 1000) <= 1000.0                   # never above the worst case


# ------------------------------------------------------------------ histograms of the bitline sums
def brute_reads(x, prog, cells, spec):
    """Per (tile id, slice, polarity): list of (cycle j, bitline sum) of every read, by explicit loops."""
    q, _s, o_x = quantize_activations(x, spec.act_bits)
    u = q.astype(np.int64) + o_x
    d, J = spec.dac_bits, -(-spec.act_bits // spec.dac_bits)
    out = {}
    for t in prog["tiles"]:
        xs = u[:, t["row0"]:t["row0"] + t["nrows"]]
        for k in range(t["slices"]):
            for p in range(spec.polarities):
                g = cells[t["crossbars"][k][p], t["row_off"]:t["row_off"] + t["nrows"],
                          t["col_off"]:t["col_off"] + t["ncols"]].astype(np.int64)
                out[(t["id"], k, p)] = [(j, ((xs >> (j * d)) & ((1 << d) - 1)) @ g) for j in range(J)]
    return out


@pytest.mark.parametrize("name,signed", [("prime", False), ("puma", True), ("mnsim", False)])
def test_read_histograms_equal_brute_force(name, signed):
    rng = np.random.default_rng(5)
    spec = preset(name, rows=16, cols=8)
    res = random_result([Layer("fc", rng.standard_normal((37, 19)).astype(np.float32))], spec, rng)
    cells = crossbar_cells(res)
    prog = layer_program(res, 0)
    x = rng.standard_normal((11, 37)).astype(np.float32)
    x = x if signed else np.abs(x)
    got = compile_layer(prog, cells, spec).read_histograms(x)
    ref = brute_reads(x, prog, cells, spec)
    assert len(got) == len(ref)
    for t, k, p, h in got:
        want = np.zeros(1)
        for j, v in ref[(t["id"], k, p)]:
            b = np.bincount(v.ravel()) * 4.0 ** (j * spec.dac_bits)
            want = np.pad(want, (0, max(0, b.size - want.size)))
            want[:b.size] += b
        n = max(want.size, h.size)
        np.testing.assert_array_equal(np.pad(h, (0, n - h.size)), np.pad(want, (0, n - want.size)))
    # per column: one histogram per tile column, summing to the crossbar's
    for (t, k, p, h), (_t, _k, _p, hs) in zip(got, compile_layer(prog, cells, spec).read_histograms(x, per_column=True)):
        assert len(hs) == t["ncols"]
        tot = np.zeros(max(len(c) for c in hs))
        for c in hs:
            tot[:c.size] += c
        np.testing.assert_array_equal(tot[:h.size], h)
        assert not tot[h.size:].any()


# ------------------------------------------------------------------ the simulator reads stored full scales
def test_stored_full_scales_hand_computed():
    """hand_case with x = [3, 3, 1, 3]: planes j0 [1,1,1,1], j1 [1,1,0,1]; + reads 6, 4; - reads 1, 1; exact 11.
    2-bit ADC (top 3).  [[6, 3]]: + delta 2 -> codes 3, 2 -> (3 + 2*2)*2 = 14; - delta 1 -> 1 + 2 = 3; y = 11.
    [[3, 6]]: + delta 1 -> 6, 4 clip to 3 -> 3 + 2*3 = 9; - delta 2 -> rint(0.5) = 0 twice -> 0; y = 9."""
    spec, cells, prog, _ = hand_case(adc_bits=2)
    x = np.array([[3.0, 3.0, 1.0, 3.0]])
    assert golden_layer(x, prog, cells, spec)[0, 0] == 11.0
    for fs, want in (([[6.0, 3.0]], 11.0), ([[3.0, 6.0]], 9.0)):
        p = {**prog, "tiles": [{**prog["tiles"][0], "adc_full_scale": fs}]}
        assert run_layer(x, p, cells, spec)[0, 0] == pytest.approx(want, rel=1e-6)
        # a forced full scale for every read still wins: 12 -> delta 4: + codes 2, 1 -> 16; - codes 0 -> 16
        assert run_layer(x, p, cells, spec, options=SimOptions(adc_full_scale=12.0))[0, 0] == pytest.approx(16.0)
        # per-column form, same values
        pc = {**prog, "tiles": [{**prog["tiles"][0], "adc_full_scale": [[[fs[0][0]], [fs[0][1]]]]}]}
        assert run_layer(x, pc, cells, spec)[0, 0] == pytest.approx(want, rel=1e-6)
    # lossless spec: stored full scales are ignored
    p = {**prog, "tiles": [{**prog["tiles"][0], "adc_full_scale": [[3.0, 6.0]]}]}
    assert run_layer(x, p, cells, spec.replace(adc_bits=None))[0, 0] == 11.0
    with pytest.raises(SimError, match="adc_full_scale"):
        run_layer(x, {**prog, "tiles": [{**prog["tiles"][0], "adc_full_scale": [[3.0]]}]}, cells, spec)
    with pytest.raises(SimError, match="adc_full_scale"):
        run_layer(x, {**prog, "tiles": [{**prog["tiles"][0], "adc_full_scale": [[3.0, -1.0]]}]}, cells, spec)


def brute_sim(x, prog, cells, spec):
    """Explicit per-read ADC with each crossbar's stored full scale (dense layer), float64."""
    q, s_x, o_x = quantize_activations(x, spec.act_bits)
    u = q.astype(np.int64) + o_x
    d, c, J = spec.dac_bits, spec.cell_bits, -(-spec.act_bits // spec.dac_bits)
    top = 2 ** spec.adc_bits - 1
    y = np.zeros((x.shape[0], prog["matrix_shape"][1]))
    for t in prog["tiles"]:
        xs = u[:, t["row0"]:t["row0"] + t["nrows"]]
        acc = np.zeros((x.shape[0], t["ncols"]))
        for k in range(t["slices"]):
            for p in range(spec.polarities):
                g = cells[t["crossbars"][k][p], t["row_off"]:t["row_off"] + t["nrows"],
                          t["col_off"]:t["col_off"] + t["ncols"]].astype(np.int64)
                delta = t["adc_full_scale"][k][p] / top
                for j in range(J):
                    v = ((xs >> (j * d)) & ((1 << d) - 1)) @ g
                    read = delta * np.clip(np.rint(v / delta), 0, top)
                    acc += (-1 if p else 1) * 2.0 ** (j * d + k * c) * read
        blk = cells[np.asarray(t["crossbars"]).ravel(), t["row_off"]:t["row_off"] + t["nrows"],
                    t["col_off"]:t["col_off"] + t["ncols"]].reshape(t["slices"], spec.polarities, t["nrows"], t["ncols"])
        qw = decode_tile(blk, t["bits"], spec.encoding, c)
        if spec.encoding == "offset":
            acc -= np.outer(xs.sum(1), np.full(t["ncols"], 2.0 ** (t["bits"] - 1)))
        acc -= o_x * qw.sum(0)
        y[:, t["col0"]:t["col0"] + t["ncols"]] += acc * np.asarray(t["scale"]) * s_x
    return y


@pytest.mark.parametrize("name,signed", [("prime", False), ("puma", True), ("neurosim", False)])
def test_stored_full_scales_match_brute_force(name, signed):
    rng = np.random.default_rng(9)
    spec = preset(name, rows=16, cols=8)
    res = random_result([Layer("fc", rng.standard_normal((37, 19)).astype(np.float32))], spec, rng)
    cells = crossbar_cells(res)
    prog = layer_program(res, 0)
    for t in prog["tiles"]:
        t["adc_full_scale"] = rng.uniform(5, 80, size=(t["slices"], spec.polarities)).round(2).tolist()
    x = rng.standard_normal((6, 37)).astype(np.float32)
    x = x if signed else np.abs(x)
    y = run_layer(x, prog, cells, spec)
    ref = brute_sim(x, prog, cells, spec)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ------------------------------------------------------------------ the compile stage
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("tvm")
    import psq_tvm
    from test_onnx_models import small_cnn

    out = {}
    for rng_ in ("calibrated", "worst"):
        warnings = []
        spec = preset("prime", rows=32, cols=32, adc_range=rng_)
        pkg = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4", warn=warnings.append)
        out[rng_] = (pkg, warnings, pkg.save(tmp_path_factory.mktemp(rng_) / "m.tar"))
    return out


def test_stage_stores_full_scales_and_reports(compiled):
    import psq_tvm

    pkg, warnings, path = compiled["calibrated"]
    spec = pkg.spec
    assert spec.adc_range == "calibrated" and pkg.manifest["spec"]["adc_range"] == "calibrated"
    n = 0
    for lay in pkg.layers:
        for t in lay["tiles"]:
            if spec.adc_lossless(t["nrows"]):
                assert "adc_full_scale" not in t
                continue
            n += 1
            fs = np.asarray(t["adc_full_scale"])
            peak = t["nrows"] * 7 * 15
            assert fs.shape == (t["slices"], 2) and np.all(fs >= 63) and np.all(fs <= peak)
    assert n > 0
    rep = pkg.report["adc"]
    assert rep["range"] == "calibrated" and rep["adc_bits"] == 6 and rep["crossbar_reads_calibrated"] > 0
    worst_pkg, worst_warn, _ = compiled["worst"]
    assert all("adc_full_scale" not in t for lay in worst_pkg.layers for t in lay["tiles"])
    wrep = worst_pkg.report["adc"]
    # calibrated ranges bring the simulator much closer to golden than the worst case on the same inputs
    assert rep["sim_vs_golden"]["sqnr_db"] > wrep["sim_vs_golden"]["sqnr_db"] + 6
    assert not wrep["meets_threshold"] and any("far from golden" in w and "adc-range calibrated" in w
                                               for w in worst_warn)
    assert any("far from golden" in w for w in warnings) == (not rep["meets_threshold"])
    # the saved package's simulator reads the stored full scales: removing them changes its outputs
    back = psq_tvm.load(path)
    x = np.random.default_rng(0).standard_normal(back.manifest["inputs"][0]["shape"]).astype(np.float32)
    y = back.run([x], "sim")[0]
    np.testing.assert_array_equal(y, pkg.run([x], "sim")[0])
    for lay in back.layers:
        for t in lay["tiles"]:
            t.pop("adc_full_scale", None)
    from psq_tvm.runtime.simulator import clear_cache
    clear_cache()
    assert not np.array_equal(y, back.run([x], "sim")[0])


def test_stage_is_deterministic_and_skipped_when_lossless():
    pytest.importorskip("tvm")
    import psq_tvm
    from test_onnx_models import small_cnn

    spec = preset("prime", rows=32, cols=32)
    a = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4")
    b = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4")
    assert a.members()["manifest.json"] == b.members()["manifest.json"]
    c = psq_tvm.compile(small_cnn(), spec=spec.replace(adc_bits=None), budget="avg-bits=4")
    assert "adc" not in c.report and all("adc_full_scale" not in t for lay in c.layers for t in lay["tiles"])
