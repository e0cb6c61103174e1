"""End-to-end verification of a package: simulator vs golden (fake-quantised, float64) vs float.

Used by ``tvmc run --verify`` and ``scripts/check_onnx_light_models.py``.  Two questions, two exit codes:

* does the simulator compute what the tables say?  Every PIM layer's simulator output is compared with
  :func:`psq_tvm.runtime.simulator.golden_layer` on the same input (bias and bias correction included,
  as the package runs them).  With a lossless ADC and no device non-idealities they must agree up to
  float32 rounding of the final scaling (``EXACT_RTOL``); otherwise the differences are the hardware
  model's cost.  Mismatch: exit code :data:`EXIT_SIM_MISMATCH`.
* is the compiled model close enough to float on these inputs?  Always reported (sim vs float:
  cosine, SQNR, top-1 agreement, accuracy with labels); with ``--max-loss KIND=VALUE`` a loss above
  the bound gives exit code :data:`EXIT_TOO_FAR_FROM_FLOAT`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import simulator
from .session import layer_bias

#: sim vs golden tolerance when the spec makes the simulator exact: float32 rounding of the
#: final scaling and of the sum over row tiles (see psq_tvm.runtime.simulator)
EXACT_RTOL = 1e-5
#: exit code of ``tvmc run --verify`` when the simulator does not match golden where it must
EXIT_SIM_MISMATCH = 3
#: exit code of ``tvmc run --verify --max-loss`` when the compiled model is too far from float
EXIT_TOO_FAR_FROM_FLOAT = 4
#: what --max-loss bounds: top1 = 1 - top-1 agreement with float; cosine = 1 - cosine with float;
#: accuracy = float accuracy - compiled accuracy (needs labels)
LOSS_KINDS = ("top1", "cosine", "accuracy")


class VerifyError(ValueError):
    """A --max-loss that cannot be parsed or measured on these outputs."""


def parse_max_loss(text: str | None) -> tuple[str, float] | None:
    """``"top1=0.01"`` -> ``("top1", 0.01)``; None stays None."""
    if text is None:
        return None
    kind, sep, value = str(text).partition("=")
    kind = kind.strip()
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not sep or kind not in LOSS_KINDS or not (math.isfinite(v) and v >= 0):
        raise VerifyError(f"cannot parse --max-loss {text!r}: expected KIND=VALUE with KIND one of {LOSS_KINDS} and "
                          "VALUE >= 0, e.g. top1=0.01 (at most 1 % of items change their top-1 class)")
    return kind, v


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    """(max relative error, a one-line summary with abs/rel error, cosine and top-1 agreement) of a vs b."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    err = float(np.abs(a64 - b64).max()) if a64.size else 0.0
    rel = err / ((float(np.abs(b64).max()) if b64.size else 0.0) + 1e-30)
    cos = float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-30))
    line = f"max abs err {err:.3e}, max rel err {rel:.3e}, cosine {cos:.6f}"
    if a.ndim == 2 and a.shape[1] > 1:
        line += f", top-1 agreement {float((a.argmax(1) == b.argmax(1)).mean()):.3f}"
    return rel, line


def losses(out: list[np.ndarray], ref: list[np.ndarray], labels: np.ndarray | None = None) -> dict[str, float]:
    """Loss of ``out`` against the float outputs ``ref`` for every kind that applies (see LOSS_KINDS)."""
    a = np.concatenate([np.asarray(o, np.float64).ravel() for o in out])
    b = np.concatenate([np.asarray(r, np.float64).ravel() for r in ref])
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    res = {"cosine": float(1.0 - (a @ b) / (na * nb)) if na > 0 and nb > 0 else float(na != nb)}
    first, fref = out[0], ref[0]
    if first.ndim == 2 and first.shape[1] > 1:
        res["top1"] = float(1.0 - (first.argmax(1) == fref.argmax(1)).mean())
        if labels is not None and len(labels) == len(first):
            lab = np.asarray(labels)
            res["accuracy"] = float((fref.argmax(1) == lab).mean() - (first.argmax(1) == lab).mean())
    return res


def is_exact(pkg: Any, sim_options: Any = None) -> tuple[bool, str]:
    """Whether the spec and options make the simulator exact, and if not, why."""
    opts = simulator._options(sim_options)
    if not pkg.spec.adc_lossless() or opts.adc_full_scale is not None:
        return False, "the ADC is lossy"
    if opts.conductance_sigma or opts.stuck_at_min or opts.stuck_at_max or opts.adc_offset:
        return False, "device non-idealities are on"
    return True, ""


def layer_errors(pkg: Any, feeds: Any, sim_options: Any = None) -> list[tuple[str, float, str]]:
    """(layer name, max rel err, summary) of every PIM layer's sim output vs golden on the same input,
    with the bias and bias correction the package runs the layer with."""
    _, trace = pkg.run(feeds, "sim", sim_options, trace=True)
    layers = {str(l["id"]): l for l in pkg.layers}
    out = []
    for lid, x, y in trace:
        lay = layers[lid]
        left = lay.get("operand") == "left" and x.ndim >= 2
        g = simulator.golden_layer(np.swapaxes(x, -1, -2) if left else x, lay, pkg.blob("crossbars"), pkg.spec,
                                   layer_bias(pkg, lay, quantised=True), sim_options)
        g = np.swapaxes(g, -1, -2) if left and g.ndim >= 2 else g
        rel, line = compare(y, g)
        out.append((lay["name"], rel, line))
    return out


def verify_package(pkg: Any, inputs: dict, batched: bool, sim_options: Any = None, max_loss: str | None = None,
                   labels: np.ndarray | None = None) -> tuple[int, list[str]]:
    """Run float, golden and sim; returns (exit code: 0, EXIT_SIM_MISMATCH or EXIT_TOO_FAR_FROM_FLOAT, lines)."""
    bound = parse_max_loss(max_loss)
    info = pkg.manifest["inputs"]
    one = {k: (v[: info[0]["shape"][0]] if batched else v) for k, v in inputs.items()}
    per_layer = layer_errors(pkg, one, sim_options)                  # on the first batch
    has_float = any(l.get("float_weight") for l in pkg.layers) or not pkg.layers
    if bound is not None and not has_float:
        raise VerifyError("--max-loss needs the float weights, but this package was compiled with --no-float-weights")
    if batched:                                                       # whole-model outputs on every sample
        x = inputs[info[0]["name"]]
        sim_out, gold_out = [pkg.run_batched(x, "sim", sim_options)], [pkg.run_batched(x, "golden", sim_options)]
        float_out = [pkg.run_batched(x, "float")] if has_float else None
    else:
        sim_out, gold_out = pkg.run(one, "sim", sim_options), pkg.run(one, "golden", sim_options)
        float_out = pkg.run(one, "float") if has_float else None
    n = len(sim_out[0]) if batched else len(next(iter(one.values())))
    lines = [f"verify on {n} sample(s) (per-layer errors on the first batch): float, golden (fake-quantised "
             "weights and activations, float64), sim"]
    lines += [f"  layer {name:<28} sim vs golden: {line}" for name, _, line in per_layer]
    for k, (s, g) in enumerate(zip(sim_out, gold_out)):
        lines.append(f"  output_{k} sim vs golden: {compare(s, g)[1]}")
        if float_out is not None:
            lines.append(f"  output_{k} sim vs float:  {compare(s, float_out[k])[1]}")
            lines.append(f"  output_{k} golden vs float: {compare(g, float_out[k])[1]}")
    code = 0
    exact, why = is_exact(pkg, sim_options)
    worst = max((rel for _, rel, _ in per_layer), default=0.0)
    if not exact:
        lines.append(f"verify: sim is not exact by design ({why}); errors above are the hardware model's cost")
    elif worst <= EXACT_RTOL:
        lines.append(f"verify: PASS sim vs golden (lossless ADC: every PIM layer matches golden, max rel err "
                     f"{worst:.2e} <= {EXACT_RTOL:g})")
    else:
        lines.append(f"verify: FAIL sim vs golden (lossless ADC, but a PIM layer differs from golden by max rel err "
                     f"{worst:.2e} > {EXACT_RTOL:g})")
        code = EXIT_SIM_MISMATCH
    if float_out is not None:
        loss = losses(sim_out, float_out, labels)
        lines.append("verify: sim vs float loss: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(loss.items())))
        if bound is not None:
            kind, limit = bound
            if kind not in loss:
                raise VerifyError(f"--max-loss {kind} cannot be measured here: " + (
                    "accuracy needs labels in the inputs file" if kind == "accuracy"
                    else "the first output is not a class vector [N, C]"))
            if loss[kind] > limit:
                lines.append(f"verify: FAIL sim vs float: {kind} loss {loss[kind]:.4g} > --max-loss {limit:g} "
                             f"(exit code {EXIT_TOO_FAR_FROM_FLOAT}); compile with a smaller reduction or "
                             "--psq-budget auto")
                code = code or EXIT_TOO_FAR_FROM_FLOAT
            else:
                lines.append(f"verify: PASS sim vs float: {kind} loss {loss[kind]:.4g} <= --max-loss {limit:g}")
    return code, lines
