#!/usr/bin/env python3
"""Evaluation sweep (issue 5, with the per-column rows of issue 6): accuracy against crossbars.

    .venv/bin/python scripts/eval/sweep.py WORKLOAD [--preset isaac] [--quick] [--out docs/results]

1. Compiles the workload's ONNX once with ``psq_tvm.compile(..., target="pim-psq")``; the
   layers the partitioner sent to PIM, tiled (``pkg.quant_result.tiles``), are quantised by
   every method, and every method is counted by the same packer.
2. Methods (rows): float; uniform 16/8-bit per layer; per-tile RTN at 4 and 3 bits; HQQ per
   tile at 4 bits; PSQ mse / cdf-kl (one scale per tile) and PSQ mse with per-column scales,
   in budget mode (reduction vs uniform 16-bit, plus "crossbars=" the RTN-4 count for the
   equal-crossbar comparison) and in tolerance mode.  Weight-only accuracy: the PIM layers'
   ONNX initializers are replaced by the method's fake-quantised weights and the model runs
   through the workload's TVM host build (``wl.run_tvm``).
3. Full simulator (8-bit activations, the preset's ADC) for single-input workloads
   (``--sim-points``), ``pkg.run_batched(x, mode="sim")``, on a deterministic subset if
   ``--sim-items`` is smaller than the evaluation set.
4. Writes ``<out>/<workload>_<preset>.json``, ``<out>/<workload>_<preset>.png`` and
   regenerates ``<out>/README.md`` from every JSON in ``<out>``.

Per-method outputs are cached in ``scripts/eval/.cache/sweep/`` keyed by the md5 of the
fake-quantised weights, so a re-run (or a run after a crash) only evaluates what changed.
Everything is deterministic (fixed seeds; the search and the baselines have no randomness).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import workloads as W  # noqa: E402
import methods as M  # noqa: E402

SWEEP_CACHE = W.CACHE / "sweep"
REDUCTIONS = (3.0, 3.5, 4.0, 4.5, 5.0, 6.0)
QUICK_REDUCTIONS = (3.5, 4.0, 5.0)
TOLERANCES = {"mse": (0.02, 0.05), "cdf-kl": (0.01, 0.03)}

#: negligible-loss criterion per workload: (metric key, kind, threshold, text)
CRITERIA = {
    "fashion": ("top1", "drop", 0.003, "top-1 drop <= 0.3 pp"),
    "mnist_digits": ("top1", "drop", 0.003, "top-1 drop <= 0.3 pp"),
    "efficientnet": ("agree_top1", "min", 0.99, "top-1 agreement with float >= 99 %"),
    "efficientnet_bn": ("agree_top1", "min", 0.99, "top-1 agreement with float >= 99 %"),
    "minilm_lee": ("spearman", "drop", 0.005, "Spearman drop <= 0.005 (gains count as no loss)"),
    "minilm_wordsim": ("spearman", "drop", 0.005, "Spearman drop <= 0.005 (same bar as Lee; issue sets none)"),
    "orientation": ("agree_top1", "min", 0.99, "top-1 agreement with float >= 99 %"),
    "orientation_folded": ("agree_top1", "min", 0.99, "top-1 agreement with float >= 99 %"),
}
PAPER_REDUCTION = 3.5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _md5(arrays) -> str:
    h = hashlib.md5()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def restrict_workload(wl, idx: np.ndarray) -> np.ndarray:
    """Restrict ``wl`` to the items ``idx`` (in place)."""
    d = wl.data
    wl._cache["data"] = dict(d, inputs={k: v[idx] for k, v in d["inputs"].items()},
                             labels=None if d["labels"] is None else d["labels"][idx])
    return idx


def subset_workload(wl, n: int):
    """Restrict ``wl`` to a deterministic, evenly strided subset of ``n`` items (in place)."""
    N = wl.num_items
    if n >= N:
        return None
    return restrict_workload(wl, np.linspace(0, N - 1, n).round().astype(int))


#: PSQ families of the sweep: objective[-column][-sens|-osens][-bc]; -sens = synthetic-input moments per row,
#: -osens = synthetic output sensitivity per layer (probe: the family's own search at reduction=4),
#: -bc = data-free bias correction from synthetic input means (``--psq-bias-correction synthetic``);
#: -bnsens / -bnbc: the same from the model's BatchNorm statistics (``bn``; needs a model with BatchNorms)
PSQ_FAMILIES = ("mse", "cdf-kl", "mse-column", "cdf-kl-column", "mse-column-sens", "cdf-kl-column-sens")
OSENS_PROBE = "reduction=4"


def parse_family(fam: str) -> tuple[str, str, str | None, str | None]:
    full = fam
    bc = None
    for suffix in ("-bnbc", "-bc"):
        if fam.endswith(suffix):
            bc, fam = ("bn" if suffix == "-bnbc" else "synthetic"), fam[: -len(suffix)]
            break
    sens = None
    for suffix in ("-osens", "-bnsens", "-sens"):
        if fam.endswith(suffix):
            sens, fam = suffix[1:], fam[: -len(suffix)]
            break
    gran = "column" if fam.endswith("-column") else "tile"
    obj = fam[:-7] if gran == "column" else fam
    if obj not in ("mse", "cdf-kl"):
        raise SystemExit(f"sweep: unknown PSQ family {full!r}; choose from {', '.join(PSQ_FAMILIES)} "
                         "(or -osens / -bnsens, and -bc / -bnbc after any)")
    return obj, gran, sens, bc


def baseline_methods(tiles, spec):
    """(name, thunk) of the non-PSQ rows (uniform, per-channel RTN-8 reference, per-tile RTN, HQQ), in table order."""
    return [
        ("uniform16-layer", lambda: M.uniform(tiles, spec, 16)),
        ("uniform8-layer", lambda: M.uniform(tiles, spec, 8)),
        ("rtn8-channel", lambda: M.rtn_per_channel(tiles, spec, 8)),
        ("rtn4-tile", lambda: M.rtn(tiles, spec, 4)),
        ("rtn3-tile", lambda: M.rtn(tiles, spec, 3)),
        ("hqq4-tile", lambda: M.hqq(tiles, spec, 4)),
    ]


def method_list(tiles, spec, reductions, tolerances, quick: bool, families=PSQ_FAMILIES, importance=None,
                input_stats=None):
    """(name, thunk) of every method row, in table order; ``importance(obj, gran, kind)`` -> tile weights,
    ``input_stats()`` -> per-layer synthetic input statistics (for the -bc families)."""
    from psq_tvm.core.quant import uniform_crossbars

    n4 = uniform_crossbars(tiles, spec, 4)
    n3 = uniform_crossbars(tiles, spec, 3)
    budgets = [f"reduction={r:g}" for r in reductions]
    eq = [f"crossbars={n}" for n in sorted({n4, n3})]
    rows = baseline_methods(tiles, spec)
    for fam in families:
        obj, gran, sens, bc = parse_family(fam)
        for b in budgets + eq:
            rows.append((None, lambda o=obj, g=gran, b=b, k=sens, bc=bc: M.psq(
                tiles, spec, o, g, budget=b, importance=importance(o, g, k) if k else None, sens=k,
                bias_stats=input_stats(bc) if bc else None, bc=bc)))
        if gran == "tile" and not sens and not bc:
            for t in tolerances[obj][: 1 if quick else None]:
                rows.append((None, lambda o=obj, g=gran, t=t: M.psq(tiles, spec, o, g, tolerance=t)))
    return rows


def evaluate(wl, onnx_model, mapping, res, ref, cache_dir: Path, prefix: str):
    key = _md5(list(res.weights) + [d for d in (res.bias_deltas or []) if d is not None])
    f = cache_dir / f"{prefix}{key}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        outs = [z["out"]]
        cached = True
        run_s = float(z["run_s"])
    else:
        t0 = time.perf_counter()
        model = M.onnx_with_weights(onnx_model, mapping, res.weights, res.bias_deltas)
        outs = wl.run_tvm(model)
        run_s = time.perf_counter() - t0
        out = wl._concat(outs)
        np.savez(f, out=out, run_s=run_s)
        outs = [out]
        cached = False
    return wl.metrics(outs, reference=ref), run_s, cached, key


def primary_ok(workload: str, m: dict, f: dict) -> bool:
    key, kind, thr, _ = CRITERIA.get(workload, ("top1", "drop", 0.003, ""))
    if kind == "drop":
        return f[key] - m[key] <= thr + 1e-12
    if kind == "min":
        return m[key] >= thr
    return abs(m[key] - f[key]) <= thr + 1e-12


#: search settings of the one compile that yields the tiles (sweep.prepare): the tiles are the same for any
#: search settings; fixed cheap ones (today's per-tile search, no statistics) so that changed compiler
#: defaults (an automatic budget, a fidelity check) do not slow every sweep down or change what it reads
PREPARE_SEARCH = {"objective": "cdf-kl", "granularity": "tile", "budget": "reduction=4", "sensitivity": "none",
                  "bias_correction": "none"}


class Context:
    """What every row of a sweep shares: the workload (possibly restricted to a subset), its ONNX model with
    the BatchNorms folded as psq-tvm folds them, one default compile (its PIM layers, tiled), the ONNX
    initializers of those layers, the uniform crossbar counts, and the float reference on these items."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def prepare(workload: str, preset: str = "isaac", items: int | None = None, quick: bool = False) -> Context:
    """Set up a sweep of ``workload`` on ``preset`` (``items``: a deterministic subset) -- see :class:`Context`.

    The float reference is cached in ``.cache/sweep/<tag>/float.npz``, the rows by weights (``evaluate``)."""
    import onnx
    import psq_tvm
    from psq_tvm.core.quant import uniform_crossbars

    wl = W.get_workload(workload)
    onnx_path = wl.onnx_path()
    onnx_model = onnx.load(str(onnx_path))
    has_bn = any(n.op_type == "BatchNormalization" for n in onnx_model.graph.node)
    # psq-tvm folds BatchNorm into the convs on import, so the PIM weights are the folded ones: evaluate
    # (float reference included) on the same folding of the model (unchanged for models without BN)
    from psq_tvm.frontend.onnx_import import fold_batchnorm
    onnx_model = fold_batchnorm(onnx_model)
    idx = subset_workload(wl, items) if items else None
    tag = f"{workload}_{preset}" + ("_quick" if quick else (f"_n{items}" if idx is not None else ""))
    cache_dir = SWEEP_CACHE / tag
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"{tag}: {wl.num_items} items")

    # 1. one compile -> the PIM layers, tiled (the tiles do not depend on the search settings; fixed ones keep
    #    this compile cheap and independent of the compiler's defaults)
    t0 = time.perf_counter()
    pkg = psq_tvm.compile(str(onnx_path), target="pim-psq", preset=preset,
                          input_shapes={k: list(v) for k, v in wl.input_shapes.items()}, **PREPARE_SEARCH)
    compile_s = time.perf_counter() - t0
    qr0 = pkg.quant_result
    tiles, spec = qr0.tiles, qr0.spec
    mapping = M.match_initializers(onnx_model, tiles.layers)
    log(f"compiled in {compile_s:.1f} s: {len(tiles.layers)} PIM layers, {tiles.n_tiles} tiles, "
        f"{pkg.report.get('n_host_layers')} weight layers on host")
    u16, u8 = uniform_crossbars(tiles, spec, 16), uniform_crossbars(tiles, spec, 8)

    # float reference on exactly these items
    ref_f = cache_dir / "float.npz"
    reuse = None
    if not ref_f.exists() and idx is None and not has_bn:
        # no BatchNorm: the model run here is the workload's own export, whose float-TVM outputs the workload
        # caches (``python scripts/eval/workloads``; same import, same build): take them instead of a re-run
        reuse = wl.reference_outputs(compute=False)
    if ref_f.exists():
        z = np.load(ref_f)
        ref, float_run_s = z["out"], float(z["run_s"])
    elif reuse is not None:
        ref, float_run_s = reuse, 0.0
        np.savez(ref_f, out=ref, run_s=float_run_s)
        log(f"float reference: the workload's cached float-TVM outputs ({wl._ref_path().name})")
    else:
        t0 = time.perf_counter()
        ref = wl._concat(wl.run_tvm(onnx_model))
        float_run_s = time.perf_counter() - t0
        np.savez(ref_f, out=ref, run_s=float_run_s)
    fm = wl.metrics([ref], reference=ref)
    log(f"float: {wl.primary_metric} = {fm[wl.primary_metric]:.4f} ({float_run_s:.0f} s)")
    return Context(workload=workload, preset=preset, wl=wl, onnx_path=onnx_path, onnx_model=onnx_model, idx=idx,
                   tag=tag, cache_dir=cache_dir, pkg=pkg, compile_s=compile_s, tiles=tiles, spec=spec,
                   mapping=mapping, u16=u16, u8=u8, ref=ref, float_run_s=float_run_s, fm=fm)


def method_row(ctx: Context, res) -> tuple[dict, bool]:
    """Evaluate one method's result (weight-only, TVM host build, cached by weights) -> (row, cached)."""
    m, run_s, cached, key = evaluate(ctx.wl, ctx.onnx_model, ctx.mapping, res, ctx.ref, ctx.cache_dir, "")
    row = {"method": res.name, "family": res.family, "config": res.config, "crossbars": res.crossbars,
           "reduction_vs_u16": ctx.u16 / res.crossbars, "reduction_vs_u8": ctx.u8 / res.crossbars,
           "avg_bits": res.avg_bits, "search_seconds": round(res.search_seconds, 3),
           "scale_values": res.scale_values, "note": res.note, "metrics": m,
           "run_seconds": round(run_s, 1), "weights_md5": key}
    row["negligible_loss"] = primary_ok(ctx.workload, m, ctx.fm)
    return row, cached


def baseline_row(ctx: Context, method: str = "rtn8-channel") -> tuple[dict, bool]:
    """The sweep's row of one baseline method (``baseline_methods``), e.g. the issue-6 reference ``rtn8-channel``."""
    thunks = dict(baseline_methods(ctx.tiles, ctx.spec))
    if method not in thunks:
        raise SystemExit(f"sweep: unknown baseline {method!r}; choose from {', '.join(thunks)}")
    return method_row(ctx, thunks[method]())



def run_sim(wl, args, onnx_path, spec_name, points, weight_rows, ref_full, idx_sim):
    """Full-simulator rows: compile each point, run mode='sim' (and 'fake-quant') on the sim subset."""
    import psq_tvm
    from psq_tvm.runtime.simulator import SimOptions

    X = np.concatenate([wl.feed(x)[wl.input_name] for x, _ in wl.batches()])[: wl.num_items]
    labels = wl.labels
    if idx_sim is not None:
        X, labels = X[idx_sim], labels[idx_sim]
    rows = []
    for obj, gran, budget in points:
        t0 = time.perf_counter()
        pkg = psq_tvm.compile(str(onnx_path), target="pim-psq", preset=spec_name, objective=obj, granularity=gran,
                              budget=budget, input_shapes={k: list(v) for k, v in wl.input_shapes.items()})
        tc = time.perf_counter() - t0
        spec = pkg.quant_result.spec
        r = {"objective": obj, "granularity": gran, "budget": budget, "compile_s": round(tc, 2),
             "crossbars": int(pkg.quant_result.crossbars), "act_bits": spec.act_bits, "adc_bits": spec.adc_bits,
             "items": int(len(X)), "subset": idx_sim is not None}
        for mode in ("sim", "fake-quant"):
            t0 = time.perf_counter()
            y = pkg.run_batched(X, mode=mode, sim_options=SimOptions(seed=0) if mode == "sim" else None)
            dt = time.perf_counter() - t0
            pred = y.argmax(1)
            r[mode] = {"top1": float((pred == labels).mean()), "seconds": round(dt, 1)}
            refp = (ref_full if idx_sim is None else ref_full[idx_sim]).argmax(1)
            r[mode]["agree_top1"] = float((pred == refp).mean())
            log(f"  sim point {obj}/{gran}/{budget}: {mode} top1 {r[mode]['top1']:.4f} ({dt:.0f} s)")
        # weight-only figure (TVM host build) of the same point on the same items
        name = f"psq-{obj}{'-column' if gran == 'column' else ''} {budget}"
        wr = weight_rows.get(name)
        if wr is not None and "_out" in wr:
            out = wr["_out"] if idx_sim is None else wr["_out"][idx_sim]
            r["weight_only_tvm"] = {"top1": float((out.argmax(1) == labels).mean())}
            r["float_tvm"] = {"top1": float(((ref_full if idx_sim is None else ref_full[idx_sim]).argmax(1)
                                             == labels).mean())}
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", choices=list(CRITERIA))
    ap.add_argument("--preset", default="isaac")
    ap.add_argument("--quick", action="store_true", help="fewer budgets, 1000-item subset")
    ap.add_argument("--items", type=int, default=None, help="deterministic subset of the evaluation set")
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    ap.add_argument("--reductions", default=None, help="comma list, default 3,3.5,4,4.5,5,6")
    ap.add_argument("--families", default="all",
                    help=f"comma list of PSQ families to run (default all: {','.join(PSQ_FAMILIES)})")
    ap.add_argument("--no-tolerance", action="store_true")
    ap.add_argument("--no-baselines", action="store_true", help="skip the uniform/RTN/HQQ rows (use with --merge)")
    ap.add_argument("--merge", action="store_true",
                    help="add the rows of this run to the existing JSON of the same workload/preset: rows of the "
                    "same method are replaced, the others kept (and so are its sim rows if this run has none)")
    ap.add_argument("--sim-items", type=int, default=None, help="items for the full-simulator rows (default all)")
    ap.add_argument("--sim-points", default="mse:tile:reduction=4,mse:tile:reduction=3.5,mse:column:reduction=4",
                    help="objective:granularity:budget,...; 'none' to skip")
    args = ap.parse_args(argv)

    import psq_tvm
    from psq_tvm.core.allocation import BudgetError

    t_start = time.perf_counter()
    ctx = prepare(args.workload, args.preset, args.items or (1000 if args.quick else None), args.quick)
    wl, onnx_path, pkg = ctx.wl, ctx.onnx_path, ctx.pkg
    idx, tag, cache_dir, compile_s = ctx.idx, ctx.tag, ctx.cache_dir, ctx.compile_s
    tiles, spec, u16, u8 = ctx.tiles, ctx.spec, ctx.u16, ctx.u8
    ref, fm = ctx.ref, ctx.fm
    rows = [{"method": "float", "family": "float", "crossbars": None, "reduction_vs_u16": None,
             "reduction_vs_u8": None, "avg_bits": 32.0, "search_seconds": 0.0, "metrics": fm,
             "run_seconds": round(ctx.float_run_s, 1)}]

    reductions = QUICK_REDUCTIONS if args.quick else REDUCTIONS
    if args.reductions:
        reductions = tuple(float(x) for x in args.reductions.split(","))
    fams = PSQ_FAMILIES if args.families == "all" else tuple(args.families.split(","))
    for f in fams:
        parse_family(f)
    tols = {} if args.no_tolerance else TOLERANCES
    tols = {k: tols.get(k, ()) for k in ("mse", "cdf-kl")}
    _imp_cache: dict = {}

    def importance(obj, gran, kind):
        """Per-tile sensitivity weights for a family (computed once per key)."""
        from psq_tvm.core.sensitivity import input_weighted_importance
        from psq_tvm.targets.input_stats import output_sensitivity
        key = (kind,) if kind in ("sens", "bnsens") else ("osens", obj, gran)
        if key not in _imp_cache:
            t0 = time.perf_counter()
            if kind in ("sens", "bnsens"):          # input second moments: synthetic / BatchNorm
                stats = input_stats("synthetic" if kind == "sens" else "bn")
                _imp_cache[key] = input_weighted_importance(tiles, [None if st is None else st[1] for st in stats])
            else:
                probe = psq_tvm.psq_search(tiles.layers, spec, tiles=tiles, budget=OSENS_PROBE,
                                           config=psq_tvm.SearchConfig(objective=obj, granularity=gran))
                f = output_sensitivity(pkg, probe)
                _imp_cache[key] = np.ones(tiles.n_tiles) if f is None else f[tiles.layer]
            log(f"sensitivity {key}: {time.perf_counter() - t0:.1f} s")
        return _imp_cache[key]

    def input_stats(kind):
        """Input statistics per PIM layer ('synthetic' or 'bn'; computed once each)."""
        if ("stats", kind) not in _imp_cache:
            from psq_tvm.targets.input_stats import layer_input_stats
            st = layer_input_stats(pkg, kind, pkg.bn_stats)
            log(f"input statistics ({kind}): {sum(s is not None for s in st)} of {len(st)} PIM layers")
            _imp_cache[("stats", kind)] = st
        return _imp_cache[("stats", kind)]

    weight_rows = {}
    for name, thunk in method_list(tiles, spec, reductions, tols, args.quick, fams, importance, input_stats):
        if args.no_baselines and name is not None:
            continue
        try:
            res = thunk()
        except BudgetError as e:          # e.g. reduction=5 on a preset whose 2-bit floor is 4x
            log(f"skipped: {e}")
            continue
        row, cached = method_row(ctx, res)
        rows.append(row)
        z = np.load(cache_dir / f"{row['weights_md5']}.npz")
        weight_rows[res.name] = dict(row, _out=z["out"])
        log(f"{res.name:32s} xb {res.crossbars:5d} ({u16 / res.crossbars:4.2f}x) bits {res.avg_bits:5.2f} "
            f"{wl.primary_metric} {row['metrics'][wl.primary_metric]:.4f} "
            f"{'ok' if row['negligible_loss'] else '--'} "
            f"search {res.search_seconds:.2f} s run {row['run_seconds']:.0f} s{' (cached)' if cached else ''}")

    sim_rows = []
    if args.sim_points != "none" and len(wl.input_names) == 1:
        points = [tuple(p.split(":", 2)) for p in args.sim_points.split(",")]
        idx_sim = None
        if args.sim_items and args.sim_items < wl.num_items:
            idx_sim = np.linspace(0, wl.num_items - 1, args.sim_items).round().astype(int)
        sim_rows = run_sim(wl, args, onnx_path, args.preset, points, weight_rows, ref, idx_sim)

    out = {"workload": args.workload, "preset": args.preset, "spec": spec.to_dict(), "quick": args.quick,
           "items": wl.num_items, "subset": idx is not None, "primary_metric": wl.primary_metric,
           "criterion": CRITERIA[args.workload][3], "pim_layers": [l.name for l in tiles.layers],
           "host_weight_layers": pkg.report.get("n_host_layers"), "tiles": int(tiles.n_tiles),
           "weights": int(tiles.n_weights.sum()), "crossbars_uniform16": u16, "crossbars_uniform8": u8,
           "compile_seconds": round(compile_s, 2), "rows": rows, "sim": sim_rows,
           "total_seconds": round(time.perf_counter() - t_start, 1), "png": f"{tag}.png",
           "command": "scripts/eval/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    jf = outdir / f"{tag}.json"
    if args.merge and jf.exists():
        old = json.loads(jf.read_text())
        if old.get("weights") != out["weights"] or old.get("tiles") != out["tiles"]:
            raise SystemExit(f"sweep: --merge: {jf} was made from other PIM layers/tiles; re-run without --merge")
        new_rows = {r["method"]: r for r in rows}
        merged = [new_rows.pop(r["method"], r) for r in old["rows"]]
        out["rows"] = merged + list(new_rows.values())
        out["sim"] = sim_rows or old.get("sim", [])
        out["command"] = old.get("command", "") + " ; merged: " + out["command"]
        out["total_seconds"] = round(old.get("total_seconds", 0) + out["total_seconds"], 1)
    W.write_json(jf, out)
    plot(out, outdir / f"{tag}.png")
    write_readme(outdir)
    log(f"wrote {jf} ({out['total_seconds']:.0f} s total)")
    return 0


# ------------------------------------------------------------------ outputs
FAMILY_STYLE = {"uniform-layer": ("k", "s"), "rtn-tile": ("tab:orange", "^"), "hqq-tile": ("tab:red", "v"),
                "rtn-channel": ("tab:brown", "<"), "psq-mse": ("tab:blue", "o"), "psq-cdf-kl": ("tab:green", "D"),
                "psq-mse-column": ("tab:purple", "P"), "psq-cdf-kl-column": ("tab:olive", "X"),
                "psq-mse-column-sens": ("tab:pink", "*"), "psq-cdf-kl-column-sens": ("tab:cyan", "h"),
                "psq-mse-column-osens": ("tab:gray", "p"), "psq-cdf-kl-osens": ("lime", "d"),
                "psq-mse-column-bc": ("gold", "o"), "psq-mse-column-sens-bc": ("navy", "*"),
                "psq-cdf-kl-bc": ("teal", "D"), "psq-mse-bc": ("maroon", "o"),
                "psq-mse-column-bnbc": ("darkorange", "o"), "psq-mse-column-bnsens-bnbc": ("darkgreen", "*"),
                "psq-cdf-kl-bnbc": ("crimson", "D"), "psq-mse-column-bnsens": ("slateblue", "*")}


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = res["primary_metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    f = next(r for r in res["rows"] if r["family"] == "float")
    ax.axhline(f["metrics"][key], color="gray", ls="--", lw=1, label="float")
    crit = CRITERIA[res["workload"]]
    if crit[1] == "drop":
        ax.axhline(f["metrics"][key] - crit[2], color="gray", ls=":", lw=1, label=crit[3])
    elif crit[1] == "absdiff":
        ax.axhline(f["metrics"][key] - crit[2], color="gray", ls=":", lw=1, label=crit[3])
    ax.axvline(res["crossbars_uniform16"] / PAPER_REDUCTION, color="tab:brown", ls=":", lw=1, label="3.5x vs u16")
    fams: dict = {}
    for r in res["rows"]:
        if r["family"] == "float" or (r.get("config") or {}).get("tolerance") is not None:
            continue
        fams.setdefault(r["family"], []).append(r)
    for fam, rs in fams.items():
        rs = sorted(rs, key=lambda r: r["crossbars"])
        c, mk = FAMILY_STYLE.get(fam, ("gray", "x"))
        ax.plot([r["crossbars"] for r in rs], [r["metrics"][key] for r in rs], marker=mk, color=c, label=fam,
                lw=1 if len(rs) > 1 and fam.startswith(("psq", "uniform")) else 0)
    for r in res["rows"]:
        if (r.get("config") or {}).get("tolerance") is not None:
            c, mk = FAMILY_STYLE.get(r["family"], ("gray", "x"))
            ax.scatter([r["crossbars"]], [r["metrics"][key]], marker=mk, facecolors="none", edgecolors=c)
    lo = f["metrics"][key]
    vals = [r["metrics"][key] for r in res["rows"]]
    spread = max(lo - min(vals), 1e-3)
    ax.set_ylim(max(min(vals), lo - 4 * max(crit[2], spread / 4)) - 0.1 * spread / 4, max(vals) + 0.1 * spread)
    ax.set_xscale("log")
    ax.set_xlabel(f"occupied crossbars ({res['preset']}, log)")
    ax.set_ylabel(key)
    ax.set_title(f"{res['workload']} ({res['preset']}): {key} vs crossbars (weight-only, TVM host build)\n"
                 "open markers: tolerance mode", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_metric(wl: str, m: dict, f: dict, key: str) -> tuple[str, str]:
    if key == "top1" and not wl.startswith("efficientnet"):
        return f"{100 * m['top1']:.2f} %", f"{100 * (m['top1'] - f['top1']):+.2f} pp"
    if wl.startswith("efficientnet"):
        return (f"agree {100 * m['agree_top1']:.1f} % ({m['agree_top1_count']}/{m['n']}), conf "
                f"{100 * m['agree_top1_confident']:.1f} %, top5 {100 * m['agree_top5']:.1f} %, KL "
                f"{m['kl_mean']:.4f}, labelled top-1 {100 * m['top1']:.0f} %",
                f"{100 * (m['agree_top1'] - 1):+.1f} pp agree")
    return f"{m[key]:.4f}", f"{m[key] - f[key]:+.4f}"


def summary_lines(res: dict) -> list[str]:
    wl = res["workload"]
    fams: dict = {}
    for r in res["rows"]:
        if r["family"] != "float":
            fams.setdefault(r["family"], []).append(r)
    out = [f"Largest reduction vs uniform 16-bit with negligible loss ({res['criterion']}), per family "
           "(monotone reading: that point and every point of the family at a smaller reduction meet the "
           "criterion; tolerance-mode rows not counted; an isolated passing point further out is listed "
           "separately):", ""]
    for fam, rs in fams.items():
        rs = sorted(rs, key=lambda r: r["reduction_vs_u16"])
        rs = [r for r in rs if (r.get("config") or {}).get("tolerance") is None]   # budget-mode points
        ok_prefix = []
        for r in rs:
            if not r.get("negligible_loss"):
                break
            ok_prefix.append(r)
        best = ok_prefix[-1] if ok_prefix else None
        rest = [r for r in rs[len(ok_prefix):] if r.get("negligible_loss")]
        isolated = rest[-1] if rest else None
        if best is None:
            line = f"* `{fam}`: none of its points meets the criterion"
        else:
            red = best["reduction_vs_u16"]
            beats = "beats" if red > PAPER_REDUCTION + 0.01 else (
                "reaches" if red >= PAPER_REDUCTION - 0.01 else "does NOT reach")
            line = (f"* `{fam}`: **{red:.2f}x** (`{best['method']}`, {best['crossbars']} crossbars) "
                    f"-- {beats} the paper's 3.5x")
        if isolated is not None:
            line += f"; isolated pass further out: `{isolated['method']}` ({isolated['reduction_vs_u16']:.2f}x)"
        out.append(line)
    # equal-crossbar comparison with RTN / HQQ
    base = {r["method"]: r for r in res["rows"] if r["family"] in ("rtn-tile", "hqq-tile")}
    if base:
        out += ["", "At equal crossbars (PSQ budget `crossbars=N` = the RTN-4 / HQQ-4 count):", ""]
        n4 = base.get("rtn4-tile", {}).get("crossbars")
        for r in res["rows"]:
            if r.get("config", {}) and r["config"].get("budget") == f"crossbars={n4}" or r["method"] in base:
                v, d = _fmt_metric(wl, r["metrics"], res["rows"][0]["metrics"], res["primary_metric"])
                out.append(f"* `{r['method']}` ({r['crossbars']} xb): {v} ({d})")
    return out


def write_readme(outdir: Path) -> None:
    files = sorted(outdir.glob("*.json"))
    order = {k: i for i, k in enumerate(["mnist_digits", "fashion", "minilm_lee", "minilm_wordsim", "efficientnet", "efficientnet_bn"])}
    results = [json.loads(f.read_text()) for f in files]
    results = [r for r in results if "primary_metric" in r]     # sweep results only (not ablation / ADC JSONs)
    results.sort(key=lambda r: (r.get("quick", False), order.get(r["workload"], 99), r["preset"] != "isaac",
                                r["preset"]))
    L = ["# Evaluation sweep: accuracy against occupied crossbars", "",
         "Generated by `scripts/eval/sweep.py` (do not edit by hand; re-run the sweep). Every method quantises",
         "the same PIM layers with the same tiles (those of `psq_tvm.compile(..., target=\"pim-psq\")`) and is",
         "counted by the same packer. Weight-only accuracy: the PIM layers' ONNX initializers replaced by the",
         "method's fake-quantised weights, run through the workload's TVM host build. Reductions are",
         "uniform-16-bit (resp. 8-bit) crossbars / the method's crossbars. HQQ is asymmetric (scale + zero",
         "point per tile) and is counted as uniform 4-bit tiles. `rtn8-channel` = one max-abs scale per",
         "output channel of the layer at 8 bits (issue 6's reference; counted as uniform 8-bit tiles).",
         "`psq-<objective>-column` = one scale per tile column (issue 6); `-sens` = tile distortions weighted",
         "by data-free input statistics (`--psq-sensitivity synthetic`; `-bnsens`: from the model's BatchNorms,",
         "`bn`); `-bc` / `-bnbc` = data-free bias correction from synthetic / BatchNorm input means",
         "(`--psq-bias-correction synthetic|bn`). Tolerance-mode rows are marked `tol=`.", ""]
    reading = outdir / "reading.md"          # hand-written reading of the evidence, kept across re-runs
    if reading.exists():
        L += [reading.read_text().rstrip(), ""]
    for res in results:
        wl = res["workload"]
        res["criterion"] = CRITERIA[wl][3]
        for r in res["rows"][1:]:      # re-judge with the current criterion
            r["negligible_loss"] = primary_ok(wl, r["metrics"], res["rows"][0]["metrics"])
        title = f"## {wl} -- {res['preset']}" + (" (QUICK: subset, fewer budgets)" if res.get("quick") else "")
        L += [title, "",
              f"{res['items']} items{' (deterministic subset)' if res.get('subset') else ''}; "
              f"{len(res['pim_layers'])} PIM layers, {res['tiles']} tiles, {res['weights']:,} weights; "
              f"{res.get('host_weight_layers')} weight layers left on host. Uniform 16-bit = "
              f"{res['crossbars_uniform16']} crossbars, uniform 8-bit = {res['crossbars_uniform8']}. "
              f"Command: `{res['command']}` ({res['total_seconds']:.0f} s).", "",
              f"![{wl} {res['preset']}]({Path(res.get('png', wl + '_' + res['preset'] + '.png')).name})", "",
              "| method | crossbars | vs u16 | vs u8 | avg bits | search s | metric | delta vs float | negligible |",
              "|---|---|---|---|---|---|---|---|---|"]
        f = res["rows"][0]["metrics"]
        for r in res["rows"]:
            v, d = _fmt_metric(wl, r["metrics"], f, res["primary_metric"])
            if r["family"] == "float":
                L.append(f"| float | - | - | - | 32 | - | {v} | - | - |")
                continue
            L.append(f"| {r['method']} | {r['crossbars']} | {r['reduction_vs_u16']:.2f}x | {r['reduction_vs_u8']:.2f}x "
                     f"| {r['avg_bits']:.2f} | {r['search_seconds']:.2f} | {v} | {d} | "
                     f"{'yes' if r.get('negligible_loss') else 'no'} |")
        L += [""] + summary_lines(res) + [""]
        if res.get("sim"):
            L += ["Full simulator (8-bit activations, the preset's ADC) next to weight-only:", "",
                  "| PSQ point | crossbars | items | float | weight-only (TVM) | fake-quant (runtime) | full sim | sim s |",
                  "|---|---|---|---|---|---|---|---|"]
            for s in res["sim"]:
                fo = s.get("float_tvm", {}).get("top1")
                wo = s.get("weight_only_tvm", {}).get("top1")
                pct = lambda x: "-" if x is None else f"{100 * x:.2f} %"  # noqa: E731
                L.append(f"| {s['objective']}/{s['granularity']} {s['budget']} | {s['crossbars']} | "
                         f"{s['items']}{' (subset)' if s['subset'] else ''} | {pct(fo)} | {pct(wo)} | "
                         f"{pct(s['fake-quant']['top1'])} | {pct(s['sim']['top1'])} (act {s['act_bits']} b, "
                         f"ADC {s['adc_bits']} b) | {s['sim']['seconds']:.0f} |")
            L.append("")
    W.write_text(outdir / "README.md", "\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
