#!/usr/bin/env python3
"""End to end: compile a workload with ``tvmc compile --target pim-psq`` and run the package.

    .venv/bin/python scripts/eval/end_to_end.py efficientnet_bn -- --psq-budget reduction=2.5 \\
        --psq-granularity column --psq-objective mse --psq-sensitivity bn

Everything after ``--`` goes to ``tvmc compile`` unchanged (the user's command line).  The package is
then run over the whole workload in ``float`` mode (the original weights, the reference), in
``fake-quant`` mode (crossbar weights, float activations: what the sweep's weight-only rows measure;
printed next to the sweep's row for the same search settings, if there is one) and in ``sim`` mode
(the crossbar simulator: the preset's activation bits, DAC and ADC).
This checks that the toolchain delivers the evaluation's numbers, not only the evaluation harness.
Appends its result to ``docs/results/<workload>_end_to_end.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import package_run as P  # noqa: E402
import sweep as S  # noqa: E402
import workloads as W  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tvmc_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload")
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    ap.add_argument("--recompile", action="store_true", help="compile even if the package cache has this package")
    args = ap.parse_args(own)

    wl = W.get_workload(args.workload)
    pkg, compile_s, cached = P.compile_workload(wl, tvmc_args, recompile=args.recompile)
    if cached:
        S.log(f"package from the cache (compiled in {compile_s:.0f} s)")
    from psq_tvm.runtime.simulator import SimOptions

    outs = {}
    for mode in ("float", "fake-quant", "sim"):
        t0 = time.perf_counter()
        outs[mode] = P.run_package(pkg, wl, mode, sim_options=SimOptions(seed=0) if mode == "sim" else None)
        S.log(f"{mode}: {wl.num_items} items in {time.perf_counter() - t0:.0f} s")
    m = wl.metrics([outs["fake-quant"]], reference=outs["float"])
    m_sim = wl.metrics([outs["sim"]], reference=outs["float"])
    report = pkg.report
    search = pkg.manifest["search"]
    row = {"tvmc_args": tvmc_args, "crossbars": report.get("crossbars", {}).get("psq"),
           "reduction_vs_u16": report.get("reduction_vs_uniform16"), "compile_seconds": round(compile_s, 1),
           "search": {k: search.get(k) for k in ("objective", "granularity", "budget", "sensitivity",
                                                 "bias_correction") if k in search},
           "metrics": m, "sim": {"act_bits": pkg.manifest["spec"]["act_bits"], "adc_bits": pkg.manifest["spec"]["adc_bits"],
                                  "metrics": m_sim}}
    S.log(f"package: {row['crossbars']} crossbars ({row['reduction_vs_u16']:.2f}x), "
          f"{wl.primary_metric} {m[wl.primary_metric]:.4f}, kl {m.get('kl_mean', float('nan')):.4f}; "
          f"full simulator ({row['sim']['act_bits']}-bit activations, {row['sim']['adc_bits']}-bit ADC): "
          f"{m_sim[wl.primary_metric]:.4f}, kl {m_sim.get('kl_mean', float('nan')):.4f}")
    # the sweep's row with the same settings, for comparison
    jf = Path(args.out) / f"{args.workload}_isaac.json"
    if jf.exists() and search.get("budget"):
        fam = (f"psq-{search.get('objective')}" + ("-column" if search.get("granularity") == "column" else "")
               + ({"bn": "-bnsens", "synthetic": "-sens"}.get(search.get("sensitivity"), ""))
               + ({"bn": "-bnbc", "synthetic": "-bc"}.get(search.get("bias_correction"), "")))
        name = f"{fam} {search['budget']}"
        sw = next((r for r in json.loads(jf.read_text())["rows"] if r["method"] == name), None)
        if sw is not None:
            row["sweep_row"] = {"method": name, "crossbars": sw["crossbars"], "metrics": sw["metrics"]}
            S.log(f"sweep row {name}: {sw['crossbars']} crossbars, {wl.primary_metric} "
                  f"{sw['metrics'][wl.primary_metric]:.4f}, kl {sw['metrics'].get('kl_mean', float('nan')):.4f}")
    p = Path(args.out) / f"{args.workload}_end_to_end.json"
    data = json.loads(p.read_text()) if p.exists() else {"workload": args.workload, "items": wl.num_items, "rows": []}
    data["rows"] = [r for r in data["rows"] if r["tvmc_args"] != tvmc_args] + [row]
    W.write_json(p, data)
    S.log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
