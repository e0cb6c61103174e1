"""Crossbar programming tables: the cell levels of every physical crossbar, and back.

Encoding of a tile with bitwidth ``b``, integer levels ``q`` in ``[-L, L]``
(``L = 2**(b-1) - 1``), cell precision ``c`` bits, ``S`` slices:

* ``offset``: stored value ``u = q + 2**(b-1)`` (in ``[1, 2**b - 1]``); slice
  ``j`` holds ``(u >> (j*c)) & (2**c - 1)``; one polarity.  The offset is
  removed digitally: ``q = sum_j 2**(j*c) * cell_j - 2**(b-1)``.
* ``differential``: ``q+ = max(q, 0)``, ``q- = max(-q, 0)``; polarity 0 holds
  the slices of ``q+``, polarity 1 those of ``q-``; ``q = value(+) - value(-)``.

Slice 0 is the least significant.  The weight is ``scale * q``.  A tile's
cells sit at ``[row_off : row_off + nrows, col_off : col_off + ncols]`` of
each of its crossbars (:meth:`psq_tvm.packing.Placement.crossbar_ids`);
every other cell is 0.
"""

from __future__ import annotations

import numpy as np

from .quant import QuantResult


def tile_levels(result: QuantResult) -> list[np.ndarray]:
    """Integer levels of every tile (int16 ``[nrows, ncols]``), indexed by global tile id."""
    tiles = result.tiles
    out: list[np.ndarray] = [None] * tiles.n_tiles  # type: ignore[list-item]
    cache: dict[int, list[np.ndarray]] = {}
    for t in range(tiles.n_tiles):
        li, gi = int(tiles.layer[t]), int(tiles.group[t])
        if li not in cache:
            cache.clear()
            cache[li] = result.levels(li)
        r0, c0, nr, nc = (int(v[t]) for v in (tiles.row0, tiles.col0, tiles.nrows, tiles.ncols))
        out[t] = cache[li][gi][r0:r0 + nr, c0:c0 + nc]
    return out


def encode_tile(q: np.ndarray, bits: int, encoding: str, cell_bits: int, slices: int) -> np.ndarray:
    """Cell values of one tile: uint8 ``[slices, polarities, nrows, ncols]``."""
    mask = (1 << cell_bits) - 1
    q = q.astype(np.int32)
    if encoding == "offset":
        planes = [q + (1 << (bits - 1))]
    else:
        planes = [np.maximum(q, 0), np.maximum(-q, 0)]
    shifts = (np.arange(slices, dtype=np.int32) * cell_bits)[:, None, None, None]
    return ((np.stack(planes)[None] >> shifts) & mask).astype(np.uint8)


def decode_tile(cells: np.ndarray, bits: int, encoding: str, cell_bits: int) -> np.ndarray:
    """Integer levels from cell values ``[slices, polarities, nrows, ncols]`` (inverse of :func:`encode_tile`)."""
    weights = (1 << (np.arange(cells.shape[0]) * cell_bits)).astype(np.int64)
    value = np.tensordot(weights, cells.astype(np.int64), axes=(0, 0))   # [polarities, nr, nc]
    if encoding == "offset":
        return value[0] - (1 << (bits - 1))
    return value[0] - value[1]


def crossbar_cells(result: QuantResult) -> np.ndarray:
    """Cell levels of every occupied crossbar: uint8 ``[n_crossbars, rows, cols]``."""
    spec, pl, tiles = result.spec, result.placement, result.tiles
    cells = np.zeros((pl.n_crossbars, spec.rows, spec.cols), dtype=np.uint8)
    slices = result.slices
    for t, q in enumerate(tile_levels(result)):
        enc = encode_tile(q, int(result.bits[t]), spec.encoding, spec.cell_bits, int(slices[t]))
        ids = pl.crossbar_ids(t)                                   # [slices, polarities]
        r, c = int(pl.row_off[t]), int(pl.col_off[t])
        nr, nc = int(tiles.nrows[t]), int(tiles.ncols[t])
        cells[ids.ravel(), r:r + nr, c:c + nc] = enc.reshape(-1, nr, nc)
    return cells


def read_tile(cells: np.ndarray, result: QuantResult, t: int) -> np.ndarray:
    """Integer levels of tile ``t`` read back from the crossbar cells."""
    pl, tiles = result.placement, result.tiles
    ids = pl.crossbar_ids(t)
    r, c = int(pl.row_off[t]), int(pl.col_off[t])
    nr, nc = int(tiles.nrows[t]), int(tiles.ncols[t])
    tile_cells = cells[ids.ravel(), r:r + nr, c:c + nc].reshape(ids.shape + (nr, nc))
    return decode_tile(tile_cells, int(result.bits[t]), result.spec.encoding, result.spec.cell_bits)
