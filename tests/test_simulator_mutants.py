"""The simulator against independent computations where its mutation run showed gaps (issue 16).

* the lossy bit-serial path, per strip and before scaling, against a per-read reference loop written
  from docs/simulator.md (bitline sums by explicit integer loops, ADC with forced / stored / worst-case
  full scale and offset, shift-and-add, offset-encoding and signed-input corrections);
* the exact path beyond float32: integers equal an int64 matmul, floats equal the bit-serial path's;
* which path runs (``force_bitserial``, ``path=``), the integer records' scales, dense input ranks,
  the activation quantiser's one-element and empty inputs, options reaching ``golden_layer``,
  ``layer_program``'s ``layer_id`` and ``read_histograms``' ``max_rows``.
"""

import numpy as np
import pytest
from test_adc_range import brute_reads
from test_simulator import dense_case, fake_quant_input, hand_case, random_result, ref_conv

from psq_tvm import CrossbarSpec, Layer, preset
from psq_tvm.core.quant import QuantResult
from psq_tvm.core.tables import crossbar_cells, decode_tile
from psq_tvm.core.tiling import ModelTiles
from psq_tvm.runtime.simulator import (
    SimOptions,
    compile_layer,
    golden_layer,
    layer_integers,
    layer_program,
    quantize_activations,
    run_layer,
)


# ------------------------------------------------------------------ per-read reference of the bit-serial path
def tile_units(x, prog, cells, spec, opts):
    """Per tile id, its integer-unit results ``[M, ncols]`` (before scaling) by explicit per-read loops:
    bitline sums from :func:`test_adc_range.brute_reads`, then the ADC of docs/simulator.md step 4 and
    the digital step 5 (shift-and-add over cycles and slices, minus the - polarity, minus the reference
    column of the offset encoding, minus the signed-input offset)."""
    q, _s, o_x = quantize_activations(x, spec.act_bits)
    u = q.astype(np.int64) + o_x
    d, c, n = spec.dac_bits, spec.cell_bits, spec.adc_bits
    reads = brute_reads(x, prog, cells, spec)
    out = {}
    for t in prog["tiles"]:
        peak = t["nrows"] * ((1 << d) - 1) * ((1 << c) - 1)
        top = None if n is None else (1 << n) - 1
        acc = np.zeros((u.shape[0], t["ncols"]))
        for k in range(t["slices"]):
            for p in range(spec.polarities):
                if opts.adc_full_scale is not None:
                    fs = float(opts.adc_full_scale)
                elif t.get("adc_full_scale") is not None and top is not None:
                    fs = float(t["adc_full_scale"][k][p])
                elif top is None or top >= peak:
                    fs = None                                   # lossless: delta 1
                else:
                    fs = float(peak)
                delta = 1.0 if fs is None else fs / top
                for j, v in reads[(t["id"], k, p)]:
                    v = v.astype(np.float64)
                    if fs is None and opts.adc_offset == 0:
                        read = v
                    else:
                        code = np.rint(v / delta + opts.adc_offset)
                        if top is not None:
                            code = np.clip(code, 0, top)
                        read = delta * code
                    acc += (-1.0 if p else 1.0) * 2.0 ** (j * d + k * c) * read
        xs = u[:, t["row0"]:t["row0"] + t["nrows"]]
        blk = cells[np.asarray(t["crossbars"]).ravel(), t["row_off"]:t["row_off"] + t["nrows"],
                    t["col_off"]:t["col_off"] + t["ncols"]].reshape(t["slices"], spec.polarities, t["nrows"],
                                                                    t["ncols"])
        qw = decode_tile(blk, t["bits"], spec.encoding, c).astype(np.int64)
        if spec.encoding == "offset":
            acc -= np.outer(xs.sum(1), np.full(t["ncols"], 2.0 ** (t["bits"] - 1)))
        acc -= o_x * qw.sum(0)
        out[t["id"]] = acc
    return out


def strip_reference(entry, prog, units):
    """The reference values of one ``layer_integers`` entry (a dense layer's row strip)."""
    want = np.full((next(iter(units.values())).shape[0], len(entry["cols"])), np.nan)
    pos = {int(col): i for i, col in enumerate(entry["cols"])}
    for t in prog["tiles"]:
        if t["row0"] == entry["row0"] and t["nrows"] == entry["nrows"]:
            for cc in range(t["ncols"]):
                want[:, pos[t["col0"] + cc]] = units[t["id"]][:, cc]
    assert not np.isnan(want).any()
    return want


BITSERIAL_CASES = {
    # 16-bit ADC, forced full scale 2.5: codes up to 65535 over 10 input cycles; their weighted sum needs
    # more than float32's 24 bits, the accumulation has to be float64
    "forced-fs-16bit-adc": (CrossbarSpec(rows=8, cols=8, cell_bits=2, encoding="offset", dac_bits=1, act_bits=10,
                                         adc_bits=16, weight_bits=(8,)), {"adc_full_scale": 2.5}, False, False),
    # worst-case full scale, 3-bit ADC (the lookup-table path) with an offset, signed input
    "worst-3bit-offset": (preset("puma", rows=16, cols=8, adc_bits=3), {"adc_offset": 0.3}, True, False),
    # stored per-crossbar full scales, differential 4-bit cells, 3-bit DAC (short last cycle)
    "stored-fs-prime": (preset("prime", rows=16, cols=8, act_bits=8), {}, False, True),
    "stored-fs-signed": (preset("mnsim", rows=16, cols=8), {}, True, True),
    # lossless ADC with an offset: whole-unit errors, no clipping (adc_bits None)
    "lossless-offset": (preset("isaac", rows=16, cols=8, adc_bits=None), {"adc_offset": 1.0}, True, False),
}


@pytest.mark.parametrize("case", sorted(BITSERIAL_CASES))
def test_bitserial_units_match_per_read_reference(case):
    spec, okw, signed, stored = BITSERIAL_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    res, cells, prog = dense_case(spec, rng, (21, 11))
    if stored:
        for t in prog["tiles"]:
            t["adc_full_scale"] = rng.uniform(4, 60, size=(t["slices"], spec.polarities)).round(2).tolist()
    x = rng.standard_normal((9, 21)).astype(np.float32)
    x = x if signed else np.abs(x)
    opts = SimOptions(**okw)
    units = tile_units(x, prog, cells, spec, opts)
    for path in ("bitserial", "auto"):
        got = layer_integers(x, prog, cells, spec, options=opts, path=path)
        assert len(got) == len({(t["row0"], t["nrows"]) for t in prog["tiles"]})
        for e in got:
            want = strip_reference(e, prog, units)
            np.testing.assert_allclose(np.asarray(e["values"], np.float64), want, rtol=1e-12,
                                       atol=1e-12 * np.abs(want).max())


# ------------------------------------------------------------------ the exact path beyond float32
def _big_layer(rows, signed):
    """A dense rows x 6 layer of 8-bit weights near the top level, one row strip, 16-bit activations near
    the top code: the dot products exceed 2**24 (float32 is not exact any more)."""
    spec = CrossbarSpec(rows=rows, cols=8, cell_bits=2, encoding="offset", dac_bits=1, act_bits=16, adc_bits=None,
                        weight_bits=(8,))
    rng = np.random.default_rng(rows + signed)
    w = rng.uniform(0.8, 1.0, (rows, 6)).astype(np.float32)
    w[0, 0] = -1.0
    tiles = ModelTiles([Layer("big", w)], spec.rows, spec.cols)
    res = QuantResult(tiles, spec, np.array([8]), np.array([1.0 / 127]), np.full(1, np.nan), "hand")
    x = rng.uniform(0.9, 1.0, (7, rows)).astype(np.float32)
    if signed:
        x[-1, 0] = -1.0                                      # one negative value: signed, s_x = 1/32767
    return spec, res, crossbar_cells(res), layer_program(res, 0), x


@pytest.mark.parametrize("rows,signed", [(8, True), (128, False)])
def test_exact_integers_beyond_float32_equal_an_int64_matmul(rows, signed):
    spec, res, cells, prog, x = _big_layer(rows, signed)
    q, s_x, o_x = quantize_activations(x, spec.act_bits)
    assert (o_x != 0) == signed
    t = prog["tiles"][0]
    blk = cells[np.asarray(t["crossbars"]).ravel(), :rows, :6].reshape(t["slices"], 1, rows, 6)
    qw = decode_tile(blk, 8, "offset", 2).astype(np.int64)
    want = q.astype(np.int64) @ qw
    assert np.abs(want).max() >= 2 ** 24 and np.any(want % 2)          # float32 cannot hold them all
    for path in ("exact", "bitserial", "auto"):
        (e,) = layer_integers(x, prog, cells, spec, path=path)
        np.testing.assert_array_equal(np.asarray(e["values"], np.float64), want.astype(np.float64))
    # the float outputs: bit-identical on both paths, and the float64 golden up to float32 rounding
    y = run_layer(x, prog, cells, spec)
    np.testing.assert_array_equal(y, run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True)))
    g = golden_layer(x, prog, cells, spec)
    np.testing.assert_allclose(y, g, rtol=0, atol=1e-6 * np.abs(g).max())
    np.testing.assert_allclose(g, (q.astype(np.float64) * s_x) @ (qw * float(res.scales[0])), rtol=1e-12)


# ------------------------------------------------------------------ which path runs
def test_force_bitserial_and_path_select_the_per_cycle_path(monkeypatch):
    import psq_tvm.runtime.simulator.layer as layer_mod
    calls = []
    real = layer_mod.bitserial_strip
    monkeypatch.setattr(layer_mod, "bitserial_strip", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)               # lossless: auto = exact path
    rng = np.random.default_rng(3)
    res, cells, prog = dense_case(spec, rng, (20, 5))
    x = np.abs(rng.standard_normal((4, 20))).astype(np.float32)
    nstrips = len(compile_layer(prog, cells, spec).strips)
    y = run_layer(x, prog, cells, spec)
    ex = layer_integers(x, prog, cells, spec, path="auto")
    assert calls == []
    yb = run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True))
    assert len(calls) == nstrips
    bs = layer_integers(x, prog, cells, spec, path="bitserial")
    assert len(calls) == 2 * nstrips
    layer_integers(x, prog, cells, spec, options=SimOptions(force_bitserial=True))
    assert len(calls) == 3 * nstrips
    np.testing.assert_array_equal(y, yb)
    for a, b in zip(ex, bs):
        np.testing.assert_array_equal(np.asarray(a["values"], np.float64), b["values"])
    # on a lossy ADC "auto" is the bit-serial path (hand_case: 2-bit ADC reads 16 instead of 14)
    hspec, hcells, hprog, hx = hand_case(adc_bits=2)
    (e,) = layer_integers(hx, hprog, hcells, hspec, path="auto")
    assert e["values"][0, 0] == 16.0
    (e,) = layer_integers(hx, hprog, hcells, hspec, path="exact")
    assert e["values"][0, 0] == 14.0


def test_integer_records_rebuild_the_output():
    """sum over strips of values * scale * act_scale, placed at the strips' columns, is the golden layer."""
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(12)
    res, cells, prog = dense_case(spec, rng, (37, 19))
    cols = [dict(t, scale=list(t["scale"] * (1 + np.arange(t["ncols"]) / 3))) for t in prog["tiles"]]
    prog = dict(prog, tiles=cols)                                        # per-column scales
    x = rng.standard_normal((5, 37)).astype(np.float32)
    y = np.zeros((5, 19))
    for e in layer_integers(x, prog, cells, spec):
        y[:, e["cols"]] += np.asarray(e["values"], np.float64) * np.asarray(e["scale"]) * e["act_scale"]
    g = golden_layer(x, prog, cells, spec)
    np.testing.assert_allclose(y, g, rtol=1e-12, atol=1e-12 * np.abs(g).max())


# ------------------------------------------------------------------ geometry
def test_dense_inputs_of_any_rank():
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(13)
    res, cells, prog = dense_case(spec, rng, (20, 7))
    w = res.dequantized(0).astype(np.float64)
    for shape in [(20,), (1, 20), (2, 3, 20), (2, 1, 2, 20)]:
        x = np.abs(rng.standard_normal(shape)).astype(np.float32)
        ref = fake_quant_input(x, spec.act_bits) @ w
        for opts in (SimOptions(), SimOptions(force_bitserial=True)):
            y = run_layer(x, prog, cells, spec, options=opts)
            assert y.shape == shape[:-1] + (7,)
            np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
        assert golden_layer(x, prog, cells, spec).shape == shape[:-1] + (7,)


@pytest.mark.parametrize("kw,hw,groups", [
    ({"strides": (1, 3), "padding": (0, 1, 1, 0), "dilation": (2, 1)}, (6, 4), 2),   # ow = 1
    ({"strides": (2, 2), "padding": (2, 2, 2, 2), "dilation": (1, 3)}, (5, 7), 1),
])
def test_conv_geometry_against_direct_convolution(kw, hw, groups):
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(14)
    res = random_result([Layer("c", rng.standard_normal((4, 6 // groups, 2, 3)).astype(np.float32), "conv2d",
                               groups=groups)], spec, rng)
    cells = crossbar_cells(res)
    prog = layer_program(res, 0, **kw)
    x = rng.standard_normal((2, 6) + hw).astype(np.float32)
    bias = rng.standard_normal(4)
    ref = ref_conv(fake_quant_input(x, spec.act_bits), res.dequantized(0).astype(np.float64), kw["strides"],
                   kw["padding"], kw["dilation"], groups) + bias[None, :, None, None]
    for opts in (SimOptions(), SimOptions(force_bitserial=True)):
        y = run_layer(x, prog, cells, spec, bias=bias, options=opts)
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ------------------------------------------------------------------ activations, options, program
def test_activation_quantiser_one_element_and_empty():
    q, s, o = quantize_activations(np.array([2.0]), 8)
    assert q.tolist() == [255.0] and s == pytest.approx(2 / 255) and o == 0
    q, s, o = quantize_activations(np.array([[-1.5]]), 4)
    assert q.tolist() == [[-7.0]] and s == pytest.approx(1.5 / 7) and o == 8
    q, s, o = quantize_activations(np.zeros((0, 3)), 8)
    assert q.shape == (0, 3) and q.dtype == np.float32 and s == 1.0 and o == 0


def test_golden_layer_uses_the_options_act_bits():
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(15)
    res, cells, prog = dense_case(spec, rng, (12, 5))
    x = np.abs(rng.standard_normal((6, 12))).astype(np.float32)
    w = res.dequantized(0).astype(np.float64)
    ref3 = fake_quant_input(x, 3) @ w
    tol = 1e-5 * np.abs(ref3).max()                 # (the tile scales are stored in float32)
    assert np.abs(ref3 - fake_quant_input(x, 8) @ w).max() > 100 * tol
    for opts in (SimOptions(act_bits=3), {"act_bits": 3}):
        np.testing.assert_allclose(golden_layer(x, prog, cells, spec, options=opts), ref3, rtol=0, atol=tol)
        np.testing.assert_allclose(run_layer(x, prog, cells, spec, options=opts), ref3, rtol=0, atol=tol)


def test_layer_program_ids():
    spec = preset("isaac", rows=16, cols=8)
    rng = np.random.default_rng(16)
    res = random_result([Layer("a", rng.standard_normal((4, 3)).astype(np.float32)),
                         Layer("b", rng.standard_normal((5, 2)).astype(np.float32))], spec, rng)
    assert layer_program(res, 1)["id"] == 1 and layer_program(res, 1)["name"] == "b"
    assert layer_program(res, 1, layer_id="dense_7")["id"] == "dense_7"
    assert layer_program(res, 0, layer_id=0)["id"] == 0


# ------------------------------------------------------------------ read histograms of a subset of rows
def test_read_histograms_max_rows_reads_evenly_spaced_rows():
    spec = preset("prime", rows=16, cols=8)
    rng = np.random.default_rng(17)
    res, cells, prog = dense_case(spec, rng, (21, 9))
    x = np.abs(rng.standard_normal((10, 21))).astype(np.float32)
    comp = compile_layer(prog, cells, spec)
    ref = brute_reads(x, prog, cells, spec)            # every row; the whole input sets the activation scale
    for max_rows, pick in ((4, [0, 3, 6, 9]), (10, range(10)), (None, range(10)), (1, [0])):
        got = comp.read_histograms(x, max_rows=max_rows)
        assert len(got) == len(ref)
        for t, k, p, h in got:
            want = np.zeros(1)
            for j, v in ref[(t["id"], k, p)]:
                b = np.bincount(v[list(pick)].ravel()) * 4.0 ** (j * spec.dac_bits)
                want = np.pad(want, (0, max(0, b.size - want.size)))
                want[:b.size] += b
            n = max(want.size, h.size)
            np.testing.assert_array_equal(np.pad(h, (0, n - h.size)), np.pad(want, (0, n - want.size)))


# ------------------------------------------------------------------ the documented float rounding of run()
@pytest.mark.parametrize("rows,f32", [(4, True), (8, False)])
def test_run_rounds_as_documented(rows, f32):
    """One row strip, signed 16-bit input, 8-bit weights near the top: ``rows * (2**15 - 1) * 127`` is below
    2**24 for 4 rows (a float32 strip: ``float32(integer) * float32(s_w s_x)`` rounded once in float32) and
    above it for 8 (float64 integers times the float64 scale, rounded once to float32); both paths."""
    spec, _res, cells, prog, x = _big_layer(rows, True)
    (e,) = layer_integers(x, prog, cells, spec, path="exact")
    ints = np.asarray(e["values"], np.float64)
    s = np.asarray(e["scale"], np.float64) * e["act_scale"]
    assert (np.abs(ints).max() < 2 ** 24) == f32
    if f32:
        want = ints.astype(np.float32) * s.astype(np.float32)
        assert want.dtype == np.float32
    else:
        want = (ints * s).astype(np.float32)
    if f32:                     # the two roundings differ somewhere here, so the rule is really tested
        assert not np.array_equal(want, (ints * s).astype(np.float32))
    for opts in (SimOptions(), SimOptions(force_bitserial=True)):
        np.testing.assert_array_equal(run_layer(x, prog, cells, spec, options=opts), want)


# ------------------------------------------------------------------ input and bias checks
def test_conv_input_size_limits_per_axis():
    """Kernel 2x3 with dilation (2, 1), strides (1, 2), no padding: the smallest input is 3 x 3 (one
    output pixel); one row or one column less is refused, naming the layer."""
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(18)
    res = random_result([Layer("c", rng.standard_normal((3, 2, 2, 3)).astype(np.float32), "conv2d")], spec, rng)
    cells = crossbar_cells(res)
    kw = {"strides": (1, 2), "padding": (0, 0, 0, 0), "dilation": (2, 1)}
    prog = layer_program(res, 0, **kw)
    for hw, out in (((3, 3), (1, 1)), ((4, 3), (2, 1)), ((3, 5), (1, 2)), ((3, 4), (1, 1))):
        x = rng.standard_normal((1, 2) + hw).astype(np.float32)
        y = run_layer(x, prog, cells, spec)
        assert y.shape == (1, 3) + out
        ref = ref_conv(fake_quant_input(x, spec.act_bits), res.dequantized(0).astype(np.float64), kw["strides"],
                       kw["padding"], kw["dilation"], 1)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    for hw in ((2, 3), (3, 2), (2, 2)):
        with pytest.raises(ValueError, match=r"'c'.*smaller than the 2x3 kernel"):
            run_layer(np.ones((1, 2) + hw, np.float32), prog, cells, spec)


def test_bias_checks():
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(19)
    res, cells, prog = dense_case(spec, rng, (6, 4))
    x = np.abs(rng.standard_normal((2, 6))).astype(np.float32)
    base = run_layer(x, prog, cells, spec)
    np.testing.assert_allclose(run_layer(x, prog, cells, spec, bias=[1, 2, 3, 4]), base + [1, 2, 3, 4], rtol=1e-6)
    for bad, msg in ((["a", "b", "c", "d"], r"'fc'.*bias is not numeric"),
                     (np.ones((4, 1)), r"'fc'.*bias must have 4 values"),
                     (np.ones((1, 4)), r"'fc'.*bias must have 4 values"),
                     (np.ones(5), r"'fc'.*bias must have 4 values"),
                     ([1.0, np.inf, 0.0, 0.0], r"'fc'.*bias contains NaN/Inf")):
        for fn in (run_layer, golden_layer):
            with pytest.raises(ValueError, match=msg):
                fn(x, prog, cells, spec, bias=bad)


def test_program_and_input_errors_are_precise():
    """Each refusal of a broken program or input names the layer, the tile and what is wrong, exactly."""
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(20)
    res, cells, prog = dense_case(spec, rng, (20, 10), bits=[4])
    x = np.abs(rng.standard_normal((2, 20))).astype(np.float32)
    t0, rest = prog["tiles"][0], prog["tiles"][1:]
    assert (t0["row0"], t0["nrows"], t0["ncols"], t0["slices"]) == (0, 16, 8, 2)

    def refused(tile, msg):
        with pytest.raises(ValueError, match=msg):
            run_layer(x, dict(prog, tiles=[dict(t0, **tile)] + rest), cells, spec)

    refused({"nrows": 21}, r"'fc'.*tile 0: box group 0 rows 0\+21 cols 0\+8 outside the 1 x \[20, 10\] matrix")
    refused({"col0": 3}, r"tile 0: box group 0 rows 0\+16 cols 3\+8 outside")
    refused({"group": 1}, r"tile 0: box group 1 rows")
    refused({"bits": 2}, r"tile 0: 2-bit tile must have 1 slices under offset/2-bit cells, got 2")
    refused({"bits": 16}, r"tile 0: 16-bit tile must have 8 slices under offset/2-bit cells, got 2")
    refused({"bits": 17}, r"tile 0: 17-bit tile must have \? slices under offset/2-bit cells, got 2")
    refused({"crossbars": [t0["crossbars"][0]]}, r"tile 0: crossbars must be \[slices=2\]\[polarities=1\], "
                                                 r"got shape \[1, 1\]")
    refused({"scale": [1.0] * 7}, r"tile 0: scale must be a finite number or a list of 8 per-column scales")
    refused({"scale": [1.0] * 7 + [np.nan]}, r"tile 0: scale must be a finite number or a list of 8")
    refused({"scale": np.inf}, r"tile 0: scale must be a finite number")
    with pytest.raises(ValueError, match=r"'fc'.*do not cover the 1 x \[20, 10\] matrix exactly once "
                                         r"\(128 weight positions missing or overlapping\)"):
        run_layer(x, dict(prog, tiles=rest), cells, spec)
    with pytest.raises(ValueError, match=r"\(128 weight positions missing or overlapping\)"):
        run_layer(x, dict(prog, tiles=prog["tiles"] + [t0]), cells, spec)
    bad = x.copy()
    bad[0, :2] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"'fc'.*input contains 2 NaN/Inf value\(s\)"):
        run_layer(bad, prog, cells, spec)


def test_conv_program_defaults_and_layer_checks():
    """A conv program without strides / dilation / padding means 1, 1 and no padding; malformed
    hyper-parameters and options are refused with exact messages."""
    spec = preset("isaac", rows=16, cols=8, adc_bits=None)
    rng = np.random.default_rng(21)
    res = random_result([Layer("c", rng.standard_normal((3, 2, 2, 3)).astype(np.float32), "conv2d")], spec, rng)
    cells = crossbar_cells(res)
    full = layer_program(res, 0)
    bare = {k: v for k, v in full.items() if k not in ("strides", "dilation", "padding")}
    x = rng.standard_normal((1, 2, 4, 5)).astype(np.float32)
    ref = ref_conv(fake_quant_input(x, spec.act_bits), res.dequantized(0).astype(np.float64), (1, 1), (0, 0, 0, 0),
                   (1, 1), 1)
    y = run_layer(x, bare, cells, spec)
    assert y.shape == ref.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    comp = compile_layer(bare, cells, spec)
    assert comp.n_crossbars == cells.shape[0] and comp.name == "'c' (id 0)"
    for key, val, msg in (("strides", [1, 1, 1], r"'c' \(id 0\): strides must have 2 values"),
                          ("dilation", [2], r"'c' \(id 0\): dilation must have 2 values"),
                          ("padding", [1, 1], r"'c' \(id 0\): padding must have 4 values")):
        with pytest.raises(ValueError, match=msg):
            run_layer(x, dict(full, **{key: val}), cells, spec)
    # options: act_bits 1 is valid (unsigned input, one cycle), 0 and 17 are not
    assert SimOptions(act_bits=1).act_bits == 1
    assert run_layer(np.abs(x), full, cells, spec, options=SimOptions(act_bits=1)).shape == (1, 3, 3, 3)
    for a in (0, 17):
        with pytest.raises(ValueError, match=r"SimOptions.act_bits must be 1..16"):
            SimOptions(act_bits=a)
    with pytest.raises(ValueError, match=r"^SimOptions\.stuck_at_min \+ stuck_at_max must not exceed 1$"):
        SimOptions(stuck_at_min=0.6, stuck_at_max=0.6)
    t0 = full["tiles"][0]
    with pytest.raises(ValueError, match=r"tile 0: adc_full_scale must be \[slices=\d+\]\[polarities=1\]"):
        run_layer(x, dict(full, tiles=[dict(t0, adc_full_scale=[["a", "b"]])] + full["tiles"][1:]), cells,
                  spec.replace(adc_bits=3))


def test_lossless_32bit_adc_with_16bit_inputs_stays_exact_on_the_bitserial_path():
    """A lossless read's code never exceeds the strip's peak, so the 2**53 exactness bound is checked with
    the peak, not with the ADC's top code: a 32-bit ADC (top 2**32 - 1) with 16 input cycles and 4 slices
    is fine (peak 8 * 3 = 24), and its integers are the exact path's (an int64 matmul's, see above)."""
    spec, _res, cells, prog, x = _big_layer(8, False)
    spec = spec.replace(adc_bits=32)
    assert spec.adc_lossless()
    (e,) = layer_integers(x, prog, cells, spec, path="exact")
    (b,) = layer_integers(x, prog, cells, spec, path="bitserial")
    np.testing.assert_array_equal(b["values"], np.asarray(e["values"], np.float64))
    np.testing.assert_array_equal(run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True)),
                                  run_layer(x, prog, cells, spec))
