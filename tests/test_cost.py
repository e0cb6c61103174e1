"""The hardware cost model against hand-worked cases, cost-aware budgets, and the published ISAAC figures."""

import itertools
import json
import os
import sys


import numpy as np
import pytest

from psq_tvm import Layer, ModelTiles, preset
from psq_tvm.core.allocation import Budget, BudgetError, allocate_budget
from psq_tvm.core.candidates import SearchConfig, evaluate_candidates
from psq_tvm.core.cost import (COST_PRESETS, CostError, CostModel, CostParams, TileMapping, cost_params,
                               cost_section, mapping_from_placement)
from psq_tvm.core.packing import pack

# round numbers so the hand computations below are easy to follow
P = CostParams(name="hand", read_ns=100.0, adc_gsps=1.0, adc_rule="sample", digital_ns=1.0, xbar_read_pj=10.0,
               dac_pj=1.0, adc_pj={8: 2.0}, shift_add_pj=0.5, mul_pj=3.0, add_pj=1.0, buffer_pj_per_bit=0.1,
               out_bits=16, host_mac_pj=0.0, xbar_um2=10.0, adc_um2={8: 100.0}, dac_um2=1.0, unit_other_um2=50.0,
               tile_other_um2=1000.0, chip_other_um2=0.0, crossbars_per_unit=8, adcs_per_unit=8, units_per_tile=2,
               tiles_per_chip=1)
SPEC = preset("isaac", adc_bits=8)      # 128x128, 2-bit cells, offset, 1-bit DAC, 8-bit activations


def _mapping(tiles, bits):
    sl = np.array([SPEC.slices(int(b)) for b in bits])
    return mapping_from_placement(tiles.layer, tiles.nrows, tiles.ncols, sl,
                                  pack(tiles.nrows, tiles.ncols, sl, SPEC.rows, SPEC.cols, SPEC.polarities))


def test_one_layer_by_hand():
    # dense 128x64, input [1,128] -> one vector; one 128x64 tile at 4 bits = 2 slices; 8 input bit-cycles
    tiles = ModelTiles([Layer("fc", np.ones((128, 64), np.float32))], 128, 128)
    model = CostModel(SPEC, P, n_vec=[1], names=["fc"], n_rows=[128], n_cols=[64], row_tiles=[1])
    out = model.evaluate(_mapping(tiles, [4]))
    reads = 1 * 8 * 2                                     # vectors x cycles x slices
    by_hand = {"crossbar": reads * 10.0, "dac": reads * 128 * 1.0, "adc": reads * 64 * 2.0,
               "shift_add": reads * 64 * 0.5, "digital": 64 * (3.0 + 1.0) + 64 * 1.0,
               "buffer": (128 * 8 + 64 * 16) * 0.1}
    for k, v in by_hand.items():
        assert out["energy_parts_uj"][k] == pytest.approx(v * 1e-6), k
    assert out["energy_uj"] == pytest.approx(5292.8e-6)
    # 2 crossbars, 2 ADCs, 64 conversions each at 1 ns < the 100 ns read: 8 cycles x 100 ns
    assert out["latency_us"] == pytest.approx(0.8)
    # one unit: 8 x (10 + 128 x 1) + 8 x 100 + 50 = 1954 um^2, plus one tile's 1000
    assert out["area_mm2"] == pytest.approx(2954e-6)
    assert (out["crossbars"], out["units"], out["tiles"], out["chips"]) == (2, 1, 1, 1)
    # the same tiles at 16 and 8 bits (8 and 4 slices): reads x4 and x2
    sec = cost_section(_mapping(tiles, [4]), SPEC, model)
    assert sec["uniform16"]["energy_uj"] == pytest.approx(19596.8e-6)
    assert sec["uniform8"]["energy_uj"] == pytest.approx(10060.8e-6)


def test_two_layers_by_hand():
    # conv [32,8,3,3] -> 72x32 matrix, output [1,32,4,4] = 16 vectors, 3 bits (2 slices)
    # dense [200,10] -> tiles 128x10 and 72x10, one vector, 8 bits (4 slices)
    tiles = ModelTiles([Layer("conv", np.ones((32, 8, 3, 3), np.float32), "conv2d"),
                        Layer("fc", np.ones((200, 10), np.float32))], 128, 128)
    p = P.replace({"adc_gsps": 0.5, "adcs_per_unit": 2})       # 2 ns per conversion, 1 ADC per 4 crossbars
    layers = [{"name": "conv", "op": "conv2d", "weight_shape": [32, 8, 3, 3], "groups": 1, "matrix_shape": [72, 32],
               "output_shape": [1, 32, 4, 4]},
              {"name": "fc", "op": "dense", "weight_shape": [200, 10], "groups": 1, "matrix_shape": [200, 10],
               "output_shape": [1, 10]}]
    model = CostModel.from_layers(layers, SPEC, p)
    out = model.evaluate(_mapping(tiles, [3, 8, 8]))
    conv, fc = out["layers"]
    e_conv = (256 * 10 * 72 / 128 + 256 * 72 + 256 * 32 * 2 + 256 * 32 * 0.5   # 256 reads = 16 x 8 x 2
              + 16 * 32 * 4 + 16 * 32 * 1 + 16 * (72 * 8 + 32 * 16) * 0.1)
    e_fc = (32 * 10 + 32 * 128 + 32 * 10 * 2 + 32 * 10 * 0.5 + 10 * 4             # the 128-row tile, 32 reads
            + 32 * 10 * 72 / 128 + 32 * 72 + 32 * 10 * 2 + 32 * 10 * 0.5 + 10 * 4  # the 72-row tile
            + 10 * 1 + (200 * 8 + 10 * 16) * 0.1)
    assert conv["energy_uj"] == pytest.approx(e_conv * 1e-6)
    assert fc["energy_uj"] == pytest.approx(e_fc * 1e-6)
    # conv: 2 crossbars -> 1 ADC; 64 conversions x 2 ns = 128 ns > 100 ns read; 16 vectors x 8 cycles
    assert conv["latency_us"] == pytest.approx(16 * 8 * 128e-3)
    # fc: 8 crossbars -> 2 ADCs, 80 conversions -> 40 x 2 = 80 ns < 100; 2 row tiles: one add in sequence
    assert fc["latency_us"] == pytest.approx((8 * 100 + 1) * 1e-3)
    assert out["latency_us"] == pytest.approx((16384 + 801) * 1e-3)
    # 10 crossbars (sets 2 + 4 + 4) -> 2 units (1354 um^2 each) -> 1 tile; 16 per chip: 6 spare
    assert (out["crossbars"], out["units"], out["tiles"], out["chips"]) == (10, 2, 1, 1)
    assert out["area_mm2"] == pytest.approx((2 * (8 * 138 + 2 * 100 + 50) + 1000) * 1e-6)
    # pipeline: the conv (16.384 us) is replicated while its 2 crossbars fit in the 6 spare: x4 -> 4.096 us
    assert out["pipeline"]["interval_us"] == pytest.approx(16.384)
    assert conv["replicas"] == 4 and fc["replicas"] == 1
    assert out["pipeline"]["interval_replicated_us"] == pytest.approx(4.096)
    # uniform 16: 8 + 8 + 8 crossbars (the two partial tiles cannot share rows) -> 3 units, 2 tiles, 2 chips
    sec = cost_section(_mapping(tiles, [3, 8, 8]), SPEC, model)
    assert sec["uniform16"]["chips"] == 2 and sec["psq"]["chips"] == 1


def _table(seed=0):
    rng = np.random.default_rng(seed)
    layers = [Layer("conv", (rng.standard_t(3, (40, 16, 3, 3)) * 0.05).astype(np.float32), "conv2d"),
              Layer("fc", (rng.standard_t(3, (300, 70)) * 0.01).astype(np.float32))]
    tiles = ModelTiles(layers, SPEC.rows, SPEC.cols)
    table = evaluate_candidates(tiles, (2, 3, 4, 5, 6, 7, 8), SearchConfig())
    model = CostModel(SPEC, COST_PRESETS["isaac"], n_vec=[64, 1], names=["conv", "fc"], n_rows=[144, 300],
                      n_cols=[40, 70], row_tiles=[2, 3])
    return tiles, table, model


def _energy(tiles, table, model, choice):
    return model.measure("energy", _mapping(tiles, np.array(table.bits)[choice]))


def test_energy_budget_meets_limit_and_says_minimum():
    tiles, table, model = _table()
    bits = np.array(table.bits)
    lo = _energy(tiles, table, model, np.zeros(tiles.n_tiles, int))           # every tile at 2 bits
    hi = _energy(tiles, table, model, np.full(tiles.n_tiles, len(bits) - 1))
    for frac in (0.2, 0.5, 0.8):         # the budget holds (spending it fully is not guaranteed: Lagrangian hull)
        limit = lo + frac * (hi - lo)
        choice, note = allocate_budget(table, tiles, SPEC, Budget("energy", limit), model)
        e = _energy(tiles, table, model, choice)
        assert e <= limit * (1 + 1e-12), (frac, e, limit)
        assert "met" in note
    with pytest.raises(BudgetError, match=f"{lo:.6g} uJ"):
        allocate_budget(table, tiles, SPEC, Budget("energy", lo * 0.99), model)


def test_energy_reduction_is_relative_to_uniform16():
    tiles, table, model = _table()
    u16 = model.measure("energy", _mapping(tiles, np.full(tiles.n_tiles, 16)))
    choice, _ = allocate_budget(table, tiles, SPEC, Budget.parse("energy-reduction=3"), model)
    assert _energy(tiles, table, model, choice) <= u16 / 3 * (1 + 1e-12)
    # a crossbar budget chooses differently from an energy budget of the same crossbars' energy
    assert Budget.parse("area=0.5").cost_kind == "area" and Budget.parse("latency-reduction=2").cost_kind == "latency"


def test_area_budget_is_exact_and_cost_budget_needs_model():
    tiles, table, model = _table()
    # area counts whole units (IMAs) and a tile's eDRAM/bus/router: 0.2146 mm^2 before any array
    floor = model.measure("area", _mapping(tiles, np.full(tiles.n_tiles, 2)))
    assert floor > COST_PRESETS["isaac"].tile_other_um2 * 1e-6
    with pytest.raises(BudgetError, match=f"needs area {floor:.6g} mm"):
        allocate_budget(table, tiles, SPEC, Budget("area", 0.1), model)
    limit = floor + 0.5 * (model.measure("area", _mapping(tiles, np.full(tiles.n_tiles, 8))) - floor)
    choice, _ = allocate_budget(table, tiles, SPEC, Budget("area", limit), model)
    assert model.measure("area", _mapping(tiles, np.array(table.bits)[choice])) <= limit
    with pytest.raises(BudgetError, match="cost model"):
        allocate_budget(table, tiles, SPEC, Budget("energy", 1.0))


def test_energy_budget_brute_force_small():
    """On 3 tiles x 3 bitwidths: at budgets on the Lagrangian hull (the energy of argmin distortion + lam x energy
    for some lam) the allocation is the brute-force optimum; at every budget it is feasible."""
    rng = np.random.default_rng(3)
    tiles = ModelTiles([Layer("fc", (rng.standard_t(3, (300, 20)) * 0.01).astype(np.float32))], 128, 128)
    table = evaluate_candidates(tiles, (2, 4, 8), SearchConfig())
    model = CostModel(SPEC, COST_PRESETS["isaac"], [1], ["fc"], [300], [20], [3])
    best = {}
    for combo in itertools.product(range(3), repeat=tiles.n_tiles):
        c = np.array(combo)
        best[combo] = (_energy(tiles, table, model, c), float(table.distortion[np.arange(3), c].sum()))
    energies = sorted({v[0] for v in best.values()})
    for limit in energies[1:-1]:
        choice, _ = allocate_budget(table, tiles, SPEC, Budget("energy", limit), model)
        assert best[tuple(choice)][0] <= limit * (1 + 1e-12)
    cost = np.array([[best[tuple(np.where(np.arange(3) == t, k, 0))][0] for k in range(3)] for t in range(3)])
    hull = set()
    for lam in np.geomspace(1e-3, 1e3, 200):
        c = np.argmin(table.distortion + lam * cost, axis=1)
        hull.add(best[tuple(c)][0])
    assert len(hull) >= 3
    for limit in sorted(hull)[:-1]:
        opt = min(d for e, d in best.values() if e <= limit * (1 + 1e-12))
        choice, _ = allocate_budget(table, tiles, SPEC, Budget("energy", limit), model)
        assert best[tuple(choice)][1] == pytest.approx(opt, rel=1e-9)


def test_params_overrides_from_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"adc_pj": {"9": 5.0}, "read_ns": 50}))
    p = cost_params("isaac", str(f))
    assert p.adc_energy_pj(9) == 5.0 and p.read_ns == 50 and p.dac_pj == COST_PRESETS["isaac"].dac_pj
    f.write_text(json.dumps({"adc_energy": 1}))
    with pytest.raises(CostError, match="unknown cost parameter"):
        cost_params("isaac", str(f))
    with pytest.raises(CostError, match=">= 0"):
        cost_params("isaac", {"dac_pj": -1})
    assert CostParams.from_dict(p.to_dict()) == p


def test_adc_resolution_extrapolation_and_mnsim_rule():
    p = COST_PRESETS["isaac"]
    assert p.adc_energy_pj(11) == pytest.approx(2 * 2.379022742)      # 2x per bit beyond the table
    assert p.adc_energy_pj(3) == pytest.approx(0.79 / 2)
    # MNSIM 2.0 ADC.py: latency = (bits + 2) / rate; energy = latency x power (6-bit, 1.26 mW, 1 GS/s)
    m = COST_PRESETS["mnsim"]
    assert m.adc_ns(6) == pytest.approx(8.0) and m.adc_energy_pj(6) == pytest.approx(10.08)


# ---------------------------------------------------------------------- validation against published figures
def test_published_figures_reproduced_within_stated_gap():
    """ISAAC Table I (IMA/tile/chip area, IMA analog power) and MNSIM 2.0's ADC figures:
    scripts/cost_validation.py, docs/results/cost_validation.md."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import cost_validation as V

    ours = V.reproduce()
    for k, (pub, src) in V.PUBLISHED.items():
        gap = abs(ours[k] - pub) / pub
        assert gap <= V.STATED_GAP[k], (src, ours[k], pub, gap)


def test_differential_counts_both_polarities_and_vectors_follow_the_output_shape():
    from psq_tvm.core.cost import vectors_per_inference

    spec = preset("mnsim")                   # 256x256, 1-bit cells, differential, 6-bit ADC, 8 input cycles
    tiles = ModelTiles([Layer("fc", np.ones((100, 20), np.float32))], 256, 256)
    sl = np.array([spec.slices(3)])          # 3 bits -> 2 magnitude bits -> 2 slices per polarity
    m = mapping_from_placement(tiles.layer, tiles.nrows, tiles.ncols, sl,
                               pack(tiles.nrows, tiles.ncols, sl, 256, 256, spec.polarities))
    assert m.n_crossbars == 4
    model = CostModel(spec, P, [1], ["fc"], [100], [20], [1])
    parts = model.energy_parts(m)
    reads = 8 * 2 * 2                        # cycles x slices x polarities
    assert parts["adc"][0] == pytest.approx(reads * 20 * 2.0 / 4)    # 6-bit: the 8-bit 2 pJ / 2^2
    assert parts["dac"][0] == pytest.approx(reads * 100 * 1.0)
    assert parts["crossbar"][0] == pytest.approx(reads * 10.0 * 100 / 256)
    conv = {"name": "c", "op": "conv2d", "weight_shape": [8, 3, 3, 3], "output_shape": [2, 8, 5, 7]}
    left = {"name": "l", "op": "dense", "weight_shape": [16, 4], "output_shape": [3, 4, 9]}   # Y = C @ X
    right = {"name": "r", "op": "dense", "weight_shape": [16, 4], "output_shape": [3, 9, 4]}
    assert (vectors_per_inference(conv), vectors_per_inference(left), vectors_per_inference(right)) == (70, 27, 27)
