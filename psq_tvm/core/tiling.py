"""Weights to unrolled crossbar matrices and to tiles, and back, exactly.

Convention (the one the simulator and the crossbar tables use):

* the unrolled matrix ``M`` of a layer has one row per input (wordline) and
  one column per output (bitline);
* dense weight ``W[K, N]`` (inputs x outputs, as ``x @ W``) is ``M = W``;
* conv weight ``W[Cout, Cin/g, kh, kw]`` with ``g`` groups gives one matrix
  per group, ``M_g[(ci*kh + i)*kw + j, co] = W[g*Cout/g + co, ci, i, j]``:
  rows in im2col order ``(ci, i, j)``, ``ci`` slowest; columns the group's
  output channels.

A matrix is cut into ``R x C`` tiles in row-major order of the tile grid;
the last row/column of tiles may be smaller (ragged).  Tiles are views,
never padded copies.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

LAYER_KINDS = ("dense", "conv2d")


class WeightError(ValueError):
    """A weight tensor that cannot be mapped to crossbars."""


def check_weight(name: str, weight: np.ndarray) -> None:
    """Reject empty, non-float and non-finite weights with a message naming the layer."""
    if weight.size == 0:
        raise WeightError(f"layer {name!r}: weight tensor is empty (shape {tuple(weight.shape)}); nothing to map")
    if not np.issubdtype(weight.dtype, np.floating):
        raise WeightError(f"layer {name!r}: weight dtype {weight.dtype} is not floating point")
    if not np.all(np.isfinite(weight)):
        bad = int(np.size(weight) - np.count_nonzero(np.isfinite(weight)))
        raise WeightError(
            f"layer {name!r}: weight has {bad} NaN/Inf value(s); fix the model (or keep this layer on the host)")


def unroll(weight: np.ndarray, kind: str, groups: int = 1) -> list[np.ndarray]:
    """The unrolled matrices of a layer (one per group), as views where possible."""
    if kind == "dense":
        if weight.ndim != 2:
            raise WeightError(f"dense weight must be 2-D [K, N], got shape {weight.shape}")
        if groups != 1:
            raise WeightError("dense layers have no groups")
        return [weight]
    if kind == "conv2d":
        if weight.ndim != 4:
            raise WeightError(f"conv2d weight must be 4-D [Cout, Cin/g, kh, kw], got shape {weight.shape}")
        cout = weight.shape[0]
        if groups < 1 or cout % groups:
            raise WeightError(f"conv2d with {cout} output channels cannot have {groups} groups")
        per = cout // groups
        flat = weight.reshape(cout, -1)  # [Cout, Cin/g*kh*kw], a view for contiguous weights
        return [flat[g * per:(g + 1) * per].T for g in range(groups)]
    raise WeightError(f"unknown layer kind {kind!r}; expected one of {LAYER_KINDS}")


def roll(matrices: Sequence[np.ndarray], kind: str, weight_shape: Sequence[int], groups: int = 1) -> np.ndarray:
    """Inverse of :func:`unroll`: rebuild the original weight tensor."""
    if kind == "dense":
        return np.array(matrices[0], copy=True).reshape(weight_shape)
    cout = weight_shape[0]
    flat = np.concatenate([m.T for m in matrices], axis=0)
    assert flat.shape[0] == cout
    return np.ascontiguousarray(flat).reshape(weight_shape)


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """How a ``K x N`` matrix is cut into ``R x C`` tiles."""

    K: int
    N: int
    R: int
    C: int

    @property
    def n_row_tiles(self) -> int:
        return -(-self.K // self.R)

    @property
    def n_col_tiles(self) -> int:
        return -(-self.N // self.C)

    @property
    def n_tiles(self) -> int:
        return self.n_row_tiles * self.n_col_tiles

    def boxes(self) -> np.ndarray:
        """``[n_tiles, 4]`` int64: row0, col0, nrows, ncols of every tile, row-major."""
        r0 = np.arange(self.n_row_tiles) * self.R
        c0 = np.arange(self.n_col_tiles) * self.C
        rr, cc = np.meshgrid(r0, c0, indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        return np.stack([rr, cc, np.minimum(self.R, self.K - rr), np.minimum(self.C, self.N - cc)], axis=1).astype(np.int64)

    def blocks(self) -> Iterator[tuple[slice, slice, int, int, int, int, np.ndarray]]:
        """Regular blocks of equal tiles: (rows, cols, nr, tr, nc, tc, tile_ids[nr, nc]).

        A block is a rectangle of ``nr x nc`` tiles, each ``tr x tc``; a matrix
        has at most four (full tiles, right edge, bottom edge, corner).
        """
        kf, nf = (self.K // self.R) * self.R, (self.N // self.C) * self.C
        ids = np.arange(self.n_tiles).reshape(self.n_row_tiles, self.n_col_tiles)
        row_parts = [(0, kf, self.R), (kf, self.K, self.K - kf)]
        col_parts = [(0, nf, self.C), (nf, self.N, self.N - nf)]
        for ra, rb, tr in row_parts:
            if rb <= ra:
                continue
            nr = (rb - ra) // tr
            for ca, cb, tc in col_parts:
                if cb <= ca:
                    continue
                nc = (cb - ca) // tc
                yield (slice(ra, rb), slice(ca, cb), nr, tr, nc, tc,
                       ids[ra // self.R: ra // self.R + nr, ca // self.C: ca // self.C + nc])


def block_view(matrix: np.ndarray, rows: slice, cols: slice, nr: int, tr: int, nc: int, tc: int) -> np.ndarray:
    """A ``[nr, tr, nc, tc]`` view of a regular block of tiles (no copy when possible)."""
    return matrix[rows, cols].reshape(nr, tr, nc, tc)


def tiles(matrix: np.ndarray, R: int, C: int) -> list[np.ndarray]:
    """The tiles of ``matrix`` as views, row-major over the tile grid."""
    grid = TileGrid(matrix.shape[0], matrix.shape[1], R, C)
    return [matrix[r0:r0 + nr, c0:c0 + nc] for r0, c0, nr, nc in grid.boxes()]


def untile(tile_list: Sequence[np.ndarray], K: int, N: int, R: int, C: int) -> np.ndarray:
    """Inverse of :func:`tiles`."""
    grid = TileGrid(K, N, R, C)
    if len(tile_list) != grid.n_tiles:
        raise ValueError(f"expected {grid.n_tiles} tiles for a {K}x{N} matrix in {R}x{C} tiles, got {len(tile_list)}")
    out = np.empty((K, N), dtype=np.result_type(*[t.dtype for t in tile_list]))
    for (r0, c0, nr, nc), t in zip(grid.boxes(), tile_list):
        out[r0:r0 + nr, c0:c0 + nc] = t
    return out


def group_packing(spec_rows: int, spec_cols: int, weight_shape: Sequence[int], groups: int) -> tuple[int, float]:
    """Groups one crossbar holds block-diagonally, and the cell utilisation that gives."""
    cout, cin_g, kh, kw = weight_shape
    r, c = cin_g * kh * kw, cout // groups
    if r >= spec_rows or c >= spec_cols:
        return 1, min(r, spec_rows) * min(c, spec_cols) / (spec_rows * spec_cols)
    k = min(spec_rows // r, spec_cols // c, groups)
    return k, k * r * c / (spec_rows * spec_cols)


#: grouped convs whose block-diagonal packing fills less than this share of a
#: crossbar's cells stay on the host (depthwise 3x3 on 128x128: 14*9/16384 < 1%)
MIN_GROUPED_UTILIZATION = 0.125


def grouped_conv_rule(spec_rows: int, spec_cols: int, weight_shape: Sequence[int], groups: int) -> tuple[bool, str]:
    """Decide whether a grouped/depthwise conv goes to PIM; returns (on_pim, reason)."""
    if groups == 1:
        return True, "dense matrix"
    k, util = group_packing(spec_rows, spec_cols, weight_shape, groups)
    if util >= MIN_GROUPED_UTILIZATION:
        return True, f"{groups} groups packed block-diagonally, {k} per crossbar, {util:.1%} cell utilisation"
    return False, (f"{groups}-group conv fills only {util:.1%} of a {spec_rows}x{spec_cols} crossbar even "
                   f"block-diagonally packed (< {MIN_GROUPED_UTILIZATION:.1%}); kept on host")


@dataclasses.dataclass
class Layer:
    """One weight layer as the search sees it: a name, the original weight and how to unroll it."""

    name: str
    weight: np.ndarray
    kind: str = "dense"
    groups: int = 1

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight)
        if self.kind not in LAYER_KINDS:
            raise WeightError(f"layer {self.name!r}: unknown kind {self.kind!r}; expected one of {LAYER_KINDS}")
        check_weight(self.name, self.weight)
        self.matrices = unroll(self.weight, self.kind, self.groups)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of one unrolled matrix (all groups have the same)."""
        return tuple(self.matrices[0].shape)  # type: ignore[return-value]


class ModelTiles:
    """The flat table of every tile of every layer, in a fixed order.

    Order: layers in the given order, then groups, then tiles row-major.  The
    per-tile arrays (``layer``, ``group``, ``row0``, ``col0``, ``nrows``,
    ``ncols``) are indexed by the global tile id that every result uses.
    """

    def __init__(self, layers: Sequence[Layer], rows: int, cols: int) -> None:
        if not layers:
            raise WeightError("no layers to map: the model has no dense/conv weights")
        names = [l.name for l in layers]
        if len(set(names)) != len(names):
            raise WeightError(f"layer names must be unique, got duplicates in {names}")
        self.layers = list(layers)
        self.rows, self.cols = rows, cols
        parts, grids = [], []
        self.matrix_first_tile: list[list[int]] = []
        start = 0
        for li, layer in enumerate(self.layers):
            firsts = []
            for gi, m in enumerate(layer.matrices):
                grid = TileGrid(m.shape[0], m.shape[1], rows, cols)
                b = grid.boxes()
                parts.append(np.column_stack([np.full(len(b), li), np.full(len(b), gi), b]))
                grids.append(grid)
                firsts.append(start)
                start += grid.n_tiles
            self.matrix_first_tile.append(firsts)
        table = np.concatenate(parts).astype(np.int64)
        self.layer, self.group, self.row0, self.col0, self.nrows, self.ncols = table.T.copy()
        self.grids = grids
        self.n_tiles = int(start)

    @property
    def n_weights(self) -> np.ndarray:
        """Weights per tile."""
        return self.nrows * self.ncols

    def matrices(self) -> Iterator[tuple[int, int, np.ndarray, TileGrid, int]]:
        """(layer index, group index, matrix, grid, first tile id) for every unrolled matrix."""
        k = 0
        for li, layer in enumerate(self.layers):
            for gi, m in enumerate(layer.matrices):
                yield li, gi, m, self.grids[k], self.matrix_first_tile[li][gi]
                k += 1

    def layer_tiles(self, li: int) -> np.ndarray:
        """Global tile ids of layer ``li``."""
        return np.flatnonzero(self.layer == li)


def tile_blocks(matrix: np.ndarray, grid: TileGrid) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Regular blocks of ``matrix`` as 4-D views ``[a, ta, b, tb]`` with tile ids ``[a, b]``.

    When ``matrix`` is the transpose of a contiguous array (a conv's unrolled
    matrix), the view is taken on the contiguous storage instead, so the
    per-tile reductions read memory in order; the tile ids are transposed to
    match.  Reductions over axes (1, 3) then give one value per tile either way.
    """
    transposed = not matrix.flags.c_contiguous and matrix.T.flags.c_contiguous
    src = matrix.T if transposed else matrix
    for rows, cols, nr, tr, nc, tc, ids in grid.blocks():
        if transposed:
            yield block_view(src, cols, rows, nc, tc, nr, tr), ids.T
        else:
            yield block_view(src, rows, cols, nr, tr, nc, tc), ids


def empty_like_layout(matrix: np.ndarray, dtype) -> np.ndarray:
    """An empty matrix of ``matrix``'s shape whose :func:`tile_blocks` views line up with ``matrix``'s."""
    if not matrix.flags.c_contiguous and matrix.T.flags.c_contiguous:
        return np.empty(matrix.T.shape, dtype=dtype).T
    return np.empty(matrix.shape, dtype=dtype)


def canonical_blocks(matrix: np.ndarray, grid: TileGrid) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Like :func:`tile_blocks` but always oriented ``[nr, tr, nc, tc]`` (rows, then columns of the matrix).

    Slower to reduce over than :func:`tile_blocks` for transposed storage, but
    per-column quantities (axis 3 = the tile's columns) read the same way for every layout.
    """
    transposed = not matrix.flags.c_contiguous and matrix.T.flags.c_contiguous
    for view, ids in tile_blocks(matrix, grid):
        yield (view.transpose(2, 3, 0, 1), ids.T) if transposed else (view, ids)
