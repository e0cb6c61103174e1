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
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .tiling import ModelTiles, canonical_blocks, tile_blocks

OBJECTIVES = ("mse", "cdf-kl")
DEFAULT_OBJECTIVE = "cdf-kl"   # chosen from the evaluation: README, "Defaults"
WEIGHTINGS = ("layer", "none")
GRANULARITIES = ("tile", "column")
DEFAULT_GRANULARITY = "tile"


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
    column_bins: int = 128      # histogram bins per column when granularity == "column"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown PSQ objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown scale granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        if self.column_bins < 16 or (self.granularity == "column" and self.objective == "cdf-kl"
                                     and self.column_bins % self.thresholds):
            raise ValueError(f"column_bins ({self.column_bins}) must be >= 16 (and a multiple of "
                             f"thresholds ({self.thresholds}) for cdf-kl per column)")
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


def tile_histograms(tiles: ModelTiles, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile histograms of ``|w| / max|w|`` and per-tile ``max|w|``.

    Returns ``(hist [T, bins] float64 counts, maxabs [T] float64)``.  Bin ``k``
    holds ``k/bins <= |w|/max < (k+1)/bins`` (the maximum itself in the last bin).
    An all-zero tile has ``maxabs == 0`` and all its weights in bin 0.
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
                inv = np.where(mx > 0, bins / np.where(mx > 0, mx, 1), 0).astype(np.float32)
                a *= inv[:, None, :, None]
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


def column_histograms(tiles: ModelTiles, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per tile-column histograms of ``|w| / max|w|_column``: ``([T * cols, bins], colmax [T, cols])``.

    Row ``t * cols + c`` is column ``c`` of tile ``t``; columns beyond a ragged
    tile's width are empty.
    """
    T, C = tiles.n_tiles, tiles.cols
    colmax = np.zeros((T, C), dtype=np.float64)
    counts = np.zeros(T * C * bins, dtype=np.int64)
    for _, _, m, grid, first in tiles.matrices():
        for view, ids in canonical_blocks(m, grid):
            a = np.abs(view, dtype=np.float32)
            cm = a.max(axis=1)                                          # [nr, nc, tc]
            tc = view.shape[3]
            colmax[first + ids, :tc] = cm
            inv = np.where(cm > 0, bins / np.where(cm > 0, cm, 1), 0).astype(np.float32)
            a *= inv[:, None]
            idx = a.astype(np.int64)
            np.minimum(idx, bins - 1, out=idx)
            lo, hi = int(ids.min()), int(ids.max()) + 1
            col_id = (ids - lo)[:, :, None] * C + np.arange(tc)         # [nr, nc, tc]
            idx += (col_id * bins)[:, None]
            a0 = (first + lo) * C * bins
            counts[a0:a0 + (hi - lo) * C * bins] += np.bincount(idx.ravel(), minlength=(hi - lo) * C * bins)
    return counts.reshape(T * C, bins).astype(np.float32), colmax


@dataclasses.dataclass
class CandidateTable:
    """Best scale per tile (or tile column) and bitwidth, with its objective, before allocation."""

    bits: tuple[int, ...]
    objective: np.ndarray     # [T, B] objective at the best ratio (reported units)
    distortion: np.ndarray    # [T, B] what the budget sums (weighted, comparable across layers)
    nsr: np.ndarray           # [T, B] tolerance measure (relative MSE or divergence)
    ratio: np.ndarray         # [T, B] chosen clipping ratio, or [T, cols, B] per column
    maxabs: np.ndarray        # [T], or [T, cols] per column

    def scales(self, bits_index: np.ndarray) -> np.ndarray:
        """Scale per tile ``[T]`` (or per tile column ``[T, cols]``) for the chosen bitwidth indices."""
        t = np.arange(len(bits_index))
        L = np.array([2 ** (b - 1) - 1 for b in self.bits], dtype=np.float64)[bits_index]
        if self.ratio.ndim == 3:
            s = self.ratio[t, :, bits_index] * self.maxabs / L[:, None]
        else:
            s = self.ratio[t, bits_index] * self.maxabs / L
        return np.where(self.maxabs > 0, s, 1.0)


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
    """Score every (bitwidth, clipping ratio) of every tile and keep the best ratio per bitwidth."""
    T, ratios = tiles.n_tiles, config.ratios
    n_w = tiles.n_weights.astype(np.float64)
    if config.granularity == "tile":
        bins = config.bins
        hist, maxabs = tile_histograms(tiles, bins)
        val, best = _best_ratio(hist, bits, config)
        ratio = ratios[best]
        scale2 = (maxabs ** 2)[:, None]
        col_counts = None
    else:
        bins = config.column_bins
        hist, maxabs = column_histograms(tiles, bins)
        val, best = _best_ratio(hist, bits, config)
        ratio = ratios[best].reshape(T, tiles.cols, len(bits))
        scale2 = (maxabs ** 2).reshape(-1, 1)
        col_counts = hist.sum(axis=1, dtype=np.float64)
    centres = (np.arange(bins) + 0.5) / bins
    if config.objective == "mse":
        err = val * scale2                                            # sum of squared error, weight units
        energy = (hist @ centres ** 2).astype(np.float64) * scale2[:, 0]
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
    zero = (maxabs.reshape(T, -1).max(axis=1) == 0)
    objective[zero] = 0.0
    distortion[zero] = 0.0
    nsr = np.where(zero[:, None], 0.0, nsr)
    return CandidateTable(tuple(bits), objective, distortion, nsr, ratio, maxabs)
