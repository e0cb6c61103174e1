"""A layer program bound to its crossbar cells (:class:`CompiledLayer`): validated once, then run on
inputs -- activation quantisation, im2col, each row strip on the exact or the bit-serial array path,
scaling and the float32 sum over row strips, bias.

Both paths scale identically -- ``float32(integer * s)`` per strip with the per-column ``s = s_w s_x``
rounded to float32 (float64 for float64 strips), summed over the row strips in float32, in strip order
-- so their float outputs are bit-identical when their integers are.  :meth:`CompiledLayer.golden`
computes ``(s_x q_x) @ (s_w q_w)`` in float64; ``run`` differs from it only by float32 rounding of the
scaling and of the sum over row strips: at most about ``(n_row_strips + 2) * 2**-24 * sum_strips
|strip term|`` per output.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import numpy as np

from ...core.crossbar import CrossbarSpec
from . import adc as _adc
from .activations import quantize_activations
from .arrays import (_F32_EXACT, bitserial_strip, exact_accumulate, exact_dtype, exact_strip, read_histograms,
                     scale_vector)
from .devices import device_key, perturbed_conductances
from .geometry import Geometry
from .options import SimError, SimOptions
from .strips import Strip, build_strips


def _weakrefable(a: Any) -> bool:
    try:
        weakref.ref(a)
        return True
    except TypeError:   # pragma: no cover
        return False


class CompiledLayer:
    """A layer program bound to its crossbar cells: validated once, levels cached.

    ``geometry`` holds the shapes (and conv hyper-parameters), ``strips`` the row strips of tiles.
    """

    def __init__(self, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec) -> None:
        self.layer = layer
        self.spec = spec
        self.name = f"{layer.get('name', '?')!r} (id {layer.get('id', '?')})"
        name = self.name
        op = layer.get("op")
        if op not in ("dense", "conv2d"):
            raise SimError(f"layer {name}: op must be 'dense' or 'conv2d', got {op!r}")
        try:
            K, N = (int(v) for v in layer["matrix_shape"])
            groups = int(layer.get("groups", 1) or 1)
            weight_shape = tuple(int(v) for v in layer["weight_shape"])
            tiles = list(layer["tiles"])
        except (KeyError, TypeError, ValueError) as e:
            raise SimError(f"layer {name}: malformed layer program ({e!r})") from None
        self.geometry = geom = Geometry(name, op, K, N, groups, weight_shape, layer)
        self.op, self.K, self.N, self.groups, self.weight_shape = op, K, N, groups, weight_shape
        cells = np.asarray(cells)
        if cells.ndim != 3 or cells.shape[1:] != (spec.rows, spec.cols):
            raise SimError(f"layer {name}: cells must be [n_crossbars, {spec.rows}, {spec.cols}], got {cells.shape}")
        self.n_crossbars = cells.shape[0]
        self._cells_ref = weakref.ref(cells) if _weakrefable(cells) else (lambda c=cells: c)
        self._noisy: dict[tuple, list[np.ndarray]] = {}
        self.strips = build_strips(tiles, cells, spec, geom)

    def adc(self, nrows: int, opts: SimOptions) -> tuple[bool, float, int | None]:
        """(identity, delta, top) of the ADC reading a strip of ``nrows`` rows (see :mod:`.adc`)."""
        return _adc.adc(self.spec, nrows, opts)

    def _perturbed(self, opts: SimOptions) -> list[np.ndarray]:
        """Per strip, the conductances with stuck-at faults and variation (cached per option set)."""
        key = device_key(opts)
        if key not in self._noisy:
            cells = self._cells_ref()
            if cells is None:
                raise SimError(f"layer {self.name}: the crossbar cells array was released")
            self._noisy[key] = perturbed_conductances(cells, self.strips, self.spec.cell_bits, opts)
        return self._noisy[key]

    def _bitserial_strip(self, si: int, st: Strip, xs: np.ndarray, o_x: int, a: int,
                         opts: SimOptions) -> np.ndarray:
        """The bit-serial path on strip ``si`` (its perturbed conductances when the options say so)."""
        G = self._perturbed(opts)[si] if opts.cells_perturbed else st.conductance
        return bitserial_strip(st, G, xs, o_x, a, opts, self.spec, self.name)

    def _quantize(self, x: Any, opts: SimOptions):
        """Check and quantise the input: (integer levels q, s_x, o_x, act bits)."""
        x = self.geometry.check_input(x)
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
        mats, layout = self.geometry.matrices(q)
        return mats, layout, s_x, o_x, a

    def _use_exact(self, st: Strip, opts: SimOptions, path: str) -> bool:
        if path == "exact":
            return True
        if path == "bitserial" or opts.force_bitserial or opts.cells_perturbed:
            return False
        return _adc.adc(self.spec, st.nrows, opts, st.full_scale)[0]

    def _strip_units(self, x: Any, opts: SimOptions, path: str):
        """[(strip, integer-unit results [M, n])], layout, s_x, M (unchunked; for verification)."""
        mats, layout, s_x, o_x, a = self._prepare(x, opts)
        signed_max = (1 << a) - 1 if o_x == 0 else (1 << (a - 1)) - 1
        results = []
        for si, st in enumerate(self.strips):
            xs = mats[st.group][:, st.row0:st.row0 + st.nrows]
            if self._use_exact(st, opts, path):
                results.append((st, exact_strip(st, xs, signed_max)))
            else:
                results.append((st, self._bitserial_strip(si, st, xs, o_x, a, opts)))
        return results, layout, s_x, mats[0].shape[0]

    def _run_exact(self, q: np.ndarray, s_x: float, signed_max: int) -> tuple[np.ndarray, tuple]:
        """Every strip on the fast path, chunked (fused im2col for convs): ``[M, N]`` float32 and layout."""
        geom, ntot = self.geometry, self.N * self.groups
        if self.op == "conv2d":
            qp, oh, ow = geom.padded(q)
            B = qp.shape[0]
            layout = ("conv2d", (B, oh, ow))
            out = np.zeros((ntot, B * oh * ow), dtype=np.float32).T    # [N, M] storage (NCHW-like)
            if out.size:
                mc = geom.chunk_columns(max(len(st.cols) for st in self.strips))
                exact_accumulate(out, geom.conv_chunks(qp, oh, ow, mc), self.strips, s_x, signed_max,
                                 transposed=True)
        else:
            mats, layout = geom.matrices(q)
            M = mats[0].shape[0]
            out = np.zeros((M, ntot), dtype=np.float32)
            if M:
                mc = geom.chunk_columns(max(len(st.cols) for st in self.strips))
                exact_accumulate(out, geom.matrix_chunks(mats, M, mc, False), self.strips, s_x, signed_max,
                                 transposed=False)
        return out, layout

    def _run_strips(self, q: np.ndarray, s_x: float, o_x: int, a: int, signed_max: int,
                    opts: SimOptions) -> tuple[np.ndarray, tuple]:
        """Some strips bit-serial: every strip in order, the same scaling and summation order as the fast
        path (float32 accumulation over row strips, the output is float32; see the module docstring)."""
        mats, layout = self.geometry.matrices(q)
        M, ntot = mats[0].shape[0], self.N * self.groups
        if self.op == "conv2d":     # output built as [N, M] (channel-major, like NCHW), used as a [M, N] view
            out = np.zeros((ntot, M), dtype=np.float32).T
        else:
            out = np.zeros((M, ntot), dtype=np.float32)
        for si, st in enumerate(self.strips):
            xs = mats[st.group][:, st.row0:st.row0 + st.nrows]
            dt = exact_dtype(st, signed_max)
            if self._use_exact(st, opts, "auto"):
                units = exact_strip(st, xs, signed_max)
                integral = dt == np.float32
            else:
                units = self._bitserial_strip(si, st, xs, o_x, a, opts)
                # the same rounding as the fast path when the units are its (float32-exact) integers
                integral = (dt == np.float32 and bool(np.all(np.abs(units) < _F32_EXACT))
                            and np.array_equal(units, np.rint(units)))
                if integral:
                    units = units.astype(np.float32)
            scaled = np.multiply(units, scale_vector(st, s_x, np.float32 if integral else np.float64),
                                 out=np.empty(units.shape, np.float32), casting="unsafe")
            if st.col_slice is not None:
                out[:, st.col_slice] += scaled
            else:
                out[:, st.cols] += scaled
        return out, layout

    # ------------------------------------------------------------ public
    def run(self, x: Any, bias: Any = None, options: SimOptions | None = None) -> np.ndarray:
        """Simulate the layer on ``x`` (dense ``[..., K]`` / conv NCHW); float32 output."""
        opts = options or SimOptions()
        self.geometry.check_bias(bias)
        q, s_x, o_x, a = self._quantize(x, opts)
        signed_max = (1 << a) - 1 if o_x == 0 else (1 << (a - 1)) - 1
        if all(self._use_exact(st, opts, "auto") for st in self.strips):
            out, layout = self._run_exact(q, s_x, signed_max)
        else:
            out, layout = self._run_strips(q, s_x, o_x, a, signed_max, opts)
        return self.geometry.finish(out, layout, bias, np.float32)

    def integers(self, x: Any, options: SimOptions | None = None, path: str = "auto") -> list[dict]:
        """Per strip, the integer-unit results before scaling (``path``: auto | exact | bitserial)."""
        if path not in ("auto", "exact", "bitserial"):
            raise ValueError(f"path must be auto, exact or bitserial, got {path!r}")
        opts = options or SimOptions()
        results, _, s_x, _ = self._strip_units(x, opts, path)
        return [{"group": st.group, "row0": st.row0, "nrows": st.nrows, "cols": st.cols,
                 "scale": st.scale, "act_scale": s_x, "values": u} for st, u in results]

    def read_histograms(self, x: Any, options: SimOptions | None = None, max_rows: int | None = None,
                        per_column: bool = False) -> list[tuple[dict, int, int, Any]]:
        """The bitline sums of every crossbar read on input ``x`` (ideal cells), per (tile, slice, polarity)
        as weighted histograms (:func:`.arrays.read_histograms`), for the ADC range calibration.

        ``max_rows``: at most this many im2col rows (input vectors) are read, evenly spaced (deterministic)."""
        opts = options or SimOptions()
        mats, _layout, _s_x, o_x, a = self._prepare(x, opts)
        M = mats[0].shape[0]
        pick = slice(None) if max_rows is None or M <= max_rows else np.linspace(0, M - 1, max_rows).astype(np.int64)
        out = []
        for st in self.strips:
            xs = mats[st.group][pick, st.row0:st.row0 + st.nrows]
            out.extend(read_histograms(st, xs, o_x, a, self.spec, opts.chunk_elements, per_column))
        return out

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
        self.geometry.check_bias(bias)
        x = self.geometry.check_input(x)
        a = int(opts.act_bits or self.spec.act_bits)
        try:
            q, s_x, _ = quantize_activations(x, a)
        except SimError as e:
            raise SimError(f"layer {self.name}: {e}") from None
        mats, layout = self.geometry.matrices(q.astype(np.float64) * s_x)
        W = self.dequantized_matrices()
        out = np.concatenate([m @ w for m, w in zip(mats, W)], axis=1)
        return self.geometry.finish(out, layout, bias, np.float64)

