#!/usr/bin/env python3
"""The defaults evidence table: what ``tvmc compile --target pim-psq`` does with NO options, per workload.

    PYTHONPATH=. .venv/bin/python scripts/eval/defaults_table.py [WORKLOADS...] [--out docs/results] \\
        [-- tvmc compile options]

For each workload (default: fashion, mnist_digits, efficientnet, efficientnet_bn, minilm_lee, minilm_wordsim,
orientation, orientation_folded):

1. ``tvmc compile --target pim-psq MODEL --input-shapes ...`` and nothing else, unless options are given
   after ``--`` (``package_run.compile_workload``, the same code as ``end_to_end.py``); the package's report
   gives the crossbars and the reduction vs uniform 16-bit the defaults chose (and its ``fidelity`` section,
   if the report has one);
2. the package over the whole workload in ``fake-quant`` mode (crossbar weights, float activations), its
   metrics against the float model;
3. the ``rtn8-channel`` reference (one max-abs scale per output channel at 8 bits) on the same workload,
   tiles and float reference, with ``sweep.py``'s own code and caches (``sweep.prepare`` / ``baseline_row``).

The float reference of both columns is the sweep's: the workload's ONNX with its BatchNorms folded as psq-tvm
folds them, run through the TVM host build (``.cache/sweep/<workload>_<preset>/float.npz``).

Pass = at least ``rtn8-channel``'s quality: classifiers judged by agreement (EfficientNet, orientation):
top-1 agreement >= the reference's and KL <= the reference's; fashion / mnist_digits: top-1 accuracy within
0.3 pt of float; minilm_lee / minilm_wordsim: Spearman within 0.005 of float.

Writes ``<out>/defaults.json`` and ``<out>/defaults.md`` (atomically).  Resumable: every workload's result is
cached in ``scripts/eval/.cache/defaults/`` keyed by workload + options + package digest (the reference by
workload + preset + ONNX + psq_tvm source), compiled packages in ``.cache/packages/``; a re-run after a crash or
with unchanged code only re-does what is missing.  Rows of an earlier run with the same options and the same
psq_tvm source are kept in the table when a run names only some workloads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import package_run as P  # noqa: E402
import sweep as S  # noqa: E402
import workloads as W  # noqa: E402

DEFAULT_WORKLOADS = ("fashion", "mnist_digits", "efficientnet", "efficientnet_bn", "minilm_lee", "minilm_wordsim",
                     "orientation", "orientation_folded")
CACHE = W.CACHE / "defaults"
REFERENCE = "rtn8-channel"
ACC_DROP = 0.003          # fashion / mnist_digits: top-1 within 0.3 pt of float
SPEARMAN_DROP = 0.005     # minilm_lee / minilm_wordsim


def kind_of(workload: str, metrics: dict) -> str:
    """How a workload is judged: 'accuracy' (drop vs float), 'spearman' (drop vs float) or 'agreement'
    (top-1 agreement and KL vs the reference)."""
    if workload in ("fashion", "mnist_digits", "mnist_digits_pad4"):
        return "accuracy"
    if "spearman" in metrics:
        return "spearman"
    return "agreement"


def passes(kind: str, m: dict, f: dict, ref: dict) -> bool:
    if kind == "accuracy":
        return f["top1"] - m["top1"] <= ACC_DROP + 1e-12
    if kind == "spearman":
        return f["spearman"] - m["spearman"] <= SPEARMAN_DROP + 1e-12
    return m["agree_top1"] >= ref["agree_top1"] - 1e-12 and m["kl_mean"] <= ref["kl_mean"] + 1e-12


def _kl(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 or x == 0 else f"{x:.1e}"


def quality_text(kind: str, m: dict, f: dict) -> str:
    if kind == "accuracy":
        return (f"top-1 {100 * m['top1']:.2f} % ({100 * (m['top1'] - f['top1']):+.2f} pt vs float "
                f"{100 * f['top1']:.2f} %); agree {100 * m['agree_top1']:.2f} %, KL {_kl(m['kl_mean'])}")
    if kind == "spearman":
        return f"Spearman {m['spearman']:.4f} ({m['spearman'] - f['spearman']:+.4f} vs float {f['spearman']:.4f})"
    cnt = f" ({m['agree_top1_count']}/{m['n']})" if "agree_top1_count" in m else ""
    acc = f"; accuracy {100 * m['top1']:.2f} % (float {100 * f['top1']:.2f} %)" if "top1" in m else ""
    return f"agree {100 * m['agree_top1']:.2f} %{cnt}, KL {_kl(m['kl_mean'])}{acc}"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def preset_of(tvmc_args) -> str:
    from psq_tvm.core.crossbar import DEFAULT_PRESET

    for i, a in enumerate(tvmc_args):
        if a == "--target-pim-psq-preset" and i + 1 < len(tvmc_args):
            return tvmc_args[i + 1]
        if a.startswith("--target-pim-psq-preset="):
            return a.split("=", 1)[1]
    return DEFAULT_PRESET


def reference(workload: str, preset: str, rerun: bool = False) -> dict:
    """The rtn8-channel row and the float metrics of ``workload`` (sweep code; cached here and in the sweep cache)."""
    import numpy as np

    wl = W.get_workload(workload)
    key = _key(workload, preset, P._file_sha(wl.onnx_path()), P.psq_tvm_source_digest(), REFERENCE)
    f = CACHE / f"{workload}.{REFERENCE}.{key}.json"
    ref_npz = S.SWEEP_CACHE / f"{workload}_{preset}" / "float.npz"
    if f.exists() and ref_npz.exists() and not rerun:
        r = json.loads(f.read_text())
        r["ref_outputs"] = np.load(ref_npz)["out"]
        r["cached"] = True
        return r
    t0 = time.perf_counter()
    ctx = S.prepare(workload, preset)
    row, cached = S.baseline_row(ctx, REFERENCE)
    r = {"workload": workload, "preset": preset, "spec": ctx.spec.to_dict(), "float_metrics": ctx.fm,
         "float_run_s": round(ctx.float_run_s, 1), "crossbars_uniform16": ctx.u16, "crossbars_uniform8": ctx.u8,
         "row": {k: v for k, v in row.items() if k != "scale_values"}, "seconds": round(time.perf_counter() - t0, 1)}
    CACHE.mkdir(parents=True, exist_ok=True)
    W.write_json(f, r)
    r["ref_outputs"] = ctx.ref
    r["cached"] = False
    return r


def package_fields(pkg) -> dict:
    """What the package says about itself: search settings, crossbars and reduction (report), fidelity (if the
    report has that section), how many PIM layers got a bias correction, how many weight layers stayed on host."""
    rep = pkg.report
    search = pkg.manifest.get("search", {})
    layers = pkg.manifest.get("layers", [])
    return {
        "search": {k: search.get(k) for k in ("objective", "granularity", "budget", "tolerance", "sensitivity",
                                              "bias_correction", "bits", "note") if k in search},
        "crossbars": rep.get("crossbars", {}).get("psq"),
        "crossbars_uniform16": rep.get("crossbars", {}).get("uniform16"),
        "reduction_vs_u16": rep.get("reduction_vs_uniform16"),
        "fidelity": rep.get("fidelity"),
        "pim_layers": len(layers),
        "bias_corrected_layers": sum(1 for e in layers if e.get("bias_correction")),
        "host_weight_layers": rep.get("n_host_layers"),
    }


def evaluate(workload: str, tvmc_args, recompile: bool = False, rerun: bool = False) -> dict:
    wl = W.get_workload(workload)
    t_start = time.perf_counter()
    preset = preset_of(tvmc_args)
    ref = reference(workload, preset, rerun)
    S.log(f"{workload}: float {json.dumps({k: ref['float_metrics'][k] for k in ('top1', 'agree_top1', 'spearman') if k in ref['float_metrics']})}; "
          f"{REFERENCE} {ref['row']['crossbars']} crossbars{' (cached)' if ref['cached'] else ''}")
    pkg, compile_s, pkg_cached = P.compile_workload(wl, tvmc_args, recompile=recompile)
    digest = P.package_digest(pkg)
    f = CACHE / f"{workload}.{_key(workload, list(tvmc_args), digest, REFERENCE)}.json"
    if f.exists() and not rerun:
        r = json.loads(f.read_text())
        r.update(package_fields(pkg))          # read from the package every time (e.g. a report section added later)
        S.log(f"{workload}: result from the cache ({f.name})")
        return r
    t0 = time.perf_counter()
    out = P.run_package(pkg, wl, "fake-quant")
    run_s = time.perf_counter() - t0
    m = wl.metrics([out], reference=ref["ref_outputs"])
    fm = ref["float_metrics"]
    kind = kind_of(workload, fm)
    rm = ref["row"]["metrics"]
    spec_same = pkg.manifest.get("spec") == ref["spec"]
    r = {
        "workload": workload, "items": wl.num_items, "tvmc_args": list(tvmc_args),
        "command": " ".join(["tvmc"] + P.tvmc_command(wl, tvmc_args, "model.tar")[1:]),
        "preset": preset, "package_digest": digest, "psq_tvm_source": P.psq_tvm_source_digest(),
        **package_fields(pkg),
        "kind": kind, "metrics": m, "float_metrics": fm,
        "reference": {"method": REFERENCE, "crossbars": ref["row"]["crossbars"],
                      "reduction_vs_u16": ref["row"]["reduction_vs_u16"], "metrics": rm,
                      "same_spec_as_package": spec_same},
        "pass": passes(kind, m, fm, rm),
        "reference_pass": passes(kind, rm, fm, rm),
        "seconds": {"compile": round(compile_s, 1), "compile_cached": pkg_cached, "fake_quant_run": round(run_s, 1),
                    "float_reference_run": ref["float_run_s"], "reference_setup": ref.get("seconds"),
                    "this_run": round(time.perf_counter() - t_start, 1)},
    }
    if not spec_same:
        S.log(f"{workload}: WARNING the package's crossbar spec differs from the {preset!r} preset the "
              f"{REFERENCE} reference uses (spec options after --?)")
    CACHE.mkdir(parents=True, exist_ok=True)
    W.write_json(f, r)
    return r


def _fmt_search(r: dict) -> str:
    import re

    s = r["search"]
    parts = [s.get("objective"), f"per {s.get('granularity')}"]
    budget = s.get("budget")
    if not budget and s.get("tolerance") is None:          # the default budget: the manifest keeps None
        mt = re.search(r"budget (\S+)", s.get("note") or "")
        budget = f"{mt.group(1)} (default)" if mt else "default budget"
    parts.append(budget or f"tolerance={s['tolerance']}")
    if s.get("sensitivity") not in (None, "none"):
        parts.append(f"sensitivity {s['sensitivity']}")
    if s.get("bias_correction") not in (None, "none"):
        n = r.get("bias_corrected_layers")
        parts.append(f"bias corr. {s['bias_correction']}"
                     + (f" ({n} of {r.get('pim_layers')} PIM layers)" if n is not None else ""))
    if s.get("bits"):
        parts.append(f"bits {s['bits']}")
    return ", ".join(str(p) for p in parts if p)


def _fmt_fidelity(fid) -> str:
    """The report's fidelity section in a table cell: its numeric and boolean entries, nested dicts flattened one
    level (``output.sqnr_db``); lists and texts are left out (the whole section is in the JSON)."""
    if not fid:
        return "-"
    if not isinstance(fid, dict):
        return str(fid)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    ok = lambda k, v: isinstance(v, (int, float, bool)) and not k.endswith("_items") and k != "samples"  # noqa: E731
    out = []
    for k, v in sorted(fid.items()):
        if isinstance(v, dict):
            out += [f"{k}.{k2} {fmt(v2)}" for k2, v2 in sorted(v.items()) if ok(k2, v2)]
        elif ok(k, v):
            out.append(f"{k} {fmt(v)}")
    return ", ".join(out) or "(see defaults.json)"


def geomean(xs) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def write_outputs(out_dir: Path, rows: list[dict], tvmc_args, argv) -> None:
    g = geomean([r["reduction_vs_u16"] for r in rows])
    g_ref = geomean([r["reference"]["reduction_vs_u16"] for r in rows])
    opts = " ".join(tvmc_args) if tvmc_args else "(none)"
    data = {"what": "defaults evidence table (scripts/eval/defaults_table.py)", "tvmc_args": list(tvmc_args),
            "command": " ".join(["scripts/eval/defaults_table.py"] + argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "reference": REFERENCE, "geomean_reduction_vs_u16": g, "geomean_reference_reduction_vs_u16": g_ref,
            "passed": sum(r["pass"] for r in rows), "workloads": len(rows), "rows": rows}
    W.write_json(out_dir / "defaults.json", data)
    any_fid = any(r.get("fidelity") for r in rows)
    L = ["# Defaults: what `tvmc compile --target pim-psq` chooses with no options", "",
         "Generated by `scripts/eval/defaults_table.py` (do not edit by hand). Each workload is compiled with "
         f"`tvmc compile --target pim-psq MODEL --input-shapes ...` and {'no other option' if not tvmc_args else f'the options `{opts}`'}; "
         "the package then runs over the whole workload in `fake-quant` mode (crossbar weights, float activations) "
         f"and is compared with the float model. `{REFERENCE}` = one max-abs scale per output channel at 8 bits "
         "on the same tiles (the sweep's reference, `scripts/eval/sweep.py`), on the same items against the same "
         "float reference. Reductions are vs uniform 16-bit. Pass = at least the reference's quality: top-1 "
         f"agreement ≥ and KL ≤ the reference's (EfficientNet, orientation); top-1 accuracy within "
         f"{100 * ACC_DROP:.1f} pt of float (fashion, mnist_digits); Spearman within {SPEARMAN_DROP} of float "
         "(minilm_lee, minilm_wordsim).", "",
         f"Command: `{data['command']}` ({data['date']}).", "",
         "| workload | items | default options | crossbars and reduction auto chose | quality vs float | "
         f"{REFERENCE} on the same workload (crossbars, reduction, quality) | pass? |"
         + (" fidelity (report) |" if any_fid else ""),
         "|---|---|---|---|---|---|---|" + ("---|" if any_fid else "")]
    for r in rows:
        ref = r["reference"]
        fm = r["float_metrics"]
        line = (f"| {r['workload']} | {r['items']} | {opts}: {_fmt_search(r)} | "
                f"{r['crossbars']} of {r['crossbars_uniform16']} ({r['reduction_vs_u16']:.2f}x)"
                + (f"; {r['host_weight_layers']} weight layers on host" if r.get("host_weight_layers") else "") + " | "
                f"{quality_text(r['kind'], r['metrics'], fm)} | "
                f"{ref['crossbars']} ({ref['reduction_vs_u16']:.2f}x), {quality_text(r['kind'], ref['metrics'], fm)} | "
                f"{'**yes**' if r['pass'] else '**no**'} |")
        if not ref.get("same_spec_as_package", True):
            line = line[:-len(" |")] + " (NB: the reference is on the preset's spec, the package's differs) |"
        if any_fid:
            line += f" {_fmt_fidelity(r.get('fidelity'))} |"
        L.append(line)
    L += ["", f"Geometric mean of the reductions: **{g:.2f}x** (auto) vs {g_ref:.2f}x ({REFERENCE}); "
              f"{data['passed']} of {len(rows)} workloads pass.", "",
          "Time per workload (s, measured by the run that computed the row, on a shared 2-core machine; compile = "
          "`tvmc compile`, fake-quant = the package over the whole workload, float reference = the TVM float run "
          "of the BatchNorm-folded model, reference setup = the sweep's in-process compile + float run + rtn8 run; "
          "total = the whole row):", "",
          "| workload | compile | fake-quant run | float reference run | reference setup | total |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        fl = s["float_reference_run"]
        fl = "cached" if not fl else fl
        L.append(f"| {r['workload']} | {s['compile']}{' (cached package)' if s.get('compile_cached') else ''} | "
                 f"{s['fake_quant_run']} | {fl} | {s.get('reference_setup') or 'cached'} | {s['this_run']} |")
    W.write_text(out_dir / "defaults.md", "\n".join(L) + "\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tvmc_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workloads", nargs="*", default=list(DEFAULT_WORKLOADS),
                    help=f"default: {' '.join(DEFAULT_WORKLOADS)}")
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    ap.add_argument("--recompile", action="store_true", help="compile even when the package cache has the package")
    ap.add_argument("--rerun", action="store_true", help="ignore cached results (not the sweep's output cache)")
    args = ap.parse_args(own)
    for w in args.workloads:
        W.get_workload(w)                      # unknown names fail before any work
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = P.psq_tvm_source_digest()
    rows: dict[str, dict] = {}
    old = out_dir / "defaults.json"
    if old.exists():
        try:
            prev = json.loads(old.read_text())
            if prev.get("tvmc_args") == tvmc_args:
                rows = {r["workload"]: r for r in prev.get("rows", []) if r.get("psq_tvm_source") == src}
        except ValueError:
            pass
    failed = []
    for w in args.workloads:
        try:
            r = evaluate(w, tvmc_args, args.recompile, args.rerun)
        except Exception as e:  # noqa: BLE001 - one broken workload must not lose the others
            S.log(f"{w}: FAILED: {type(e).__name__}: {e}")
            failed.append(w)
            continue
        rows[w] = r
        S.log(f"{w}: {r['crossbars']} crossbars ({r['reduction_vs_u16']:.2f}x), "
              f"{quality_text(r['kind'], r['metrics'], r['float_metrics'])}; {REFERENCE} {r['reference']['crossbars']} "
              f"({r['reference']['reduction_vs_u16']:.2f}x), "
              f"{quality_text(r['kind'], r['reference']['metrics'], r['float_metrics'])} -> "
              f"{'PASS' if r['pass'] else 'FAIL'} ({r['seconds']['this_run']:.0f} s)")
        if r.get("fidelity"):
            S.log(f"{w}: fidelity (report): {json.dumps(r['fidelity'], sort_keys=True)}")
        order = {n: i for i, n in enumerate(list(DEFAULT_WORKLOADS) + list(W.WORKLOADS) + list(W.EXTRA_WORKLOADS))}
        write_outputs(out_dir, sorted(rows.values(), key=lambda r: order.get(r["workload"], 999)), tvmc_args, argv)
    S.log(f"wrote {out_dir / 'defaults.json'} and defaults.md ({len(rows)} workloads)"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
