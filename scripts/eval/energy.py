#!/usr/bin/env python3
"""Accuracy against energy (issue 15 item 3): energy budgets vs crossbar budgets on the same cost model.

    .venv/bin/python scripts/eval/energy.py WORKLOAD [--preset isaac] [--items N] [--out docs/results]

1. One compile (``sweep.prepare``) gives the PIM layers, tiled, and the manifest layer shapes; the cost
   model is ``CostModel.from_layers`` with the preset's numbers (``psq_tvm.core.cost``).
2. One PSQ candidate table (mse, per-column scales: the compile's defaults); for each crossbar budget
   ``reduction=R`` and each energy budget ``energy-reduction=R`` the whole-model Lagrangian allocates, and
   for every crossbar point also ``energy=<that point's energy>``: the same energy, spent by the energy
   cost instead of the crossbar count.
3. Each allocation is evaluated weight-only through the workload's TVM host build (``sweep.method_row``,
   cached by weights); energy, latency, area and crossbars come from the cost model.
4. Writes ``<out>/energy_<workload>_<preset>.json`` and ``.png`` (accuracy vs energy, both budget kinds).
   Energies and latencies are per input item: the cost model's per-inference figures (one compiled batch
   of the workload) divided by the batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import methods as M  # noqa: E402
import sweep as S  # noqa: E402

CROSSBAR_REDUCTIONS = (3.0, 4.0, 5.0)
ENERGY_REDUCTIONS = (2.5, 3.0, 3.5)


def main(argv=None) -> int:
    from psq_tvm.core.allocation import Budget, allocate_budget
    from psq_tvm.core.candidates import SearchConfig, evaluate_candidates
    from psq_tvm.core.cost import CostModel, cost_params, mapping_from_placement
    from psq_tvm.core.packing import pack
    from psq_tvm.core.search import quant_result

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload")
    ap.add_argument("--preset", default="isaac")
    ap.add_argument("--items", type=int, default=None, help="a deterministic subset of the evaluation set")
    ap.add_argument("--out", default=str(HERE.parent.parent / "docs" / "results"))
    ap.add_argument("--reductions", default=",".join(f"{r:g}" for r in CROSSBAR_REDUCTIONS),
                    help="crossbar budgets reduction=R, comma-separated")
    ap.add_argument("--energy-reductions", default=",".join(f"{r:g}" for r in ENERGY_REDUCTIONS),
                    help="energy budgets energy-reduction=R, comma-separated")
    ap.add_argument("--render", action="store_true", help="only rewrite <out>/energy.md from the JSON files")
    a = ap.parse_args(argv)
    if a.render:
        write_markdown(Path(a.out))
        return 0

    ctx = S.prepare(a.workload, a.preset, items=a.items)
    tiles, spec = ctx.tiles, ctx.spec
    model = CostModel.from_layers(ctx.pkg.layers, spec, cost_params(spec.name), ctx.pkg.manifest.get("host_layers", []))
    table = evaluate_candidates(tiles, spec.weight_bits, SearchConfig(objective="mse", granularity="column"))

    batch = int(next(iter(ctx.wl.input_shapes.values()))[0])

    def per_item(ev: dict) -> dict:
        return {"energy_uj": ev["energy_uj"] / batch, "latency_us": ev["latency_us"] / batch,
                "area_mm2": ev["area_mm2"], "crossbars": ev["crossbars"], "chips": ev["chips"],
                "energy_parts_uj": {k: v / batch for k, v in ev["energy_parts_uj"].items()}}

    def point(budget: str) -> dict:
        choice, note = allocate_budget(table, tiles, spec, Budget.parse(budget), model)
        qr = quant_result(table, tiles, spec, choice, "mse", note=note)
        res = M._from_quant_result(f"psq {budget}", "psq-mse-column", qr, {"budget": budget})
        row, _ = S.method_row(ctx, res)
        m = mapping_from_placement(tiles.layer, tiles.nrows, tiles.ncols, qr.slices, qr.placement)
        ev = per_item(model.evaluate(m))
        S.log(f"{budget}: {qr.crossbars} crossbars, {ev['energy_uj']:.4g} uJ, "
              f"{ctx.wl.primary_metric} {row['metrics'][ctx.wl.primary_metric]:.4f}")
        return {"budget": budget, "kind": Budget.parse(budget).kind, "crossbars": int(qr.crossbars),
                "avg_bits": float(qr.avg_bits), "energy_uj": ev["energy_uj"], "latency_us": ev["latency_us"],
                "area_mm2": ev["area_mm2"], "energy_parts_uj": ev["energy_parts_uj"],
                "layer_avg_bits": [r["avg_bits"] for r in qr.layer_table()],
                "bits": [int(b) for b in qr.bits], "metrics": row["metrics"], "note": note}

    sl16 = np.full(tiles.n_tiles, spec.slices(16))
    u16 = per_item(model.evaluate(mapping_from_placement(tiles.layer, tiles.nrows, tiles.ncols, sl16,
                                                pack(tiles.nrows, tiles.ncols, sl16, spec.rows, spec.cols,
                                                     spec.polarities))))
    crossbar_pts = [point(f"reduction={float(r):g}") for r in a.reductions.split(",")]
    energy_pts = [point(f"energy-reduction={float(r):g}") for r in a.energy_reductions.split(",")]
    same_energy = []
    for p in crossbar_pts:
        q = point(f"energy={p['energy_uj'] * batch:.12g}")      # the budget is per compiled batch
        differ = int(np.sum(np.array(p["bits"]) != np.array(q["bits"])))
        same_energy.append({"crossbar_budget": p["budget"], "energy_budget": q["budget"], "tiles_differ": differ,
                            "crossbar_point": {k: p[k] for k in ("crossbars", "energy_uj", "avg_bits", "metrics")},
                            "energy_point": {k: q[k] for k in ("crossbars", "energy_uj", "avg_bits", "metrics")},
                            "layer_avg_bits": {"crossbar_budget": p["layer_avg_bits"],
                                               "energy_budget": q["layer_avg_bits"]}})
        energy_pts.append(q)
    out = {"workload": a.workload, "preset": a.preset, "items": a.items or ctx.wl.num_items, "batch": batch,
           "metric": ctx.wl.primary_metric, "float": ctx.fm, "uniform16": {k: u16[k] for k in
                                                                            ("energy_uj", "latency_us", "area_mm2", "crossbars")},
           "layers": [l.name for l in tiles.layers], "n_vec": model.n_vec.tolist(),
           "crossbar_budgets": crossbar_pts, "energy_budgets": energy_pts, "same_energy": same_energy,
           "command": "scripts/eval/energy.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for pts in (crossbar_pts, energy_pts):
        for p in pts:
            p.pop("bits")
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"energy_{a.workload}_{a.preset}"
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True))
    tmp.replace(stem.with_suffix(".json"))
    plot(out, stem.with_suffix(".png"))
    write_markdown(outdir)
    S.log(f"wrote {stem}.json/.png and {outdir / 'energy.md'}")
    return 0


def _row(p: dict, key: str) -> str:
    return (f"| `{p['budget']}` | {p['crossbars']} | {p['avg_bits']:.2f} | {p['energy_uj']:.4g} | "
            f"{p['latency_us']:.4g} | {p['area_mm2']:.4g} | {p['metrics'][key]:.4f} |")


def write_markdown(outdir: Path) -> None:
    """``energy.md`` from every ``energy_*.json`` in ``outdir`` (tables and the facts read off them)."""
    lines = ["# Accuracy against energy: energy budgets and crossbar budgets", "",
             "Generated by `scripts/eval/energy.py` (do not edit by hand; re-run it). One PSQ candidate table per "
             "workload (mse, per-column scales); every point is the whole-model Lagrangian under one budget, "
             "`reduction=R` (crossbars, vs uniform 16-bit) or `energy-reduction=R` / `energy=E` (the isaac cost "
             "numbers of `psq_tvm/core/cost.py`). Weight-only accuracy through the workload's TVM host build, as in "
             "the sweep. Energy and latency per input item (one compiled batch / its size); the values of "
             "`energy=E` budgets are per compiled batch (uJ), as the compiler counts them. Latency with layers in "
             "sequence; area of the occupied IMAs and tiles. On the isaac numbers every ADC serves one crossbar, so "
             "a layer's latency does not depend on its bitwidths (fewer slices, fewer crossbars, as many ADCs per "
             "crossbar) and the latency column is the same for every point; PSQ's latency gain is in the "
             "replicated pipeline (`tvmc report`).", ""]
    for f in sorted(outdir.glob("energy_*.json")):
        r = json.loads(f.read_text())
        key = r["metric"]
        u = r["uniform16"]
        lines += [f"## {r['workload']} ({r['preset']}, {r['items']} items, batch {r['batch']})", "",
                  f"Command: `{r['command']}`. Float {key} {r['float'][key]:.4f}; uniform 16-bit: "
                  f"{u['crossbars']} crossbars, {u['energy_uj']:.4g} uJ, {u['latency_us']:.4g} us, "
                  f"{u['area_mm2']:.4g} mm^2 per item.", "",
                  f"![accuracy vs energy]({f.with_suffix('.png').name})", "",
                  f"| budget | crossbars | avg bits | energy (uJ) | latency (us) | area (mm^2) | {key} |",
                  "|---|---|---|---|---|---|---|"]
        pts = sorted(r["crossbar_budgets"] + r["energy_budgets"], key=lambda p: p["energy_uj"])
        lines += [_row(p, key) for p in pts]
        lines += ["", "**Same energy, spent two ways.** Each crossbar budget's allocation, and the energy budget "
                  "set to exactly its energy:", "",
                  f"| crossbar budget | its crossbars / energy / {key} | energy budget: crossbars / energy / {key} "
                  "| tiles with another bitwidth | layers the energy budget gives more bits (avg bits; input vectors "
                  "per batch) | ... fewer bits |",
                  "|---|---|---|---|---|---|"]
        for c in r["same_energy"]:
            a, b = c["crossbar_point"], c["energy_point"]
            la, lb = c["layer_avg_bits"]["crossbar_budget"], c["layer_avg_bits"]["energy_budget"]
            diff = sorted(range(len(la)), key=lambda i: la[i] - lb[i])
            more = [f"{r['layers'][i]} {la[i]:.2f}->{lb[i]:.2f} ({r['n_vec'][i]:g})"
                    for i in diff[:3] if lb[i] > la[i] + 1e-9]
            fewer = [f"{r['layers'][i]} {la[i]:.2f}->{lb[i]:.2f} ({r['n_vec'][i]:g})"
                     for i in diff[::-1][:3] if lb[i] < la[i] - 1e-9]
            lines.append(f"| `{c['crossbar_budget']}` | {a['crossbars']} / {a['energy_uj']:.4g} / {a['metrics'][key]:.4f} "
                         f"| {b['crossbars']} / {b['energy_uj']:.4g} / {b['metrics'][key]:.4f} | {c['tiles_differ']} "
                         f"| {'; '.join(more) or '-'} | {'; '.join(fewer) or '-'} |")
        lines.append("")
    tmp = outdir / "energy.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(outdir / "energy.md")


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = out["metric"]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for pts, mark, lab in ((out["crossbar_budgets"], "o-", "crossbar budget (reduction=R)"),
                           (out["energy_budgets"], "s--", "energy budget")):
        pts = sorted(pts, key=lambda p: p["energy_uj"])
        ax.plot([p["energy_uj"] for p in pts], [p["metrics"][key] for p in pts], mark, label=lab)
    ax.axhline(out["float"][key], color="gray", lw=0.8, label="float")
    ax.set_xlabel(f"energy per item (uJ, {out['preset']} numbers; uniform16 {out['uniform16']['energy_uj']:.3g})")
    ax.set_ylabel(key)
    ax.set_title(f"{out['workload']}: accuracy vs energy")
    ax.legend(fontsize=8)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
