"""The ADC at the edge of losslessness, and per-column scales on the lossy bit-serial path."""
import numpy as np
import pytest
from test_simulator import random_result

from psq_tvm import Layer, preset
from psq_tvm.core.quant import QuantResult
from psq_tvm.core.tables import crossbar_cells
from psq_tvm.core.tiling import ModelTiles
from psq_tvm.runtime.simulator import SimOptions, golden_layer, layer_program, run_layer
from psq_tvm.runtime.simulator.adc import adc


@pytest.mark.parametrize("rows, adc_bits, lossless", [
    # isaac: 2-bit cells, 1-bit DAC: peak = rows * 1 * 3
    (5, 4, True),      # 2^4 - 1 = 15 == peak 15: every sum has its own code
    (6, 4, False),     # peak 18 > 15
    (85, 8, True),     # 255 == 85 * 3
    (86, 8, False),
    (21, 6, True),     # 63 == 21 * 3
])
def test_lossless_exactly_when_codes_cover_the_peak(rows, adc_bits, lossless):
    spec = preset("isaac", rows=rows, cols=8, adc_bits=adc_bits)
    assert spec.adc_lossless() is lossless
    identity, delta, top = adc(spec, rows, SimOptions())
    assert top == 2 ** adc_bits - 1
    assert identity is lossless
    assert delta == (1.0 if lossless else rows * 3 / top)


def _full_scale_layer(rows, adc_bits):
    """One rows x 3 tile with every weight at the top level (+7 at 4 bits: offset cells 15 = all 3s) and
    every input at the top activation code: each bitline sums to exactly rows * 3, the ADC's peak."""
    spec = preset("isaac", rows=rows, cols=8, adc_bits=adc_bits, weight_bits=(4,))
    w = np.full((rows, 3), 0.7, np.float32)
    tiles = ModelTiles([Layer("fc", w)], spec.rows, spec.cols)
    res = QuantResult(tiles, spec, np.array([4]), np.array([0.1]), np.full(1, np.nan), "hand")
    cells = crossbar_cells(res)
    assert np.all(cells[:, :rows, :3] == 3)
    return spec, cells, layer_program(res, 0), np.ones((2, rows), np.float32)


def test_sum_at_the_peak_is_read_exactly_at_the_boundary():
    spec, cells, prog, x = _full_scale_layer(5, 4)
    g = golden_layer(x, prog, cells, spec)
    np.testing.assert_allclose(g, np.full((2, 3), 5 * 7 * 0.1), rtol=1e-6)     # x_q = 1 (max-abs scale), q = 7
    # exact up to the float32 rounding of the final scaling (verify's EXACT_RTOL is 1e-5)
    np.testing.assert_allclose(run_layer(x, prog, cells, spec), g, rtol=1e-7)
    np.testing.assert_allclose(run_layer(x, prog, cells, spec, options=SimOptions(force_bitserial=True)), g, rtol=1e-7)
    # one row more, one code short: the same full-scale read now loses precision somewhere in the layer
    spec6, cells6, prog6, x6 = _full_scale_layer(6, 4)
    xr = np.random.default_rng(0).uniform(0, 1, (4, 6)).astype(np.float32)
    assert not np.array_equal(run_layer(xr, prog6, cells6, spec6), golden_layer(xr, prog6, cells6, spec6))


@pytest.mark.parametrize("adc_bits", [4, 6])
def test_per_column_scales_on_the_lossy_bitserial_path(adc_bits):
    """The ADC reads integer bitline sums, before any scale: with a lossy ADC, giving column c the scale
    k_c * s multiplies that column's output by exactly k_c (a digital multiply after the ADC)."""
    rng = np.random.default_rng(4)
    spec = preset("isaac", rows=32, cols=16, adc_bits=adc_bits)
    assert not spec.adc_lossless()
    res = random_result([Layer("fc", rng.standard_normal((70, 20)).astype(np.float32))], spec, rng, bits=[4, 6])
    cells = crossbar_cells(res)
    prog = layer_program(res, 0)
    x = np.abs(rng.standard_normal((5, 70))).astype(np.float32)
    k = 1.0 + np.arange(20) / 7.0                      # per output column of the layer
    col = dict(prog, tiles=[dict(t, scale=list(t["scale"] * k[t["col0"]:t["col0"] + t["ncols"]]))
                            for t in prog["tiles"]])
    for opts in (SimOptions(), SimOptions(force_bitserial=True)):
        base = run_layer(x, prog, cells, spec, options=opts).astype(np.float64)
        scaled = run_layer(x, col, cells, spec, options=opts).astype(np.float64)
        np.testing.assert_allclose(scaled, base * k[None, :], rtol=2e-6, atol=1e-6)
    # and the lossy read does differ from golden here (otherwise this test would not reach the ADC)
    assert not np.allclose(run_layer(x, col, cells, spec), golden_layer(x, col, cells, spec), rtol=1e-4)
