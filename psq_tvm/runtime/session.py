"""The PIM runtime the lowered host module calls: ``pim_psq.layer(x, layer_id, out)``.

Importing this module registers the packed function with TVM.  A package's host
library calls it once per PIM layer; it runs the layer from the *active*
:class:`Session` (set with ``with Session(package, mode):``) in one of three modes:

* ``float``      -- the original float weights (blob ``weight_<id>``) and float activations:
  the float model, exactly as before partitioning (up to summation order);
* ``fake-quant`` -- weights decoded from the stored crossbar cells (levels x tile scale),
  float activations;
(``float`` and ``fake-quant`` accumulate in float64 and round the layer output to float32, so
results do not depend on BLAS summation order.)

* ``sim``        -- :func:`psq_tvm.simulator.run_layer`, the functional crossbar simulator
  (bit-serial inputs, ADC, shift-and-add).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..core.crossbar import CrossbarSpec
from ..core.tables import decode_tile
from ..core.tiling import roll

MODES = ("sim", "golden", "fake-quant", "float")
"""sim: the crossbar simulator; golden: fake-quantised weights and activations in float64 (the
simulator's reference); fake-quant: weights decoded from the cells, float activations; float: original weights."""
_ACTIVE = threading.local()


class PIMRuntimeError(RuntimeError):
    pass




def im2col(x: np.ndarray, kh: int, kw: int, strides, padding, dilation) -> np.ndarray:
    """``x`` NCHW -> ``[N, Ho, Wo, C, kh, kw]`` patches (rows in the (ci, i, j) order of the tables)."""
    pt, pl, pb, pr = padding
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    dh, dw = dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))  # [N, C, H', W', eh, ew]
    win = win[:, :, ::strides[0], ::strides[1], ::dh, ::dw]
    return win.transpose(0, 2, 3, 1, 4, 5)


def conv2d_matrices(x: np.ndarray, layer: dict, matrices: list[np.ndarray], bias: np.ndarray | None) -> np.ndarray:
    """conv2d of NCHW ``x`` with per-group unrolled matrices ``[Cin/g*kh*kw, Cout/g]``, accumulated in the
    matrices' precision (float64 for the package's modes; float32 matrices give the compile's faster probes)."""
    cout, cin_g, kh, kw = layer["weight_shape"]
    g = int(layer["groups"])
    cols = im2col(x, kh, kw, layer["strides"], layer["padding"], layer["dilation"])
    n, ho, wo = cols.shape[:3]
    outs = []
    for gi in range(g):
        a = cols[:, :, :, gi * cin_g:(gi + 1) * cin_g].reshape(n * ho * wo, cin_g * kh * kw)
        with np.errstate(over="ignore", invalid="ignore"):    # beyond float range: inf, reported by the caller
            outs.append(a.astype(matrices[gi].dtype, copy=False) @ matrices[gi])
    y = np.concatenate(outs, axis=1).reshape(n, ho, wo, cout).transpose(0, 3, 1, 2)
    if bias is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            y = y + bias.reshape(1, -1, 1, 1)
    return y


def dense_matrix(x: np.ndarray, layer: dict, matrix: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``x @ W (+ b)``; for a constant-left matmul (``operand == "left"``) ``(x^T @ W)^T``."""
    left = layer.get("operand") == "left"
    if left and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    with np.errstate(over="ignore", invalid="ignore"):        # beyond float range: inf, reported by the caller
        y = x.astype(matrix.dtype, copy=False) @ matrix
        if bias is not None:
            y = y + bias
    if left and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return y


def layer_matrices_from_cells(layer: dict, cells: np.ndarray, spec: CrossbarSpec) -> list[np.ndarray]:
    """Fake-quantised unrolled matrices (float32, one per group) decoded from the crossbar cells."""
    K, N = layer["matrix_shape"]
    mats = [np.zeros((K, N), dtype=np.float32) for _ in range(int(layer["groups"]))]
    for t in layer["tiles"]:
        ids = np.asarray(t["crossbars"], dtype=np.int64)           # [slices, polarities]
        r, c, nr, nc = t["row_off"], t["col_off"], t["nrows"], t["ncols"]
        tc = cells[ids.ravel(), r:r + nr, c:c + nc].reshape(ids.shape + (nr, nc))
        q = decode_tile(tc, int(t["bits"]), spec.encoding, spec.cell_bits)
        mats[t["group"]][t["row0"]:t["row0"] + nr, t["col0"]:t["col0"] + nc] = q * np.asarray(t["scale"], dtype=np.float32)
    return mats


def dequantized_weight(layer: dict, cells: np.ndarray, spec: CrossbarSpec) -> np.ndarray:
    """The fake-quantised weight of a manifest layer in its stored shape, from the cells."""
    mats = layer_matrices_from_cells(layer, cells, spec)
    kind = "conv2d" if layer["op"] == "conv2d" else "dense"
    return roll(mats, kind, layer["weight_shape"], int(layer["groups"]))


def layer_bias(package: Any, layer: Mapping[str, Any], quantised: bool) -> np.ndarray | None:
    """A layer's bias as the package runs it: the stored bias, plus (``quantised``: the sim, golden and
    fake-quant modes) its ``bias_correction`` blob, in float32 -- what a driver programs."""
    b = None if layer.get("bias") is None else package.blob(layer["bias"])
    if not quantised or layer.get("bias_correction") is None:
        return b
    c = package.blob(layer["bias_correction"])
    return c.copy() if b is None else (b + c).astype(np.float32)


class Session:
    """A loaded package made active for the host library's ``pim_psq.layer`` calls."""

    def __init__(self, package: Any, mode: str = "fake-quant", sim_options: Any = None,
                 weights: Mapping[str, Sequence[np.ndarray]] | None = None,
                 biases: Mapping[str, np.ndarray | None] | None = None):
        """``weights`` / ``biases`` (mode ``float`` only): per layer id, unrolled matrices and a bias that
        replace the stored ones for this session -- a what-if run of other quantised weights without
        building a package (the compile's fidelity measure and sensitivity use it)."""
        if mode not in MODES:
            raise ValueError(f"unknown run mode {mode!r}; choose one of {MODES}")
        self.package = package
        self.mode = mode
        self.sim_options = sim_options
        self.manifest = package.manifest
        self.spec = CrossbarSpec.from_dict(self.manifest["spec"])
        self.layers = {str(l["id"]): l for l in self.manifest["layers"]}
        # decoded matrices are cached on the package, so repeated runs do not decode again
        if not hasattr(package, "_runtime_cache"):
            package._runtime_cache = {}
        self._mats: dict = package._runtime_cache
        if (weights or biases) and mode != "float":
            raise ValueError("weight/bias overrides apply to mode 'float' only")
        self.weights = {str(k): list(v) for k, v in (weights or {}).items()}
        self.biases = {str(k): v for k, v in (biases or {}).items()}
        self.trace: list[tuple[str, np.ndarray, np.ndarray]] | None = None
        self._prev = None
        self._sim: Callable | None = None
        if mode == "sim":
            try:
                from . import simulator  # noqa: F401
            except ImportError:
                raise NotImplementedError(
                    "run mode 'sim' needs psq_tvm.simulator (the crossbar simulator), which is not installed "
                    "in this build; use --mode fake-quant or --mode float") from None
            self._sim = simulator.run_layer
        elif mode == "golden":
            from . import simulator
            self._sim = simulator.golden_layer

    def bias(self, layer: dict) -> np.ndarray | None:
        """The layer's bias; in the quantised modes plus its bias correction (if the package has one)."""
        if str(layer["id"]) in self.biases:
            return self.biases[str(layer["id"])]
        if self.mode == "float":
            return layer_bias(self.package, layer, quantised=False)
        key = ("bias", str(layer["id"]))
        if key not in self._mats:
            self._mats[key] = layer_bias(self.package, layer, quantised=True)
        return self._mats[key]

    def matrices(self, layer: dict) -> list[np.ndarray]:
        if str(layer["id"]) in self.weights:
            return self.weights[str(layer["id"])]
        key = (self.mode, str(layer["id"]))
        if key not in self._mats:
            if self.mode == "float":
                name = layer.get("float_weight")
                if name is None:
                    raise PIMRuntimeError(f"layer {layer['name']!r}: package stores no float weights (compiled with "
                                        "float weights off); use --mode fake-quant")
                w = self.package.blob(name)
                from ..core.tiling import unroll
                self._mats[key] = [np.ascontiguousarray(m, dtype=np.float64) for m in
                                   unroll(w, "conv2d" if layer["op"] == "conv2d" else "dense", int(layer["groups"]))]
            else:
                self._mats[key] = [m.astype(np.float64) for m in
                                   layer_matrices_from_cells(layer, self.package.blob("crossbars"), self.spec)]
        return self._mats[key]

    def run_layer(self, layer_id: str, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):      # values beyond float32: inf/NaN in the output
            return self._run_layer(layer_id, x)

    def _run_layer(self, layer_id: str, x: np.ndarray) -> np.ndarray:
        layer = self.layers[str(layer_id)]
        bias = self.bias(layer)
        if self.mode in ("sim", "golden"):
            if layer.get("operand") == "left" and x.ndim >= 2:
                y = self._sim(np.swapaxes(x, -1, -2), layer, self.package.blob("crossbars"), self.spec, bias,
                              self.sim_options)
                y = np.swapaxes(y, -1, -2)
            else:
                y = self._sim(x, layer, self.package.blob("crossbars"), self.spec, bias, self.sim_options)
        elif layer["op"] == "conv2d":
            y = conv2d_matrices(x, layer, self.matrices(layer), bias)
        else:
            y = dense_matrix(x, layer, self.matrices(layer)[0], bias)
        y = np.ascontiguousarray(y, dtype=np.float32)
        if self.trace is not None:
            self.trace.append((str(layer_id), x, y))
        return y

    def __enter__(self) -> "Session":
        self._prev = getattr(_ACTIVE, "session", None)
        _ACTIVE.session = self
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.session = self._prev


def active() -> Session:
    s = getattr(_ACTIVE, "session", None)
    if s is None:
        raise PIMRuntimeError("pim_psq.layer called with no active package session; run the package through "
                            "psq_tvm.load(path).run(...) or `with psq_tvm.runtime.Session(pkg, mode):`")
    return s


def _layer(x, layer_id, out) -> None:
    y = active().run_layer(str(layer_id), x.numpy())
    if tuple(y.shape) != tuple(out.shape):
        raise PIMRuntimeError(f"PIM layer {layer_id}: runtime produced shape {y.shape}, host expects {tuple(out.shape)}")
    out.copyfrom(y)


def register() -> None:
    """Register ``pim_psq.layer`` with TVM (idempotent)."""
    import tvm

    tvm.register_global_func("pim_psq.layer", _layer, override=True)


register()
