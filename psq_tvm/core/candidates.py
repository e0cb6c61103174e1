"""Candidate scales per tile (or tile column) and bitwidth, scored by the PSQ objective, data-free.

For every tile the search considers each candidate bitwidth ``b`` and a grid
of clipping ratios ``r`` (scale ``s = r * max|w| / L``, ``L = 2**(b-1) - 1``,
symmetric levels ``q = clip(rint(w / s), -L, L)``) and scores how far the
quantised weight distribution is from the original one:

* ``mse``    -- mean squared error between ``w`` and ``s * q``;
* ``cdf-kl`` -- the CDF-based symmetric divergence on ``|w|`` (AFP, ICCV'21):
  at thresholds ``t`` the fractions ``P = F(|w| < t)`` and ``Q = F(|s q| < t)``
  are compared by the symmetric (Jeffreys) KL divergence of the two Bernoulli
  laws, ``(P - Q) * (logit P - logit Q)``, averaged over the thresholds.

Both are computed from one histogram of ``|w| / max|w|`` per tile
(``bins`` fine bins), so the cost per candidate does not depend on the tile
size: one pass over the weights builds all histograms, and every candidate of
every tile is then evaluated at once (a matrix product for ``mse``, gathers on
the cumulative histogram for ``cdf-kl``).  The result, a :class:`CandidateTable`,
is what :mod:`psq_tvm.core.allocation` chooses bitwidths from.

Per tile column (``granularity="column"``, one scale per bitline, the
bitwidth per tile) a column holds at most ``rows`` weights, so the search uses
a coarse histogram per column (``column_bins``) with kernels that do not
represent a bin by its centre, and ``column_thresholds`` CDF thresholds for
``cdf-kl`` (see :func:`column_mse`, :func:`column_cdf_kl`).

Zero and negligible weights: a tile (column) whose ``max|w|`` is 0 or below
:func:`negligible_below` (~1e-35 for bits <= 8: every candidate scale must be
a normal float32) is treated as all zero -- scale 1.0, levels 0, objective and
distortion 0 -- instead of being quantised with a subnormal scale.  Histogram
normalisation never overflows, so denormal or all-zero channels (BatchNorm
folded with a vanishing gamma) cannot produce inf/NaN bins.  NaN/Inf weights
are rejected earlier (:func:`psq_tvm.core.tiling.check_weight`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np

from .quant import DEFAULT_ROUNDING, ROUNDINGS
from .tiling import ModelTiles, tile_blocks

OBJECTIVES = ("mse", "cdf-kl")
DEFAULT_OBJECTIVE = "mse"      # chosen from the evaluation: README, "Defaults"
WEIGHTINGS = ("layer", "none")
GRANULARITIES = ("tile", "column")
DEFAULT_GRANULARITY = "column"   # chosen from the evaluation: README, "Defaults"


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Knobs of the candidate search (not of the allocation)."""

    objective: str = DEFAULT_OBJECTIVE
    n_scales: int = 32          # clipping ratios per bitwidth
    min_clip: float = 0.15      # smallest clipping ratio of max|w|
    bins: int = 2048            # fine histogram bins of |w| / max|w|
    thresholds: int = 128       # CDF thresholds for cdf-kl (bins must be a multiple)
    weighting: str = "layer"    # how tile distortions are summed for the budget
    granularity: str = DEFAULT_GRANULARITY   # "tile": one scale per tile; "column": one per tile column (bitline)
    column_bins: int = 64       # histogram bins per column when granularity == "column" (a column has <= rows weights)
    column_thresholds: int = 16  # CDF thresholds per column for cdf-kl (column_bins must be a multiple)
    rounding: str = DEFAULT_ROUNDING  # how the chosen candidate's levels are formed (quant.ROUNDINGS)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown PSQ objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose one of {ROUNDINGS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown scale granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        if self.column_bins < 16 or self.column_thresholds < 2 or (
                self.granularity == "column" and self.objective == "cdf-kl" and self.column_bins % self.column_thresholds):
            raise ValueError(f"column_bins ({self.column_bins}) must be >= 16 (and a multiple of "
                             f"column_thresholds ({self.column_thresholds}, >= 2) for cdf-kl per column)")
        if self.n_scales < 1:
            raise ValueError(f"n_scales must be >= 1, got {self.n_scales}")
        if not 0.0 < self.min_clip <= 1.0:
            raise ValueError(f"min_clip must be in (0, 1], got {self.min_clip}")
        if self.bins < 16 or self.thresholds < 2 or self.bins % self.thresholds:
            raise ValueError(f"bins ({self.bins}) must be >= 16 and a multiple of thresholds ({self.thresholds})")

    @property
    def ratios(self) -> np.ndarray:
        """Clipping ratios, largest first (ties resolve to the least clipping)."""
        return np.linspace(1.0, self.min_clip, self.n_scales)


_CACHE_ELEMENTS = 1 << 17
_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


def negligible_below(bits: Sequence[int], ratios: np.ndarray) -> float:
    """``max|w|`` below which a tile (or tile column) is treated as all zero.

    A tile (column) whose ``max|w|`` is zero or below this value gets levels 0,
    scale 1.0 and distortion 0.  The value is the smallest ``max|w|`` for which
    every candidate scale ``r * max|w| / L`` is a normal float32
    (``float32.tiny * L_max / r_min``, about 1e-35 for bits <= 8): levels are
    computed in float32, and a subnormal scale has too few significant bits to
    round weights to the nearest level.  Such weights (denormal channels left by
    a folded BatchNorm with a vanishing gamma) change no output measurably.
    """
    L_max = 2 ** (max(bits) - 1) - 1
    return _F32_TINY * L_max / float(np.min(ratios))


_BELOW_BINS = 1.0 - 2.0 ** -20      # |w| * bins / max * this < bins even after float32 rounding


def _bin_scale(mx: np.ndarray, bins: int, zero_below: float, shrink: float = 1.0) -> np.ndarray:
    """float32 ``bins / mx`` (times ``shrink``) where ``mx`` is kept, 0 where it is zero or negligible.

    Divided in float32 like the weights (so normal tiles bin exactly as before),
    then clamped to the float32 range: ``|w| * inv <= mx * inv <= bins`` is
    finite for every ``|w| <= mx`` (no inf, no 0 * inf = NaN, no negative index).
    """
    mx = np.asarray(mx, dtype=np.float32)
    keep = (mx > 0) & (mx >= zero_below)
    with np.errstate(over="ignore", divide="ignore"):
        inv = np.divide(np.float32(bins * shrink), mx, out=np.zeros_like(mx), where=keep)
    return np.minimum(inv, np.float32(_F32_MAX * shrink))


def tile_histograms(tiles: ModelTiles, bins: int, zero_below: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile histograms of ``|w| / max|w|`` and per-tile ``max|w|``.

    Returns ``(hist [T, bins] float64 counts, maxabs [T] float64)``.  Bin ``k``
    holds ``k/bins <= |w|/max < (k+1)/bins`` (the maximum itself in the last bin).
    A tile with ``maxabs == 0`` or ``maxabs < zero_below`` (see
    :func:`negligible_below`) has all its weights in bin 0.
    """
    T = tiles.n_tiles
    maxabs = np.zeros(T, dtype=np.float64)
    counts = np.zeros(T * bins, dtype=np.int64)
    for _, _, m, grid, first in tiles.matrices():
        for block, block_ids in tile_blocks(m, grid):
            step = max(1, _CACHE_ELEMENTS // (block[0].size or 1))
            for i0 in range(0, block.shape[0], step):          # cache-sized pieces
                view, ids = block[i0:i0 + step], block_ids[i0:i0 + step]
                a = np.abs(view, dtype=np.float32)
                mx = a.max(axis=(1, 3))
                maxabs[first + ids] = mx
                a *= _bin_scale(mx, bins, zero_below)[:, None, :, None]
                idx = a.astype(np.int64)
                np.minimum(idx, bins - 1, out=idx)
                lo, hi = int(ids.min()), int(ids.max()) + 1
                idx += ((ids - lo) * bins)[:, None, :, None]
                a0 = (first + lo) * bins
                counts[a0:a0 + (hi - lo) * bins] += np.bincount(idx.ravel(), minlength=(hi - lo) * bins)
    return counts.reshape(T, bins).astype(np.float64), maxabs


def candidate_grid(bits: Sequence[int], ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised scales ``[B, S]`` (``r / L``) and level counts ``L [B]``."""
    L = np.array([2 ** (b - 1) - 1 for b in bits], dtype=np.float64)
    return ratios[None, :] / L[:, None], L


def _quantise_normalised(x: np.ndarray, s: np.ndarray, L: np.ndarray) -> np.ndarray:
    """``s * clip(rint(x / s), 0, L)`` for ``x >= 0``, broadcast over candidates."""
    return s * np.minimum(np.rint(x / s), L)


def distortion_mse(hist: np.ndarray, bits: Sequence[int], ratios: np.ndarray) -> np.ndarray:
    """Sum of squared error per tile and candidate in normalised units: ``[T, B, S]``.

    Multiply by ``maxabs**2`` for weight units.  Each bin is represented by its
    centre, so the result is exact up to the bin width (``1/bins`` of max|w|).
    """
    H = hist.shape[1]
    centres = (np.arange(H) + 0.5) / H
    s, L = candidate_grid(bits, ratios)
    q = _quantise_normalised(centres[:, None, None], s[None], L[None, :, None])  # [H, B, S]
    err2 = (centres[:, None, None] - q) ** 2
    return (hist @ err2.reshape(H, -1)).reshape(hist.shape[0], len(bits), len(ratios))


_CDF_CHUNK = 64


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    out = np.log(p)
    out -= np.log1p(-p)
    return out


def distortion_cdf_kl(hist: np.ndarray, bits: Sequence[int], ratios: np.ndarray, thresholds: int,
                      eps: float = 1e-6) -> np.ndarray:
    """CDF-based symmetric divergence per tile and candidate: ``[T, B, S]``.

    At each threshold ``t_i = i / thresholds`` (i = 1 .. thresholds-1) of
    ``|w|/max``, ``P = F(|w| < t)`` is read from the cumulative histogram and
    ``Q = F(|q(w)| < t)`` is ``F`` at the rounding boundary below ``t``
    (``|q| < t`` exactly when ``|w| < (J + 1/2) s`` with ``J`` the largest level
    index below ``t / s``).  Score: mean over thresholds of
    ``(P - Q) * (logit P - logit Q)``.
    """
    T, H = hist.shape
    n = hist.sum(axis=1, keepdims=True)
    cdf = np.zeros((T, H + 1), dtype=np.float64)
    np.cumsum(hist, axis=1, out=cdf[:, 1:])
    cdf /= np.where(n > 0, n, 1)
    cdf = cdf.astype(np.float32)
    logit = _logit(cdf, eps)
    tau = np.arange(1, thresholds) / thresholds                    # [Th]
    p_idx = (tau * H).astype(np.int64)                              # exact bin boundaries
    s, L = candidate_grid(bits, ratios)                             # [B, S], [B]
    J = np.ceil(tau[None, None, :] / s[:, :, None]) - 1             # [B, S, Th]
    boundary = (J + 0.5) * s[:, :, None]
    q_idx = np.clip(np.ceil(boundary * H - 0.5), 0, H).astype(np.int64)   # bins whose centre is below
    q_idx = np.where(J >= L[:, None, None], H, q_idx)               # every level below t: Q = 1
    out = np.empty((T, len(bits), len(ratios)), dtype=np.float64)
    # chunks of tiles keep the gathered [S, Th, chunk] blocks in cache
    for a in range(0, T, _CDF_CHUNK):
        b = min(T, a + _CDF_CHUNK)
        cdfT, logitT = np.ascontiguousarray(cdf[a:b].T), np.ascontiguousarray(logit[a:b].T)   # [H+1, chunk]
        P, GP = cdfT[p_idx], logitT[p_idx]                                                     # [Th, chunk]
        shape = (len(ratios), len(tau), b - a)
        Q, GQ = np.empty(shape, np.float32), np.empty(shape, np.float32)
        for bi in range(len(bits)):
            np.take(cdfT, q_idx[bi], axis=0, out=Q)
            np.take(logitT, q_idx[bi], axis=0, out=GQ)
            Q -= P
            GQ -= GP
            Q *= GQ
            out[a:b, bi, :] = Q.sum(axis=1).T
    return out / (thresholds - 1)


# ------------------------------------------------------------------ per column
# A tile column holds at most ``rows`` (128) weights, so a fine histogram per
# column compresses nothing.  Per column the search uses a coarse histogram
# (``column_bins``, 64) and evaluates it with candidate kernels that do not
# represent a bin by its centre:
#
# * mse: the squared error averaged over each bin (weights uniform within a
#   bin), ``E[bin, candidate]``; one float32 matrix product gives every
#   candidate of every column.  Unlike bin centres this stays accurate when the
#   quantisation step is finer than a bin (6-8 bits), where it tends to the
#   rounding noise ``s**2 / 12``.
# * cdf-kl: ``column_thresholds`` (16) thresholds on bin boundaries.  Every
#   term ``(P - Q)(logit P - logit Q)`` reads the cumulative histogram at two
#   boundaries ``(a, j)`` (``a`` the threshold, ``j`` the rounding boundary the
#   candidate puts below it), and most (threshold, candidate) pairs have
#   ``j == a`` (term 0) or share a pair with other candidates.  The distinct
#   nonzero pairs of a bitwidth (a few dozen to ~200, clipped thresholds
#   included) are computed once per column, and a 0/1 matrix product sums them
#   into every candidate: the same objective as the gather form, at
#   matrix-product speed.  At 2 bits every candidate compares all its unclipped
#   thresholds with one boundary, a sum read from prefix sums.  With 16
#   thresholds (8 weights each on average) the largest is 15/16 of max|w|, so
#   this objective does not see clipping above it; ``column_bins=128,
#   column_thresholds=128`` gives the per-tile definition (128 thresholds) at
#   several times the cost.
# The search runs piece by piece (whole tiles, cache-sized) as the histograms
# are built, without a [T * cols, bins] array.
# Ties (equal objectives up to float32 rounding) resolve to the least clipping.


def _column_blocks(matrix: np.ndarray, grid) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regular blocks as ``[A, B, tc, tr]`` views (tile columns on axis 2, the column's rows last) with tile ids ``[A, B]``.

    Built on :func:`tile_blocks`, so a conv's unrolled matrix (the transpose of a
    contiguous array) is read in storage order: its tile columns are contiguous runs.
    """
    transposed = not matrix.flags.c_contiguous and matrix.T.flags.c_contiguous
    for view, ids in tile_blocks(matrix, grid):
        if transposed:            # [nc, tc, nr, tr], ids [nc, nr]
            yield view.transpose(0, 2, 1, 3), ids
        else:                     # [nr, tr, nc, tc], ids [nr, nc]
            yield view.transpose(0, 2, 3, 1), ids


def _column_pieces(tiles: ModelTiles, bins: int, zero_below: float
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Histograms of ``|w| / max|w|_column`` per cache-sized piece of whole tiles.

    Yields ``(rows, colmax, hist)``: global row ids ``t * cols + c`` ``[n]``,
    the columns' ``max|w|`` ``[n]`` (float32) and their histograms ``[n, bins]``
    (float32 counts).  A column whose max is zero or below ``zero_below`` has
    all its weights in bin 0.
    """
    C = tiles.cols
    for _, _, m, grid, first in tiles.matrices():
        for block, block_ids in _column_blocks(m, grid):
            tc = block.shape[2]
            step = max(1, _CACHE_ELEMENTS // (block[0].size or 1))
            for i0 in range(0, block.shape[0], step):          # whole tiles in every piece
                view, ids = block[i0:i0 + step], block_ids[i0:i0 + step]
                a = np.abs(view, dtype=np.float32)              # [A, B, tc, tr]
                cm = a.max(axis=3)                              # [A, B, tc]
                a *= _bin_scale(cm, bins, zero_below, _BELOW_BINS)[..., None]   # < bins: no clamp pass
                idx = a.astype(np.intp)
                n_local = ids.size * tc                         # local row = (local tile, column)
                idx += (np.arange(0, n_local * bins, bins).reshape(cm.shape))[..., None]
                hist = np.bincount(idx.ravel(order="K"), minlength=n_local * bins).reshape(n_local, bins)
                rows = ((first + ids)[:, :, None] * C + np.arange(tc)).ravel()
                yield rows, cm.ravel(), hist.astype(np.float32)


def column_histograms(tiles: ModelTiles, bins: int, zero_below: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per tile-column histograms of ``|w| / max|w|_column``: ``([T * cols, bins] float32, colmax [T, cols])``.

    Row ``t * cols + c`` is column ``c`` of tile ``t``; columns beyond a ragged
    tile's width are empty.  A column whose max is zero or below ``zero_below``
    has all its weights in bin 0.  (The search itself evaluates every piece as
    it is built, without this [T * cols, bins] array.)
    """
    T, C = tiles.n_tiles, tiles.cols
    colmax = np.zeros(T * C, dtype=np.float64)
    counts = np.zeros((T * C, bins), dtype=np.float32)
    for rows, cm, hist in _column_pieces(tiles, bins, zero_below):
        colmax[rows] = cm
        counts[rows] = hist
    return counts, colmax.reshape(T, C)


def _column_search(tiles: ModelTiles, bits: Sequence[int], config: SearchConfig, zero_below: float):
    """Per column: best objective ``val [T*cols, B]`` (normalised units), its ratio index, ``colmax [T, cols]``,
    ``E[x^2]``-energy ``[T*cols]`` (normalised units, sum over the column) and weight count ``[T*cols]``.

    Negligible columns get value, index, energy and count 0.
    """
    T, C, B = tiles.n_tiles, tiles.cols, len(bits)
    bins, ratios = config.column_bins, config.ratios
    val = np.zeros((T * C, B), dtype=np.float64)
    best = np.zeros((T * C, B), dtype=np.int64)
    colmax = np.zeros(T * C, dtype=np.float64)
    energy = np.zeros(T * C, dtype=np.float64)
    counts = np.zeros(T * C, dtype=np.float64)
    edges = np.arange(bins + 1) / bins                                 # E[x^2] of a uniform bin
    bin_x2 = ((edges[:-1] ** 2 + edges[:-1] * edges[1:] + edges[1:] ** 2) / 3).astype(np.float32)
    for rows, cm, hist in _column_pieces(tiles, bins, zero_below):
        colmax[rows] = cm
        live = cm >= zero_below
        if not live.all():
            rows, hist = rows[live], hist[live]
        if not len(rows):
            continue
        if config.objective == "mse":
            val[rows], best[rows] = column_mse(hist, bits, ratios)
        else:
            val[rows], best[rows] = column_cdf_kl(hist, bits, ratios, config.column_thresholds)
        energy[rows] = hist @ bin_x2
        counts[rows] = hist.sum(axis=1)
    return val, best, colmax.reshape(T, C), energy, counts


_COLUMN_CHUNK = 4096
_TIE_RTOL = np.float32(1e-6)


def _tie_bias(S: int) -> np.ndarray:
    """``1 + 1e-6 k`` for candidate ``k``: folded into the candidate matrices (a linear map), so the
    argmin of the biased objective picks, among candidates within ~1e-6 of each other, the least
    clipping (the first).  The bias outweighs the float32 rounding of the matrix products (~1e-7),
    so a column's choice does not depend on the other columns in the product."""
    return 1.0 + float(_TIE_RTOL) * np.arange(S)


def _pick(raw: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best candidate along the last axis of the biased objective ``raw [..., S]``: ``(unbiased value, index)``."""
    S = raw.shape[-1]
    k = np.argmin(raw, axis=-1)
    flat = raw.reshape(-1, S)[np.arange(k.size), k.ravel()].reshape(k.shape)
    return flat / bias[k], k


@functools.lru_cache(maxsize=16)
def _mse_bin_kernel(bins: int, bits: tuple[int, ...], ratios: tuple[float, ...], sub: int = 64,
                    biased: bool = False) -> np.ndarray:
    """``[bins, B * S]`` float32: squared error of every candidate averaged over each bin of ``|w|/max``
    (times :func:`_tie_bias` when ``biased``)."""
    x = (np.arange(bins * sub) + 0.5) / (bins * sub)              # midpoint rule inside each bin
    s, L = candidate_grid(bits, np.asarray(ratios))
    q = _quantise_normalised(x[:, None, None], s[None], L[None, :, None])
    err2 = ((x[:, None, None] - q) ** 2).reshape(bins, sub, -1).mean(axis=1)
    if biased:
        err2 = (err2.reshape(bins, len(bits), -1) * _tie_bias(len(ratios))).reshape(bins, -1)
    return np.ascontiguousarray(err2, dtype=np.float32)


def column_mse(hist: np.ndarray, bits: Sequence[int], ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: sum of squared error (normalised units) at the best ratio ``[N, B]`` and that ratio's index."""
    B, S = len(bits), len(ratios)
    bias = _tie_bias(S)
    kern = _mse_bin_kernel(hist.shape[1], tuple(bits), tuple(float(r) for r in ratios), biased=True)
    val = np.empty((hist.shape[0], B), dtype=np.float64)
    best = np.empty((hist.shape[0], B), dtype=np.int64)
    for a in range(0, hist.shape[0], _COLUMN_CHUNK):
        raw = (hist[a:a + _COLUMN_CHUNK] @ kern).reshape(-1, B, S)   # [chunk, B, S]
        val[a:a + len(raw)], best[a:a + len(raw)] = _pick(raw, bias)
    return val, best


def _boundary_indices(bins: int, bits: Sequence[int], ratios: np.ndarray, thresholds: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative-histogram indices of the thresholds ``[Th-1]`` and of ``F(|q| < t)`` per candidate ``[B, S, Th-1]``."""
    tau = np.arange(1, thresholds) / thresholds
    p_idx = np.arange(1, thresholds) * (bins // thresholds)           # exact bin boundaries
    s, L = candidate_grid(bits, ratios)
    J = np.ceil(tau[None, None, :] / s[:, :, None]) - 1
    boundary = (J + 0.5) * s[:, :, None]
    q_idx = np.clip(np.ceil(boundary * bins - 0.5), 0, bins).astype(np.int64)
    q_idx = np.where(J >= L[:, None, None], bins, q_idx)             # every level below t: Q = 1
    return p_idx, q_idx


@functools.lru_cache(maxsize=16)
def _cdf_pairs(bins: int, bits: tuple[int, ...], ratios: tuple[float, ...], thresholds: int):
    """How :func:`column_cdf_kl` sums the terms of every candidate: ``(ranges, clip_row, clip_sel, per_bit)``.

    Terms ``(P_a - C_j)(logit P_a - logit C_j)`` of a threshold ``a`` and a
    rounding boundary ``j`` are stored as rows of a term matrix: per threshold
    ``a`` the contiguous boundary range ``[lo, hi)`` covering its unclipped pairs
    from row ``off`` (``ranges`` holds ``(a, lo, hi, off)``), then the clipped
    pairs ``(a, bins)`` (``Q = 1``), one per threshold, from row ``clip_row``.
    ``clip_sel[c]`` ``[S, Th-1]`` sums the clipped terms into candidates (the
    pattern -- thresholds above the clipping ratio -- is the same for every
    bitwidth in exact arithmetic, so usually computed once).

    ``per_bit[b]`` is ``("pairs", rows, sel, c)``: the term rows the bitwidth
    uses (clipped ones included) and the 0/1 matrix ``[len(rows), S]`` summing
    them into its candidates; or, when every candidate has a single unclipped boundary (2
    bits: one level above 0), ``("run", i0, i1, j, c)``: thresholds
    ``i0[k] <= i < i1[k]`` all compare with boundary ``j[k]``, a sum computed
    from prefix sums over the thresholds, no term matrix needed.  Candidate
    ``k`` of every matrix is scaled by :func:`_tie_bias`.
    """
    S = len(ratios)
    bias = _tie_bias(S)
    p_idx, q_idx = _boundary_indices(bins, bits, np.asarray(ratios), thresholds)
    P = np.broadcast_to(p_idx[None, None, :], q_idx.shape)
    unclipped = q_idx < bins
    single = [all(len(np.unique(q_idx[bi, k][unclipped[bi, k]])) <= 1 for k in range(S))
              for bi in range(len(bits))]
    nz = (q_idx != P) & unclipped & ~np.array(single)[:, None, None]   # term rows of the "pairs" bitwidths
    row = np.full(q_idx.shape, -1, dtype=np.int64)
    ranges, off = [], 0
    for i, a in enumerate(p_idx):
        m = nz[:, :, i]
        if m.any():
            lo, hi = int(q_idx[:, :, i][m].min()), int(q_idx[:, :, i][m].max()) + 1
            ranges.append((int(a), lo, hi, off))
            row[:, :, i] = np.where(m, off + q_idx[:, :, i] - lo, row[:, :, i])
            off += hi - lo
    clip_row = off
    clip_sel, per_bit = [], []
    for bi in range(len(bits)):
        pattern = (~unclipped[bi] * bias[:, None]).astype(np.float32)  # [S, Th-1]
        for ci, known in enumerate(clip_sel):
            if np.array_equal(known, pattern):
                break
        else:
            ci = len(clip_sel)
            clip_sel.append(pattern)
        if single[bi]:
            u = unclipped[bi]                                           # [S, Th-1], one run per candidate
            i0 = np.where(u.any(axis=1), np.argmax(u, axis=1), 0)
            i1 = np.where(u.any(axis=1), u.shape[1] - np.argmax(u[:, ::-1], axis=1), 0)
            assert np.all(u.sum(axis=1) == i1 - i0)                     # contiguous
            j = np.where(u.any(axis=1), q_idx[bi][np.arange(S), i0], 0)
            per_bit.append(("run", i0, i1, j, ci))
            continue
        rb = np.where(unclipped[bi], row[bi], clip_row + np.arange(len(p_idx))[None, :])   # clipped rows too
        rb = np.where(unclipped[bi] & (row[bi] < 0), -1, rb)
        used = np.unique(rb[rb >= 0])
        sel = np.zeros((S, len(used)), dtype=np.float32)
        k, i = np.nonzero(rb >= 0)
        sel[k, np.searchsorted(used, rb[k, i])] = bias[k]
        per_bit.append(("pairs", used, np.ascontiguousarray(sel.T), ci))
    return tuple(ranges), clip_row, tuple(clip_sel), per_bit


def _logit32(p: np.ndarray, eps: float) -> np.ndarray:
    """``logit(clip(p, eps, 1 - eps))`` in float32 with one log (no log1p)."""
    p = np.clip(p, np.float32(eps), np.float32(1 - eps))
    q = np.subtract(np.float32(1), p)
    np.divide(p, q, out=p)
    return np.log(p, out=p)


def column_cdf_kl(hist: np.ndarray, bits: Sequence[int], ratios: np.ndarray, thresholds: int,
                  eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per column: CDF divergence at the best ratio ``[N, B]`` and that ratio's index.

    The objective is :func:`distortion_cdf_kl`'s with ``thresholds`` thresholds
    (bin boundaries), evaluated as a sum over the distinct nonzero terms (see the
    comment above) in a transposed layout (one row per cumulative-histogram index).
    """
    N, H = hist.shape
    ranges, clip_row, clip_sel, per_bit = _cdf_pairs(H, tuple(bits), tuple(float(r) for r in ratios), thresholds)
    p_idx = np.arange(1, thresholds) * (H // thresholds)
    B, S = len(bits), len(ratios)
    val = np.empty((N, B), dtype=np.float64)
    best = np.empty((N, B), dtype=np.int64)
    chunk = min(N, _COLUMN_CHUNK // 2)
    tri = np.tri(H + 1, H, -1, dtype=np.float32)                        # cdf[j] = sum of bins < j (exact integers)
    terms = np.empty((clip_row + len(p_idx), chunk), dtype=np.float32)
    out = np.empty((chunk, B, S), dtype=np.float32)
    bias = _tie_bias(S)
    runs = any(kind == "run" for kind, *_ in per_bit)
    for a0 in range(0, N, chunk):
        h = hist[a0:a0 + chunk]
        c = len(h)
        cdf = tri @ h.T                                                 # [H+1, chunk] cumulative counts
        n = cdf[H].copy()
        cdf /= np.where(n > 0, n, 1)[None, :]
        lg = _logit32(cdf.copy(), eps)
        D = terms[:, :c]
        for a, lo, hi, off in ranges:                                   # (P - Q)(logit P - logit Q)
            d = np.subtract(cdf[a], cdf[lo:hi], out=D[off:off + hi - lo])
            d *= lg[a] - lg[lo:hi]
        d = np.subtract(cdf[p_idx], cdf[H], out=D[clip_row:])
        d *= lg[p_idx] - lg[H]
        if runs:                            # prefix sums over thresholds of P G, P, G (float64: differences cancel)
            cum = np.zeros((len(p_idx) + 1, 3, c))
            cum[1:, 1] = cdf[p_idx]
            cum[1:, 2] = lg[p_idx]
            np.multiply(cum[1:, 1], cum[1:, 2], out=cum[1:, 0])
            for i in range(2, len(p_idx) + 1):
                cum[i] += cum[i - 1]
        clipped = [D[clip_row:].T @ cs.T for cs in clip_sel] if runs else []   # [chunk, S] each
        raw = out[:c]
        for bi, (kind, *plan) in enumerate(per_bit):
            if kind == "run":                                           # sum_{i0<=i<i1} (P_i - c)(G_i - g)
                i0, i1, j, ci = plan
                span = cum[i1] if not i0.any() else cum[i1] - cum[i0]   # [S, 3, chunk]
                cj, gj = cdf[j].astype(np.float64), lg[j].astype(np.float64)   # [S, chunk]
                r = span[:, 0].copy()
                r -= gj * span[:, 1]
                r -= cj * span[:, 2]
                cj *= gj
                cj *= ((i1 - i0) * bias)[:, None]
                r *= bias[:, None]
                r += cj
                raw[:, bi] = r.T
                raw[:, bi] += clipped[ci]
                continue
            used, sel, _ = plan
            if len(used):
                np.matmul(np.take(D, used, axis=0).T, sel, out=raw[:, bi])
            else:
                raw[:, bi] = 0
        val[a0:a0 + c], best[a0:a0 + c] = _pick(raw, bias)
    return val / (thresholds - 1), best


@dataclasses.dataclass
class CandidateTable:
    """Best scale per tile (or tile column) and bitwidth, with its objective, before allocation."""

    bits: tuple[int, ...]
    objective: np.ndarray     # [T, B] objective at the best ratio (reported units)
    distortion: np.ndarray    # [T, B] what the budget sums (weighted, comparable across layers)
    nsr: np.ndarray           # [T, B] tolerance measure (relative MSE or divergence)
    ratio: np.ndarray         # [T, B] chosen clipping ratio, or [T, cols, B] per column
    maxabs: np.ndarray        # [T], or [T, cols] per column
    zero: np.ndarray | None = None   # like maxabs: True where the tile (column) is treated as all zero

    def scales(self, bits_index: np.ndarray) -> np.ndarray:
        """Scale per tile ``[T]`` (or per tile column ``[T, cols]``) for the chosen bitwidth indices.

        Finite and > 0 everywhere: 1.0 for tiles (columns) treated as zero.
        """
        t = np.arange(len(bits_index))
        L = np.array([2 ** (b - 1) - 1 for b in self.bits], dtype=np.float64)[bits_index]
        if self.ratio.ndim == 3:
            s = self.ratio[t, :, bits_index] * self.maxabs / L[:, None]
        else:
            s = self.ratio[t, bits_index] * self.maxabs / L
        zero = self.zero if self.zero is not None else ~(self.maxabs > 0)
        return np.where(zero, 1.0, s)


_ROW_CHUNK = 8192


def _best_ratio(hist: np.ndarray, bits: Sequence[int], config: SearchConfig) -> tuple[np.ndarray, np.ndarray]:
    """Objective at the best clipping ratio per histogram row and bitwidth, and that ratio's index."""
    rows = hist.shape[0]
    val = np.empty((rows, len(bits)), dtype=np.float64)
    best = np.empty((rows, len(bits)), dtype=np.int64)
    for a in range(0, rows, _ROW_CHUNK):
        h = hist[a:a + _ROW_CHUNK]
        if config.objective == "mse":
            raw = distortion_mse(h, bits, config.ratios)
        else:
            raw = distortion_cdf_kl(h, bits, config.ratios, config.thresholds)
        k = np.argmin(raw, axis=2)                                     # first minimum: least clipping
        best[a:a + len(h)] = k
        val[a:a + len(h)] = np.take_along_axis(raw, k[:, :, None], axis=2)[:, :, 0]
    return val, best


def evaluate_candidates(tiles: ModelTiles, bits: Sequence[int], config: SearchConfig,
                        tile_importance: np.ndarray | None = None) -> CandidateTable:
    """Score every (bitwidth, clipping ratio) of every tile and keep the best ratio per bitwidth.

    Tiles (columns) whose ``max|w|`` is zero or below :func:`negligible_below`
    are treated as all zero: ratio 1, scale 1.0, objective and distortion 0.
    """
    T, ratios = tiles.n_tiles, config.ratios
    n_w = tiles.n_weights.astype(np.float64)
    zero_below = negligible_below(bits, ratios)
    if config.granularity == "tile":
        bins = config.bins
        hist, maxabs = tile_histograms(tiles, bins, zero_below)
        zero = maxabs < zero_below
        val, best = _best_ratio(hist, bits, config)
        best[zero] = 0
        val[zero] = 0.0
        ratio = ratios[best]
        scale2 = (maxabs ** 2)[:, None]
        centres = (np.arange(bins) + 0.5) / bins
        energy = (hist @ centres ** 2) * scale2[:, 0]
        col_counts = None
    else:
        val, best, maxabs, energy, col_counts = _column_search(tiles, bits, config, zero_below)
        zero = maxabs < zero_below                                    # [T, cols]
        ratio = ratios[best].reshape(T, tiles.cols, len(bits))
        scale2 = (maxabs ** 2).reshape(-1, 1)
        energy = energy * scale2[:, 0]
    if config.objective == "mse":
        err = val * scale2                                            # sum of squared error, weight units
        if col_counts is not None:
            err = err.reshape(T, tiles.cols, len(bits)).sum(axis=1)
            energy = energy.reshape(T, tiles.cols).sum(axis=1)
        objective = err / n_w[:, None]                                # mean squared error per weight
        nsr = err / np.where(energy > 0, energy, np.inf)[:, None]
        layer_energy = np.bincount(tiles.layer, weights=energy, minlength=len(tiles.layers))
        norm = layer_energy[tiles.layer] if config.weighting == "layer" else np.ones(T)
        distortion = err / np.maximum(norm, 1e-300)[:, None]
    else:
        div = val
        if col_counts is not None:
            div = (val * col_counts[:, None]).reshape(T, tiles.cols, len(bits)).sum(axis=1) / n_w[:, None]
        objective = nsr = div
        layer_w = np.bincount(tiles.layer, weights=n_w, minlength=len(tiles.layers))
        share = n_w / layer_w[tiles.layer] if config.weighting == "layer" else n_w
        distortion = div * share[:, None]
    if tile_importance is not None:
        distortion = distortion * np.asarray(tile_importance, dtype=np.float64)[:, None]
    tile_zero = zero.reshape(T, -1).all(axis=1)
    objective = np.where(tile_zero[:, None], 0.0, objective)
    distortion = np.where(tile_zero[:, None], 0.0, distortion)
    nsr = np.where(tile_zero[:, None], 0.0, nsr)
    return CandidateTable(tuple(bits), objective, distortion, nsr, ratio, maxabs, zero)
