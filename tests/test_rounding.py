"""Balanced rounding (``rounding="balanced"``): every bitline's rounding errors cancel.

Expected values come from a brute force over every way of moving the levels of a small column by
-1/0/+1 (not from the greedy in :func:`psq_tvm.core.quant.balanced_levels`), and from sampling.
"""

import itertools

import numpy as np
import pytest

from psq_tvm.core.crossbar import preset
from psq_tvm.core.quant import balanced_levels, level_limit, quantize_levels
from psq_tvm.core.search import SearchConfig, psq_search
from psq_tvm.core.tiling import Layer


def _brute(x: np.ndarray, L: int) -> tuple[float, int, float]:
    """Over every rounding of the column (each level ``floor(x)`` or ``ceil(x)``, clipped to [-L, L]): the
    best (|sum of errors| floored at 0.5, number of levels that differ from round-to-nearest, sum of squared
    errors), lexicographically."""
    q0 = np.clip(np.rint(x), -L, L)
    options = [sorted({float(np.clip(np.floor(v), -L, L)), float(np.clip(np.ceil(v), -L, L))}) for v in x]
    best = None
    for q in itertools.product(*options):
        e = np.array(q) - x
        key = (round(max(abs(e.sum()), 0.5), 9), int(np.count_nonzero(np.array(q) != q0)),
               round(float((e ** 2).sum()), 9))
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("seed", range(40))
def test_balanced_levels_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    bits = int(rng.integers(2, 6))
    L = int(level_limit(bits))
    s = float(rng.uniform(0.2, 1.0))
    w = (rng.normal(size=n) * rng.uniform(0.3, 2.5) * L * s + rng.normal() * s).astype(np.float32)
    block = w.reshape(1, n, 1, 1)
    q = balanced_levels(block, s, bits).reshape(-1).astype(np.float64)
    x = np.divide(w, np.float32(s), dtype=np.float32).astype(np.float64)
    e = q - x
    got = (round(max(abs(e.sum()), 0.5), 9), int(np.count_nonzero(q != np.clip(np.rint(x), -L, L))),
           round(float((e ** 2).sum()), 9))
    assert np.all(np.abs(q) <= L)
    assert got == _brute(x, L), (w, s, bits)


def test_balanced_levels_each_column_on_its_own():
    """Axis 1 is the bitline: columns (axes 0, 2, 3) never mix, whatever their scales and bitwidths."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(2, 9, 3, 4)).astype(np.float32)
    s = rng.uniform(0.1, 0.6, size=(2, 1, 3, 4))
    b = rng.integers(3, 7, size=(2, 1, 3, 1))
    q = balanced_levels(w, s, b)
    for i, j, k in itertools.product(range(2), range(3), range(4)):
        one = balanced_levels(w[i:i + 1, :, j:j + 1, k:k + 1], s[i:i + 1, :, j:j + 1, k:k + 1], b[i:i + 1, :, j:j + 1])
        assert np.array_equal(q[i, :, j, k], one[0, :, 0, 0])
    assert q.dtype == np.int16
    assert np.all(np.abs(q.astype(int) - quantize_levels(w, s, b)) <= 1)


def test_balanced_rounding_cuts_the_output_error_of_correlated_inputs():
    """Sampled: inputs that share a positive mean (as after a ReLU) see a smaller output error."""
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(128, 64)) * 0.05).astype(np.float32)
    res = {r: psq_search([Layer("fc", w, "dense")], preset("isaac"), budget="avg-bits=4",
                         config=SearchConfig(objective="mse", granularity="column", rounding=r))
           for r in ("nearest", "balanced")}
    assert np.array_equal(res["nearest"].bits, res["balanced"].bits)   # the allocation is the same
    x = np.abs(rng.normal(size=(4000, 128))) + 0.5                       # positive, correlated through the mean
    err = {r: float((((x @ (q.dequantized(0).astype(np.float64) - w)) ** 2).mean())) for r, q in res.items()}
    assert err["balanced"] < 0.5 * err["nearest"], err
    # ... and per column the error sums are at most half a level (columns with room to move)
    qr = res["balanced"]
    lv = qr.levels(0)[0].astype(np.float64)
    sc = qr.scales[0][:64]
    e = (lv - w / sc).sum(axis=0)
    assert np.all(np.abs(e) <= 0.5 + 1e-4)


def test_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding"):
        SearchConfig(rounding="stochastic")
