"""Property-based tests of the candidate search (hypothesis): random and adversarial weights.

Every objective x granularity is searched on small layers whose columns are drawn
from adversarial families (all zero, one nonzero, denormal, just below/above the
negligible threshold, spread 1e4x within a tile, constant, +-equal values, huge)
with tiny and ragged tiles, dense and conv layouts, and checked against
expectations computed independently of the search:

* every candidate scale is finite and > 0, levels lie in [-L, L], the
  dequantised weights are finite;
* an unclipped weight is within half a step of its dequantised value;
* all-zero (and negligible) tiles/columns dequantise to exactly zero;
* per column, a column's scale does not depend on the other columns;
* the same input gives bit-identical results;
* the reported mse objective equals the MSE of the dequantised weights within
  the histogram resolution (a Lipschitz bound on the squared error).
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from psq_tvm import Layer, ModelTiles, SearchConfig, preset, psq_search  # noqa: E402
from psq_tvm.core.candidates import GRANULARITIES, OBJECTIVES, evaluate_candidates, negligible_below  # noqa: E402
from psq_tvm.core.quant import quantize_levels  # noqa: E402

CONFIGS = [(o, g) for o in OBJECTIVES for g in GRANULARITIES]
BITS = [(2, 3, 4, 5, 6, 7, 8), (2, 4, 16)]
MODES = ("normal", "spread", "zero", "one", "denormal", "tiny", "edge", "const", "pm", "huge", "heavy")
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _column(mode: str, k: int, rng: np.random.Generator, thr: float) -> np.ndarray:
    """One output column of ``k`` weights of an adversarial family."""
    if mode == "normal":
        return rng.normal(size=k) * 0.05
    if mode == "spread":                               # channel ranges 1e-4 .. 1 within a tile
        return rng.normal(size=k) * 10.0 ** rng.uniform(-4, 0)
    if mode == "zero":
        return np.zeros(k)
    if mode == "one":
        out = np.zeros(k)
        out[rng.integers(k)] = rng.choice([-1, 1]) * 10.0 ** rng.uniform(-3, 1)
        return out
    if mode == "denormal":                             # subnormal float32 (BatchNorm with gamma ~ 0)
        return rng.choice([-1, 1], size=k) * rng.uniform(0, 1.1e-38, size=k) * (rng.random(k) < 0.8)
    if mode == "tiny":                                 # normal float32 but far below the threshold
        return rng.normal(size=k) * 1e-37
    if mode == "edge":                                 # around the negligible threshold
        return rng.uniform(-1, 1, size=k) * thr * rng.choice([0.5, 0.999, 1.001, 2.0, 10.0])
    if mode == "const":
        return np.full(k, rng.choice([-1, 1]) * 10.0 ** rng.uniform(-3, 1))
    if mode == "pm":                                   # +-equal values
        return rng.choice([-1.0, 1.0], size=k) * 10.0 ** rng.uniform(-3, 1)
    if mode == "huge":
        return rng.normal(size=k) * 1e30
    return rng.standard_t(2, size=k) * 0.01            # heavy tails


@st.composite
def layers(draw):
    """(Layer, tile rows, tile cols, bits): dense or conv, ragged tiles, adversarial columns."""
    bits = draw(st.sampled_from(BITS))
    thr = negligible_below(bits, SearchConfig().ratios)
    conv = draw(st.booleans())
    if conv:
        cout, cin, kk = draw(st.integers(1, 20)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 3]))
        K, N = cin * kk * kk, cout
    else:
        K, N = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    R, C = draw(st.sampled_from([1, 2, 3, 5, 8, 16])), draw(st.sampled_from([1, 2, 3, 5, 8, 16]))
    modes = draw(st.lists(st.sampled_from(MODES), min_size=N, max_size=N))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    m = np.stack([_column(mode, K, rng, thr) for mode in modes], axis=1).astype(np.float32)   # [K, N]
    if conv:
        return Layer("w", np.ascontiguousarray(m.T).reshape(cout, cin, kk, kk), "conv2d"), R, C, bits
    return Layer("w", m), R, C, bits


@st.composite
def raw_layers(draw):
    """Dense layers of arbitrary finite float32 values (subnormals included), tiny tiles."""
    shape = draw(st.tuples(st.integers(1, 12), st.integers(1, 12)))
    elems = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)   # the whole range
    w = draw(hnp.arrays(np.float32, shape, elements=elems))
    return Layer("w", w), draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4, 8])), BITS[0]


def _search(layer, R, C, bits, objective, granularity):
    tiles = ModelTiles([layer], R, C)
    cfg = SearchConfig(objective=objective, granularity=granularity)
    return tiles, cfg, evaluate_candidates(tiles, bits, cfg)


def _scale_matrix(tiles, s: np.ndarray, K: int, N: int) -> np.ndarray:
    """Per-weight scale ``[K, N]`` of the (single-matrix) layer from tile or tile-column scales."""
    out = np.empty((K, N))
    for t in range(tiles.n_tiles):
        r0, c0, nr, nc = (int(v[t]) for v in (tiles.row0, tiles.col0, tiles.nrows, tiles.ncols))
        out[r0:r0 + nr, c0:c0 + nc] = s[t, :nc][None, :] if s.ndim == 2 else s[t]
    return out


def check_properties(layer, R, C, bits, objective, granularity):
    tiles, cfg, table = _search(layer, R, C, bits, objective, granularity)
    thr = negligible_below(bits, cfg.ratios)
    w = layer.matrices[0]
    K, N = w.shape
    w64 = w.astype(np.float64)
    col_max = np.abs(w64).max(axis=0)
    per_column = granularity == "column"
    # negligible-ness, computed independently of the search: per column, or per tile
    tile_of = np.empty((K, N), dtype=np.int64)
    for t in range(tiles.n_tiles):
        r0, c0, nr, nc = (int(v[t]) for v in (tiles.row0, tiles.col0, tiles.nrows, tiles.ncols))
        tile_of[r0:r0 + nr, c0:c0 + nc] = t
    tile_max = np.zeros(tiles.n_tiles)
    np.maximum.at(tile_max, tile_of.ravel(), np.abs(w64).ravel())
    if per_column:
        seg_max = np.zeros((K, N))
        for t in range(tiles.n_tiles):
            r0, c0, nr, nc = (int(v[t]) for v in (tiles.row0, tiles.col0, tiles.nrows, tiles.ncols))
            seg_max[r0:r0 + nr, c0:c0 + nc] = np.abs(w64[r0:r0 + nr, c0:c0 + nc]).max(axis=0)[None, :]
    else:
        seg_max = tile_max[tile_of]
    negligible = seg_max < thr
    for bi, b in enumerate(bits):
        L = 2 ** (b - 1) - 1
        s_t = table.scales(np.full(tiles.n_tiles, bi))
        assert np.all(np.isfinite(s_t)) and np.all(s_t > 0), (b, s_t)
        s = _scale_matrix(tiles, s_t, K, N)
        q = quantize_levels(w, s, b).astype(np.int64)
        assert np.abs(q).max() <= L
        deq = s * q
        assert np.all(np.isfinite(deq))
        # within half a step where not clipped (float32 division: slack of a few ulps per level)
        unclipped = np.abs(w64) <= s * L * (1 - 1e-6)
        slack = s * (np.abs(q) + 2) * 2.0 ** -22
        assert np.all((np.abs(w64 - deq) <= s / 2 + slack)[unclipped]), b
        # all-zero and negligible tiles/columns: exactly zero
        assert not deq[:, col_max == 0].any()
        assert not deq[negligible].any(), b
        if objective == "mse":
            _check_mse(tiles, cfg, table, bi, w64, deq, s_t, per_column, thr)
        assert np.all(np.isfinite(table.objective[:, bi])) and np.all(table.objective[:, bi] >= 0)
    assert np.all(table.objective[tile_max < thr] == 0) and np.all(table.distortion[tile_max < thr] == 0)
    return tiles, cfg, table


def _check_mse(tiles, cfg, table, bi, w64, deq, s_t, per_column, thr):
    """Reported mse vs the MSE of the dequantised weights: |g(x) - g(bin)| <= Lip(g) * bin width.

    ``g(x) = (x - Q(x))**2`` (normalised units) is continuous with ``|g'| <= 2 e``,
    ``e = max(step / 2, 1 - ratio)`` the largest error; the tile search represents a bin by its
    centre (``|x - c| <= 1 / (2 bins)``), the column search by its average (``<= 1 / bins``).
    """
    L = 2 ** (table.bits[bi] - 1) - 1
    for t in range(tiles.n_tiles):
        r0, c0, nr, nc = (int(v[t]) for v in (tiles.row0, tiles.col0, tiles.nrows, tiles.ncols))
        err2 = (w64[r0:r0 + nr, c0:c0 + nc] - deq[r0:r0 + nr, c0:c0 + nc]) ** 2
        true = err2.mean()
        if per_column:
            r = table.ratio[t, :nc, bi]
            mx = table.maxabs[t, :nc]
            e = np.maximum(r / L / 2, 1 - r)
            bound = np.sum(nr * mx ** 2 * 2.1 * e / cfg.column_bins) / (nr * nc)
            bound += np.sum(err2[:, table.zero[t, :nc]]) / (nr * nc)      # negligible columns report 0
        else:
            r, mx = table.ratio[t, bi], table.maxabs[t]
            bound = mx ** 2 * max(r / L / 2, 1 - r) / cfg.bins if mx >= thr else true
        assert abs(table.objective[t, bi] - true) <= bound * (1 + 1e-6) + 1e-6 * true + 1e-300, \
            (t, table.bits[bi], table.objective[t, bi], true, bound)


@pytest.mark.parametrize("objective,granularity", CONFIGS)
@SETTINGS
@given(case=layers())
def test_properties_adversarial(case, objective, granularity):
    layer, R, C, bits = case
    check_properties(layer, R, C, bits, objective, granularity)


@pytest.mark.parametrize("objective,granularity", CONFIGS)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=raw_layers())
def test_properties_raw_floats(case, objective, granularity):
    layer, R, C, bits = case
    check_properties(layer, R, C, bits, objective, granularity)


@pytest.mark.parametrize("objective,granularity", CONFIGS)
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=layers(), data=st.data())
def test_deterministic_and_column_independent(case, data, objective, granularity):
    layer, R, C, bits = case
    tiles, _, a = _search(layer, R, C, bits, objective, granularity)
    _, _, b = _search(Layer("w", layer.weight.copy(), layer.kind), R, C, bits, objective, granularity)
    for f in ("objective", "distortion", "nsr", "ratio", "maxabs"):
        assert getattr(a, f).tobytes() == getattr(b, f).tobytes(), f
    idx = np.arange(len(bits))
    assert all(a.scales(np.full(tiles.n_tiles, i)).tobytes() == b.scales(np.full(tiles.n_tiles, i)).tobytes()
               for i in idx)
    if granularity != "column":
        return
    # replace every other column of the layer: the kept column's ratio, max and scales do not move
    m = layer.matrices[0]
    keep = data.draw(st.integers(0, m.shape[1] - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    other = (rng.normal(size=m.shape) * 10.0 ** rng.uniform(-5, 3, size=m.shape[1])).astype(np.float32)
    other[:, rng.random(m.shape[1]) < 0.3] = 0
    other[:, keep] = m[:, keep]
    w2 = np.ascontiguousarray(other.T).reshape(layer.weight.shape) if layer.kind == "conv2d" else other
    _, _, c = _search(Layer("w", w2, layer.kind), R, C, bits, objective, granularity)
    cols = np.flatnonzero((tiles.col0 <= keep) & (keep < tiles.col0 + tiles.ncols))
    j = keep - tiles.col0[cols]
    assert a.ratio[cols, j].tobytes() == c.ratio[cols, j].tobytes()
    assert a.maxabs[cols, j].tobytes() == c.maxabs[cols, j].tobytes()
    for i in idx:
        sa, sc = a.scales(np.full(tiles.n_tiles, i)), c.scales(np.full(tiles.n_tiles, i))
        assert sa[cols, j].tobytes() == sc[cols, j].tobytes()


@pytest.mark.parametrize("objective,granularity", CONFIGS)
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(case=layers())
def test_end_to_end_levels_and_dequantised(case, objective, granularity):
    """Through psq_search and QuantResult (the path the packager uses)."""
    layer, R, C, bits = case
    spec = preset(rows=R, cols=C, weight_bits=bits)
    r = psq_search([layer], spec, config=SearchConfig(objective=objective, granularity=granularity),
                   tolerance=0.01)
    assert np.all(np.isfinite(r.scales)) and np.all(r.scales > 0)
    L = 2 ** (r.bits - 1) - 1
    q = r.levels(0)[0]
    tiles = r.tiles
    for t in range(tiles.n_tiles):
        r0, c0, nr, nc = (int(v[t]) for v in (tiles.row0, tiles.col0, tiles.nrows, tiles.ncols))
        assert np.abs(q[r0:r0 + nr, c0:c0 + nc]).max() <= L[t]
    dq = r.dequantized(0)
    assert np.all(np.isfinite(dq))
    assert not dq[layer.weight == 0].any() or np.all(np.abs(layer.weight) < 1)


def test_denormal_columns_regression():
    """The crash seen on folded-BatchNorm mobile nets: columns with max|w| ~ 3e-40."""
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(300, 200)) * 0.05).astype(np.float32)
    w[:, 3], w[:, 4], w[:, 5], w[:, 8] = 3e-40, 0.0, -1e-45, 1e-36
    w[:128, 9] = 1e-38
    w[:, 7] *= 1e-4
    for objective, granularity in CONFIGS:
        r = psq_search([Layer("x", w)], preset(), config=SearchConfig(objective=objective, granularity=granularity),
                       budget="avg-bits=4")
        dq = r.dequantized(0)
        assert np.all(np.isfinite(r.scales)) and np.all(r.scales > 0) and np.all(np.isfinite(dq))
        assert not dq[:, [3, 4, 5, 8]].any()
        if granularity == "column":
            assert np.abs(dq[:, 7]).max() > 0          # a small but normal column is quantised, not dropped
