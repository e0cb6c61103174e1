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
from .tiling import canonical_blocks


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


def encode_tiles(q: np.ndarray, bits: int, encoding: str, cell_bits: int, slices: int) -> np.ndarray:
    """Cell values of tiles of one bitwidth: levels ``[k, nrows, ncols]`` -> uint8 ``[k, slices, polarities, nrows, ncols]``."""
    mask = (1 << cell_bits) - 1
    q = q.astype(np.int32)
    if encoding == "offset":
        planes = (q + (1 << (bits - 1)))[:, None]
    else:
        planes = np.stack([np.maximum(q, 0), np.maximum(-q, 0)], axis=1)
    out = np.empty((q.shape[0], slices) + planes.shape[1:], dtype=np.uint8)
    for j in range(slices):
        out[:, j] = (planes >> (j * cell_bits)) & mask
    return out


def encode_tile(q: np.ndarray, bits: int, encoding: str, cell_bits: int, slices: int) -> np.ndarray:
    """Cell values of one tile: uint8 ``[slices, polarities, nrows, ncols]``."""
    return encode_tiles(q[None], bits, encoding, cell_bits, slices)[0]


def decode_tile(cells: np.ndarray, bits: int, encoding: str, cell_bits: int) -> np.ndarray:
    """Integer levels from cell values ``[slices, polarities, nrows, ncols]`` (inverse of :func:`encode_tile`)."""
    weights = (1 << (np.arange(cells.shape[0]) * cell_bits)).astype(np.int64)
    value = np.tensordot(weights, cells.astype(np.int64), axes=(0, 0))   # [polarities, nr, nc]
    if encoding == "offset":
        return value[0] - (1 << (bits - 1))
    return value[0] - value[1]


def crossbar_cells(result: QuantResult) -> np.ndarray:
    """Cell levels of every occupied crossbar: uint8 ``[n_crossbars, rows, cols]``.

    Works one row of tiles at a time (small temporaries): tiles that own their crossbars
    (offset 0) are encoded and stored one bitwidth at a time; tiles packed together with others
    are placed one by one.
    """
    spec, pl, tiles = result.spec, result.placement, result.tiles
    cells = np.zeros((pl.n_crossbars, spec.rows, spec.cols), dtype=np.uint8)
    slices = result.slices
    for _li, _gi, m, grid, first in tiles.matrices():
        for view, ids in canonical_blocks(m, grid):
            nr, tr, nc, tc = view.shape
            packable = tr < spec.rows and tc < spec.cols
            for i in range(nr):
                tids = first + ids[i]                                         # [nc]
                q = result.block_levels(view[i:i + 1], tids[None])[0].transpose(1, 0, 2)   # [nc, tr, tc]
                if packable:                                                  # each at its own offset
                    for k, t in enumerate(tids):
                        enc = encode_tile(q[k], int(result.bits[t]), spec.encoding, spec.cell_bits, int(slices[t]))
                        r, c = int(pl.row_off[t]), int(pl.col_off[t])
                        cells[pl.crossbar_ids(t).ravel(), r:r + tr, c:c + tc] = enc.reshape(-1, tr, tc)
                    continue
                tb = result.bits[tids]
                for b in np.unique(tb):
                    sel = np.flatnonzero(tb == b)
                    n_sl = int(slices[tids[sel[0]]])
                    enc = encode_tiles(q[sel], int(b), spec.encoding, spec.cell_bits, n_sl)
                    xb = pl.set_first[pl.set_of_tile[tids[sel]]][:, None] + np.arange(n_sl * spec.polarities)
                    cells[xb.reshape(-1), :tr, :tc] = enc.reshape(-1, tr, tc)
    return cells


def read_tile(cells: np.ndarray, result: QuantResult, t: int) -> np.ndarray:
    """Integer levels of tile ``t`` read back from the crossbar cells."""
    pl, tiles = result.placement, result.tiles
    ids = pl.crossbar_ids(t)
    r, c = int(pl.row_off[t]), int(pl.col_off[t])
    nr, nc = int(tiles.nrows[t]), int(tiles.ncols[t])
    tile_cells = cells[ids.ravel(), r:r + nr, c:c + nc].reshape(ids.shape + (nr, nc))
    return decode_tile(tile_cells, int(result.bits[t]), result.spec.encoding, result.spec.cell_bits)
