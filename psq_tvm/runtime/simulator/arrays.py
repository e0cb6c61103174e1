"""The two array paths that compute a row strip's integer results ``q_x . q_w`` (before scaling).

* **Exact fast path** (lossless ADC, ideal devices): one matmul per row strip, in float32 BLAS when
  ``nrows * max|q_x| * max|q_w| < 2**24`` (else float64, ``< 2**53``): every partial sum is then an
  exactly representable integer, so the result does not depend on summation order or FMA use.
  :func:`exact_accumulate` runs it chunk by chunk (cache-sized) and scales into the output.
* **Bit-serial path**: ``J = ceil(a/d)`` input cycles of ``d = dac_bits`` bits, least significant
  first (``u_x = sum_j 2**(j d) x_j``); per cycle, slice and polarity the crossbar read
  ``v = x_j . g`` over the strip's rows goes through the ADC (:mod:`.adc`); the digital side
  shift-and-adds the codes over cycles (``2**(j d)``) and slices (``2**(k c)``), subtracts the ``-``
  polarity, for the offset encoding ``2**(b-1) * sum_rows(u_x)`` (the reference column) and the
  signed-input offset ``o_x * colsum(q_w)``.

**Exactness.**  With a lossless ADC and no non-idealities the bit-serial path gives, per tile and
output column, the integer ``sum_r q_x[r] q_w[r, col]`` exactly: the shift-and-add reassembles ``u_x``
and the stored weight values (all partial sums are integers far below 2**53, held in float64), and
the offset corrections are exact integer identities -- the same integers as the fast path.  Both
paths then scale identically, ``float32(integer * s)`` per strip with the per-column ``s = s_w s_x``
rounded to float32 (float64 for float64 strips) (:func:`scale_vector`).
"""

from __future__ import annotations

import numpy as np

from ...core.crossbar import CrossbarSpec
from .adc import adc, adc_codes
from .options import SimError, SimOptions
from .strips import Strip

_F32_EXACT = 2 ** 24
_F64_EXACT = 2 ** 53
_LUT_MAX = 1 << 21


def exact_dtype(st: Strip, signed_max: int):
    """float32 when every partial sum of the strip's dot products is an integer below 2**24."""
    return np.float32 if st.nrows * signed_max * st.lmax < _F32_EXACT else np.float64


def scale_vector(st: Strip, s_x: float, dt) -> np.ndarray:
    """Per-column ``s_w * s_x``; float32 when the integers are float32 (one float32 rounding each)."""
    return (st.scale * s_x).astype(dt)


def exact_strip(st: Strip, xs: np.ndarray, signed_max: int) -> np.ndarray:
    """``q_x . q_w`` over the strip's rows: [M, n] integers (float array, exact).

    float32 BLAS when every partial sum is an integer below 2**24 in magnitude, else float64.
    """
    bound = st.nrows * signed_max * st.lmax
    dt = np.float32 if bound < _F32_EXACT else np.float64
    w = st.levels if dt == np.float32 else st.levels.astype(np.float64)
    return xs.astype(dt, copy=False) @ w


def exact_plan(strips: list[Strip], s_x: float, signed_max: int, transposed: bool) -> list[tuple]:
    """Per strip ``(strip, weights, dtype, scales)`` for :func:`exact_accumulate` (transposed for convs)."""
    plan = []
    for st in strips:
        dt = exact_dtype(st, signed_max)
        w = st.levels if dt == np.float32 else st.levels.astype(np.float64)
        sc = scale_vector(st, s_x, dt)
        if transposed:
            w, sc = np.ascontiguousarray(w.T), sc[:, None]
        plan.append((st, w, dt, sc))
    return plan


def exact_accumulate(out: np.ndarray, chunks, strips: list[Strip], s_x: float, signed_max: int,
                     transposed: bool) -> None:
    """Fast path: ``out += (s_w s_x) * (q_x . q_w)`` strip by strip, chunk by chunk (cache-sized).

    ``out`` is ``[M, N]``; when it is the transpose of a C-contiguous ``[N, M]`` array (convs), the
    products are formed transposed, ``q_w^T . X^T``, and ``chunks`` yields ``X^T`` column blocks.
    ``chunks`` yields ``(m0, k, get)`` with ``get(g)`` the group's input block (``[K, k]`` transposed,
    else ``[k, K]``).
    """
    if transposed:                                   # (a 1-row output is both C- and F-contiguous,
        out = out.T                                  # so the caller says which layout it passes) [N, M]
    nmax = max(len(st.cols) for st in strips)
    plan = exact_plan(strips, s_x, signed_max, transposed)
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


def bitserial_strip(st: Strip, G: np.ndarray, xs: np.ndarray, o_x: int, a: int, opts: SimOptions,
                    spec: CrossbarSpec, name: str) -> np.ndarray:
    """Per-cycle crossbar reads of one strip, ADC, shift-and-add, corrections: [M, n] float64 units."""
    d, c, P = spec.dac_bits, spec.cell_bits, spec.polarities
    J = -(-a // d)
    dmax = (1 << d) - 1
    identity, delta, top = adc(spec, st.nrows, opts, st.full_scale)
    per_column = np.ndim(delta) > 0             # calibrated full scales: one step per bit-serial column
    integer_reads = not (opts.conductance_sigma > 0)
    identity = identity and integer_reads       # analog sums with variation are still rounded by the ADC
    peak = st.nrows * dmax * ((1 << c) - 1)
    rdt = np.float32 if (integer_reads and peak < _F32_EXACT) else np.float64
    G = G.astype(rdt, copy=False)
    lut = None
    if integer_reads and not identity and not per_column and peak < _LUT_MAX:
        lut = adc_codes(np.arange(peak + 1), delta, top, opts.adc_offset).astype(rdt)
    code_max = peak if identity else (top if top is not None else peak * 2 + abs(opts.adc_offset) + 1)
    jsum = float((2.0 ** (d * np.arange(J))).sum())
    ksum = float((2.0 ** (c * np.arange(len(st.prefix)))).sum())
    if code_max * jsum * ksum * P >= _F64_EXACT:
        raise SimError(f"layer {name}: bit-serial accumulation would exceed 2**53 (exactness lost)")
    # the J-cycle weighted sum of codes stays exact in float32 when below 2**24
    cdt = np.float32 if (rdt == np.float32 and code_max * jsum < _F32_EXACT) else np.float64
    jw = (2.0 ** (d * np.arange(J))).astype(cdt)
    M, n = xs.shape[0], len(st.cols)
    u = np.empty((M, st.nrows), dtype=rdt)      # unsigned a-bit wordline values, exact in float
    np.add(xs, o_x, out=u, casting="unsafe")
    ncat = G.shape[1]
    out = np.empty((M, n), dtype=np.float64)
    step = max(1, int(opts.chunk_elements // max(1, J * max(ncat, st.nrows))))
    for m0 in range(0, M, step):
        uc = u[m0:m0 + step]
        mc = uc.shape[0]
        v = bit_planes(uc, J, d, rdt).reshape(J * mc, st.nrows) @ G    # bitline sums of every cycle and crossbar
        if identity:
            codes = v
        elif lut is not None:
            codes = np.take(lut, v.astype(np.intp))
        else:
            codes = adc_codes(v, delta, top, opts.adc_offset)
        codes = codes.reshape(J, mc, ncat)
        if codes.dtype != cdt:
            codes = codes.astype(cdt)
        cyc = np.tensordot(jw, codes, axes=(0, 0))       # shift-and-add over input cycles
        if per_column:
            cyc = cyc.astype(np.float64) * delta          # each crossbar's own step
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
        if not per_column and delta != 1.0:
            acc *= delta
        if spec.encoding == "offset":                      # reference column: 2**(b-1) * sum(u_x)
            acc -= np.outer(uc.sum(axis=1, dtype=np.float64), st.w_offset)
        if o_x:                                            # signed-input offset: o_x * sum_r q_w
            acc -= o_x * st.colsum
        out[m0:m0 + mc] = acc
    return out if st.to_natural is None else out[:, st.to_natural]


def bit_planes(u: np.ndarray, J: int, d: int, dt) -> np.ndarray:
    """``[J, *u.shape]`` input bit planes ``x_j = floor(u / 2**(j d)) - 2**d floor(u / 2**((j+1) d))`` of the
    unsigned wordline values ``u`` (exact float floor arithmetic, least significant plane first)."""
    planes = np.empty((J,) + u.shape, dtype=dt)
    inv = [dt(2.0 ** -(d * j)) for j in range(J + 1)]
    hi = u
    for j in range(J):
        if j + 1 == J:
            planes[j] = hi
        else:
            nxt = np.floor(u * inv[j + 1])
            np.multiply(nxt, -(1 << d), out=planes[j])
            planes[j] += hi
            hi = nxt
    return planes


def read_histograms(st: Strip, xs: np.ndarray, o_x: int, a: int, spec: CrossbarSpec, chunk_elements: int,
                    per_column: bool = False) -> list[tuple[dict, int, int, np.ndarray | list[np.ndarray]]]:
    """The bitline sums every crossbar read of the strip produces on ``xs`` (ideal cells), as weighted
    histograms: per (tile, slice ``k``, polarity ``p``), ``hist[v]`` = sum over reads of value ``v`` of
    ``4**(j d)`` (``j``: the input cycle; a read's error reaches the output times ``2**(j d)``).

    Returns ``[(tile, k, p, hist)]`` in the strip's bit-serial column order (``per_column``: ``hist`` is a
    list of one histogram per tile column)."""
    d = spec.dac_bits
    J = -(-a // d)
    G = st.conductance.astype(np.float64)
    u = xs.astype(np.float64) + o_x
    jw = 4.0 ** (d * np.arange(J))
    blocks = []
    for k, per_k in enumerate(st.xbar_blocks):
        members = [t for t in st.tiles if t["slices"] > k]
        for p in range(len(per_k)):
            blocks.extend((t, k, p) for t in members)
    ncat = G.shape[1]
    hists: list[np.ndarray] = [np.zeros(1) for _ in range(ncat if per_column else len(blocks))]
    step = max(1, int(chunk_elements // max(1, J * max(ncat, st.nrows))))
    for m0 in range(0, u.shape[0], step):
        v = np.rint(bit_planes(u[m0:m0 + step], J, d, np.float64) @ G).astype(np.int64)   # [J, mc, ncat]
        off = 0
        for bi, (t, _k, _p) in enumerate(blocks):
            nc = t["ncols"]
            for hi, sel in ([(off + c, slice(off + c, off + c + 1)) for c in range(nc)] if per_column
                            else [(bi, slice(off, off + nc))]):
                for j in range(J):
                    h = np.bincount(v[j, :, sel].ravel()) * jw[j]
                    if h.size > hists[hi].size:
                        h[:hists[hi].size] += hists[hi]
                        hists[hi] = h
                    else:
                        hists[hi][:h.size] += h
            off += nc
    if per_column:
        out, off = [], 0
        for t, k, p in blocks:
            out.append((t, k, p, hists[off:off + t["ncols"]]))
            off += t["ncols"]
        return out
    return [(t, k, p, h) for (t, k, p), h in zip(blocks, hists)]
