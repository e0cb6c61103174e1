"""End-to-end verification of a package: simulator vs golden (fake-quantised, float64) vs float.

Used by ``tvmc run --verify`` and ``scripts/check_onnx_light_models.py``.  Every PIM layer's
simulator output is compared with :func:`psq_tvm.simulator.golden_layer` on the same input;
with a lossless ADC and no device non-idealities they must agree up to float32 rounding of
the final scaling (``EXACT_RTOL``), otherwise the differences are the hardware model's cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import simulator

#: sim vs golden tolerance when the spec makes the simulator exact: float32 rounding of the
#: final scaling and of the sum over row tiles (see psq_tvm.simulator)
EXACT_RTOL = 1e-5


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    """(max relative error, a one-line summary with abs/rel error, cosine and top-1 agreement) of a vs b."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    err = float(np.abs(a64 - b64).max()) if a64.size else 0.0
    rel = err / (float(np.abs(b64).max()) + 1e-30)
    cos = float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-30))
    line = f"max abs err {err:.3e}, max rel err {rel:.3e}, cosine {cos:.6f}"
    if a.ndim == 2 and a.shape[1] > 1:
        line += f", top-1 agreement {float((a.argmax(1) == b.argmax(1)).mean()):.3f}"
    return rel, line


def is_exact(pkg: Any, sim_options: Any = None) -> tuple[bool, str]:
    """Whether the spec and options make the simulator exact, and if not, why."""
    opts = simulator._options(sim_options)
    if not pkg.spec.adc_lossless() or opts.adc_full_scale is not None:
        return False, "the ADC is lossy"
    if opts.conductance_sigma or opts.stuck_at_min or opts.stuck_at_max or opts.adc_offset:
        return False, "device non-idealities are on"
    return True, ""


def layer_errors(pkg: Any, feeds: Any, sim_options: Any = None) -> list[tuple[str, float, str]]:
    """(layer name, max rel err, summary) of every PIM layer's sim output vs golden on the same input."""
    _, trace = pkg.run(feeds, "sim", sim_options, trace=True)
    layers = {str(l["id"]): l for l in pkg.layers}
    out = []
    for lid, x, y in trace:
        lay = layers[lid]
        left = lay.get("operand") == "left" and x.ndim >= 2
        bias = pkg.blob(lay["bias"]) if lay.get("bias") else None
        g = simulator.golden_layer(np.swapaxes(x, -1, -2) if left else x, lay, pkg.blob("crossbars"), pkg.spec,
                                   bias, sim_options)
        g = np.swapaxes(g, -1, -2) if left and g.ndim >= 2 else g
        rel, line = compare(y, g)
        out.append((lay["name"], rel, line))
    return out


def verify_package(pkg: Any, inputs: dict, batched: bool, sim_options: Any = None) -> tuple[bool, list[str]]:
    """Run float, golden and sim; returns (sim matches golden where exact, report lines)."""
    info = pkg.manifest["inputs"]
    one = {k: (v[: info[0]["shape"][0]] if batched else v) for k, v in inputs.items()}
    per_layer = layer_errors(pkg, one, sim_options)                  # on the first batch
    has_float = any(l.get("float_weight") for l in pkg.layers)
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
    exact, why = is_exact(pkg, sim_options)
    worst = max((rel for _, rel, _ in per_layer), default=0.0)
    if not exact:
        lines.append(f"verify: sim is not exact by design ({why}); errors above are the hardware model's cost")
        return True, lines
    if worst <= EXACT_RTOL:
        lines.append(f"verify: PASS (lossless ADC: every PIM layer matches golden, max rel err {worst:.2e} <= "
                     f"{EXACT_RTOL:g})")
        return True, lines
    lines.append(f"verify: FAIL (lossless ADC, but a PIM layer differs from golden by max rel err {worst:.2e} > "
                 f"{EXACT_RTOL:g})")
    return False, lines
