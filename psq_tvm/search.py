"""The PSQ search: a scale and a bitwidth for every crossbar tile, data-free.

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
the cumulative histogram for ``cdf-kl``).  Bitwidths are then allocated by
:mod:`psq_tvm.allocation` (tolerance or whole-model budget).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from .allocation import Budget, allocate_budget, allocate_tolerance
from .crossbar import CrossbarSpec
from .quant import QuantResult
from .tiling import Layer, ModelTiles, tile_blocks

OBJECTIVES = ("mse", "cdf-kl")
DEFAULT_OBJECTIVE = "mse"
WEIGHTINGS = ("layer", "none")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Knobs of the candidate search (not of the allocation)."""

    objective: str = DEFAULT_OBJECTIVE
    n_scales: int = 32          # clipping ratios per bitwidth
    min_clip: float = 0.15      # smallest clipping ratio of max|w|
    bins: int = 2048            # fine histogram bins of |w| / max|w|
    thresholds: int = 128       # CDF thresholds for cdf-kl (bins must be a multiple)
    weighting: str = "layer"    # how tile distortions are summed for the budget

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown PSQ objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS}")
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
        for view, ids in tile_blocks(m, grid):
            a = np.abs(view, dtype=np.float32) if view.dtype != np.float32 else np.abs(view)
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
    return np.log(p) - np.log1p(-p)


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
    logit = _logit(cdf, eps).astype(np.float32)
    cdf = cdf.astype(np.float32)
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


@dataclasses.dataclass
class CandidateTable:
    """Best scale per tile and bitwidth, with its objective, before allocation."""

    bits: tuple[int, ...]
    objective: np.ndarray     # [T, B] objective at the best ratio (reported units)
    distortion: np.ndarray    # [T, B] what the budget sums (weighted, comparable across layers)
    nsr: np.ndarray           # [T, B] tolerance measure (relative MSE or divergence)
    ratio: np.ndarray         # [T, B] chosen clipping ratio
    maxabs: np.ndarray        # [T]

    def scales(self, bits_index: np.ndarray) -> np.ndarray:
        """Scale per tile for the chosen bitwidth indices."""
        t = np.arange(len(bits_index))
        L = np.array([2 ** (b - 1) - 1 for b in self.bits], dtype=np.float64)[bits_index]
        s = self.ratio[t, bits_index] * self.maxabs / L
        return np.where(self.maxabs > 0, s, 1.0)


def evaluate_candidates(tiles: ModelTiles, bits: Sequence[int], config: SearchConfig,
                        tile_importance: np.ndarray | None = None) -> CandidateTable:
    """Score every (bitwidth, clipping ratio) of every tile and keep the best ratio per bitwidth."""
    hist, maxabs = tile_histograms(tiles, config.bins)
    ratios = config.ratios
    if config.objective == "mse":
        raw = distortion_mse(hist, bits, ratios)
    else:
        raw = distortion_cdf_kl(hist, bits, ratios, config.thresholds)
    best = np.argmin(raw, axis=2)                                    # first minimum: least clipping
    t = np.arange(tiles.n_tiles)[:, None]
    b = np.arange(len(bits))[None, :]
    val = raw[t, b, best]                                            # [T, B]
    ratio = ratios[best]
    n_w = tiles.n_weights.astype(np.float64)
    centres = (np.arange(config.bins) + 0.5) / config.bins
    if config.objective == "mse":
        sq = maxabs ** 2
        energy = (hist @ centres ** 2) * sq                          # sum w^2 per tile (histogram estimate)
        objective = val * sq[:, None] / n_w[:, None]                 # mean squared error, weight units
        nsr = np.where(energy[:, None] > 0, val * sq[:, None] / np.maximum(energy, 1e-300)[:, None], 0.0)
        layer_energy = np.bincount(tiles.layer, weights=energy, minlength=len(tiles.layers))
        if config.weighting == "layer":
            distortion = val * sq[:, None] / np.maximum(layer_energy[tiles.layer], 1e-300)[:, None]
        else:
            distortion = val * sq[:, None]
    else:
        objective = val
        nsr = val
        layer_w = np.bincount(tiles.layer, weights=n_w, minlength=len(tiles.layers))
        if config.weighting == "layer":
            distortion = val * (n_w / layer_w[tiles.layer])[:, None]
        else:
            distortion = val * n_w[:, None]
    if tile_importance is not None:
        distortion = distortion * np.asarray(tile_importance, dtype=np.float64)[:, None]
    zero = maxabs == 0
    objective[zero] = 0.0
    distortion[zero] = 0.0
    nsr[zero] = 0.0
    return CandidateTable(tuple(bits), objective, distortion, nsr, ratio, maxabs)


def psq_search(layers: Sequence[Layer], spec: CrossbarSpec, *, config: SearchConfig | None = None,
               budget: Budget | str | None = None, tolerance: float | None = None,
               bits: Sequence[int] | None = None, tile_importance: np.ndarray | None = None,
               tiles: ModelTiles | None = None) -> QuantResult:
    """Run PSQ on ``layers``: per-tile scale and bitwidth under a tolerance or a whole-model budget.

    Exactly one of ``budget`` (e.g. ``"avg-bits=4.5"``, ``"crossbars=800"``,
    ``"reduction=3.5"``) and ``tolerance`` (largest acceptable per-tile
    relative MSE, or divergence for ``cdf-kl``) should be given; with neither,
    the default budget ``reduction=4`` is used.
    """
    start = time.perf_counter()
    config = config or SearchConfig()
    bits = tuple(sorted(set(bits or spec.weight_bits)))
    for b in bits:
        if not 2 <= b <= 16:
            raise ValueError(f"candidate bitwidth {b} outside 2..16")
    tiles = tiles or ModelTiles(layers, spec.rows, spec.cols)
    table = evaluate_candidates(tiles, bits, config, tile_importance)
    if budget is not None and tolerance is not None:
        raise ValueError("give either a budget or a tolerance, not both")
    if tolerance is not None:
        choice, note = allocate_tolerance(table, tolerance), f"tolerance {tolerance:g}"
    else:
        budget = Budget.parse(budget or DEFAULT_BUDGET)
        choice, note = allocate_budget(table, tiles, spec, budget)
    chosen_bits = np.array(bits, dtype=np.int64)[choice]
    t = np.arange(tiles.n_tiles)
    return QuantResult(
        tiles=tiles, spec=spec, bits=chosen_bits, scales=table.scales(choice),
        objective=table.objective[t, choice], method=f"psq-{config.objective}",
        search_seconds=time.perf_counter() - start, note=note,
        candidates=table)


DEFAULT_BUDGET = "reduction=4"
