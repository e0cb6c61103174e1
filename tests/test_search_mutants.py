"""Behavioural tests written against the mutants that survived the search's mutation run (docs/testing.md,
"Surviving mutants, explained": which survivor each test kills, and why the others are equivalent).

Every expected value comes from a computation independent of the code under test: the brute-force loop
of test_search (one candidate at a time, on the weights), a float64 loop over the bin-averaged squared
error, hand-worked numbers, or a clock read around the call.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from test_search import _brute_force, _heavy

from psq_tvm import Layer, ModelTiles, SearchConfig, preset, psq_search
from psq_tvm.core import candidates
from psq_tvm.core.candidates import (
    column_cdf_kl,
    column_mse,
    distortion_cdf_kl,
    evaluate_candidates,
)
from psq_tvm.core.search import quant_result


def _small_layers(rng):
    return [Layer("a", _heavy(rng, (150, 40))), Layer("b", _heavy(rng, (30, 20), 0.3))]


# ------------------------------------------------------------------ psq_search / quant_result


def test_bitwidth_17_rejected_16_accepted(rng):
    layers = _small_layers(rng)
    with pytest.raises(ValueError, match=r"^candidate bitwidth 17 outside 2\.\.16$"):
        psq_search(layers, preset(), bits=(4, 17))
    r = psq_search(layers, preset(), bits=(4, 16), budget="avg-bits=16")
    assert set(r.bits.tolist()) <= {4, 16}


def test_budget_and_tolerance_together_message(rng):
    with pytest.raises(ValueError, match=r"^give either a budget or a tolerance, not both$"):
        psq_search(_small_layers(rng), preset(), budget="avg-bits=4", tolerance=0.01)


@pytest.mark.parametrize("objective", ["mse", "cdf-kl"])
def test_result_method_time_and_note(rng, objective):
    layers = _small_layers(rng)
    t0 = time.perf_counter()
    r = psq_search(layers, preset(), config=SearchConfig(objective=objective), tolerance=0.05)
    wall = time.perf_counter() - t0
    assert r.method == f"psq-{objective}"
    assert isinstance(r.search_seconds, float) and 0.0 < r.search_seconds <= wall
    assert r.note == "tolerance 0.05"


def test_quant_result_defaults(rng):
    layers = _small_layers(rng)
    tiles = ModelTiles(layers, 128, 128)
    table = evaluate_candidates(tiles, (2, 4), SearchConfig())
    choice = np.arange(tiles.n_tiles) % 2
    r = quant_result(table, tiles, preset(), choice, "cdf-kl")
    assert r.search_seconds == 0.0 and r.note == "" and r.method == "psq-cdf-kl"
    assert r.bits.tolist() == [(2, 4)[c] for c in choice]


# ------------------------------------------------------------------ column_mse


def _bin_averaged_sse(hist, bits, ratios, sub=64):
    """float64 loop: per row and candidate, sum over bins of count x the squared error averaged over the bin
    (``sub`` midpoints per bin, the kernel's documented rule), ``[N, B, S]``."""
    H = hist.shape[1]
    out = np.zeros((hist.shape[0], len(bits), len(ratios)))
    for bi, b in enumerate(bits):
        L = 2 ** (b - 1) - 1
        for k, r in enumerate(ratios):
            s = r / L
            per_bin = np.empty(H)
            for j in range(H):
                x = (j * sub + np.arange(sub) + 0.5) / (H * sub)
                per_bin[j] = np.mean((x - s * np.minimum(np.rint(x / s), L)) ** 2)
            out[:, bi, k] = hist.astype(np.float64) @ per_bin
    return out


def _clipping_columns(rng, n, bins=64):
    """Histograms of columns that want heavy clipping (many weights below max/4, one at the max) and plain ones."""
    h = np.zeros((n, bins), dtype=np.float32)
    for i in range(n):
        if i % 2:
            h[i, 4:16] = rng.integers(10, 30, size=12)
        else:
            h[i] = rng.poisson(1.5, size=bins)
        h[i, -1] += 1
    return h


def test_column_mse_value_and_index(rng):
    """The unbiased sum of squared error at the best ratio, and that ratio's index usable as an index.

    The tie bias ``1 + 1e-6 k`` must not leak into the value: at the heavily clipped columns here the
    chosen ``k`` is >= 8, where a biased value is off by >= 8e-6 (the float32 products: < 1e-7)."""
    bits, ratios = (2, 3, 4), SearchConfig().ratios
    h = _clipping_columns(rng, 12)
    want = _bin_averaged_sse(h, bits, ratios)
    val, best = column_mse(h, bits, ratios)
    assert best.dtype.kind == "i"
    assert np.all(ratios[best] == ratios[np.argmin(want, axis=2)])
    assert best[1::2].min() >= 8                         # the bias would be visible here
    np.testing.assert_allclose(val, want.min(axis=2), rtol=1e-6)


def test_column_mse_more_columns_than_a_chunk(rng, monkeypatch):
    """Every column is evaluated when there are more of them than one chunk (chunk made small)."""
    monkeypatch.setattr(candidates, "_COLUMN_CHUNK", 8)
    bits, ratios = (2, 4), SearchConfig(n_scales=8).ratios
    h = _clipping_columns(rng, 100)                       # > 8 chunks, > 64 bins
    want = _bin_averaged_sse(h, bits, ratios)
    val, best = column_mse(h, bits, ratios)
    np.testing.assert_allclose(val, want.min(axis=2), rtol=1e-6)
    assert np.array_equal(best, np.argmin(want, axis=2))


# ------------------------------------------------------------------ column_cdf_kl


def _check_columns_cdf_kl(w, bits, cfg):
    """Per-column cdf-kl through evaluate_candidates (one tile, every column its own scale) vs the brute force."""
    K, N = w.shape
    table = evaluate_candidates(ModelTiles([Layer("c", w)], K, N), bits, cfg)
    scores = np.zeros((N, len(bits)))
    for c in range(N):
        ref = _brute_force(w[:, c], bits, cfg.ratios, cfg.column_bins, "cdf-kl", cfg.column_thresholds)
        for bi, b in enumerate(bits):
            k, scores[c, bi] = ref[b]
            assert table.ratio[0, c, bi] == cfg.ratios[k], (c, b)
    # the tile's objective is the columns' divergence weighted by their weight counts (all equal here)
    np.testing.assert_allclose(table.objective[0], scores.mean(axis=0), rtol=2e-3, atol=1e-9)


def test_column_cdf_kl_two_bits_only(rng):
    """Only 2-bit candidates: every one is evaluated by the prefix-sum ("run") form."""
    cfg = SearchConfig(objective="cdf-kl", granularity="column", n_scales=8)
    _check_columns_cdf_kl(_heavy(rng, (96, 6)), (2,), cfg)


def test_column_cdf_kl_more_columns_than_a_chunk(rng, monkeypatch):
    monkeypatch.setattr(candidates, "_COLUMN_CHUNK", 8)     # chunks of 4 columns
    cfg = SearchConfig(objective="cdf-kl", granularity="column", n_scales=6)
    _check_columns_cdf_kl(_heavy(rng, (40, 26)), (2, 4), cfg)


def test_column_cdf_kl_no_term_at_all_is_zero(rng):
    """8 bits, no clipping below the top threshold: every rounding boundary falls in the threshold's own bin,
    so Q = P at every threshold and the divergence is exactly 0 (no term is left to sum)."""
    cfg = SearchConfig(objective="cdf-kl", granularity="column", n_scales=4, min_clip=0.95)
    w = _heavy(rng, (128, 5))
    table = evaluate_candidates(ModelTiles([Layer("c", w)], 128, 5), (8,), cfg)
    for c in range(5):
        assert _brute_force(w[:, c], (8,), cfg.ratios, 64, "cdf-kl", 16)[8] == (0, 0.0)
    assert np.all(table.objective == 0.0) and np.all(table.ratio == 1.0)


def test_column_cdf_kl_exact_tie_picks_least_clipping():
    """Every weight in bin 0 (below the first threshold and below every rounding boundary): ``P = Q = 1`` at
    every threshold, so every candidate scores exactly 0, and the tie goes to the least clipping, index 0."""
    h = np.zeros((4, 64), dtype=np.float32)
    h[:, 0] = [1, 2, 7, 128]
    bits, ratios = (2, 3, 4, 8), SearchConfig().ratios
    val, best = column_cdf_kl(h, bits, ratios, 16)
    assert np.all(best == 0)
    assert np.all(np.abs(val) <= 1e-12)


def _jeffreys(p, q, eps=1e-6):
    lg = lambda x: math.log(min(max(x, eps), 1 - eps) / (1 - min(max(x, eps), 1 - eps)))
    return (p - q) * (lg(p) - lg(q))


@pytest.mark.parametrize("form", ["tile", "column"])
def test_cdf_kl_bin_centre_on_the_rounding_boundary(form):
    """Convention pinned at an exact tie: a bin whose centre lies on the rounding boundary ``(J + 1/2) s``
    counts as rounding up (not in ``F(|q| < t)``), at ``J = 0`` as at every ``J``.

    16 bins = 16 thresholds, 2 bits, ratio 1/16: ``s = 1/16`` and bin 0's centre is ``1/32 = s/2``.  Three
    weights in bin 0, one at the max: ``P = 3/4`` at every threshold.  At ``t = 1/16`` (``J = 0``) bin 0
    rounds up, so ``Q = 0``; at ``t >= 2/16`` every level is below ``t`` (clipped), ``Q = 1``."""
    h = np.zeros((1, 16))
    h[0, 0], h[0, 15] = 3, 1
    want = (_jeffreys(0.75, 0.0) + 14 * _jeffreys(0.75, 1.0)) / 15
    ratios = np.array([1 / 16])
    if form == "tile":
        got = distortion_cdf_kl(h, (2,), ratios, 16)[0, 0, 0]
    else:
        got = column_cdf_kl(h.astype(np.float32), (2,), ratios, 16)[0][0, 0]
    assert got == pytest.approx(want, rel=2e-3)          # float32 CDF and logits (~3e-4); bin 0 rounding down: +20 %
