"""The fidelity guard: how far the quantised model is from float, measured without user data.

The search is data-free, and so is this measure by default: the float model and the quantised one
(fake-quantised PIM weights plus bias corrections, float activations -- what ``tvmc run --mode
fake-quant`` computes) run on the same seeded synthetic inputs (:func:`synthetic_feeds`: N(0, 1)
for float inputs, uniform indices for inputs that index an embedding table, ones for other
integer inputs such as attention masks), or on a few real inputs the user gives
(``--calib-inputs``).  Measured:

* at the model outputs: SQNR in dB (``10 log10(sum y^2 / sum (y_q - y)^2)`` over every output
  value), cosine, and top-1 agreement where an output is a class vector ``[N, C]``;
* per PIM layer: output SQNR of the quantised layer on its own float input (traced from the float
  run), so the worst layers can be named.

:func:`parse_min_fidelity` reads ``--psq-min-fidelity``: ``rtn8`` asks for at least the output SQNR that
per-output-channel 8-bit round-to-nearest weights reach on the same inputs (the usual "8-bit quality"
reference, measured the same way), ``rtn8+D`` / ``rtn8-D`` shift that by ``D`` dB, a plain number is an
absolute SQNR in dB, and several comma-separated rules take the lowest (the default, ``23,rtn8-2``: 23 dB,
or less where even 8-bit RTN stays under 25 dB on these inputs).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.tiling import unroll
from ..runtime.session import conv2d_matrices, dense_matrix

#: default of --psq-min-fidelity: output SQNR >= 23 dB, or >= that of per-channel 8-bit RTN minus 2 dB if that
#: is lower (README, "Defaults", and docs/results/fidelity_calibration.md: the evidence)
DEFAULT_MIN_FIDELITY = "23,rtn8-2"
#: synthetic samples the guard measures on (seeded); with --calib-inputs, the user's inputs instead
FIDELITY_SAMPLES = 16
#: samples whose per-layer inputs are kept for the per-layer SQNR (memory: activations of every layer)
LAYER_SAMPLES = 2
#: layers named in the warning
WORST_LAYERS = 3


class FidelityError(ValueError):
    """A --psq-min-fidelity value that cannot be parsed."""


def parse_min_fidelity(text: str | float | None) -> list[tuple[str, float]]:
    """``--psq-min-fidelity``: one rule or several, comma separated; the threshold is the LOWEST of them.

    ``"rtn8"`` / ``"rtn8+1.5"`` / ``"rtn8-2"`` -> ``("rtn8", offset dB)`` (relative to the output SQNR of
    per-output-channel 8-bit round-to-nearest on the same inputs); ``"23"`` -> ``("db", 23.0)``.
    """
    s = str(DEFAULT_MIN_FIDELITY if text is None else text).strip().lower().replace(" ", "")
    rules = []
    for part in s.split(","):
        m = re.fullmatch(r"rtn8(?:([+-])(\d+(?:\.\d*)?))?", part)
        if m:
            rules.append(("rtn8", float(m.group(2) or 0.0) * (-1 if m.group(1) == "-" else 1)))
            continue
        try:
            v = float(part.removesuffix("db"))
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise FidelityError(f"cannot parse --psq-min-fidelity {text!r}: each comma-separated rule is 'rtn8', "
                                "'rtn8+D' or 'rtn8-D' (dB relative to per-channel 8-bit round-to-nearest) or a "
                                "finite number of dB; the threshold is the lowest rule")
        rules.append(("db", v))
    return rules


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """``10 log10(sum ref^2 / sum (out - ref)^2)`` in float64; +inf when identical."""
    r = np.asarray(ref, np.float64).ravel()
    d = np.asarray(out, np.float64).ravel() - r
    noise, signal = float(d @ d), float(r @ r)
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def output_metrics(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> dict[str, Any]:
    """SQNR (dB), cosine and (for class-vector outputs) top-1 agreement of ``out`` against ``ref``.

    ``ref``/``out``: the model outputs of every run, in the same order (lists of arrays).
    """
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in ref])
    o = np.concatenate([np.asarray(a, np.float64).ravel() for a in out])
    nr, no = float(np.linalg.norm(r)), float(np.linalg.norm(o))
    cos = float(r @ o / (nr * no)) if nr > 0 and no > 0 else (1.0 if nr == no else 0.0)
    m: dict[str, Any] = {"sqnr_db": _finite(sqnr_db(r, o)), "cosine": cos}
    cls = [(a, b) for a, b in zip(ref, out) if np.ndim(a) == 2 and np.shape(a)[1] > 1]
    if cls:
        agree = np.concatenate([np.argmax(a, 1) == np.argmax(b, 1) for a, b in cls])
        m["top1_agreement"] = float(agree.mean())
        m["top1_items"] = int(agree.size)
    return m


def _finite(v: float) -> float:
    """JSON-safe dB value: +-inf clipped to +-999."""
    return float(min(max(v, -999.0), 999.0))


def rtn8_channel_matrices(layer_record: Mapping[str, Any], weight: np.ndarray) -> list[np.ndarray]:
    """Per-output-channel 8-bit round-to-nearest weights of a layer, as unrolled float32 matrices
    (one max-abs scale per matrix column = output channel; the reference of ``rtn8``)."""
    kind = "conv2d" if layer_record["op"] == "conv2d" else "dense"
    out = []
    for m in unroll(np.asarray(weight, np.float32), kind, int(layer_record["groups"])):
        m = np.asarray(m, np.float64)
        s = np.abs(m).max(axis=0) / 127.0
        s = np.where(s > 0, s, 1.0)
        out.append(np.ascontiguousarray(np.clip(np.rint(m / s), -127, 127) * s, dtype=np.float32))
    return out


class FidelityProbe:
    """A runnable float model and fixed inputs; measures other PIM weights against float on them.

    ``model``: a :class:`~psq_tvm.runtime.package.Package` whose layers have float weights (the
    compile's float model); ``feeds_list``: the inputs (lists of arrays, one list per run);
    ``source``: what the inputs are, for the report.
    """

    def __init__(self, model: Any, feeds_list: Sequence[Sequence[np.ndarray]], source: str):
        self.model, self.feeds_list, self.source = model, list(feeds_list), source
        self.layers = {str(l["id"]): l for l in model.manifest["layers"]}
        self.reference: list[np.ndarray] = []
        self._memo: dict[str, dict[str, Any]] = {}
        self.layer_io: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for k, feeds in enumerate(self.feeds_list):
            outs, trace = model.run(feeds, "float", trace=True)
            bad = next((self.layers[lid]["name"] for lid, _, y in trace if not np.isfinite(y).all()), None)
            if bad or not all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f"):
                raise FidelityError(f"the float model's output has NaN/Inf values on {source}"
                                    + (f" (first in PIM layer {bad!r})" if bad else "")
                                    + ": a weight or an intermediate value exceeds the float32 range; check the "
                                    "model's weights")
            self.reference.extend(outs)
            if k < LAYER_SAMPLES:
                for lid, x, y in trace:
                    self.layer_io.setdefault(lid, []).append((x, y))

    @property
    def samples(self) -> int:
        return len(self.feeds_list)

    def outputs(self, weights: Mapping[str, list[np.ndarray]], biases: Mapping[str, np.ndarray | None]
                ) -> list[np.ndarray]:
        """Model outputs on the probe's inputs with the given PIM weights and biases."""
        outs: list[np.ndarray] = []
        for feeds in self.feeds_list:
            outs.extend(self.model.run(feeds, "float", weights=weights, biases=biases))
        return outs

    def output_metrics(self, weights, biases) -> dict[str, Any]:
        """:func:`output_metrics` of these weights on the probe's inputs (remembered per weights digest:
        the auto budget's chosen point is not run again for the report)."""
        key = _digest(weights, biases)
        if key not in self._memo:
            self._memo[key] = output_metrics(self.reference, self.outputs(weights, biases))
        return dict(self._memo[key])

    def layer_sqnr(self, weights: Mapping[str, list[np.ndarray]], biases: Mapping[str, np.ndarray | None]
                   ) -> dict[str, float]:
        """Per layer id: SQNR (dB) of the layer's output with ``weights`` on its traced float input."""
        out = {}
        for lid, io in self.layer_io.items():
            lay = self.layers[lid]
            if lid not in weights:
                continue
            ys, yqs = [], []
            for x, y in io:
                if lay["op"] == "conv2d":
                    yq = conv2d_matrices(x, lay, weights[lid], biases.get(lid))
                else:
                    yq = dense_matrix(x, lay, weights[lid][0], biases.get(lid))
                ys.append(np.asarray(y, np.float64).ravel())
                yqs.append(np.asarray(yq, np.float32).astype(np.float64).ravel())
            out[lid] = _finite(sqnr_db(np.concatenate(ys), np.concatenate(yqs)))
        return out


def _digest(weights: Mapping[str, list[np.ndarray]], biases: Mapping[str, np.ndarray | None]) -> str:
    h = hashlib.sha1()
    for lid in sorted(weights):
        for m in weights[lid]:
            h.update(np.ascontiguousarray(m).tobytes())
        b = biases.get(lid)
        h.update(b"-" if b is None else np.ascontiguousarray(b).tobytes())
    return h.hexdigest()


def fidelity_section(probe: FidelityProbe, weights, biases, threshold: dict[str, Any],
                     reference: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``fidelity`` section for the final weights (JSON-able)."""
    outm = probe.output_metrics(weights, biases)
    per_layer = probe.layer_sqnr(weights, biases)
    layers = [{"name": probe.layers[lid]["name"], "id": int(lid), "sqnr_db": v} for lid, v in per_layer.items()]
    worst = sorted(layers, key=lambda r: r["sqnr_db"])[:WORST_LAYERS]
    sec = {"inputs": probe.source, "samples": probe.samples, "output": outm, "layers": layers,
           "worst_layers": [r["name"] for r in worst], "threshold": threshold}
    if reference is not None:
        sec["reference_rtn8_channel"] = reference
    sec["meets_threshold"] = bool(outm["sqnr_db"] >= threshold["sqnr_db"])
    return sec


def warning_text(sec: Mapping[str, Any]) -> str | None:
    """One line for stderr when the output fidelity is under the threshold, naming the worst layers."""
    if sec.get("meets_threshold", True):
        return None
    o, t = sec["output"], sec["threshold"]
    worst = ", ".join(f"{r['name']} ({r['sqnr_db']:.1f} dB)" for r in sorted(sec["layers"], key=lambda r: r["sqnr_db"])
                      [:WORST_LAYERS])
    extra = f", top-1 agreement {o['top1_agreement']:.3f}" if "top1_agreement" in o else ""
    return (f"warning: the quantised model is far from float on {sec['inputs']}: output SQNR {o['sqnr_db']:.1f} dB "
            f"(cosine {o['cosine']:.4f}{extra}) < threshold {t['sqnr_db']:.1f} dB ({t['rule']}); worst PIM layers: "
            f"{worst}. Use a smaller --psq-budget reduction, --psq-budget auto, or --psq-granularity column; "
            "check with `tvmc run --verify --max-loss` on real inputs")
