"""Device non-idealities against cells perturbed by hand and against sampled statistics."""
import numpy as np
import pytest
from test_simulator import fake_quant_input, hand_case, random_result

from psq_tvm import Layer, preset
from psq_tvm.core.tables import crossbar_cells
from psq_tvm.runtime.simulator import SimOptions, clear_cache, layer_program, run_layer


def _offset_layer(seed=2):
    """One 6x4 tile of 4-bit levels on offset-encoded 2-bit cells (2 slices: stored u = q + 8 = c0 + 4 c1)."""
    spec = preset("isaac", rows=8, cols=8, adc_bits=None)
    rng = np.random.default_rng(seed)
    res = random_result([Layer("fc", rng.standard_normal((6, 4)).astype(np.float32))], spec, rng, bits=[4])
    x = np.abs(rng.standard_normal((3, 6))).astype(np.float32)
    return spec, res, crossbar_cells(res), layer_program(res, 0), x


def _offset_reference(x, spec, res, prog, cells):
    """The layer computed from (possibly faulty) cells by hand: level = c0 + 4 c1 - 8, times the tile
    scale, applied to the quantised input."""
    t = prog["tiles"][0]
    (xb0,), (xb1,) = t["crossbars"]
    r0, c0 = t["row_off"], t["col_off"]
    window = lambda xb: cells[xb, r0:r0 + 6, c0:c0 + 4].astype(np.float64)
    levels = window(xb0) + 4 * window(xb1) - 8
    return fake_quant_input(x, spec.act_bits) @ (levels * float(res.scales[0]))


def test_reference_reads_the_ideal_cells():
    spec, res, cells, prog, x = _offset_layer()
    np.testing.assert_allclose(run_layer(x, prog, cells, spec), _offset_reference(x, spec, res, prog, cells),
                               rtol=1e-6, atol=1e-9)


def test_stuck_at_min_and_max_are_levels_zero_and_top():
    # all cells at 0: every weight reads -8; all at 3: 3 + 4*3 - 8 = +7
    spec, res, cells, prog, x = _offset_layer()
    top = (1 << spec.cell_bits) - 1
    for opts, stuck in ((SimOptions(stuck_at_min=1.0), 0), (SimOptions(stuck_at_max=1.0), top)):
        clear_cache()
        want = _offset_reference(x, spec, res, prog, np.full_like(cells, stuck))
        np.testing.assert_allclose(run_layer(x, prog, cells, spec, options=opts), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p_min, p_max, seed", [(0.2, 0.0, 1), (0.0, 0.3, 2), (0.15, 0.25, 7)])
def test_partial_stuck_rates_follow_the_documented_draws(p_min, p_max, seed):
    """Per physical crossbar ``i``: u ~ default_rng([seed, i]).random((R, C)); u < p_min: level 0,
    p_min <= u < p_min + p_max: top level (the contract in simulator/devices.py)."""
    spec, res, cells, prog, x = _offset_layer()
    top = (1 << spec.cell_bits) - 1
    hand = cells.copy()
    for i in range(len(cells)):
        u = np.random.default_rng([seed, i]).random(cells[i].shape)
        hand[i][u < p_min] = 0
        hand[i][(u >= p_min) & (u < p_min + p_max)] = top
    assert not np.array_equal(hand, cells)
    clear_cache()
    got = run_layer(x, prog, cells, spec, options=SimOptions(stuck_at_min=p_min, stuck_at_max=p_max, seed=seed))
    np.testing.assert_allclose(got, _offset_reference(x, spec, res, prog, hand), rtol=1e-6, atol=1e-9)


def _hand_case_monte_carlo(sigma, n, rng):
    """The hand case's read with relative variation, sampled independently: input bit planes j0 = [1, 1, 1, 0],
    j1 = [1, 1, 0, 0]; each array read is rounded by the (lossless, step 1) ADC; y = sum_j 2^j (code+ - code-)."""
    lp, lm = np.array([3.0, 1, 2, 0]), np.array([0.0, 0, 0, 1])
    planes = np.array([[1.0, 1, 1, 0], [1.0, 1, 0, 0]])
    gp = np.maximum(lp * (1 + sigma * rng.standard_normal((n, 4))), 0)
    gm = np.maximum(lm * (1 + sigma * rng.standard_normal((n, 4))), 0)
    return sum(2 ** j * (np.rint(gp @ planes[j]) - np.rint(gm @ planes[j])) for j in range(2))


def test_conductance_variation_is_relative_to_the_level():
    """``g = level (1 + sigma z)``: over 300 seeds the hand case (+ levels [3, 1, 2, 0], - levels [0, 0, 0, 1],
    x = [3, 3, 1, 0], exact result 14) has the mean and spread of an independent Monte Carlo of that model;
    level-0 cells stay off, whatever sigma."""
    spec, cells, prog, x = hand_case(adc_bits=None)
    sigma, n = 0.3, 300
    ys = []
    for seed in range(n):
        clear_cache()
        ys.append(run_layer(x, prog, cells, spec, options=SimOptions(conductance_sigma=sigma, seed=seed))[0, 0])
    ys = np.array(ys, dtype=np.float64)
    ref = _hand_case_monte_carlo(sigma, 200_000, np.random.default_rng(0))
    assert abs(ys.mean() - ref.mean()) < 4 * ref.std() / np.sqrt(n), (ys.mean(), ref.mean())
    assert 0.8 * ref.std() < ys.std() < 1.2 * ref.std(), (ys.std(), ref.std())
    # a tile of zero weights on differential cells is all level 0: no variation can make it conduct
    zero = cells.copy()
    zero[:, :, 2] = 0
    clear_cache()
    assert run_layer(x, prog, zero, spec, options=SimOptions(conductance_sigma=0.5, seed=3))[0, 0] == 0.0
