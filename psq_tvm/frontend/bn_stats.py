"""Data-free input statistics of PIM layers from the model's own BatchNorm parameters (as in DFQ).

An inference BatchNorm ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` was fitted so that, on
the training data, channel ``c`` of ``y`` has mean ``beta_c`` and standard deviation ``|gamma_c|``.
Modelling it as ``N(beta_c, gamma_c^2)`` and propagating that through the ops between the
BatchNorm and the next conv / Gemm gives each layer's per-channel input mean ``E[x]`` and second
moment ``E[x^2]`` without any data (Nagel et al., "Data-Free Quantization", ICCV 2019):

* ``Relu`` and ``Clip(lo, hi)`` (ReLU6): moments of the clipped Gaussian, in closed form;
* ``Add`` of two known branches: means add, variances add (branches taken independent);
* ``Identity``, ``Dropout``, ``Pad``, ``AveragePool``, ``GlobalAveragePool``, and ``Flatten`` /
  ``Reshape`` that keep the channel count: the mean passes through (``Pad``'s zeros at the border
  and the variance reduction of pooling are ignored);
* anything else (the model input, ``MaxPool``, another conv, ...): unknown, and the layer gets
  no statistics.

Must run on the ONNX model *before* BatchNorm is folded into the convs
(:func:`batchnorm_input_stats` is called by the importer for that reason).
"""

from __future__ import annotations

import math

import numpy as np

#: ops a channel mean passes through unchanged
_PASS = {"Identity", "Dropout", "Pad", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape"}


def _phi(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(z / math.sqrt(2)))


def clipped_gaussian_moments(mu: np.ndarray, var: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """``(E[y], Var[y])`` of ``y = clip(x, lo, hi)``, ``x ~ N(mu, var)`` (``lo``/``hi`` may be +-inf)."""
    mu = np.asarray(mu, np.float64)
    sd = np.sqrt(np.maximum(np.asarray(var, np.float64), 1e-30))
    a = (lo - mu) / sd
    b = (hi - mu) / sd
    Pa, Pb = _Phi(a), _Phi(b)
    pa, pb = _phi(a), _phi(b)
    lo_t = np.where(np.isfinite(lo), lo, 0.0)
    hi_t = np.where(np.isfinite(hi), hi, 0.0)
    inside = Pb - Pa
    m1 = lo_t * Pa + hi_t * (1 - Pb) + mu * inside + sd * (pa - pb)
    # E[x^2 1{lo<x<hi}] = (mu^2 + sd^2) P + sd (mu + lo) phi(a) - sd (mu + hi) phi(b); phi(+-inf) = 0
    m2 = (lo_t ** 2 * Pa + hi_t ** 2 * (1 - Pb) + (mu ** 2 + sd ** 2) * inside
          + sd * (mu + lo_t) * pa - sd * (mu + hi_t) * pb)
    return m1, np.maximum(m2 - m1 ** 2, 0.0)


def batchnorm_input_stats(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{node name: (E[x], E[x^2])}`` per input channel for every Conv / Gemm / MatMul whose data input
    can be traced back to BatchNorms (see the module docstring); other layers are absent."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts: dict[str, np.ndarray] = {}

    def const(name: str) -> np.ndarray | None:
        if name in consts:
            return consts[name]
        if name in inits:
            consts[name] = numpy_helper.to_array(inits[name])
            return consts[name]
        return None

    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    producer = {o: n for n in g.node for o in n.output}
    memo: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}

    def gauss(t: str, depth: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, variance) per channel of tensor ``t``, or None."""
        if t in memo:
            return memo[t]
        memo[t] = None                     # cycles / deep recursion guard
        n = producer.get(t)
        out = None
        if n is None or depth > 200:
            pass
        elif n.op_type == "BatchNormalization" and len(n.input) >= 3:
            gamma, beta = const(n.input[1]), const(n.input[2])
            if gamma is not None and beta is not None:
                out = (beta.astype(np.float64).ravel(), (gamma.astype(np.float64).ravel()) ** 2)
        elif n.op_type in ("Relu", "Clip"):
            src = gauss(n.input[0], depth + 1)
            lo, hi = (0.0, math.inf) if n.op_type == "Relu" else (-math.inf, math.inf)
            if n.op_type == "Clip":
                attrs = {a.name: a for a in n.attribute}
                if "min" in attrs:
                    lo = attrs["min"].f
                if "max" in attrs:
                    hi = attrs["max"].f
                for k, bound in ((1, "lo"), (2, "hi")):
                    if len(n.input) > k and n.input[k]:
                        v = const(n.input[k])
                        if v is None:
                            src = None
                        elif bound == "lo":
                            lo = float(v)
                        else:
                            hi = float(v)
            if src is not None:
                out = clipped_gaussian_moments(src[0], src[1], lo, hi)
        elif n.op_type == "Add" and len(n.input) == 2:
            a, b = gauss(n.input[0], depth + 1), gauss(n.input[1], depth + 1)
            if a is not None and b is not None and a[0].shape == b[0].shape:
                out = (a[0] + b[0], a[1] + b[1])
        elif n.op_type in _PASS:
            out = gauss(n.input[0], depth + 1)
        memo[t] = out
        return out

    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, n in enumerate(g.node):
        if n.op_type not in ("Conv", "Gemm", "MatMul") or not n.input:
            continue
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Gemm" and "transA" in attrs and attrs["transA"].i:
            continue
        data = n.input[0]
        if n.op_type == "MatMul" and data in inits:
            continue                        # constant-left MatMul: the data is the right operand
        st = gauss(data)
        if st is None:
            continue
        mean, var = st
        stats[n.name or f"{n.op_type.lower()}_{k}"] = (mean, var + mean ** 2)
    return stats
