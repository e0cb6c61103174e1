"""The compile report: per-layer tiles, bitwidths and crossbars vs. the uniform baselines.

:func:`build_report` makes the JSON-able dict stored in the package (deterministic:
measured times are not stored in the package; :attr:`psq_tvm.package.Package.report` merges
them in right after a compile); :func:`format_table` prints it and
:func:`plot` draws bitwidths per layer/tile and crossbars per layer.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .crossbar import CrossbarSpec
from .packing import pack


def _uniform_layer(result, ids: np.ndarray, bits: int) -> int:
    spec = result.spec
    sl = spec.slices(bits)
    t = result.tiles
    return pack(t.nrows[ids], t.ncols[ids], np.full(len(ids), sl), spec.rows, spec.cols, spec.polarities).n_crossbars


def build_report(result, host_layers: Sequence[dict], spec: CrossbarSpec, layers: Sequence[dict]) -> dict[str, Any]:
    """Report dict for a compile (``result`` None when nothing went to PIM)."""
    from .quant import compare

    rep: dict[str, Any] = {"spec": spec.name, "host_layers": list(host_layers), "n_host_layers": len(host_layers)}
    if result is None:
        rep.update(crossbars={"psq": 0, "uniform16": 0, "uniform8": 0}, reduction_vs_uniform16=None,
                   reduction_vs_uniform8=None, avg_bits=None, cell_utilization=None, pim_layers=[], n_pim_layers=0,
                   tiles=0, weights=0, method=None, note="no layer mapped to PIM")
        return rep
    cmp = compare(result)
    cmp.pop("search_seconds", None)
    rep.update(cmp)
    pl = result.placement
    per_layer = []
    for li, row in enumerate(result.layer_table()):
        ids = result.tiles.layer_tiles(li)
        phys = set()
        for t in ids:
            phys.update(int(c) for c in pl.crossbar_ids(int(t)).ravel())
        lay = layers[li] if li < len(layers) else {}
        per_layer.append({
            "name": row["layer"], "op": lay.get("op", row["kind"]), "weight_shape": row["weight_shape"],
            "groups": row["groups"], "tiles": row["tiles"],
            "bits_histogram": {str(k): v for k, v in row["bits_histogram"].items()},
            "tile_bits": [int(b) for b in result.bits[ids]],
            "avg_bits": row["avg_bits"], "crossbars": len(phys),
            "uniform16": _uniform_layer(result, ids, 16), "uniform8": _uniform_layer(result, ids, 8),
        })
    rep.update(pim_layers=per_layer, n_pim_layers=len(per_layer), tiles=int(result.tiles.n_tiles),
               weights=int(result.tiles.n_weights.sum()), method=result.method, note=result.note)
    return rep


def format_table(rep: dict[str, Any]) -> str:
    """Human-readable report: one row per PIM layer, totals, host layers with reasons."""
    lines = []
    head = f"{'layer':<28} {'op':<7} {'tiles':>5} {'avg bits':>8} {'bits histogram':<24} {'xbars':>6} {'u16':>6} {'u8':>6}"
    lines.append(head)
    lines.append("-" * len(head))
    for l in rep.get("pim_layers", []):
        hist = " ".join(f"{b}:{n}" for b, n in sorted(l["bits_histogram"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"{l['name'][:28]:<28} {l['op']:<7} {l['tiles']:>5} {l['avg_bits']:>8.2f} {hist[:24]:<24} "
                     f"{l['crossbars']:>6} {l['uniform16']:>6} {l['uniform8']:>6}")
    lines.append("-" * len(head))
    c = rep["crossbars"]
    lines.append(f"crossbars (packed, whole model): PSQ {c['psq']}  uniform16 {c['uniform16']}  uniform8 {c['uniform8']}")
    if rep.get("reduction_vs_uniform16") is not None:
        lines.append(f"reduction: {rep['reduction_vs_uniform16']:.2f}x vs uniform16, "
                     f"{rep['reduction_vs_uniform8']:.2f}x vs uniform8; avg bits {rep['avg_bits']:.3f}; "
                     f"cell utilisation {rep.get('cell_utilization', 0):.1%}")
    secs = rep.get("search_seconds")
    took = f"{secs:.3f} s" if isinstance(secs, (int, float)) else "time in compile's log"
    lines.append(f"PSQ search: {took} ({rep.get('method')}, {rep.get('note', '')})")
    lines.append(f"PIM layers: {rep.get('n_pim_layers', 0)}   host layers: {rep.get('n_host_layers', 0)}")
    for h in rep.get("host_layers", []):
        lines.append(f"  host: {h['name']} ({h['op']}): {h['reason']}")
    lines += format_fidelity(rep.get("fidelity"))
    lines += format_cost(rep.get("cost"))
    return "\n".join(lines)


COST_VARIANTS = ("psq", "uniform16", "uniform8")


def format_cost(cost: dict[str, Any] | None) -> list[str]:
    """Text lines of the report's ``cost`` section: per layer and total energy, latency, area, side by side."""
    if not cost:
        return []
    out = [f"hardware cost ({cost['params']} numbers, {cost['adc_bits']}-bit ADC, {cost['input_cycles']} input "
           "bit-cycles; energy uJ / latency us per inference, area mm^2), PSQ | uniform16 | uniform8:"]
    head = f"  {'layer':<26} {'energy':>29} {'latency':>29} {'area':>23}"
    out.append(head)
    rows = zip(*(cost[v]["layers"] for v in COST_VARIANTS))
    for ls in rows:
        out.append(f"  {ls[0]['name'][:26]:<26} " + " ".join(
            "|".join(f"{l[k]:9.4g}" for l in ls) for k in ("energy_uj", "latency_us")) + " "
            + "|".join(f"{l['area_mm2']:7.3g}" for l in ls))
    t = [cost[v] for v in COST_VARIANTS]
    out.append(f"  {'total':<26} " + " ".join("|".join(f"{x[k]:9.4g}" for x in t) for k in ("energy_uj", "latency_us"))
               + " " + "|".join(f"{x['area_mm2']:7.3g}" for x in t))
    out.append("  chips: " + ", ".join(f"{v} {x['chips']}" for v, x in zip(COST_VARIANTS, t))
               + "; pipeline interval (us, no replication -> with replication): "
               + ", ".join(f"{v} {x['pipeline']['interval_us']:.4g} -> {x['pipeline']['interval_replicated_us']:.4g}"
                           for v, x in zip(COST_VARIANTS, t)))
    e16, e8, e = t[1]["energy_uj"], t[2]["energy_uj"], t[0]["energy_uj"]
    if e > 0:
        out.append(f"  energy: {e16 / e:.2f}x less than uniform16, {e8 / e:.2f}x less than uniform8")
    return out


def format_fidelity(fid: dict[str, Any] | None) -> list[str]:
    """Text lines of the report's ``fidelity`` section (the quantised model against float)."""
    if not fid:
        return []
    o, t = fid["output"], fid["threshold"]
    verdict = "meets" if fid.get("meets_threshold") else "BELOW"
    out = [f"fidelity vs float on {fid['inputs']}: output SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.5f}"
           + (f", top-1 agreement {o['top1_agreement']:.3f}" if "top1_agreement" in o else "")
           + f"; {verdict} the threshold {t['sqnr_db']:.1f} dB ({t['rule']})"]
    ref = fid.get("reference_rtn8_channel")
    if ref:
        out.append(f"  per-channel 8-bit RTN on the same inputs: output SQNR {ref['sqnr_db']:.1f} dB, "
                   f"cosine {ref['cosine']:.5f}")
    auto = fid.get("auto_budget")
    if auto:
        pts = ", ".join(f"{p['crossbars']}:{p['sqnr_db']:.1f}" for p in auto["points"])
        out.append(f"  auto budget: {auto['chosen_crossbars']} crossbars ({auto['why']}); tried crossbars:dB {pts}")
    worst = sorted(fid.get("layers", []), key=lambda r: r["sqnr_db"])[:5]
    if worst:
        out.append("  lowest per-layer SQNR: " + ", ".join(f"{r['name']} {r['sqnr_db']:.1f} dB" for r in worst))
    return out


def plot(rep: dict[str, Any], path: Any, format: str | None = None) -> Any:  # noqa: A002 (matplotlib's name)
    """Two panels: bitwidth of every tile per layer, and crossbars per layer vs. baselines.

    ``path``: a file name or a binary file object (then ``format``, e.g. 'png', says the image format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = rep.get("pim_layers", [])
    fid = rep.get("fidelity")
    cost = rep.get("cost")
    n = 2 + bool(fid) + 3 * bool(cost)
    fig, axes = plt.subplots(n, 1, figsize=(max(6, 0.35 * len(layers) + 3), 3.5 * n), constrained_layout=True)
    ax1, ax2 = axes[0], axes[1]
    for k, l in enumerate(layers):
        b = np.asarray(l["tile_bits"])
        jitter = (np.arange(len(b)) / max(len(b), 1) - 0.5) * 0.6
        ax1.scatter(k + jitter, b, s=6, alpha=0.6)
    ax1.set_ylabel("tile bitwidth")
    ax1.set_title("PSQ bitwidth of every tile, per layer")
    x = np.arange(len(layers))
    w = 0.28
    ax2.bar(x - w, [l["uniform16"] for l in layers], w, label="uniform 16-bit")
    ax2.bar(x, [l["uniform8"] for l in layers], w, label="uniform 8-bit")
    ax2.bar(x + w, [l["crossbars"] for l in layers], w, label="PSQ")
    ax2.set_ylabel("crossbars")
    ax2.set_yscale("log")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels([l["name"] for l in layers], rotation=70, fontsize=7)
    c = rep["crossbars"]
    ax2.set_title(f"crossbars per layer (model total: PSQ {c['psq']}, u16 {c['uniform16']}, u8 {c['uniform8']})")
    if fid:
        ax3 = axes[2]
        by_name = {r["name"]: r["sqnr_db"] for r in fid.get("layers", [])}
        ax3.bar(x, [by_name.get(l["name"], np.nan) for l in layers], color="tab:green")
        ax3.set_ylabel("layer output SQNR (dB)")
        o = fid["output"]
        ax3.set_title(f"fidelity vs float: model output SQNR {o['sqnr_db']:.1f} dB "
                      f"(threshold {fid['threshold']['sqnr_db']:.1f} dB)", fontsize=9)
        ax3.set_xticks(x)
        ax3.set_xticklabels([l["name"] for l in layers], rotation=70, fontsize=7)
    if cost:
        for ax, key, unit in zip(axes[n - 3:], ("energy_uj", "latency_us", "area_mm2"), ("uJ", "us", "mm^2")):
            for k, v in enumerate(COST_VARIANTS):
                ax.bar(x + (k - 1) * w, [l[key] for l in cost[v]["layers"]], w,
                       label=f"{v} (total {cost[v][key]:.4g} {unit})")
            ax.set_ylabel(f"{key.split('_')[0]} ({unit})")
            ax.set_title(f"{key.split('_')[0]} per layer, {cost['params']} cost numbers", fontsize=9)
            ax.legend(fontsize=7)
            ax.set_xticks(x)
            ax.set_xticklabels([l["name"] for l in layers], rotation=70, fontsize=7)
    fig.savefig(path, dpi=120, format=format)
    plt.close(fig)
    return path
