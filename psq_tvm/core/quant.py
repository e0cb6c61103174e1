"""Per-tile quantisation results, their crossbar accounting, and the baselines.

A :class:`QuantResult` is what every method (PSQ, uniform per-layer,
per-tile round-to-nearest) produces: for every tile of a
:class:`~psq_tvm.tiling.ModelTiles` a bitwidth and a scale.  Integer levels
are ``q = clip(rint(w / s), -L, L)`` with ``L = 2**(b-1) - 1`` (``rint``
rounds half to even), the dequantised weight is ``s * q``; with ``rounding="balanced"``
(:func:`balanced_levels`) some of them are then rounded the other way so that every crossbar
column's (bitline's) rounding errors cancel.  Crossbar counts
come from one packer (:mod:`psq_tvm.packing`) for every method, so every
comparison is side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from .crossbar import CrossbarSpec
from .packing import Placement, pack
from .tiling import Layer, ModelTiles, canonical_blocks, empty_like_layout, roll, tile_blocks


def level_limit(bits: np.ndarray | int) -> np.ndarray:
    """Largest level magnitude ``L = 2**(b-1) - 1``."""
    return (np.left_shift(1, np.asarray(bits, dtype=np.int64) - 1) - 1)


def quantize_levels(w: np.ndarray, scale: np.ndarray | float, bits: np.ndarray | int) -> np.ndarray:
    """Integer levels of ``w`` (int16), ``clip(rint(w / scale), -L, L)`` evaluated in float32, broadcasting."""
    return _nearest(np.divide(w, scale, dtype=np.float32), bits)   # float32: levels are defined on float32 weights


def _nearest(x: np.ndarray, bits: np.ndarray | int) -> np.ndarray:
    """``clip(rint(x), -L, L)`` as int16, ``x`` the weights in level units (float32)."""
    L = level_limit(bits)
    q = np.rint(x)
    np.clip(q, -L, L, out=q)
    return q.astype(np.int16)


#: how a tile's levels are formed from its weights, scale and bitwidth
ROUNDINGS = ("nearest", "balanced")
DEFAULT_ROUNDING = "balanced"


def balanced_levels(w: np.ndarray, scale: np.ndarray | float, bits: np.ndarray | int) -> np.ndarray:
    """Levels of a canonical block ``w`` ``[nr, tr, nc, tc]`` (axis 1: the rows of a tile column, i.e.
    the cells on one bitline) whose rounding errors cancel along every bitline (int16).

    Start from :func:`quantize_levels` (round to nearest), with errors ``e = q - w / s`` (in levels). A
    bitline sums ``x_i * s * (w_i / s + e_i)``; where its inputs are alike (neighbouring channels after
    a ReLU or BatchNorm are mostly positive and correlated) the error it adds is about
    ``s * E[x] * sum(e)``.  So, per bitline, with ``E = sum(e)``, the ``k = rint(|E|)`` elements whose error
    has the sign of ``E`` and is largest in magnitude (those that cost least to move: ``|e|`` close to
    0.5) are rounded the other way, ``q -= sign(E)``, staying within ``[-L, L]``.  Afterwards
    ``|sum(e)| <= 0.5`` wherever there were enough such elements; each element moves by at most one
    level.  This is SQuant's error-sum flipping (Guo et al., "SQuant: On-the-Fly Data-Free Quantization
    via Diagonal Hessian Approximation", ICLR 2022), applied per crossbar column.  Deterministic
    (stable sort; ties go to the lower row).
    """
    x = np.divide(w, scale, dtype=np.float32)
    q = _nearest(x, bits)
    if q.ndim != 4 or q.shape[1] < 2:
        return q
    L = np.broadcast_to(level_limit(bits), q.shape)
    qf = q.astype(np.float64)
    e = qf - np.broadcast_to(x, q.shape)
    E = e.sum(axis=1, keepdims=True)
    k = np.rint(np.abs(E))
    sgn = np.sign(E)
    moved = qf - sgn
    ok = (k > 0) & (np.sign(e) == sgn) & (np.abs(moved) <= L)
    order = np.argsort(np.where(ok, -np.abs(e), 1.0), axis=1, kind="stable")
    rank = np.argsort(order, axis=1, kind="stable")
    return np.where(ok & (rank < k), moved, qf).astype(np.int16)


def block_levels_for(rounding: str):
    """The level function of a rounding mode: :func:`quantize_levels` or :func:`balanced_levels`."""
    if rounding == "nearest":
        return quantize_levels
    if rounding == "balanced":
        return balanced_levels
    raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")


@dataclasses.dataclass
class QuantResult:
    """Bitwidth and scale for every tile, and everything derived from them."""

    tiles: ModelTiles
    spec: CrossbarSpec
    bits: np.ndarray          # [T] int64
    scales: np.ndarray        # [T] float64
    objective: np.ndarray     # [T] objective at the chosen candidate (nan for baselines)
    method: str
    search_seconds: float = 0.0
    note: str = ""
    candidates: Any = None
    rounding: str = "nearest"     # how levels are formed (:data:`ROUNDINGS`)
    _placement: Placement | None = dataclasses.field(default=None, repr=False)

    # ----------------------------------------------------------- crossbars
    @property
    def slices(self) -> np.ndarray:
        """Slices per polarity of every tile."""
        return -(-(self.bits - (1 if self.spec.encoding == "differential" else 0)) // self.spec.cell_bits)

    @property
    def placement(self) -> Placement:
        """Tiles placed on physical crossbars (block reassembly)."""
        if self._placement is None:
            t = self.tiles
            self._placement = pack(t.nrows, t.ncols, self.slices, self.spec.rows, self.spec.cols,
                                   self.spec.polarities)
        return self._placement

    @property
    def crossbars(self) -> int:
        """Occupied physical crossbars after packing."""
        return self.placement.n_crossbars

    @property
    def avg_bits(self) -> float:
        """Weight-count weighted average bitwidth."""
        n = self.tiles.n_weights
        return float((n * self.bits).sum() / n.sum())

    def cell_utilization(self) -> float:
        """Share of the occupied crossbars' cells that hold a weight slice."""
        used = (self.tiles.n_weights * self.slices).sum() * self.spec.polarities
        return float(used / (self.crossbars * self.spec.rows * self.spec.cols))

    # -------------------------------------------------------------- weights
    @property
    def per_column(self) -> bool:
        """True when every tile column (bitline) carries its own scale (``scales`` is ``[T, cols]``)."""
        return self.scales.ndim == 2

    def _scale_view(self, ids: np.ndarray, tc: int) -> np.ndarray:
        """Scales of a canonical block ``[nr, tr, nc, tc]`` in a broadcastable shape."""
        s = self.scales[ids]
        return s[:, None, :, :tc] if s.ndim == 3 else s[:, None, :, None]

    def block_levels(self, view: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Integer levels (int16) of a canonical block of weights ``[nr, tr, nc, tc]`` with global tile ids ``[nr, nc]``."""
        return block_levels_for(self.rounding)(view, self._scale_view(ids, view.shape[3]),
                                               self.bits[ids][:, None, :, None])

    def levels(self, layer: int) -> list[np.ndarray]:
        """Integer levels of each unrolled matrix of a layer (int16, same shape as the matrix)."""
        out = []
        for li, _, m, grid, first in self.tiles.matrices():
            if li != layer:
                continue
            q = empty_like_layout(m, np.int16)
            for (view, ids), (qview, _) in zip(canonical_blocks(m, grid), canonical_blocks(q, grid)):
                qview[...] = self.block_levels(view, first + ids)
            out.append(q)
        return out

    def dequantized(self, layer: int) -> np.ndarray:
        """The fake-quantised weight of a layer in its original shape (float32)."""
        mats = []
        for li, _, m, grid, first in self.tiles.matrices():
            if li != layer:
                continue
            out = empty_like_layout(m, np.float64)
            for (view, ids), (oview, _) in zip(canonical_blocks(m, grid), canonical_blocks(out, grid)):
                s = self._scale_view(first + ids, view.shape[3])
                oview[...] = self.block_levels(view, first + ids) * s
            mats.append(out)
        lay = self.tiles.layers[layer]
        return roll(mats, lay.kind, lay.weight.shape, lay.groups).astype(np.float32)

    def tile_scale(self, t: int) -> float | list[float]:
        """Scale of tile ``t`` as stored in a manifest: a number, or one per tile column."""
        if self.per_column:
            return [float(v) for v in self.scales[t, :int(self.tiles.ncols[t])]]
        return float(self.scales[t])

    def scale_storage(self) -> int:
        """Number of scale values the digital periphery stores (one per tile, or one per tile column)."""
        return int(self.tiles.ncols.sum()) if self.per_column else int(self.tiles.n_tiles)

    # -------------------------------------------------------------- reports
    def layer_table(self) -> list[dict[str, Any]]:
        """Per layer: tiles, bitwidth histogram, average bits, crossbars (ceil share of packed sets)."""
        rows = []
        pl = self.placement
        per_tile = self.slices * self.spec.polarities
        for li, layer in enumerate(self.tiles.layers):
            ids = self.tiles.layer_tiles(li)
            b = self.bits[ids]
            n = self.tiles.n_weights[ids]
            sets = np.unique(pl.set_of_tile[ids])
            rows.append({
                "layer": layer.name, "kind": layer.kind, "weight_shape": list(layer.weight.shape),
                "groups": layer.groups, "tiles": int(len(ids)),
                "bits_histogram": {int(k): int(v) for k, v in zip(*np.unique(b, return_counts=True))},
                "avg_bits": float((n * b).sum() / n.sum()),
                "crossbars_unpacked": int(per_tile[ids].sum()),
                "crossbar_sets": int(len(sets)),
            })
        return rows

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "crossbars": self.crossbars, "avg_bits": self.avg_bits,
                "cell_utilization": self.cell_utilization(), "tiles": int(self.tiles.n_tiles),
                "weights": int(self.tiles.n_weights.sum()), "search_seconds": self.search_seconds,
                "scale_values": self.scale_storage(),
                "note": self.note}


# ------------------------------------------------------------------ baselines
def _tiles_for(layers_or_tiles: Sequence[Layer] | ModelTiles, spec: CrossbarSpec) -> ModelTiles:
    if isinstance(layers_or_tiles, ModelTiles):
        return layers_or_tiles
    return ModelTiles(layers_or_tiles, spec.rows, spec.cols)


def tile_maxabs(tiles: ModelTiles) -> np.ndarray:
    """max|w| of every tile."""
    out = np.zeros(tiles.n_tiles)
    for _, _, m, grid, first in tiles.matrices():
        for view, ids in tile_blocks(m, grid):
            out[first + ids] = np.abs(view).max(axis=(1, 3))
    return out


def uniform_per_layer(layers: Sequence[Layer] | ModelTiles, spec: CrossbarSpec, bits: int) -> QuantResult:
    """Every tile at ``bits``, one max-abs scale per layer (the classic uniform baseline)."""
    tiles = _tiles_for(layers, spec)
    mx = tile_maxabs(tiles)
    layer_max = np.zeros(len(tiles.layers))
    np.maximum.at(layer_max, tiles.layer, mx)
    L = 2 ** (bits - 1) - 1
    scales = np.where(layer_max > 0, layer_max / L, 1.0)[tiles.layer]
    return QuantResult(tiles, spec, np.full(tiles.n_tiles, bits, dtype=np.int64), scales,
                       np.full(tiles.n_tiles, np.nan), f"uniform{bits}-per-layer")


def rtn_per_tile(layers: Sequence[Layer] | ModelTiles, spec: CrossbarSpec, bits: int) -> QuantResult:
    """Every tile at ``bits``, its own max-abs scale, round to nearest (no search)."""
    tiles = _tiles_for(layers, spec)
    mx = tile_maxabs(tiles)
    L = 2 ** (bits - 1) - 1
    scales = np.where(mx > 0, mx / L, 1.0)
    return QuantResult(tiles, spec, np.full(tiles.n_tiles, bits, dtype=np.int64), scales,
                       np.full(tiles.n_tiles, np.nan), f"rtn{bits}-per-tile")


def uniform_crossbars(tiles: ModelTiles, spec: CrossbarSpec, bits: int) -> int:
    """Crossbars every tile at ``bits`` occupies, packed by the same code as PSQ."""
    sl = spec.slices(bits)
    return pack(tiles.nrows, tiles.ncols, np.full(tiles.n_tiles, sl), spec.rows, spec.cols,
                spec.polarities).n_crossbars


def compare(result: QuantResult) -> dict[str, Any]:
    """Crossbars of ``result`` next to uniform 16-bit and uniform 8-bit, same tiles, same packer."""
    u16 = uniform_crossbars(result.tiles, result.spec, 16)
    u8 = uniform_crossbars(result.tiles, result.spec, 8)
    n = result.crossbars
    return {"crossbars": {"psq": n, "uniform16": u16, "uniform8": u8},
            "reduction_vs_uniform16": u16 / n, "reduction_vs_uniform8": u8 / n,
            "avg_bits": result.avg_bits, "cell_utilization": result.cell_utilization(),
            "search_seconds": result.search_seconds, "scale_values": result.scale_storage(),
            "scale_granularity": "column" if result.per_column else "tile"}
