"""Data-free input statistics of PIM layers from the model's own BatchNorm parameters (as in DFQ).

An inference BatchNorm ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` was fitted so that, on
the training data, channel ``c`` of ``y`` has mean ``beta_c`` and standard deviation ``|gamma_c|``.
Modelling it as ``N(beta_c, gamma_c^2)`` and propagating that through the ops between the
BatchNorm and the next conv / Gemm gives each layer's per-channel input mean ``E[x]`` and second
moment ``E[x^2]`` without any data (Nagel et al., "Data-Free Quantization", ICCV 2019):

* ``Relu`` and ``Clip(lo, hi)`` (ReLU6): moments of the clipped Gaussian, in closed form;
* elementwise activations ``HardSwish``, ``HardSigmoid``, ``Sigmoid``, ``Tanh``, ``LeakyRelu``, ``Elu``,
  ``Softplus``, and swish written as ``Mul(x, Sigmoid(x))`` / ``Mul(x, HardSigmoid(x))``: moments of
  ``f(x)``, ``x ~ N(mean, var)``, by Gauss-Hermite quadrature (:func:`elementwise_moments`; moment
  matching: the result is treated as Gaussian again downstream);
* ``Add`` of two known branches: means add, variances add (branches taken independent), unless both
  are elementwise functions of the same BatchNorm output (``x + Relu(x)``, a residual around an
  activation): then the moments of their sum, by quadrature;
  ``Add``/``Sub``/``Mul``/``Div`` by a constant (scalar or per channel): the affine map;
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


_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite.hermgauss(64)


def elementwise_moments(f, mu: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(E[f(x)], Var[f(x)])`` per channel for ``x ~ N(mu, var)``, by 64-point Gauss-Hermite quadrature."""
    mu = np.asarray(mu, np.float64)[..., None]
    sd = np.sqrt(np.maximum(np.asarray(var, np.float64), 0.0))[..., None]
    y = f(mu + np.sqrt(2.0) * sd * _GH_NODES)
    w = _GH_WEIGHTS / np.sqrt(np.pi)
    m1 = y @ w
    return m1, np.maximum((y * y) @ w - m1 ** 2, 0.0)


def _attr(node, name: str, default: float) -> float:
    return next((a.f for a in node.attribute if a.name == name), default)


def _activation(node):
    """The elementwise function of an activation node, or None."""
    op = node.op_type
    if op == "HardSigmoid":
        a, b = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
        return lambda x: np.clip(a * x + b, 0.0, 1.0)
    if op == "HardSwish":
        return lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if op == "Sigmoid":
        return lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))
    if op == "Tanh":
        return np.tanh
    if op == "LeakyRelu":
        a = _attr(node, "alpha", 0.01)
        return lambda x: np.where(x >= 0, x, a * x)
    if op == "Elu":
        a = _attr(node, "alpha", 1.0)
        return lambda x: np.where(x >= 0, x, a * np.expm1(np.minimum(x, 0.0)))
    if op == "Softplus":
        return lambda x: np.logaddexp(0.0, x)
    return None


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

    def _gate_of(n):
        """(x, gate node) when Mul node ``n`` is x * Sigmoid(x) or x * HardSigmoid(x)."""
        for k in (0, 1):
            gate = producer.get(n.input[k])
            if gate is not None and gate.op_type in ("Sigmoid", "HardSigmoid") and gate.input[0] == n.input[1 - k]:
                return n.input[1 - k], gate
        return None
    def clip_bounds(n) -> tuple[float, float] | None:
        """(lo, hi) of a Relu or Clip node; None when a bound is not a constant."""
        if n.op_type == "Relu":
            return 0.0, math.inf
        lo, hi = -math.inf, math.inf
        attrs = {a.name: a for a in n.attribute}
        if "min" in attrs:
            lo = attrs["min"].f
        if "max" in attrs:
            hi = attrs["max"].f
        for k in (1, 2):
            if len(n.input) > k and n.input[k]:
                v = const(n.input[k])
                if v is None:
                    return None
                lo, hi = (float(v), hi) if k == 1 else (lo, float(v))
        return lo, hi

    def elementwise_of(t: str, depth: int = 0):
        """``(BatchNorm output, f)`` when tensor ``t`` is ``f`` of that output applied elementwise (per channel),
        through Relu/Clip, the activations above, swish and constant Add/Sub/Mul/Div; else None."""
        n = producer.get(t)
        if n is None or depth > 200:
            return None
        if n.op_type == "BatchNormalization":
            return t, (lambda v: v)
        if n.op_type in ("Identity", "Dropout"):
            return elementwise_of(n.input[0], depth + 1)
        if n.op_type in ("Relu", "Clip"):
            src, bounds = elementwise_of(n.input[0], depth + 1), clip_bounds(n)
            if src is None or bounds is None:
                return None
            return src[0], (lambda v, f=src[1], b=bounds: np.clip(f(v), *b))
        act = _activation(n)
        if act is not None:
            src = elementwise_of(n.input[0], depth + 1)
            return None if src is None else (src[0], lambda v, f=src[1], g=act: g(f(v)))
        if n.op_type == "Mul" and len(n.input) == 2 and _gate_of(n) is not None:
            x, gate = _gate_of(n)
            src, act = elementwise_of(x, depth + 1), _activation(gate)
            return None if src is None else (src[0], lambda v, f=src[1], g=act: f(v) * g(f(v)))
        if n.op_type in ("Add", "Sub", "Mul", "Div") and len(n.input) == 2:
            consts_in = [const(i) is not None for i in n.input]
            if sum(consts_in) == 1:
                k = consts_in.index(True)
                src = elementwise_of(n.input[1 - k], depth + 1)
                c = np.asarray(const(n.input[k]), np.float64)
                c = c.reshape(-1, 1) if c.size > 1 else c.reshape(())      # per channel, against [C, nodes]
                ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
                op = ops[n.op_type]
                if src is None:
                    return None
                return src[0], ((lambda v, f=src[1]: op(c, f(v))) if k == 0 else (lambda v, f=src[1]: op(f(v), c)))
            if n.op_type == "Add" and not any(consts_in):
                a, b = elementwise_of(n.input[0], depth + 1), elementwise_of(n.input[1], depth + 1)
                if a is not None and b is not None and a[0] == b[0]:
                    return a[0], (lambda v, fa=a[1], fb=b[1]: fa(v) + fb(v))
        return None

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
            src, bounds = gauss(n.input[0], depth + 1), clip_bounds(n)
            if src is not None and bounds is not None:
                out = clipped_gaussian_moments(src[0], src[1], *bounds)
        elif n.op_type == "Add" and len(n.input) == 2 and all(const(i) is None for i in n.input):
            a, b = gauss(n.input[0], depth + 1), gauss(n.input[1], depth + 1)
            if a is not None and b is not None and a[0].shape == b[0].shape:
                fa, fb = elementwise_of(n.input[0]), elementwise_of(n.input[1])
                if fa is not None and fb is not None and fa[0] == fb[0]:
                    # both branches are functions of one BatchNorm output: correlated, not independent
                    out = elementwise_moments(lambda v: fa[1](v) + fb[1](v), *gauss(fa[0], depth + 1))
                else:
                    out = (a[0] + b[0], a[1] + b[1])
        elif _activation(n) is not None:
            src = gauss(n.input[0], depth + 1)
            if src is not None:
                out = elementwise_moments(_activation(n), *src)
        elif n.op_type == "Mul" and len(n.input) == 2 and _gate_of(n) is not None:
            x, gate = _gate_of(n)                 # swish: x * sigmoid(x) / x * hardsigmoid(x)
            src = gauss(x, depth + 1)
            if src is not None:
                out = elementwise_moments(lambda v, g=_activation(gate): v * g(v), *src)
        elif n.op_type in ("Add", "Sub", "Mul", "Div") and len(n.input) == 2 and \
                sum(const(i) is not None for i in n.input) == 1:
            k = 0 if const(n.input[0]) is not None else 1
            c = np.asarray(const(n.input[k]), np.float64)
            src = gauss(n.input[1 - k], depth + 1)
            if src is not None and (c.size == 1 or c.size == src[0].size) and not (n.op_type == "Div" and k == 0):
                c = c.reshape(-1) if c.size > 1 else c.reshape(())
                mu, var = src
                if n.op_type == "Add":
                    out = (mu + c, var)
                elif n.op_type == "Sub":
                    out = (mu - c, var) if k == 1 else (c - mu, var)
                elif n.op_type == "Mul":
                    out = (mu * c, var * c * c)
                elif np.all(c != 0):
                    out = (mu / c, var / (c * c))
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
