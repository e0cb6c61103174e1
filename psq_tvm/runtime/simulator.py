"""Functional crossbar simulator: one PIM layer, computed the way the crossbars would.

The simulator reads a layer's weights **only** from the crossbar cell tables
(``cells``: uint8 ``[n_crossbars, R, C]``, see :mod:`psq_tvm.tables`) and the
layer's tile metadata (a manifest layer entry, see :func:`layer_program`), so
running it verifies the tables themselves.  It imports no TVM.

What one call computes (DESIGN.md section 6), for an input ``x``:

1. **Activations.**  ``a = options.act_bits or spec.act_bits``.  The range is
   taken from ``x`` itself at run time (data-free, one scale per call/tensor).
   Unsigned input (``min(x) >= 0``): ``s_x = max(x) / (2**a - 1)``,
   ``q_x = clip(rint(x / s_x), 0, 2**a - 1)``, input offset ``o_x = 0``.
   Signed input: ``s_x = max|x| / (2**(a-1) - 1)``, ``q_x`` symmetric in
   ``[-(2**(a-1)-1), 2**(a-1)-1]``, fed to the wordlines as the unsigned a-bit
   ``u_x = q_x + o_x`` with ``o_x = 2**(a-1)``; the offset is corrected
   digitally (``- o_x * colsum(q_w)``, a per-column constant of the layer).
   All-zero input: ``s_x = 1``.  Zero padding of a conv is ``q_x = 0``.
2. **Bit-serial inputs**, ``d = spec.dac_bits`` per cycle, ``J = ceil(a/d)``
   cycles, least significant first: ``u_x = sum_j 2**(j d) x_j``.
3. **Weights** as stored: slice ``k`` (``c = cell_bits``) of polarity ``p`` of a
   tile lives on crossbar ``tile["crossbars"][k][p]`` at rows
   ``row_off .. row_off+nrows`` and columns ``col_off .. col_off+ncols``.  Only
   the tile's own wordlines are driven when it is read, so cells of other
   tiles packed on the same crossbar never enter its bitlines.
4. **Crossbar read** = integer dot product ``v = x_j . g`` over the tile's rows
   (``g`` = cell level, or its perturbed conductance with non-idealities), then
   the **ADC** with ``n = spec.adc_bits``: with ``peak = nrows (2**d-1)(2**c-1)``,
   the ADC is *lossless* (``code = v``) when ``n`` is None or
   ``2**n - 1 >= peak`` and no full scale is forced; otherwise
   ``delta = FS / (2**n - 1)`` (``FS = options.adc_full_scale`` or ``peak``) and
   ``code = clip(rint(v / delta + adc_offset), 0, 2**n - 1)``; the read is worth
   ``delta * code``.
5. **Digital**: shift-and-add of codes over input cycles (``2**(j d)``) and
   slices (``2**(k c)``), minus the ``-`` polarity (differential); for the
   offset encoding minus ``2**(b-1) * sum_rows(u_x)`` (the reference column,
   computed digitally); minus the input offset term; times ``tile scale x s_x``;
   summed over the row tiles; plus bias.

**Exactness.**  With a lossless ADC and no non-idealities, steps 2-5 give, per
tile and output column, the integer ``sum_r q_x[r] q_w[r, col]`` exactly: the
shift-and-add reassembles ``u_x`` and the stored weight values (all partial
sums are integers far below 2**53, held in float64), and the offset
corrections are exact integer identities.  The fast path computes the same
integer with one matmul per row strip of tiles, in float32 BLAS when
``nrows * max|q_x| * max|q_w| < 2**24`` (else float64, ``< 2**53``): every
partial sum is then an exactly representable integer, so the result does not
depend on summation order or FMA use.  :func:`layer_integers` returns these
per-strip integers from either path; the tests check them bit-identical.
Both paths then scale identically -- ``float32(integer * s)`` per strip with
the per-column ``s = s_w s_x`` rounded to float32 (float64 for float64 strips),
summed over the row strips in float32, in strip order -- so the two paths'
float outputs are bit-identical too.  :func:`golden_layer`
computes ``(s_x q_x) @ (s_w q_w)`` in float64; ``run_layer`` differs from it
only by float32 rounding of the scaling and of the sum over row strips: at
most about ``(n_row_strips + 2) * 2**-24 * sum_strips |strip term|`` per output.

**Non-idealities** (off by default, deterministic for a given seed): per cell,
stuck-at-min (level 0) with rate ``stuck_at_min``, else stuck-at-max (level
``2**c - 1``) with rate ``stuck_at_max``, then programmed-conductance variation
``g = level * (1 + sigma * z)``, ``z ~ N(0, 1)``, clipped at 0; the random
numbers of physical crossbar ``i`` come from ``default_rng([seed, i])`` drawn
over the whole ``R x C`` array, so a cell's fault does not depend on which
layer or tile reads it.  ``adc_offset`` (in ADC LSBs) is added before rounding.
The digital correction constants use the intended (programmed) levels.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..core.crossbar import CrossbarSpec
from ..core.tables import decode_tile

__all__ = [
    "SimOptions", "SimError", "CompiledLayer", "compile_layer", "run_layer", "golden_layer",
    "layer_integers", "layer_program", "quantize_activations", "clear_cache",
]

_F32_EXACT = 2 ** 24
_F64_EXACT = 2 ** 53
_LUT_MAX = 1 << 21
_EXACT_CHUNK_BYTES = 1 << 21   # working set of one fast-path chunk (a share of L2/L3; tuned by bench_sim)
_EXACT_CHUNK_MIN = 128         # fewest input rows (pixels / tokens) per fast-path chunk


class SimError(ValueError):
    """Bad input or a malformed layer program; the message names the layer."""


# ------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class SimOptions:
    """How the simulator runs (all device non-idealities off by default).

    act_bits         -- activation bits; None = ``spec.act_bits``
    adc_full_scale   -- ADC full scale in bitline-sum units (one DAC step x one
                        cell level); None = the tile's lossless peak
                        ``nrows (2**dac-1)(2**cell-1)``.  Setting it always
                        applies the ADC quantiser (never the identity);
                        ignored when ``spec.adc_bits`` is None
    force_bitserial  -- use the per-cycle path even when the ADC is lossless
    conductance_sigma -- relative sigma of programmed conductance, per cell
    stuck_at_min, stuck_at_max -- per-cell fault rates
    adc_offset       -- ADC offset in LSBs, added before rounding
    seed             -- seed of the device faults / variation
    chunk_elements   -- memory bound (elements) of one bit-serial work block
    """

    act_bits: int | None = None
    adc_full_scale: float | None = None
    force_bitserial: bool = False
    conductance_sigma: float = 0.0
    stuck_at_min: float = 0.0
    stuck_at_max: float = 0.0
    adc_offset: float = 0.0
    seed: int = 0
    chunk_elements: int = 1 << 20

    def __post_init__(self) -> None:
        a = self.act_bits
        if a is not None and (not isinstance(a, (int, np.integer)) or isinstance(a, bool) or not 1 <= a <= 16):
            raise ValueError(f"SimOptions.act_bits must be 1..16 or None, got {self.act_bits!r}")
        if self.adc_full_scale is not None and not (math.isfinite(self.adc_full_scale) and self.adc_full_scale > 0):
            raise ValueError("SimOptions.adc_full_scale must be a positive number or None, "
                             f"got {self.adc_full_scale!r}")
        if not (math.isfinite(self.conductance_sigma) and self.conductance_sigma >= 0):
            raise ValueError(f"SimOptions.conductance_sigma must be >= 0, got {self.conductance_sigma!r}")
        for f in ("stuck_at_min", "stuck_at_max"):
            v = getattr(self, f)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"SimOptions.{f} must be a rate in [0, 1], got {v!r}")
        if self.stuck_at_min + self.stuck_at_max > 1.0:
            raise ValueError("SimOptions.stuck_at_min + stuck_at_max must not exceed 1")
        if not math.isfinite(self.adc_offset):
            raise ValueError(f"SimOptions.adc_offset must be finite, got {self.adc_offset!r}")
        if self.chunk_elements < 1:
            raise ValueError("SimOptions.chunk_elements must be positive")

    @property
    def cells_perturbed(self) -> bool:
        """True when the stored conductances differ from the programmed levels."""
        return self.conductance_sigma > 0 or self.stuck_at_min > 0 or self.stuck_at_max > 0

    @property
    def ideal(self) -> bool:
        """True when no device non-ideality is enabled."""
        return not self.cells_perturbed and self.adc_offset == 0

    def replace(self, **kw: Any) -> "SimOptions":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SimOptions":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown simulator option(s) {sorted(unknown)}; known: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)


# -------------------------------------------------------------- activations
def quantize_activations(x: np.ndarray, act_bits: int) -> tuple[np.ndarray, float, int]:
    """Data-free activation quantisation of one tensor.

    Returns ``(q, s_x, o_x)``: integer levels ``q`` (float32, exact), the scale
    (``x ~ s_x * q``) and the wordline offset (0 for unsigned input,
    ``2**(a-1)`` for signed input, where the crossbars see ``q + o_x``).
    """
    x64 = np.asarray(x, dtype=np.float64)
    if x64.size == 0:
        return np.zeros(x64.shape, np.float32), 1.0, 0
    lo, hi = float(x64.min()), float(x64.max())
    if lo >= 0:
        top, bottom, offset = (1 << act_bits) - 1, 0, 0
        peak = hi
    else:
        if act_bits < 2:
            raise SimError(f"signed input needs act_bits >= 2, got {act_bits}")
        top = (1 << (act_bits - 1)) - 1
        bottom, offset = -top, 1 << (act_bits - 1)
        peak = max(hi, -lo)
    scale = peak / top if peak > 0 else 1.0
    t = np.divide(x64, scale)                # in place from here on: large temporaries are costly
    np.rint(t, out=t)
    np.clip(t, bottom, top, out=t)
    return t.astype(np.float32), float(scale), offset


# --------------------------------------------------------------- programs
def _as_pair(v: Any, n: int, what: str, name: str) -> tuple[int, ...]:
    try:
        t = tuple(int(a) for a in v)
    except TypeError:
        t = (int(v),) * n
    if len(t) != n:
        raise SimError(f"layer {name}: {what} must have {n} values, got {v!r}")
    return t


@dataclasses.dataclass
class _Strip:
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


class CompiledLayer:
    """A layer program bound to its crossbar cells: validated once, levels cached."""

    def __init__(self, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec) -> None:
        self.layer = layer
        self.spec = spec
        self.name = f"{layer.get('name', '?')!r} (id {layer.get('id', '?')})"
        name = self.name
        op = layer.get("op")
        if op not in ("dense", "conv2d"):
            raise SimError(f"layer {name}: op must be 'dense' or 'conv2d', got {op!r}")
        self.op = op
        try:
            K, N = (int(v) for v in layer["matrix_shape"])
            self.groups = int(layer.get("groups", 1) or 1)
            self.weight_shape = tuple(int(v) for v in layer["weight_shape"])
            tiles = list(layer["tiles"])
        except (KeyError, TypeError, ValueError) as e:
            raise SimError(f"layer {name}: malformed layer program ({e!r})") from None
        self.K, self.N = K, N
        if op == "dense":
            if self.groups != 1:
                raise SimError(f"layer {name}: dense layers have no groups (got {self.groups})")
        else:
            if len(self.weight_shape) != 4:
                raise SimError(f"layer {name}: conv2d weight_shape must be 4-D, got {self.weight_shape}")
            cout, cin_g, kh, kw = self.weight_shape
            if cin_g * kh * kw != K or cout != N * self.groups:
                raise SimError(f"layer {name}: matrix_shape {[K, N]} does not match weight_shape "
                               f"{list(self.weight_shape)} with {self.groups} groups")
            self.kernel = (kh, kw)
            self.strides = _as_pair(layer.get("strides", (1, 1)), 2, "strides", name)
            self.dilation = _as_pair(layer.get("dilation", (1, 1)), 2, "dilation", name)
            self.padding = _as_pair(layer.get("padding", (0, 0, 0, 0)), 4, "padding", name)
            if min(self.strides) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
                raise SimError(f"layer {name}: strides/dilation must be >= 1 and padding >= 0")
        cells = np.asarray(cells)
        if cells.ndim != 3 or cells.shape[1:] != (spec.rows, spec.cols):
            raise SimError(f"layer {name}: cells must be [n_crossbars, {spec.rows}, {spec.cols}], got {cells.shape}")
        self.n_crossbars = cells.shape[0]
        self._cells_ref = weakref.ref(cells) if _weakrefable(cells) else (lambda c=cells: c)
        self._noisy: dict[tuple, list[np.ndarray]] = {}
        self.strips = self._build(tiles, cells)

    # ------------------------------------------------------------ build
    def _build(self, tiles: list, cells: np.ndarray) -> list[_Strip]:
        spec, name = self.spec, self.name
        P, c = spec.polarities, spec.cell_bits
        cover = np.zeros((self.groups, self.K, self.N), dtype=np.int32)
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
            if not (0 <= g < self.groups and nr >= 1 and nc >= 1 and r0 >= 0 and c0 >= 0
                    and r0 + nr <= self.K and c0 + nc <= self.N):
                raise SimError(f"{tid}: box group {g} rows {r0}+{nr} cols {c0}+{nc} outside the "
                               f"{self.groups} x [{self.K}, {self.N}] matrix")
            if not 2 <= b <= 16 or S != spec.slices(b):
                raise SimError(f"{tid}: {b}-bit tile must have {spec.slices(b) if 2 <= b <= 16 else '?'} slices "
                               f"under {spec.encoding}/{c}-bit cells, got {S}")
            if xb.shape != (S, P):
                raise SimError(f"{tid}: crossbars must be [slices={S}][polarities={P}], got shape {list(xb.shape)}")
            if xb.min() < 0 or xb.max() >= self.n_crossbars:
                raise SimError(f"{tid}: crossbar id out of range 0..{self.n_crossbars - 1}: {xb.tolist()}")
            if not (0 <= tt["row_off"] and tt["row_off"] + nr <= spec.rows and 0 <= tt["col_off"]
                    and tt["col_off"] + nc <= spec.cols):
                raise SimError(f"{tid}: placement rows {tt['row_off']}+{nr} cols {tt['col_off']}+{nc} "
                               f"outside a {spec.rows}x{spec.cols} crossbar")
            if sc.ndim == 0:
                sc = np.full(nc, float(sc))
            if sc.shape != (nc,) or not np.all(np.isfinite(sc)):
                raise SimError(f"{tid}: scale must be a finite number or a list of {nc} per-column scales")
            tt["crossbars"], tt["scale"] = xb, sc
            cover[g, r0:r0 + nr, c0:c0 + nc] += 1
            by_strip.setdefault((g, r0, nr), []).append(tt)
        if not np.all(cover == 1):
            bad = int(np.count_nonzero(cover != 1))
            raise SimError(f"layer {name}: tiles do not cover the {self.groups} x [{self.K}, {self.N}] matrix "
                           f"exactly once ({bad} weight positions missing or overlapping)")
        strips = []
        for (g, r0, nr), members in sorted(by_strip.items()):
            members.sort(key=lambda t: (-t["slices"], t["col0"]))
            cols = np.concatenate([g * self.N + t["col0"] + np.arange(t["ncols"]) for t in members])
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
            st = _Strip(g, r0, nr, members, ncols, slice(int(ncols[0]), int(ncols[-1]) + 1) if contiguous else None,
                        np.concatenate(scale)[nat], np.ascontiguousarray(levels[:, nat], dtype=np.float32), L,
                        np.concatenate(woff), levels.sum(axis=0).astype(np.float64), prefix, xbar_blocks,
                        None if identity else nat)
            st.conductance = self._gather(st, lambda xb: cells[xb]).astype(np.float32)
            strips.append(st)
        return strips

    def _gather(self, st: _Strip, array_of) -> np.ndarray:
        """The strip's cell blocks side by side in bit-serial column order: [k][p][tiles]."""
        parts = []
        for per_k in st.xbar_blocks:
            for per_p in per_k:
                for xb, ro, co, nc in per_p:
                    parts.append(array_of(xb)[ro:ro + st.nrows, co:co + nc])
        return np.concatenate(parts, axis=1)

    def _perturbed(self, opts: SimOptions) -> list[np.ndarray]:
        """Per strip, the conductances with stuck-at faults and variation (cached per option set)."""
        key = (opts.conductance_sigma, opts.stuck_at_min, opts.stuck_at_max, int(opts.seed))
        if key not in self._noisy:
            cells = self._cells_ref()
            if cells is None:
                raise SimError(f"layer {self.name}: the crossbar cells array was released")
            gmax = float((1 << self.spec.cell_bits) - 1)
            memo: dict[int, np.ndarray] = {}

            def device(xb: int) -> np.ndarray:
                if xb not in memo:
                    rng = np.random.default_rng([int(opts.seed), xb])
                    g = cells[xb].astype(np.float64)
                    u = rng.random(g.shape)
                    z = rng.standard_normal(g.shape)
                    g[u < opts.stuck_at_min] = 0.0
                    g[(u >= opts.stuck_at_min) & (u < opts.stuck_at_min + opts.stuck_at_max)] = gmax
                    if opts.conductance_sigma > 0:
                        g = np.maximum(g * (1.0 + opts.conductance_sigma * z), 0.0)
                    memo[xb] = g
                return memo[xb]

            self._noisy[key] = [self._gather(st, device) for st in self.strips]
        return self._noisy[key]

    # -------------------------------------------------------------- ADC
    def adc(self, nrows: int, opts: SimOptions) -> tuple[bool, float, int | None]:
        """(identity, delta, top) of the ADC reading a strip of ``nrows`` rows."""
        n = self.spec.adc_bits
        if n is None:
            return opts.adc_offset == 0, 1.0, None
        top = (1 << n) - 1
        peak = nrows * ((1 << self.spec.dac_bits) - 1) * ((1 << self.spec.cell_bits) - 1)
        if opts.adc_full_scale is not None:
            return False, float(opts.adc_full_scale) / top, top
        if top >= peak:
            return opts.adc_offset == 0, 1.0, top
        return False, peak / top, top

    @staticmethod
    def _adc_codes(v: np.ndarray, delta: float, top: int | None, offset: float) -> np.ndarray:
        """ADC codes of bitline sums ``v`` (float64 arithmetic, the reference definition)."""
        code = np.rint(np.asarray(v, dtype=np.float64) / delta + offset)
        if top is not None:
            np.clip(code, 0, top, out=code)
        return code

    # ------------------------------------------------------------ inputs
    def _check_input(self, x: Any) -> np.ndarray:
        name = self.name
        try:
            x = np.asarray(x)
        except Exception as e:   # pragma: no cover
            raise SimError(f"layer {name}: input is not an array ({e})") from None
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise SimError(f"layer {name}: input dtype {x.dtype} is not numeric")
        if self.op == "dense":
            if x.ndim < 1 or x.shape[-1] != self.K:
                raise SimError(f"layer {name}: dense input must have shape [..., {self.K}], got {list(x.shape)}")
        else:
            cin = self.weight_shape[1] * self.groups
            if x.ndim != 4 or x.shape[1] != cin:
                raise SimError(f"layer {name}: conv2d input must be NCHW with C={cin}, got shape {list(x.shape)}")
            kh, kw = self.kernel
            (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilation, self.padding
            oh = (x.shape[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
            ow = (x.shape[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1
            if oh < 1 or ow < 1:
                raise SimError(f"layer {name}: input {list(x.shape)} is smaller than the "
                               f"{kh}x{kw} kernel (dilation {[dh, dw]}, padding {list(self.padding)})")
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise SimError(f"layer {name}: input contains {bad} NaN/Inf value(s)")
        return x

    def _padded(self, q: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Zero-padded contiguous conv input and the output height/width."""
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilation, self.padding
        if pt or pl or pb or pr:
            B, C, H, W = q.shape
            qp = np.zeros((B, C, H + pt + pb, W + pl + pr), dtype=q.dtype)
            qp[:, :, pt:pt + H, pl:pl + W] = q
            q = qp
        q = np.ascontiguousarray(q)
        oh = (q.shape[2] - dh * (kh - 1) - 1) // sh + 1
        ow = (q.shape[3] - dw * (kw - 1) - 1) // sw + 1
        return q, oh, ow

    def _window(self, qp: np.ndarray, g: int, b: slice | int, r0: int, rows: int, ow: int) -> np.ndarray:
        """Strided view ``[Cg, kh, kw, (B,) rows, ow]`` of group ``g``'s receptive fields (no copy)."""
        kh, kw = self.kernel
        (sh, sw), (dh, dw) = self.strides, self.dilation
        cg = qp.shape[1] // self.groups
        sB, sC, sH, sW = qp.strides
        if isinstance(b, slice):
            base = qp[b, g * cg:(g + 1) * cg, r0 * sh:]
            return as_strided(base, (cg, kh, kw, base.shape[0], rows, ow),
                              (sC, sH * dh, sW * dw, sB, sH * sh, sW * sw), writeable=False)
        base = qp[b, g * cg:(g + 1) * cg, r0 * sh:]
        return as_strided(base, (cg, kh, kw, rows, ow), (sC, sH * dh, sW * dw, sH * sh, sW * sw), writeable=False)

    def _matrices(self, q: np.ndarray) -> tuple[list[np.ndarray], tuple]:
        """im2col of the integer input: one [M, K] float32 matrix per group, and the output layout."""
        if self.op == "dense":
            return [q.reshape(-1, self.K)], ("dense", q.shape[:-1])
        qp, oh, ow = self._padded(q)
        B = qp.shape[0]
        # built as X^T [K, M] (inner copy loop runs along the output width, fast), used as the view X = X^T.T
        mats = [self._window(qp, g, slice(None), 0, oh, ow).reshape(self.K, B * oh * ow).T
                for g in range(self.groups)]
        return mats, ("conv2d", (B, oh, ow))

    def _conv_chunks(self, qp: np.ndarray, oh: int, ow: int, budget: int):
        """Fused im2col for the fast path: (m0, k, get) per chunk of whole output rows of one image,
        ``get(g)`` building group ``g``'s ``X^T`` chunk ``[K, k]`` into a reused buffer."""
        B = qp.shape[0]
        rows = int(max(1, min(oh, budget // max(1, ow))))
        bufs: dict[int, np.ndarray] = {}
        for b in range(B):
            for r0 in range(0, oh, rows):
                r = min(rows, oh - r0)
                m0, k = (b * oh + r0) * ow, r * ow

                def get(g: int, b=b, r0=r0, r=r, k=k) -> np.ndarray:
                    if r == rows:
                        if g not in bufs:
                            bufs[g] = np.empty((self.K, rows * ow), dtype=qp.dtype)
                        dst = bufs[g]
                    else:
                        dst = np.empty((self.K, k), dtype=qp.dtype)
                    np.copyto(dst.reshape(qp.shape[1] // self.groups, *self.kernel, r, ow),
                              self._window(qp, g, b, r0, r, ow))
                    return dst
                yield m0, k, get

    def _check_bias(self, bias: Any) -> None:
        if bias is None:
            return
        ntot = self.N * self.groups
        try:
            b = np.asarray(bias, dtype=np.float64)
        except (TypeError, ValueError):
            raise SimError(f"layer {self.name}: bias is not numeric") from None
        if b.size != ntot or b.ndim > 1 and b.shape != (ntot,):
            raise SimError(f"layer {self.name}: bias must have {ntot} values, got shape {list(np.shape(bias))}")
        if not np.all(np.isfinite(b)):
            raise SimError(f"layer {self.name}: bias contains NaN/Inf")

    def _finish(self, out: np.ndarray, layout: tuple, bias: Any, dtype) -> np.ndarray:
        ntot = self.N * self.groups
        if bias is not None:
            out += np.asarray(bias, dtype=out.dtype).reshape(ntot)
        if layout[0] == "dense":
            return out.reshape(tuple(layout[1]) + (ntot,)).astype(dtype)
        B, oh, ow = layout[1]
        return np.ascontiguousarray(out.T.reshape(ntot, B, oh, ow).transpose(1, 0, 2, 3), dtype=dtype)

    # -------------------------------------------------------------- paths
    def _exact_strip(self, st: _Strip, xs: np.ndarray, signed_max: int) -> np.ndarray:
        """``q_x . q_w`` over the strip's rows: [M, n] integers (float array, exact).

        float32 BLAS when every partial sum is an integer below 2**24 in magnitude, else float64.
        """
        bound = st.nrows * signed_max * st.lmax
        dt = np.float32 if bound < _F32_EXACT else np.float64
        w = st.levels if dt == np.float32 else st.levels.astype(np.float64)
        return xs.astype(dt, copy=False) @ w

    def _bitserial_strip(self, si: int, st: _Strip, xs: np.ndarray, o_x: int, a: int,
                         opts: SimOptions) -> np.ndarray:
        """Per-cycle crossbar reads of one strip, ADC, shift-and-add, corrections: [M, n] float64 units."""
        spec = self.spec
        d, c, P = spec.dac_bits, spec.cell_bits, spec.polarities
        J = -(-a // d)
        dmax = (1 << d) - 1
        identity, delta, top = self.adc(st.nrows, opts)
        G = self._perturbed(opts)[si] if opts.cells_perturbed else st.conductance
        integer_reads = not (opts.conductance_sigma > 0)
        identity = identity and integer_reads       # analog sums with variation are still rounded by the ADC
        peak = st.nrows * dmax * ((1 << c) - 1)
        rdt = np.float32 if (integer_reads and peak < _F32_EXACT) else np.float64
        G = G.astype(rdt, copy=False)
        lut = None
        if integer_reads and not identity and peak < _LUT_MAX:
            lut = self._adc_codes(np.arange(peak + 1), delta, top, opts.adc_offset).astype(rdt)
        code_max = peak if identity else (top if top is not None else peak * 2 + abs(opts.adc_offset) + 1)
        jsum = float((2.0 ** (d * np.arange(J))).sum())
        ksum = float((2.0 ** (c * np.arange(len(st.prefix)))).sum())
        if code_max * jsum * ksum * P >= _F64_EXACT:
            raise SimError(f"layer {self.name}: bit-serial accumulation would exceed 2**53 (exactness lost)")
        # the J-cycle weighted sum of codes stays exact in float32 when below 2**24
        cdt = np.float32 if (rdt == np.float32 and code_max * jsum < _F32_EXACT) else np.float64
        jw = (2.0 ** (d * np.arange(J))).astype(cdt)
        M, n = xs.shape[0], len(st.cols)
        u = np.empty((M, st.nrows), dtype=rdt)      # unsigned a-bit wordline values, exact in float
        np.add(xs, o_x, out=u, casting="unsafe")
        ncat = G.shape[1]
        out = np.empty((M, n), dtype=np.float64)
        step = max(1, int(opts.chunk_elements // max(1, J * max(ncat, st.nrows))))
        inv = [rdt(2.0 ** -(d * j)) for j in range(J + 1)]
        for m0 in range(0, M, step):
            uc = u[m0:m0 + step]
            mc = uc.shape[0]
            # bit planes x_j = floor(u / 2**(j d)) - 2**d floor(u / 2**((j+1) d)), exact in float
            planes = np.empty((J, mc, st.nrows), dtype=rdt)
            hi = uc
            for j in range(J):
                nxt = np.floor(uc * inv[j + 1]) if j + 1 < J else None
                if nxt is None:
                    planes[j] = hi
                else:
                    np.multiply(nxt, -(dmax + 1), out=planes[j])
                    planes[j] += hi
                    hi = nxt
            v = planes.reshape(J * mc, st.nrows) @ G          # bitline sums of every cycle and crossbar
            if identity:
                codes = v
            elif lut is not None:
                codes = np.take(lut, v.astype(np.intp))
            else:
                codes = self._adc_codes(v, delta, top, opts.adc_offset)
            codes = codes.reshape(J, mc, ncat)
            if codes.dtype != cdt:
                codes = codes.astype(cdt)
            cyc = np.tensordot(jw, codes, axes=(0, 0))       # shift-and-add over input cycles
            acc = np.zeros((mc, n), dtype=np.float64)
            off = 0
            for k, nk in enumerate(st.prefix):                # shift-and-add over slices, +/- polarity
                for p in range(P):
                    w = float(1 << (k * c)) * (-1.0 if p == 1 else 1.0)
                    if k == 0 and p == 0 and nk == n:
                        acc += cyc[:, off:off + nk]
                    else:
                        acc[:, :nk] += w * cyc[:, off:off + nk]
                    off += nk
            if delta != 1.0:
                acc *= delta
            if spec.encoding == "offset":                      # reference column: 2**(b-1) * sum(u_x)
                acc -= np.outer(uc.sum(axis=1, dtype=np.float64), st.w_offset)
            if o_x:                                            # signed-input offset: o_x * sum_r q_w
                acc -= o_x * st.colsum
            out[m0:m0 + mc] = acc
        return out if st.to_natural is None else out[:, st.to_natural]

    def _quantize(self, x: Any, opts: SimOptions):
        """Check and quantise the input: (integer levels q, s_x, o_x, act bits)."""
        x = self._check_input(x)
        a = int(opts.act_bits or self.spec.act_bits)
        if self.spec.dac_bits > a:
            raise SimError(f"layer {self.name}: dac_bits {self.spec.dac_bits} exceed act_bits {a}")
        try:
            q, s_x, o_x = quantize_activations(x, a)
        except SimError as e:
            raise SimError(f"layer {self.name}: {e}") from None
        return q, s_x, o_x, a

    def _prepare(self, x: Any, opts: SimOptions):
        """Check and quantise the input, im2col: (per-group [M, K] matrices, layout, s_x, o_x, a)."""
        q, s_x, o_x, a = self._quantize(x, opts)
        mats, layout = self._matrices(q)
        return mats, layout, s_x, o_x, a

    def _use_exact(self, st: _Strip, opts: SimOptions, path: str) -> bool:
        if path == "exact":
            return True
        if path == "bitserial" or opts.force_bitserial or opts.cells_perturbed:
            return False
        return self.adc(st.nrows, opts)[0]

    def _strip_units(self, x: Any, opts: SimOptions, path: str):
        """[(strip, integer-unit results [M, n])], layout, s_x, M (unchunked; for verification)."""
        mats, layout, s_x, o_x, a = self._prepare(x, opts)
        signed_max = (1 << a) - 1 if o_x == 0 else (1 << (a - 1)) - 1
        results = []
        for si, st in enumerate(self.strips):
            xs = mats[st.group][:, st.row0:st.row0 + st.nrows]
            if self._use_exact(st, opts, path):
                results.append((st, self._exact_strip(st, xs, signed_max)))
            else:
                results.append((st, self._bitserial_strip(si, st, xs, o_x, a, opts)))
        return results, layout, s_x, mats[0].shape[0]

    def _exact_plan(self, strips: list[_Strip], s_x: float, signed_max: int, transposed: bool) -> list[tuple]:
        plan = []
        for st in strips:
            dt = self._exact_dtype(st, signed_max)
            w = st.levels if dt == np.float32 else st.levels.astype(np.float64)
            sc = self._scale_vector(st, s_x, dt)
            if transposed:
                w, sc = np.ascontiguousarray(w.T), sc[:, None]
            plan.append((st, w, dt, sc))
        return plan

    @staticmethod
    def _exact_dtype(st: _Strip, signed_max: int):
        """float32 when every partial sum of the strip's dot products is an integer below 2**24."""
        return np.float32 if st.nrows * signed_max * st.lmax < _F32_EXACT else np.float64

    @staticmethod
    def _scale_vector(st: _Strip, s_x: float, dt) -> np.ndarray:
        """Per-column ``s_w * s_x``; float32 when the integers are float32 (one float32 rounding each)."""
        return (st.scale * s_x).astype(dt)

    def _chunk_columns(self, strips: list[_Strip]) -> int:
        """Rows of ``X`` (columns of ``X^T``) per fast-path chunk, so that a chunk's working set stays in cache."""
        nmax = max(len(st.cols) for st in strips)
        return int(max(_EXACT_CHUNK_MIN, min(2048, _EXACT_CHUNK_BYTES // (12 * nmax + 4 * self.K))))

    @staticmethod
    def _matrix_chunks(mats: list[np.ndarray], M: int, mc: int, transposed: bool):
        for m0 in range(0, M, mc):
            k = min(mc, M - m0)
            if transposed:
                yield m0, k, (lambda g, m0=m0, k=k: mats[g].T[:, m0:m0 + k])
            else:
                yield m0, k, (lambda g, m0=m0, k=k: mats[g][m0:m0 + k])

    def _exact_accumulate(self, out: np.ndarray, chunks, strips: list[_Strip], s_x: float,
                          signed_max: int, transposed: bool) -> None:
        """Fast path: ``out += (s_w s_x) * (q_x . q_w)`` strip by strip, chunk by chunk (cache-sized).

        ``out`` is ``[M, N]``; when it is the transpose of a C-contiguous ``[N, M]`` array (convs), the
        products are formed transposed, ``q_w^T . X^T``, and ``chunks`` yields ``X^T`` column blocks.
        ``chunks`` yields ``(m0, k, get)`` with ``get(g)`` the group's input block (``[K, k]`` transposed,
        else ``[k, K]``).
        """
        if transposed:                                   # (a 1-row output is both C- and F-contiguous,
            out = out.T                                  # so the caller says which layout it passes) [N, M]
        nmax = max(len(st.cols) for st in strips)
        plan = self._exact_plan(strips, s_x, signed_max, transposed)
        b32: dict[tuple, np.ndarray] = {}
        bsc: np.ndarray | None = None
        for m0, k, get in chunks:
            o = out[:, m0:m0 + k] if transposed else out[m0:m0 + k]
            inputs: dict[int, np.ndarray] = {}
            for st, w, dt, sc in plan:
                n = len(st.cols)
                if st.group not in inputs:
                    inputs[st.group] = get(st.group)
                key = (dt, n, k)
                if key not in b32:
                    b32[key] = np.empty((n, k) if transposed else (k, n), dtype=dt)
                if dt != out.dtype and (bsc is None or bsc.size < nmax * k):
                    bsc = np.empty(nmax * k, dtype=out.dtype)
                if transposed:
                    xs = inputs[st.group][st.row0:st.row0 + st.nrows]
                    p = np.matmul(w, xs.astype(dt, copy=False), out=b32[key])        # exact integers
                    scaled = np.multiply(p, sc, out=p if dt == out.dtype else bsc[:n * k].reshape(n, k),
                                         casting="unsafe")
                    if st.col_slice is not None:
                        o[st.col_slice] += scaled
                    else:
                        o[st.cols] += scaled
                else:
                    xs = inputs[st.group][:, st.row0:st.row0 + st.nrows]
                    p = np.matmul(xs.astype(dt, copy=False), w, out=b32[key])        # exact integers
                    scaled = np.multiply(p, sc, out=p if dt == out.dtype else bsc[:n * k].reshape(k, n),
                                         casting="unsafe")
                    if st.col_slice is not None:
                        o[:, st.col_slice] += scaled
                    else:
                        o[:, st.cols] += scaled

    # ------------------------------------------------------------ public
    def run(self, x: Any, bias: Any = None, options: SimOptions | None = None) -> np.ndarray:
        """Simulate the layer on ``x`` (dense ``[..., K]`` / conv NCHW); float32 output."""
        opts = options or SimOptions()
        self._check_bias(bias)
        q, s_x, o_x, a = self._quantize(x, opts)
        signed_max = (1 << a) - 1 if o_x == 0 else (1 << (a - 1)) - 1
        ntot = self.N * self.groups
        if all(self._use_exact(st, opts, "auto") for st in self.strips):
            if self.op == "conv2d":
                qp, oh, ow = self._padded(q)
                B = qp.shape[0]
                layout = ("conv2d", (B, oh, ow))
                out = np.zeros((ntot, B * oh * ow), dtype=np.float32).T    # [N, M] storage (NCHW-like)
                if out.size:
                    mc = self._chunk_columns(self.strips)
                    self._exact_accumulate(out, self._conv_chunks(qp, oh, ow, mc), self.strips, s_x, signed_max,
                                          transposed=True)
            else:
                mats, layout = self._matrices(q)
                M = mats[0].shape[0]
                out = np.zeros((M, ntot), dtype=np.float32)
                if M:
                    mc = self._chunk_columns(self.strips)
                    self._exact_accumulate(out, self._matrix_chunks(mats, M, mc, False), self.strips, s_x,
                                           signed_max, transposed=False)
            return self._finish(out, layout, bias, np.float32)
        mats, layout = self._matrices(q)
        M = mats[0].shape[0]
        # float32 accumulation over row strips (the output is float32); see the module docstring
        if self.op == "conv2d":     # output built as [N, M] (channel-major, like NCHW), used as a [M, N] view
            out = np.zeros((ntot, M), dtype=np.float32).T
        else:
            out = np.zeros((M, ntot), dtype=np.float32)
        # some strips bit-serial: every strip in order, the same scaling and summation order as above
        for si, st in enumerate(self.strips):
            xs = mats[st.group][:, st.row0:st.row0 + st.nrows]
            dt = self._exact_dtype(st, signed_max)
            if self._use_exact(st, opts, "auto"):
                units = self._exact_strip(st, xs, signed_max)
                integral = dt == np.float32
            else:
                units = self._bitserial_strip(si, st, xs, o_x, a, opts)
                # the same rounding as the fast path when the units are its (float32-exact) integers
                integral = (dt == np.float32 and bool(np.all(np.abs(units) < _F32_EXACT))
                            and np.array_equal(units, np.rint(units)))
                if integral:
                    units = units.astype(np.float32)
            scaled = np.multiply(units, self._scale_vector(st, s_x, np.float32 if integral else np.float64),
                                 out=np.empty(units.shape, np.float32), casting="unsafe")
            if st.col_slice is not None:
                out[:, st.col_slice] += scaled
            else:
                out[:, st.cols] += scaled
        return self._finish(out, layout, bias, np.float32)

    def integers(self, x: Any, options: SimOptions | None = None, path: str = "auto") -> list[dict]:
        """Per strip, the integer-unit results before scaling (``path``: auto | exact | bitserial)."""
        if path not in ("auto", "exact", "bitserial"):
            raise ValueError(f"path must be auto, exact or bitserial, got {path!r}")
        opts = options or SimOptions()
        results, _, s_x, _ = self._strip_units(x, opts, path)
        return [{"group": st.group, "row0": st.row0, "nrows": st.nrows, "cols": st.cols,
                 "scale": st.scale, "act_scale": s_x, "values": u} for st, u in results]

    def dequantized_matrices(self) -> list[np.ndarray]:
        """Per group, ``scale * levels`` read from the cells, float64 ``[K, N]``."""
        mats = [np.zeros((self.K, self.N)) for _ in range(self.groups)]
        for st in self.strips:
            w = st.levels.astype(np.float64) * st.scale
            local = st.cols - st.group * self.N
            mats[st.group][st.row0:st.row0 + st.nrows, local] = w
        return mats

    def golden(self, x: Any, bias: Any = None, options: SimOptions | None = None) -> np.ndarray:
        """Fake-quantised reference (float64): same activation quantisation, weights from the cells."""
        opts = options or SimOptions()
        self._check_bias(bias)
        x = self._check_input(x)
        a = int(opts.act_bits or self.spec.act_bits)
        try:
            q, s_x, _ = quantize_activations(x, a)
        except SimError as e:
            raise SimError(f"layer {self.name}: {e}") from None
        mats, layout = self._matrices(q.astype(np.float64) * s_x)
        W = self.dequantized_matrices()
        out = np.concatenate([m @ w for m, w in zip(mats, W)], axis=1)
        return self._finish(out, layout, bias, np.float64)


def _weakrefable(a: Any) -> bool:
    try:
        weakref.ref(a)
        return True
    except TypeError:   # pragma: no cover
        return False


# ------------------------------------------------------------------ cache
_CACHE: dict[int, tuple[Any, dict]] = {}


def clear_cache() -> None:
    """Forget compiled layers (call after modifying a cells array in place)."""
    _CACHE.clear()


def _layer_key(layer: Mapping[str, Any], spec: CrossbarSpec) -> Any:
    def freeze(v: Any) -> Any:
        if isinstance(v, Mapping):
            return tuple(sorted((k, freeze(w)) for k, w in v.items()))
        if isinstance(v, (list, tuple)):
            return tuple(freeze(w) for w in v)
        if isinstance(v, np.ndarray):
            return (v.shape, v.tobytes())
        return v
    return (freeze(layer), spec)


def compile_layer(layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec) -> CompiledLayer:
    """A (cached) :class:`CompiledLayer` for ``layer`` on ``cells``.

    The cache is keyed by the cells object (its identity) and the layer's
    content; cells are treated as immutable -- call :func:`clear_cache` after
    changing them in place.
    """
    key = _layer_key(layer, spec)
    entry = _CACHE.get(id(cells))
    if entry is None or entry[0]() is not cells:
        if _weakrefable(cells):
            ref = weakref.ref(cells, lambda _r, i=id(cells): _CACHE.pop(i, None))
        else:   # pragma: no cover
            ref = lambda c=cells: c
        entry = (ref, {})
        _CACHE[id(cells)] = entry
    comp = entry[1].get(key)
    if comp is None:
        comp = CompiledLayer(layer, cells, spec)
        entry[1][key] = comp
    return comp


def _options(options: SimOptions | Mapping[str, Any] | None) -> SimOptions:
    if options is None:
        return SimOptions()
    if isinstance(options, SimOptions):
        return options
    if isinstance(options, Mapping):
        return SimOptions.from_dict(options)
    raise TypeError(f"simulator options must be SimOptions, a dict or None, got {type(options).__name__}")


def run_layer(x: Any, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec, bias: Any = None,
              options: SimOptions | Mapping[str, Any] | None = None) -> np.ndarray:
    """Simulate one PIM layer on ``x`` reading weights from ``cells`` only (float32 output).

    Dense ``x [..., K] -> [..., N]``; conv2d ``x`` NCHW -> NCHW.  The fast exact
    path is used automatically for strips whose ADC is lossless (and without
    non-idealities), the bit-serial path otherwise or with
    ``options.force_bitserial``.
    """
    return compile_layer(layer, cells, spec).run(x, bias, _options(options))


def golden_layer(x: Any, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec, bias: Any = None,
                 options: SimOptions | Mapping[str, Any] | None = None) -> np.ndarray:
    """Fake-quantised float64 reference of the layer (weights = scale x levels decoded from the cells).

    Same activation quantisation as :func:`run_layer` (``options.act_bits``); no ADC, no device effects.
    """
    return compile_layer(layer, cells, spec).golden(x, bias, _options(options))


def layer_integers(x: Any, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec,
                   options: SimOptions | Mapping[str, Any] | None = None, path: str = "auto") -> list[dict]:
    """Per row strip, the integer results of ``path`` before scaling (``q_x . q_w`` when lossless).

    ``path``: ``"exact"`` (one matmul per strip, always the ideal integers), ``"bitserial"`` (per-cycle
    reads, ADC, shift-and-add, corrections) or ``"auto"`` (what :func:`run_layer` uses).  Each entry has
    ``group``, ``row0``, ``nrows``, ``cols`` (output columns), ``scale`` (per column), ``act_scale`` and
    ``values`` ``[M, len(cols)]``.
    """
    return compile_layer(layer, cells, spec).integers(x, _options(options), path)


def layer_program(result: Any, li: int, cells: np.ndarray | None = None, *, strides: Sequence[int] = (1, 1),
                  padding: Sequence[int] = (0, 0, 0, 0), dilation: Sequence[int] = (1, 1),
                  bias: str | None = None, layer_id: Any = None) -> dict:
    """The manifest-style layer dict of layer ``li`` of a :class:`~psq_tvm.quant.QuantResult`.

    ``cells`` is accepted for symmetry with :func:`run_layer` and not read.
    Conv hyper-parameters are not part of a ``QuantResult`` and are given here.
    """
    del cells
    tiles, pl, spec = result.tiles, result.placement, result.spec
    lay = tiles.layers[li]
    slices = result.slices
    out_tiles = []
    for t in tiles.layer_tiles(li):
        t = int(t)
        out_tiles.append({
            "id": t, "group": int(tiles.group[t]), "row0": int(tiles.row0[t]), "col0": int(tiles.col0[t]),
            "nrows": int(tiles.nrows[t]), "ncols": int(tiles.ncols[t]), "bits": int(result.bits[t]),
            "scale": float(result.scales[t]), "slices": int(slices[t]),
            "crossbars": pl.crossbar_ids(t).tolist(),
            "row_off": int(pl.row_off[t]), "col_off": int(pl.col_off[t]),
        })
    return {
        "id": li if layer_id is None else layer_id, "name": lay.name, "op": lay.kind,
        "weight_shape": [int(v) for v in lay.weight.shape], "matrix_shape": [int(v) for v in lay.matrix_shape],
        "groups": int(lay.groups), "strides": [int(v) for v in strides], "padding": [int(v) for v in padding],
        "dilation": [int(v) for v in dilation], "bias": bias, "tiles": out_tiles,
    }
