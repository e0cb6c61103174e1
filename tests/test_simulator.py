"""Functional crossbar simulator: exact vs bit-serial, vs golden, lossy ADC, non-idealities, errors."""


import numpy as np
import pytest

from psq_tvm import CrossbarSpec, Layer, preset, psq_search
from psq_tvm.core.quant import QuantResult, tile_maxabs
from psq_tvm.runtime.simulator import (SimError, SimOptions, clear_cache, compile_layer, golden_layer, layer_integers,
                               layer_program, quantize_activations, run_layer)
from psq_tvm.core.tables import crossbar_cells, encode_tile
from psq_tvm.core.tiling import ModelTiles


# ------------------------------------------------------------------ helpers
def random_result(layers, spec, rng, bits=None):
    """A QuantResult with random per-tile bitwidths (max-abs scales): mixed slice counts, packing."""
    tiles = ModelTiles(layers, spec.rows, spec.cols)
    choice = np.asarray(bits if bits is not None else spec.weight_bits)
    b = rng.choice(choice, size=tiles.n_tiles).astype(np.int64)
    mx = tile_maxabs(tiles)
    L = 2.0 ** (b - 1) - 1
    scales = np.where(mx > 0, mx / L, 1.0)
    return QuantResult(tiles, spec, b, scales, np.full(tiles.n_tiles, np.nan), "random")


def dense_case(spec, rng, shape, bits=None):
    """A random dense layer of ``shape`` [K, N] as random_result, its crossbar cells and its program."""
    res = random_result([Layer("fc", rng.standard_normal(shape).astype(np.float32))], spec, rng, bits)
    return res, crossbar_cells(res), layer_program(res, 0)


def ref_conv(x, w, strides, padding, dilation, groups):
    """Direct (loop over kernel taps) NCHW conv, float64, independent of the simulator's im2col."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = strides, padding, dilation
    B, C, H, W = x.shape
    cout, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = cout // groups
    out = np.zeros((B, cout, oh, ow))
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                           j * dw: j * dw + sw * (ow - 1) + 1: sw]
                out[:, g * og:(g + 1) * og] += np.einsum("bchw,oc->bohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out


def fake_quant_input(x, act_bits):
    q, s, _ = quantize_activations(x, act_bits)
    return q.astype(np.float64) * s


def small_model(rng):
    """A grouped conv (packs block-diagonally), a ragged dense layer and a tiny dense layer."""
    return [
        Layer("gconv", rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "conv2d", groups=4),
        Layer("fc", rng.standard_normal((37, 29)).astype(np.float32), "dense"),
        Layer("tiny", rng.standard_normal((5, 3)).astype(np.float32), "dense"),
    ]


CONV_KW = {"strides": (2, 1), "padding": (1, 0, 2, 1), "dilation": (1, 2)}


def layer_input(li, rng, signed):
    shape = [(2, 8, 7, 9), (3, 37), (4, 5)][li]
    x = rng.standard_normal(shape).astype(np.float32)
    return x if signed else np.maximum(x, 0)


# -------------------------------------------------- exact == bit-serial integers
CASES = [(enc, c, d) for enc in ("offset", "differential") for c in (1, 2, 4) for d in (1, 2, 3)]


@pytest.mark.parametrize("encoding,cell_bits,dac_bits", CASES)
def test_exact_and_bitserial_integers_identical(encoding, cell_bits, dac_bits):
    rng = np.random.default_rng(100 * cell_bits + 10 * dac_bits + (encoding == "offset"))
    act_bits = int(rng.choice([max(dac_bits, 2), 5, 8]))   # 5 and 8 with d=2,3: a shorter last cycle
    spec = CrossbarSpec(rows=16, cols=12, cell_bits=cell_bits, encoding=encoding, dac_bits=dac_bits,
                        act_bits=max(act_bits, dac_bits), adc_bits=None, weight_bits=(2, 3, 4, 5, 7, 8))
    layers = small_model(rng)
    res = random_result(layers, spec, rng)
    pl = res.placement
    assert len(np.unique(pl.set_of_tile)) < res.tiles.n_tiles      # some tiles share crossbars
    cells = crossbar_cells(res)
    for li in range(len(layers)):
        prog = layer_program(res, li, **(CONV_KW if li == 0 else {}))
        for signed in (False, True):
            x = layer_input(li, rng, signed)
            ex = layer_integers(x, prog, cells, spec, path="exact")
            bs = layer_integers(x, prog, cells, spec, path="bitserial")
            assert len(ex) == len(bs) > 0
            for a, b in zip(ex, bs):
                assert np.array_equal(a["cols"], b["cols"])
                ai, bi = np.asarray(a["values"], np.float64), np.asarray(b["values"], np.float64)
                assert np.all(ai == np.rint(ai)) and np.array_equal(ai, bi), (li, signed)
            # and the float outputs of both paths are the same numbers
            y = run_layer(x, prog, cells, spec)
            yb = run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True))
            np.testing.assert_array_equal(y, yb)


def test_exact_path_is_used_automatically_only_when_lossless():
    spec = preset("puma", rows=32, cols=32)                 # 8-bit ADC, peak 32*1*3 = 96 <= 255: lossless
    rng = np.random.default_rng(3)
    res = random_result([Layer("fc", rng.standard_normal((40, 20)).astype(np.float32))], spec, rng)
    comp = compile_layer(layer_program(res, 0), crossbar_cells(res), spec)
    assert all(comp.adc(st.nrows, SimOptions())[0] for st in comp.strips)
    lossy = spec.replace(adc_bits=5)                        # 31 < 96
    comp2 = compile_layer(layer_program(res, 0), crossbar_cells(res), lossy)
    # full 32-row strips are lossy (96 > 31); the ragged 8-row strip is lossless (8 * 3 = 24 <= 31)
    assert [comp2.adc(st.nrows, SimOptions())[0] for st in comp2.strips] == [st.nrows == 8 for st in comp2.strips]
    assert sorted({st.nrows for st in comp2.strips}) == [8, 32]


# ------------------------------------------------------------ sim == golden
@pytest.mark.parametrize("spec_name", ["isaac", "prime"])
def test_sim_matches_golden_and_direct_reference(spec_name):
    rng = np.random.default_rng(7)
    spec = preset(spec_name, rows=24, cols=20, adc_bits=None)
    layers = small_model(rng)
    res = random_result(layers, spec, rng)
    cells = crossbar_cells(res)
    for li, layer in enumerate(layers):
        kw = CONV_KW if li == 0 else {}
        prog = layer_program(res, li, **kw)
        for signed in (False, True):
            x = layer_input(li, rng, signed)
            bias = rng.standard_normal(prog["matrix_shape"][1] * prog["groups"])
            y = run_layer(x, prog, cells, spec, bias=bias)
            yb = run_layer(x, prog, cells, spec, bias=bias, options=SimOptions(force_bitserial=True))
            g = golden_layer(x, prog, cells, spec, bias=bias)
            assert y.dtype == np.float32 and g.dtype == np.float64 and y.shape == g.shape
            tol = 1e-6 * np.abs(g).max()
            np.testing.assert_allclose(y, g, rtol=0, atol=tol)
            np.testing.assert_allclose(yb, g, rtol=0, atol=tol)
            # independent reference: dequantised weight of the QuantResult, direct conv / matmul
            wq = res.dequantized(li).astype(np.float64)
            xq = fake_quant_input(x, spec.act_bits)
            if layer.kind == "conv2d":
                ref = ref_conv(xq, wq, kw["strides"], kw["padding"], kw["dilation"], layer.groups)
                ref += bias[None, :, None, None]
            else:
                ref = xq @ wq + bias
            np.testing.assert_allclose(g, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_golden_matches_float_layer_roughly():
    rng = np.random.default_rng(11)
    spec = preset("isaac", adc_bits=None)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    res = random_result([Layer("fc", w)], spec, rng, bits=[8])
    cells = crossbar_cells(res)
    prog = layer_program(res, 0)
    x = np.abs(rng.standard_normal((10, 64))).astype(np.float32)
    y = run_layer(x, prog, cells, spec)
    ref = x.astype(np.float64) @ w
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def test_weights_come_from_the_cells():
    rng = np.random.default_rng(5)
    spec = preset("isaac", rows=16, cols=16, adc_bits=None)
    res, cells, prog = dense_case(spec, rng, (20, 10), bits=[4])
    x = np.abs(rng.standard_normal((3, 20))).astype(np.float32)
    y0 = run_layer(x, prog, cells, spec)
    t = prog["tiles"][0]
    damaged = cells.copy()
    xb = t["crossbars"][1][0]                                 # most significant slice of tile 0
    r, c = t["row_off"], t["col_off"]
    damaged[xb, r, c] = (damaged[xb, r, c] + 1) % 4
    y1 = run_layer(x, prog, damaged, spec)
    g1 = golden_layer(x, prog, damaged, spec)
    assert not np.allclose(y0, y1)
    np.testing.assert_allclose(y1, g1, atol=1e-6 * np.abs(g1).max())
    # cells of other crossbars / outside the tile's block are never read
    other = cells.copy()
    used = {xb for tt in prog["tiles"] for row in tt["crossbars"] for xb in row}
    spare = np.zeros((1,) + cells.shape[1:], np.uint8) + 3
    other = np.concatenate([other, spare])
    np.testing.assert_array_equal(run_layer(x, prog, other, spec), y0)
    assert max(used) < cells.shape[0]
    # a stored value that no 4-bit level encodes (u = 0 -> q = -8 < -7) is refused, naming the tile
    bad = cells.copy()
    bad[[row[0] for row in t["crossbars"]], r, c] = 0
    with pytest.raises(ValueError, match=r"'fc'.*tile 0.*outside"):
        run_layer(x, prog, bad, spec)


def test_per_column_scales():
    rng = np.random.default_rng(9)
    spec = preset("isaac", rows=16, cols=16, adc_bits=None)
    res, cells, prog = dense_case(spec, rng, (20, 10))
    x = rng.standard_normal((3, 20)).astype(np.float32)
    y = run_layer(x, prog, cells, spec)
    as_list = dict(prog, tiles=[dict(t, scale=[t["scale"]] * t["ncols"]) for t in prog["tiles"]])
    np.testing.assert_array_equal(run_layer(x, as_list, cells, spec), y)
    col = dict(prog, tiles=[dict(t, scale=list(t["scale"] * (1 + np.arange(t["ncols"])))) for t in prog["tiles"]])
    np.testing.assert_allclose(run_layer(x, col, cells, spec), golden_layer(x, col, cells, spec), atol=1e-5)
    np.testing.assert_allclose(run_layer(x, col, cells, spec, options=SimOptions(force_bitserial=True)),
                               golden_layer(x, col, cells, spec), atol=1e-5)


# -------------------------------------------------------------------- inputs
def test_activation_quantisation():
    q, s, o = quantize_activations(np.array([0.0, 1.0, 2.55]), 8)
    assert o == 0 and s == pytest.approx(0.01) and q.tolist() == [0, 100, 255]
    q, s, o = quantize_activations(np.array([-1.27, 0.5, 1.0]), 8)
    assert o == 128 and s == pytest.approx(0.01) and q.tolist() == [-127, 50, 100]
    q, s, o = quantize_activations(np.zeros(4), 8)
    assert s == 1.0 and not q.any()
    with pytest.raises(SimError):
        quantize_activations(np.array([-1.0, 1.0]), 1)


def test_signed_inputs_use_offset_and_match_golden():
    rng = np.random.default_rng(21)
    spec = preset("isaac", rows=16, cols=16, adc_bits=None)
    res, cells, prog = dense_case(spec, rng, (30, 20))
    x = rng.standard_normal((5, 30)).astype(np.float32)
    assert x.min() < 0
    y = run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True))
    np.testing.assert_allclose(y, golden_layer(x, prog, cells, spec), atol=1e-6 * np.abs(y).max())
    # negating the input negates the output (symmetric signed quantisation)
    np.testing.assert_allclose(run_layer(-x, prog, cells, spec), -y, atol=1e-6 * np.abs(y).max())


def test_act_bits_override():
    rng = np.random.default_rng(22)
    spec = preset("isaac", rows=16, cols=16, adc_bits=None)
    res, cells, prog = dense_case(spec, rng, (30, 20), bits=[8])
    x = np.abs(rng.standard_normal((50, 30))).astype(np.float32)
    ref = x.astype(np.float64) @ res.dequantized(0)
    errs = [np.abs(run_layer(x, prog, cells, spec, options=SimOptions(act_bits=a)) - ref).mean() for a in (3, 5, 8, 12)]
    assert errs == sorted(errs, reverse=True)
    o = SimOptions(act_bits=5)
    np.testing.assert_array_equal(run_layer(x, prog, cells, spec, options=o),
                                  run_layer(x, prog, cells, spec, options=o.replace(force_bitserial=True)))


# ---------------------------------------------------------------- lossy ADC
def hand_case(**spec_kw):
    """One 4x1 tile, differential, 2-bit cells, 3-bit weights (1 slice), 1-bit DAC, 2-bit activations.

    levels q = [3, 1, 2, -1] -> + array [3, 1, 2, 0], - array [0, 0, 0, 1]; x = [3, 3, 1, 0] (s_x = 1)
    input bit planes: j=0 [1, 1, 1, 0], j=1 [1, 1, 0, 0]; exact q_x . q = 9 + 3 + 2 + 0 = 14.
    bitline sums: (j0,+) 6, (j0,-) 0, (j1,+) 4, (j1,-) 0; peak = 4 * 1 * 3 = 12.
    """
    spec = CrossbarSpec(rows=4, cols=4, cell_bits=2, encoding="differential", dac_bits=1, act_bits=2,
                        adc_bits=spec_kw.pop("adc_bits", 2), weight_bits=(3,))
    q = np.array([[3], [1], [2], [-1]])
    cells = np.zeros((2, 4, 4), np.uint8)
    enc = encode_tile(q, 3, "differential", 2, 1)             # [1, 2, 4, 1]
    cells[:, :, 2:3] = enc[0]
    cells[:, :, 0] = 3                                        # another tile's columns: never read
    prog = {"id": 0, "name": "hand", "op": "dense", "weight_shape": [4, 1], "matrix_shape": [4, 1], "groups": 1,
            "bias": None, "tiles": [{"id": 0, "group": 0, "row0": 0, "col0": 0, "nrows": 4, "ncols": 1, "bits": 3,
                                     "scale": 1.0, "slices": 1, "crossbars": [[0, 1]], "row_off": 0, "col_off": 2}]}
    x = np.array([[3.0, 3.0, 1.0, 0.0]])
    return spec, cells, prog, x


@pytest.mark.parametrize("adc_bits,options,expected", [
    (None, {}, 14.0),                       # lossless
    (4, {}, 14.0),                          # 15 >= 12: lossless
    # 2-bit ADC over the peak 12: delta 4; codes rint(6/4)=2, rint(4/4)=1 -> (2 + 2*1) * 4 = 16
    (2, {}, 16.0),
    # offset +0.5 LSB: rint(2.0)=2, rint(0.5)=0 on the - reads, rint(1.5)=2 -> (2 + 2*2) * 4 = 24
    (2, {"adc_offset": 0.5}, 24.0),
    # full scale 6: delta 2; codes 3 and 2 -> (3 + 2*2) * 2 = 14
    (2, {"adc_full_scale": 6.0}, 14.0),
    # full scale 3: delta 1; 6 and 4 clip to 3 -> 3 + 2*3 = 9
    (2, {"adc_full_scale": 3.0}, 9.0),
    # 3-bit ADC over the peak 12: delta 12/7; rint(3.5)=4, rint(2.333)=2 -> (4 + 2*2) * 12/7
    (3, {}, 8 * 12 / 7),
])
def test_lossy_adc_hand_computed(adc_bits, options, expected):
    spec, cells, prog, x = hand_case(adc_bits=adc_bits)
    y = run_layer(x, prog, cells, spec, options=SimOptions(**options))
    assert y.shape == (1, 1) and y[0, 0] == pytest.approx(expected, rel=1e-6)
    assert golden_layer(x, prog, cells, spec)[0, 0] == 14.0


def test_lossy_adc_error_grows_as_bits_shrink():
    rng = np.random.default_rng(31)
    base = preset("isaac", rows=64, cols=64)
    layers = [Layer("fc", rng.standard_normal((150, 70)).astype(np.float32))]
    res = random_result(layers, base.replace(adc_bits=None), rng, bits=[6])
    cells = crossbar_cells(res)
    prog = layer_program(res, 0)
    x = np.abs(rng.standard_normal((40, 150))).astype(np.float32)
    g = golden_layer(x, prog, cells, base.replace(adc_bits=None))
    errs = []
    for n in (12, 9, 8, 7, 6, 5, 4, 3):
        y = run_layer(x, prog, cells, base.replace(adc_bits=n))
        errs.append(float(np.sqrt(np.mean((y - g) ** 2))))
    # 12, 9, 8 bits: 2**n - 1 >= 64 rows * 1 * 3 = 192, lossless
    assert max(errs[:3]) < 1e-6 * np.abs(g).max()
    assert all(b > a for a, b in zip(errs[2:], errs[3:])), errs


# ------------------------------------------------------------ non-idealities
def noisy_setup():
    rng = np.random.default_rng(41)
    spec = preset("prime", rows=32, cols=32, adc_bits=None)
    layers = [Layer("a", rng.standard_normal((40, 30)).astype(np.float32)),
              Layer("b", rng.standard_normal((20, 10)).astype(np.float32))]
    res = random_result(layers, spec, rng, bits=[6, 8])
    cells = crossbar_cells(res)
    return spec, res, cells, [layer_program(res, i) for i in range(2)], rng


def test_nonidealities_off_by_default_and_seeded():
    spec, res, cells, progs, rng = noisy_setup()
    x = np.abs(rng.standard_normal((6, 40))).astype(np.float32)
    ideal = run_layer(x, progs[0], cells, spec)
    assert SimOptions().ideal
    np.testing.assert_array_equal(run_layer(x, progs[0], cells, spec, options=SimOptions(seed=5)), ideal)
    o = SimOptions(conductance_sigma=0.05, stuck_at_min=0.01, stuck_at_max=0.01, seed=3)
    y1 = run_layer(x, progs[0], cells, spec, options=o)
    clear_cache()
    y2 = run_layer(x, progs[0], cells, spec, options=o)
    np.testing.assert_array_equal(y1, y2)
    y3 = run_layer(x, progs[0], cells, spec, options=o.replace(seed=4))
    assert not np.array_equal(y1, y3) and not np.array_equal(y1, ideal)
    assert np.abs(y1 - ideal).max() > 0
    small = run_layer(x, progs[0], cells, spec, options=SimOptions(conductance_sigma=0.002))
    assert np.abs(small - ideal).max() < np.abs(y1 - ideal).max()


def test_faults_belong_to_physical_cells_not_call_order():
    spec, res, cells, progs, rng = noisy_setup()
    o = SimOptions(stuck_at_max=0.05, conductance_sigma=0.03, seed=9)
    xa = np.abs(rng.standard_normal((3, 40))).astype(np.float32)
    xb = np.abs(rng.standard_normal((3, 20))).astype(np.float32)
    clear_cache()
    a1 = run_layer(xa, progs[0], cells, spec, options=o)
    b1 = run_layer(xb, progs[1], cells, spec, options=o)
    clear_cache()
    b2 = run_layer(xb, progs[1], cells, spec, options=o)
    a2 = run_layer(xa, progs[0], cells, spec, options=o)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)


def test_stuck_at_and_adc_offset_extremes():
    spec, cells, prog, x = hand_case(adc_bits=None)
    # every cell stuck at max (3): + and - arrays equal, offset-free differential reads cancel
    y = run_layer(x, prog, cells, spec, options=SimOptions(stuck_at_max=1.0))
    assert y[0, 0] == 0.0
    # every cell stuck at min: nothing conducts
    assert run_layer(x, prog, cells, spec, options=SimOptions(stuck_at_min=1.0))[0, 0] == 0.0
    # +1 LSB ADC offset on a lossless ADC: every + and - read gains 1, they cancel in the difference
    assert run_layer(x, prog, cells, spec, options=SimOptions(adc_offset=1.0))[0, 0] == 14.0
    # ... but not when every cell is stuck on the + side only is checked through the offset encoding
    spec_o = preset("isaac", rows=8, cols=8, adc_bits=None)
    rng = np.random.default_rng(2)
    res, c_o, p_o = dense_case(spec_o, rng, (6, 4), bits=[4])
    xo = np.abs(rng.standard_normal((2, 6))).astype(np.float32)
    y0 = run_layer(xo, p_o, c_o, spec_o)
    y1 = run_layer(xo, p_o, c_o, spec_o, options=SimOptions(adc_offset=1.0))
    assert not np.allclose(y0, y1)


def test_options_validation():
    with pytest.raises(ValueError):
        SimOptions(stuck_at_min=1.5)
    with pytest.raises(ValueError):
        SimOptions(conductance_sigma=-1)
    with pytest.raises(ValueError):
        SimOptions(adc_full_scale=0)
    with pytest.raises(ValueError):
        SimOptions.from_dict({"sigma": 1})
    assert SimOptions.from_dict({"seed": 3}).seed == 3


# ------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_layer():
    spec, res, cells, progs, rng = noisy_setup()
    x = np.abs(rng.standard_normal((6, 40))).astype(np.float32)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"'a'.*NaN"):
        run_layer(bad, progs[0], cells, spec)
    with pytest.raises(ValueError, match=r"'a'.*NaN"):
        golden_layer(bad, progs[0], cells, spec)
    with pytest.raises(ValueError, match=r"'a'.*shape"):
        run_layer(x[:, :39], progs[0], cells, spec)
    with pytest.raises(ValueError, match=r"'a'.*bias"):
        run_layer(x, progs[0], cells, spec, bias=np.zeros(3))
    with pytest.raises(ValueError, match=r"'a'"):
        run_layer(np.array(["x"] * 40), progs[0], cells, spec)


def test_bad_conv_input_and_programs():
    rng = np.random.default_rng(51)
    spec = preset("isaac", rows=32, cols=32, adc_bits=None)
    layers = [Layer("conv", rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv2d")]
    res = random_result(layers, spec, rng)
    cells = crossbar_cells(res)
    prog = layer_program(res, 0)
    with pytest.raises(ValueError, match=r"'conv'.*NCHW"):
        run_layer(np.zeros((1, 4, 8, 8), np.float32), prog, cells, spec)
    with pytest.raises(ValueError, match=r"'conv'.*smaller"):
        run_layer(np.zeros((1, 3, 2, 2), np.float32), prog, cells, spec)
    t0 = prog["tiles"][0]
    broken = dict(prog, tiles=[dict(t0, slices=t0["slices"] + 1)] + prog["tiles"][1:])
    with pytest.raises(ValueError, match=r"'conv'.*tile 0.*slices"):
        run_layer(np.zeros((1, 3, 8, 8), np.float32), broken, cells, spec)
    missing = dict(prog, tiles=prog["tiles"][1:]) if len(prog["tiles"]) > 1 else dict(prog, matrix_shape=[28, 4])
    with pytest.raises(ValueError, match=r"'conv'"):
        run_layer(np.zeros((1, 3, 8, 8), np.float32), missing, cells, spec)
    with pytest.raises(ValueError, match=r"'conv'.*cells"):
        run_layer(np.zeros((1, 3, 8, 8), np.float32), prog, cells[:, :8], spec)
    wrong = dict(prog, tiles=[dict(t0, crossbars=[[999]] * t0["slices"])] + prog["tiles"][1:])
    with pytest.raises(ValueError, match=r"out of range"):
        run_layer(np.zeros((1, 3, 8, 8), np.float32), wrong, cells, spec)


def test_compiled_layers_are_cached_per_cells_object():
    spec, res, cells, progs, rng = noisy_setup()
    assert compile_layer(progs[0], cells, spec) is compile_layer(progs[0], cells, spec)
    assert compile_layer(progs[0], cells.copy(), spec) is not compile_layer(progs[0], cells, spec)
    clear_cache()


def test_layer_program_structure():
    rng = np.random.default_rng(61)
    spec = preset("prime", rows=16, cols=16)
    layers = small_model(rng)
    res = random_result(layers, spec, rng)
    prog = layer_program(res, 0, strides=(2, 2), padding=(1, 1, 1, 1))
    assert prog["op"] == "conv2d" and prog["groups"] == 4 and prog["matrix_shape"] == [18, 2]
    assert prog["strides"] == [2, 2] and prog["padding"] == [1, 1, 1, 1] and prog["dilation"] == [1, 1]
    for t in prog["tiles"]:
        assert np.shape(t["crossbars"]) == (t["slices"], 2)
        assert set(t) >= {"id", "group", "row0", "col0", "nrows", "ncols", "bits", "scale", "slices",
                          "crossbars", "row_off", "col_off"}
    import json
    json.dumps(prog)                                      # plain JSON types only


# ------------------------------------------------------- a shipped model
def test_shipped_model_layers_sim_equals_golden():
    """Every conv/dense layer of the shipped Fashion-MNIST CNN, PSQ-quantised on the default (isaac,
    lossless 9-bit ADC) crossbars: both simulator paths equal the golden layer."""
    onnx = pytest.importorskip("onnx")
    import os
    from onnx import numpy_helper

    from psq_tvm import psq_search
    path = os.path.join(os.path.dirname(__file__), "..", "psq_tvm", "data", "fashion_cnn.onnx")
    if not os.path.exists(path):
        pytest.skip("shipped model missing")
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            layers.append(Layer(node.name or f"conv{len(layers)}", inits[node.input[1]].astype(np.float32), "conv2d"))
        elif node.op_type == "Gemm" and node.input[1] in inits:
            tb = any(a.name == "transB" and a.i for a in node.attribute)
            w = inits[node.input[1]]
            layers.append(Layer(node.name or f"fc{len(layers)}", (w.T if tb else w).astype(np.float32), "dense"))
        elif node.op_type == "MatMul" and node.input[1] in inits:
            layers.append(Layer(node.name or f"fc{len(layers)}", inits[node.input[1]].astype(np.float32), "dense"))
    assert len(layers) >= 4
    spec = preset("isaac")
    assert spec.adc_lossless()
    res = psq_search(layers, spec, budget="avg-bits=5")
    cells = crossbar_cells(res)
    rng = np.random.default_rng(0)
    for li, layer in enumerate(layers):
        if layer.kind == "conv2d":
            prog = layer_program(res, li, padding=(1, 1, 1, 1))
            x = rng.standard_normal((2, layer.weight.shape[1], 6, 6)).astype(np.float32)
        else:
            prog = layer_program(res, li)
            x = rng.standard_normal((3, layer.matrix_shape[0])).astype(np.float32)
        if li > 0:
            x = np.maximum(x, 0)                                  # post-ReLU activations; layer 0 signed
        g = golden_layer(x, prog, cells, spec)
        tol = 2e-6 * np.abs(g).max()
        y = run_layer(x, prog, cells, spec)
        np.testing.assert_allclose(y, g, rtol=0, atol=tol)
        # many row strips (up to 9 here): both paths sum them in the same order, bit-identical floats
        np.testing.assert_array_equal(run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True)), y)
        ex = layer_integers(x, prog, cells, spec, path="exact")
        bs = layer_integers(x, prog, cells, spec, path="bitserial")
        assert all(np.array_equal(np.asarray(a["values"], np.float64), b["values"]) for a, b in zip(ex, bs))


def test_lossy_adc_hand_computed_offset_encoding():
    """2-bit weights, offset encoding (1 slice of 2-bit cells): stored u_w = q + 2.

    q = [1, -1, 0, 1] -> cells [3, 1, 2, 3]; x = [3, 3, 1, 0] (planes j0 [1,1,1,0], j1 [1,1,0,0]).
    reads: j0 = 3+1+2 = 6, j1 = 3+1 = 4; reference column 2 * sum(x) = 14; exact q_x . q = 0.
    lossless: 6 + 2*4 - 14 = 0.  2-bit ADC (delta 12/3 = 4): codes 2, 1 -> (2 + 2*1)*4 - 14 = 2.
    """
    spec = CrossbarSpec(rows=4, cols=4, cell_bits=2, encoding="offset", dac_bits=1, act_bits=2, adc_bits=2,
                        weight_bits=(2,))
    q = np.array([[1], [-1], [0], [1]])
    cells = np.zeros((1, 4, 4), np.uint8)
    cells[0, :, 1:2] = encode_tile(q, 2, "offset", 2, 1)[0, 0]
    prog = {"id": 7, "name": "hand-offset", "op": "dense", "weight_shape": [4, 1], "matrix_shape": [4, 1],
            "groups": 1, "bias": None,
            "tiles": [{"id": 0, "group": 0, "row0": 0, "col0": 0, "nrows": 4, "ncols": 1, "bits": 2, "scale": 0.5,
                       "slices": 1, "crossbars": [[0]], "row_off": 0, "col_off": 1}]}
    x = np.array([[3.0, 3.0, 1.0, 0.0]])
    assert run_layer(x, prog, cells, spec)[0, 0] == pytest.approx(2 * 0.5)
    assert run_layer(x, prog, cells, spec.replace(adc_bits=None))[0, 0] == 0.0
    assert golden_layer(x, prog, cells, spec)[0, 0] == 0.0


def test_mixed_lossless_and_lossy_strips_match_forced_bitserial():
    spec = preset("puma", rows=32, cols=32, adc_bits=5)     # 32-row strips lossy, the 8-row strip lossless
    rng = np.random.default_rng(8)
    res, cells, prog = dense_case(spec, rng, (40, 20))
    x = np.abs(rng.standard_normal((7, 40))).astype(np.float32)
    np.testing.assert_array_equal(run_layer(x, prog, cells, spec),
                                  run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True)))


@pytest.mark.parametrize("chunk_min", [1, 7, 128])
def test_fast_path_chunking_does_not_change_results(monkeypatch, chunk_min):
    """The fused-im2col / chunked fast path gives the same floats for any chunk size (one output row,
    ragged chunks, whole images)."""
    import psq_tvm.runtime.simulator as sim
    rng = np.random.default_rng(71)
    spec = preset("isaac", rows=16, cols=12, adc_bits=None)
    layers = small_model(rng)
    res = random_result(layers, spec, rng)
    cells = crossbar_cells(res)
    prog = layer_program(res, 0, **CONV_KW)
    x = rng.standard_normal((3, 8, 11, 13)).astype(np.float32)
    ref = run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True))
    monkeypatch.setattr(sim, "_EXACT_CHUNK_MIN", chunk_min)
    monkeypatch.setattr(sim, "_EXACT_CHUNK_BYTES", 1)
    np.testing.assert_array_equal(run_layer(x, prog, cells, spec), ref)
    prog_d = layer_program(res, 1)
    xd = rng.standard_normal((9, 37)).astype(np.float32)
    np.testing.assert_array_equal(run_layer(xd, prog_d, cells, spec),
                                  run_layer(xd, prog_d, cells, spec, options=SimOptions(force_bitserial=True)))


def test_conv_with_one_output_pixel_and_batch_one():
    """A 1x1 conv on a 1x1 map with batch 1 (DenseNet's classifier): the [1, N] output is both C- and
    F-contiguous, which once confused the fast path's layout detection."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(300, 200, 1, 1)).astype(np.float32)
    spec = preset("isaac")
    res = psq_search([Layer("c", w, "conv2d")], spec, budget="avg-bits=4")
    cells = crossbar_cells(res)
    lay = layer_program(res, 0, cells)
    x = rng.normal(size=(1, 200, 1, 1)).astype(np.float32)
    y = run_layer(x, lay, cells, spec)
    g = golden_layer(x, lay, cells, spec)
    assert y.shape == (1, 300, 1, 1)
    np.testing.assert_allclose(y, g, rtol=1e-5, atol=1e-6 * np.abs(g).max())
