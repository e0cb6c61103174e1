"""Block reassembly: placing tiles on physical crossbars, and counting them.

A tile of bitwidth ``b`` needs ``slices(b)`` crossbars per polarity.  A tile
that fills neither all rows nor all columns of a crossbar (edge tiles, small
layers, groups of a grouped conv) can share its crossbars with other such
tiles of the same slice count: the tiles sit on disjoint rows *and* disjoint
columns (block-diagonally), so each wordline carries one input and each
bitline one output.  The same arrangement is repeated on every slice and
polarity of the shared set.

Packing is first-fit decreasing (largest ``max(rows/R, cols/C)`` first, ties
by tile id), deterministic.  Sets are numbered by their smallest tile id, and
physical crossbar ids are handed out set by set, slice-major, polarity-minor.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Placement:
    """Where every tile sits: its crossbar set and its offset on those crossbars."""

    set_of_tile: np.ndarray   # [T] index of the crossbar set holding the tile
    row_off: np.ndarray       # [T] first wordline of the tile on its crossbars
    col_off: np.ndarray       # [T] first bitline
    set_slices: np.ndarray    # [S] slices per polarity of each set
    set_first: np.ndarray     # [S] first physical crossbar id of each set
    polarities: int
    n_crossbars: int

    def crossbar_ids(self, tile: int) -> np.ndarray:
        """Physical crossbar ids of a tile as ``[slices, polarities]`` (slice 0 = least significant)."""
        s = int(self.set_of_tile[tile])
        n = int(self.set_slices[s]) * self.polarities
        return (self.set_first[s] + np.arange(n)).reshape(-1, self.polarities)

    def tiles_of_set(self, s: int) -> np.ndarray:
        return np.flatnonzero(self.set_of_tile == s)


def pack(nrows: np.ndarray, ncols: np.ndarray, slices: np.ndarray, R: int, C: int, polarities: int) -> Placement:
    """Place tiles (given by their sizes and slice counts) on as few crossbars as first-fit allows."""
    nrows, ncols, slices = (np.asarray(a, dtype=np.int64) for a in (nrows, ncols, slices))
    T = len(nrows)
    set_of_tile = np.full(T, -1, dtype=np.int64)
    row_off = np.zeros(T, dtype=np.int64)
    col_off = np.zeros(T, dtype=np.int64)
    packable = (nrows < R) & (ncols < C)
    # full tiles: a set each, named by the tile itself
    full = np.flatnonzero(~packable)
    for t in full:
        set_of_tile[t] = t
    # partial tiles: first-fit decreasing, per slice count
    part = np.flatnonzero(packable)
    if len(part):
        size = np.maximum(nrows[part] / R, ncols[part] / C)
        order = part[np.lexsort((part, -size))]
        for sl in np.unique(slices[part]):
            members = order[slices[order] == sl]
            used_r = np.zeros(len(members), dtype=np.int64)
            used_c = np.zeros(len(members), dtype=np.int64)
            owner = np.zeros(len(members), dtype=np.int64)   # a representative tile id per bin
            n_bins = 0
            for t in members:
                r, c = nrows[t], ncols[t]
                fits = np.flatnonzero((used_r[:n_bins] + r <= R) & (used_c[:n_bins] + c <= C))
                if len(fits):
                    k = int(fits[0])
                else:
                    k = n_bins
                    n_bins += 1
                    owner[k] = t
                row_off[t], col_off[t] = used_r[k], used_c[k]
                used_r[k] += r
                used_c[k] += c
                set_of_tile[t] = owner[k]
    # renumber sets by smallest member tile id
    reps = np.unique(set_of_tile)
    first_member = np.full(len(reps), T, dtype=np.int64)
    inv = np.searchsorted(reps, set_of_tile)
    np.minimum.at(first_member, inv, np.arange(T))
    rank = np.empty(len(reps), dtype=np.int64)
    rank[np.argsort(first_member, kind="stable")] = np.arange(len(reps))
    set_idx = rank[inv]
    set_slices = np.zeros(len(reps), dtype=np.int64)
    set_slices[set_idx] = slices
    per_set = set_slices * polarities
    set_first = np.concatenate([[0], np.cumsum(per_set)[:-1]]).astype(np.int64)
    return Placement(set_idx, row_off, col_off, set_slices, set_first, polarities, int(per_set.sum()))


def count_crossbars(nrows: np.ndarray, ncols: np.ndarray, slices: np.ndarray, R: int, C: int, polarities: int) -> int:
    """Occupied crossbars after packing (same algorithm as :func:`pack`)."""
    return pack(nrows, ncols, slices, R, C, polarities).n_crossbars
