#!/usr/bin/env python3
"""Evidence for the fidelity guard's threshold: the data-free output SQNR the compile measures, next to the
real quality on the workload's data, at a grid of crossbar budgets.

    .venv/bin/python scripts/eval/fidelity_calibration.py WORKLOAD [--objective mse --granularity column]

For one workload and one search family it runs the compile pipeline up to the candidate table (the same
code as ``tvmc compile``), then for every reduction of the grid allocates the bitwidths, applies the
family's bias correction and measures (a) the output SQNR on the compile's seeded synthetic inputs (what
``--psq-budget auto`` and the guard see) and (b) the workload's real metrics over the whole evaluation
set (fake-quantised weights written into the ONNX model, run with TVM, as the sweep does).  The same two
measures for per-output-channel 8-bit RTN (``rtn8-channel``, the quality reference) come first.  Writes
``docs/results/<workload>_fidelity_calibration.json``; ``--summary`` prints the threshold each rule
would need across every workload that has a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import methods as M  # noqa: E402
import sweep as S  # noqa: E402
import workloads as W  # noqa: E402

GRID = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)


def quality_ok(workload: str, m: dict, float_m: dict, ref_m: dict) -> bool:
    """Issue 12's bar: at least rtn8-channel's quality (agreement and KL), or the task criterion."""
    if workload in ("fashion", "mnist_digits"):
        return float_m["top1"] - m["top1"] <= 0.003 + 1e-12
    if workload.startswith("minilm"):
        return float_m["spearman"] - m["spearman"] <= 0.005 + 1e-12
    return m["agree_top1"] >= ref_m["agree_top1"] - 1e-12 and m["kl_mean"] <= ref_m["kl_mean"] + 1e-12


def run(args, save=None) -> dict:
    import onnx

    from psq_tvm.core.allocation import Budget, BudgetError, allocate_budget
    from psq_tvm.core.quant import uniform_crossbars
    from psq_tvm.core.search import quant_result
    from psq_tvm.frontend.onnx_import import fold_batchnorm
    from psq_tvm.targets import fidelity as F
    from psq_tvm.targets.pipeline import CompileContext, CompileOptions, Pipeline, _corrections, _guard_corrections

    wl = W.get_workload(args.workload)
    if args.items:
        S.subset_workload(wl, args.items)
    onnx_path = wl.onnx_path()
    opts = CompileOptions(objective=args.objective, granularity=args.granularity, rounding=args.rounding,
                          sensitivity=args.sensitivity,
                          bias_correction=args.bias_correction, budget="reduction=4",
                          input_shapes={k: list(v) for k, v in wl.input_shapes.items()})
    ctx = CompileContext(str(onnx_path), opts, say=lambda m: S.log(m))
    Pipeline.default().run(ctx, until="candidates")
    tiles, spec = ctx.tiles, ctx.spec
    u16 = uniform_crossbars(tiles, spec, 16)
    model = fold_batchnorm(onnx.load(str(onnx_path)))           # the PIM weights are the BN-folded ones
    mapping = M.match_initializers(model, tiles.layers)
    cache = S.SWEEP_CACHE / (f"{args.workload}_isaac" + (f"_n{args.items}" if args.items else ""))
    cache.mkdir(parents=True, exist_ok=True)
    ref_f = cache / "float.npz"
    if ref_f.exists():
        ref = np.load(ref_f)["out"]
    else:
        ref = wl._concat(wl.run_tvm(model))
        np.savez(ref_f, out=ref, run_s=0.0)
    float_m = wl.metrics([ref], reference=ref)

    def real(weights, deltas) -> dict:
        res = M.MethodResult("calib", "calib", weights, 0, 0.0, 0.0, {}, bias_deltas=deltas)
        return S.evaluate(wl, model, mapping, res, ref, cache, "calib_")[0]

    t0 = time.perf_counter()
    rtn = M.rtn_per_channel(tiles, spec, 8)
    ref_row = {"method": "rtn8-channel", "crossbars": rtn.crossbars, "reduction": u16 / rtn.crossbars,
               "synthetic": ctx.reference_rtn8(), "real": real(rtn.weights, None)}
    S.log(f"rtn8-channel: synthetic SQNR {ref_row['synthetic']['sqnr_db']:.1f} dB; real {ref_row['real']}")
    rows = []
    for r in (tuple(float(v) for v in args.grid.split(",")) if args.grid else GRID):
        try:
            choice, _ = allocate_budget(ctx.candidates, tiles, spec, Budget("reduction", r))
        except BudgetError as e:
            S.log(f"{r}x: {e}")
            continue
        res = quant_result(ctx.candidates, tiles, spec, choice, args.objective, rounding=args.rounding)
        corr = _corrections(ctx, res)
        w, b = ctx.weights_of(res, _guard_corrections(ctx, res, corr))     # what the guard measures
        syn = ctx.probe().output_metrics(w, b)
        m = real([res.dequantized(li) for li in range(len(tiles.layers))], corr)
        row = {"reduction_budget": r, "crossbars": int(res.crossbars), "reduction": u16 / res.crossbars,
               "synthetic": syn, "real": m, "ok": quality_ok(args.workload, m, float_m, ref_row["real"])}
        rows.append(row)
        if save is not None:                                   # every point is kept, even if the run is cut
            save({"workload": args.workload, "partial": True, "rtn8_channel": ref_row, "points": rows})
        S.log(f"{r}x ({res.crossbars} xbars): synthetic SQNR {syn['sqnr_db']:.1f} dB (rtn8 "
              f"{ref_row['synthetic']['sqnr_db']:.1f}); real {wl.primary_metric} {m[wl.primary_metric]:.4f}"
              f"{' KL %.4f' % m['kl_mean'] if 'kl_mean' in m else ''}; ok={row['ok']}")
    return {"workload": args.workload, "items": wl.num_items, "family": {"objective": args.objective, "granularity": args.granularity, "rounding": args.rounding,
                                                  "sensitivity": args.sensitivity,
                                                  "bias_correction": args.bias_correction},
            "synthetic_inputs": ctx.probe().source, "fidelity_samples": F.FIDELITY_SAMPLES, "float": float_m,
            "rtn8_channel": ref_row, "points": rows, "seconds": round(time.perf_counter() - t0, 1)}


def _scan(points: list[dict], passes) -> dict | None:
    """What a descending scan picks on the grid (as ``auto`` does): the most compressed point before the
    first one ``passes`` rejects, going from the least to the most compressed."""
    chosen = None
    for p in sorted(points, key=lambda p: p["reduction"]):
        if not passes(p):
            break
        chosen = p
    return chosen


def summary(outdir: Path, family: str) -> None:
    """Per workload: the largest reduction a descending scan keeps within the quality bar (an oracle guard
    that sees the real data), the geometric mean of those, and what data-free rules on the synthetic SQNR
    (absolute ``A`` dB, relative ``rtn8-D``, or ``min(A, rtn8-D)`` as the default) would pick instead."""
    runs = [json.loads(f.read_text()) for f in sorted(outdir.glob(f"*_fidelity_calibration{family}.json"))]
    runs = [d for d in runs if d.get("points") and not d.get("partial")]
    if not runs:
        print(f"no finished *_fidelity_calibration{family}.json in {outdir}")
        return
    print(f"{'workload':<20} {'oracle':>7} {'first failing point (synthetic dB)':>36} {'rtn8 dB':>8}")
    oracle = []
    for d in runs:
        best = _scan(d["points"], lambda p: p["ok"])
        fail = next((p for p in sorted(d["points"], key=lambda p: p["reduction"]) if not p["ok"]), None)
        oracle.append(best["reduction"] if best else 1.0)
        where = f"{fail['reduction']:.2f}x at {fail['synthetic']['sqnr_db']:.1f}" if fail else "none"
        print(f"{d['workload']:<20} {oracle[-1]:>6.2f}x {where:>36} {d['rtn8_channel']['synthetic']['sqnr_db']:>8.1f}")
    print(f"oracle geometric mean {math.exp(np.mean(np.log(oracle))):.2f}x over {len(runs)} workload(s), all passing")
    rules = [(f"{a}", a, math.inf) for a in range(12, 40, 1)] + \
        [(f"rtn8-{dd}", math.inf, dd) for dd in range(0, 21)] + \
        [(f"{a},rtn8-{dd}", a, dd) for a in range(15, 31) for dd in range(0, 11)]
    scored = []
    for name, a, dd in rules:
        red, npass = [], 0
        for d in runs:
            thr = min(a, d["rtn8_channel"]["synthetic"]["sqnr_db"] - dd)
            p = _scan(d["points"], lambda p, thr=thr: p["synthetic"]["sqnr_db"] >= thr)
            red.append(p["reduction"] if p else 1.0)
            npass += bool(p is None or p["ok"])
        scored.append((npass, math.exp(np.mean(np.log(red))), name))
    print("data-free rules (descending scan on each run's grid; a rule that rejects a run's first grid point is "
          "counted at 1x there, so compare rules only over runs whose grids start low enough):")
    for npass, gm, name in sorted(scored, key=lambda t: (-t[0], -t[1]))[:8]:
        print(f"  {name:<14} {npass} of {len(runs)} pass, geometric mean {gm:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", nargs="?")
    ap.add_argument("--objective", default="mse")
    ap.add_argument("--granularity", default="column")
    ap.add_argument("--sensitivity", default="none")
    ap.add_argument("--bias-correction", default="bn")
    ap.add_argument("--rounding", default="nearest", choices=("nearest", "balanced"))
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--items", type=int, default=None, help="deterministic subset of the evaluation set")
    ap.add_argument("--grid", default=None, help=f"comma list of reductions (default {','.join(map(str, GRID))})")
    args = ap.parse_args(argv)
    fam = f"_{args.objective}-{args.granularity}-{args.sensitivity}-{args.bias_correction}" + \
        ("" if args.rounding == "nearest" else f"-{args.rounding}")
    out = Path(args.out)
    if args.summary:
        summary(out, fam)
        return 0
    path = out / f"{args.workload}_fidelity_calibration{fam}.json"
    res = run(args, save=lambda partial: W.write_json(path, partial))
    W.write_json(path, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
