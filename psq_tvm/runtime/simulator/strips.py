"""The crossbar strips of a layer: its tile program checked against the spec and the cells, and the
tiles grouped by row strip (tiles of one group sharing the same rows, read together), with their
weight levels decoded from the cells.

Weights as stored: slice ``k`` (``c = cell_bits``) of polarity ``p`` of a tile lives on crossbar
``tile["crossbars"][k][p]`` at rows ``row_off .. row_off+nrows`` and columns ``col_off .. col_off+ncols``.
Only the tile's own wordlines are driven when it is read, so cells of other tiles packed on the same
crossbar never enter its bitlines.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from ...core.crossbar import CrossbarSpec
from ...core.tables import decode_tile
from .geometry import Geometry
from .options import SimError


@dataclasses.dataclass
class Strip:
    """Tiles of one group sharing the same rows (a row strip).

    Public arrays are in natural column order (``cols`` increasing); the bit-serial internals
    (``w_offset``, ``colsum``, ``conductance``, ``prefix``) use the *serial order*: tiles sorted by
    slice count (desc), so that the columns having slice ``k`` are a prefix; ``to_natural`` maps
    serial-order columns to natural order (None when they coincide).
    """

    group: int
    row0: int
    nrows: int
    tiles: list[dict]              # in serial order
    cols: np.ndarray               # [n] output column (within the layer's total N), increasing
    col_slice: slice | None        # the same as a slice when contiguous
    scale: np.ndarray              # [n] float64 weight scale per column
    levels: np.ndarray             # [nrows, n] float32 integer levels (from the cells)
    lmax: int                      # max |level| bound of the strip
    w_offset: np.ndarray           # [n] serial order: offset 2**(b-1) (offset encoding) or 0
    colsum: np.ndarray             # [n] serial order: sum over rows of the integer levels
    prefix: list[int]              # [Smax] number of leading serial-order columns having slice k
    xbar_blocks: list[list[list[tuple[int, int, int, int]]]]   # [k][p] -> (xbar, row_off, col_off, ncols) per tile
    to_natural: np.ndarray | None = None
    conductance: np.ndarray | None = None   # [nrows, sum_k P*prefix[k]] ideal cell levels, float32
    full_scale: np.ndarray | None = None    # [sum_k P*prefix[k]] calibrated ADC full scale per bit-serial
    #                                         column (NaN: none stored), None when no tile has one


def build_strips(tiles: list, cells: np.ndarray, spec: CrossbarSpec, geom: Geometry) -> list[Strip]:
    """Check the tiles (boxes, slices, crossbar ids, placements, scales, exact cover of the matrix) and
    group them into row strips, in (group, row0, nrows) order, levels decoded from ``cells``."""
    name, n_crossbars = geom.name, cells.shape[0]
    P, c = spec.polarities, spec.cell_bits
    cover = np.zeros((geom.groups, geom.K, geom.N), dtype=np.int32)
    by_strip: dict[tuple[int, int, int], list[dict]] = {}
    for t in tiles:
        try:
            tt = {k: int(t[k]) for k in ("group", "row0", "col0", "nrows", "ncols", "bits", "slices",
                                         "row_off", "col_off")}
            tt["id"] = t.get("id", "?")
            xb = np.asarray(t["crossbars"], dtype=np.int64)
            sc = np.asarray(t["scale"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            which = t.get("id", "?") if isinstance(t, Mapping) else repr(t)
            raise SimError(f"layer {name}: malformed tile {which} ({e!r})") from None
        tid = f"layer {name} tile {tt['id']}"
        g, r0, c0, nr, nc, b, S = (tt[k] for k in ("group", "row0", "col0", "nrows", "ncols", "bits", "slices"))
        if not (0 <= g < geom.groups and nr >= 1 and nc >= 1 and r0 >= 0 and c0 >= 0
                and r0 + nr <= geom.K and c0 + nc <= geom.N):
            raise SimError(f"{tid}: box group {g} rows {r0}+{nr} cols {c0}+{nc} outside the "
                           f"{geom.groups} x [{geom.K}, {geom.N}] matrix")
        if not 2 <= b <= 16 or S != spec.slices(b):
            raise SimError(f"{tid}: {b}-bit tile must have {spec.slices(b) if 2 <= b <= 16 else '?'} slices "
                           f"under {spec.encoding}/{c}-bit cells, got {S}")
        if xb.shape != (S, P):
            raise SimError(f"{tid}: crossbars must be [slices={S}][polarities={P}], got shape {list(xb.shape)}")
        if xb.min() < 0 or xb.max() >= n_crossbars:
            raise SimError(f"{tid}: crossbar id out of range 0..{n_crossbars - 1}: {xb.tolist()}")
        if not (0 <= tt["row_off"] and tt["row_off"] + nr <= spec.rows and 0 <= tt["col_off"]
                and tt["col_off"] + nc <= spec.cols):
            raise SimError(f"{tid}: placement rows {tt['row_off']}+{nr} cols {tt['col_off']}+{nc} "
                           f"outside a {spec.rows}x{spec.cols} crossbar")
        if sc.ndim == 0:
            sc = np.full(nc, float(sc))
        if sc.shape != (nc,) or not np.all(np.isfinite(sc)):
            raise SimError(f"{tid}: scale must be a finite number or a list of {nc} per-column scales")
        tt["crossbars"], tt["scale"] = xb, sc
        tt["adc_full_scale"] = _full_scale(t.get("adc_full_scale"), S, P, nc, tid)
        cover[g, r0:r0 + nr, c0:c0 + nc] += 1
        by_strip.setdefault((g, r0, nr), []).append(tt)
    if not np.all(cover == 1):
        bad = int(np.count_nonzero(cover != 1))
        raise SimError(f"layer {name}: tiles do not cover the {geom.groups} x [{geom.K}, {geom.N}] matrix "
                       f"exactly once ({bad} weight positions missing or overlapping)")
    strips = []
    for (g, r0, nr), members in sorted(by_strip.items()):
        members.sort(key=lambda t: (-t["slices"], t["col0"]))
        cols = np.concatenate([g * geom.N + t["col0"] + np.arange(t["ncols"]) for t in members])
        nat = np.argsort(cols, kind="stable")
        identity = bool(np.array_equal(nat, np.arange(len(cols))))
        lv, scale, woff = [], [], []
        for t in members:
            ro, co, nc = t["row_off"], t["col_off"], t["ncols"]
            block = cells[t["crossbars"].ravel(), ro:ro + nr, co:co + nc].reshape(t["slices"], P, nr, nc)
            q = decode_tile(block, t["bits"], spec.encoding, c)
            Lt = (1 << (t["bits"] - 1)) - 1
            if np.abs(q).max(initial=0) > Lt:
                raise SimError(f"layer {name} tile {t['id']}: cells decode to levels outside +-{Lt} for "
                               f"{t['bits']} bits (damaged or mismatched crossbar tables)")
            lv.append(q)
            scale.append(t["scale"])
            woff.append(np.full(nc, float(1 << (t["bits"] - 1)) if spec.encoding == "offset" else 0.0))
        levels = np.concatenate(lv, axis=1)
        L = max((1 << (t["bits"] - 1)) - 1 for t in members)
        Smax = members[0]["slices"]
        prefix = [sum(t["ncols"] for t in members if t["slices"] > k) for k in range(Smax)]
        xbar_blocks = [[[(int(t["crossbars"][k, p]), t["row_off"], t["col_off"], t["ncols"])
                         for t in members if t["slices"] > k] for p in range(P)] for k in range(Smax)]
        ncols = cols[nat]
        contiguous = bool(np.all(np.diff(ncols) == 1))
        st = Strip(g, r0, nr, members, ncols, slice(int(ncols[0]), int(ncols[-1]) + 1) if contiguous else None,
                   np.concatenate(scale)[nat], np.ascontiguousarray(levels[:, nat], dtype=np.float32), L,
                   np.concatenate(woff), levels.sum(axis=0).astype(np.float64), prefix, xbar_blocks,
                   None if identity else nat)
        st.conductance = gather(st, lambda xb: cells[xb]).astype(np.float32)
        if any(t["adc_full_scale"] is not None for t in members):
            st.full_scale = np.concatenate([
                (np.full((t["slices"], P, t["ncols"]), np.nan) if t["adc_full_scale"] is None
                 else t["adc_full_scale"])[k, p] for k in range(Smax) for p in range(P) for t in members
                if t["slices"] > k])
        strips.append(st)
    return strips


def _full_scale(value, S: int, P: int, ncols: int, tid: str) -> np.ndarray | None:
    """A tile's ``adc_full_scale`` ([slices][polarities], or [slices][polarities][ncols]) as ``[S, P, ncols]``."""
    if value is None:
        return None
    try:
        fs = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        fs = np.empty(0)
    if fs.shape == (S, P):
        fs = np.repeat(fs[:, :, None], ncols, axis=2)
    if fs.shape != (S, P, ncols) or not np.all(np.isfinite(fs)) or not np.all(fs > 0):
        raise SimError(f"{tid}: adc_full_scale must be [slices={S}][polarities={P}] positive numbers "
                       f"(or [slices][polarities][{ncols}]), got {value!r}")
    return fs


def gather(st: Strip, array_of: Callable[[int], np.ndarray]) -> np.ndarray:
    """The strip's cell blocks side by side in bit-serial column order: [k][p][tiles]."""
    parts = []
    for per_k in st.xbar_blocks:
        for per_p in per_k:
            for xb, ro, co, nc in per_p:
                parts.append(array_of(xb)[ro:ro + st.nrows, co:co + nc])
    return np.concatenate(parts, axis=1)

