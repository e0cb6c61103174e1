"""Layer geometry: input and bias checks, conv padding, im2col windows, the output layout, and the
chunking of the fast path's input rows into cache-sized blocks.

Unrolled-matrix convention (``psq_tvm.core.tiling``): dense ``x [..., K] @ W [K, N]``; a conv with
``W [Cout, Cin/g, kh, kw]`` is, per group, ``X [M, K] @ W_g [K, N]`` with im2col rows in ``(ci, i, j)``
order (``ci`` slowest) and ``M = B * oh * ow`` output pixels.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .options import SimError

_EXACT_CHUNK_BYTES = 1 << 21   # working set of one fast-path chunk (a share of L2/L3; tuned by bench_sim)
_EXACT_CHUNK_MIN = 128         # fewest input rows (pixels / tokens) per fast-path chunk


def _as_pair(v: Any, n: int, what: str, name: str) -> tuple[int, ...]:
    try:
        t = tuple(int(a) for a in v)
    except TypeError:
        t = (int(v),) * n
    if len(t) != n:
        raise SimError(f"layer {name}: {what} must have {n} values, got {v!r}")
    return t


class Geometry:
    """Shapes of one layer (``op``, per-group matrix ``[K, N]``, ``groups``; for conv2d also ``kernel``,
    ``strides``, ``dilation``, ``padding``), checked against each other; ``name`` goes into errors."""

    def __init__(self, name: str, op: str, K: int, N: int, groups: int, weight_shape: tuple,
                 layer: Mapping[str, Any]) -> None:
        self.name, self.op, self.K, self.N, self.groups, self.weight_shape = name, op, K, N, groups, weight_shape
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

    # ------------------------------------------------------------ checks
    def check_input(self, x: Any) -> np.ndarray:
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

    def check_bias(self, bias: Any) -> None:
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

    # ------------------------------------------------------------ im2col
    def padded(self, q: np.ndarray) -> tuple[np.ndarray, int, int]:
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

    def window(self, qp: np.ndarray, g: int, b: slice | int, r0: int, rows: int, ow: int) -> np.ndarray:
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

    def matrices(self, q: np.ndarray) -> tuple[list[np.ndarray], tuple]:
        """im2col of the integer input: one [M, K] float32 matrix per group, and the output layout."""
        if self.op == "dense":
            return [q.reshape(-1, self.K)], ("dense", q.shape[:-1])
        qp, oh, ow = self.padded(q)
        B = qp.shape[0]
        # built as X^T [K, M] (inner copy loop runs along the output width, fast), used as the view X = X^T.T
        mats = [self.window(qp, g, slice(None), 0, oh, ow).reshape(self.K, B * oh * ow).T
                for g in range(self.groups)]
        return mats, ("conv2d", (B, oh, ow))

    def finish(self, out: np.ndarray, layout: tuple, bias: Any, dtype) -> np.ndarray:
        """``[M, N]`` result plus bias, reshaped to the output layout (dense ``[..., N]``, conv NCHW)."""
        ntot = self.N * self.groups
        if bias is not None:
            out += np.asarray(bias, dtype=out.dtype).reshape(ntot)
        if layout[0] == "dense":
            return out.reshape(tuple(layout[1]) + (ntot,)).astype(dtype)
        B, oh, ow = layout[1]
        return np.ascontiguousarray(out.T.reshape(ntot, B, oh, ow).transpose(1, 0, 2, 3), dtype=dtype)

    # ------------------------------------------------------------ chunks
    def chunk_columns(self, nmax: int) -> int:
        """Rows of ``X`` (columns of ``X^T``) per fast-path chunk, so that a chunk's working set stays in
        cache (``nmax``: the most output columns of a strip)."""
        return int(max(_EXACT_CHUNK_MIN, min(2048, _EXACT_CHUNK_BYTES // (12 * nmax + 4 * self.K))))

    @staticmethod
    def matrix_chunks(mats: list[np.ndarray], M: int, mc: int, transposed: bool):
        """(m0, k, get) per block of ``mc`` rows of the per-group matrices ``mats``."""
        for m0 in range(0, M, mc):
            k = min(mc, M - m0)
            if transposed:
                yield m0, k, (lambda g, m0=m0, k=k: mats[g].T[:, m0:m0 + k])
            else:
                yield m0, k, (lambda g, m0=m0, k=k: mats[g][m0:m0 + k])

    def conv_chunks(self, qp: np.ndarray, oh: int, ow: int, budget: int):
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
                              self.window(qp, g, b, r0, r, ow))
                    return dst
                yield m0, k, get
