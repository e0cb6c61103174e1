#!/usr/bin/env python3
"""What the ADC costs: full-simulator accuracy against ADC bits, one workload, one preset.

    .venv/bin/python scripts/eval/adc_sweep.py [mnist_digits] [--preset prime] [--adc 6,8,10,12,none]
                                               [--ranges worst,calibrated] [--items N]

Compiles the workload once per ADC width and ADC range (default objective and budget; the ADC does
not change the search), runs the whole evaluation set through the crossbar simulator (``mode="sim"``)
and through the golden model (fake-quantised weights and activations, no ADC), and prints top-1 for
each.  ``worst``: every ADC's full scale is the tile's worst-case bitline sum,
``rows (2^dac-1)(2^cell-1)``; ``calibrated``: each crossbar's full scale as the compile chose it from
the bitline sums on data-free inputs (``--target-pim-psq-adc-range``, the default).  The compile's own
data-free estimate (the report's ``adc`` section: simulator vs golden output SQNR on synthetic inputs)
is printed next to it.  Writes ``docs/results/<workload>_<preset>_adc.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import workloads as W  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", nargs="?", default="mnist_digits")
    ap.add_argument("--preset", default="prime")
    ap.add_argument("--adc", default="6,8,10,12,none", help="comma list of ADC bits; 'none' = lossless")
    ap.add_argument("--ranges", default="worst,calibrated", help="comma list of ADC ranges (worst, calibrated)")
    ap.add_argument("--items", type=int, help="only the first N items of the evaluation set (default: all)")
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    args = ap.parse_args(argv)

    import psq_tvm
    from psq_tvm.runtime.simulator import SimOptions

    wl = W.get_workload(args.workload)
    if len(wl.input_names) != 1 or wl.labels is None:
        raise SystemExit(f"adc_sweep: {args.workload} is not a single-input labelled workload")
    n = wl.num_items if args.items is None else min(args.items, wl.num_items)
    X = np.concatenate([wl.feed(x)[wl.input_name] for x, _ in wl.batches()])[:n]
    y = np.asarray(wl.labels)[:n]
    rows = []
    golden = None
    for a in args.adc.split(","):
        adc = None if a.strip().lower() == "none" else int(a)
        for rng in ([args.ranges.split(",")[0]] if adc is None else args.ranges.split(",")):
            t0 = time.perf_counter()
            pkg = psq_tvm.compile(str(wl.onnx_path()), target="pim-psq", preset=args.preset,
                                  adc_bits="none" if adc is None else adc, adc_range=rng.strip(),
                                  input_shapes={k: list(v) for k, v in wl.input_shapes.items()})
            spec = pkg.quant_result.spec
            sim = pkg.run_batched(X, mode="sim", sim_options=SimOptions(seed=0)).argmax(1)
            g = pkg.run_batched(X, mode="golden").argmax(1)
            if golden is None:
                golden = g
            if not np.array_equal(g, golden):
                raise SystemExit("adc_sweep: golden changed between compiles (the ADC must not change the search)")
            est = pkg.report.get("adc", {}).get("sim_vs_golden", {})
            r = {"adc_bits": spec.adc_bits, "adc_range": None if adc is None else rng.strip(),
                 "lossless": bool(spec.adc_lossless()), "sim_top1": float((sim == y).mean()),
                 "golden_top1": float((golden == y).mean()), "sim_golden_agreement": float((sim == golden).mean()),
                 "compile_estimate_sqnr_db": est.get("sqnr_db"), "crossbars": int(pkg.quant_result.crossbars),
                 "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(r)
            print(f"adc {str(spec.adc_bits):>4} {str(r['adc_range']):>10}: sim top-1 {r['sim_top1']:.4f}   golden (no "
                  f"ADC) {r['golden_top1']:.4f}   sim=golden {r['sim_golden_agreement']:.4f}   compile's estimate "
                  f"{'-' if est.get('sqnr_db') is None else format(est['sqnr_db'], '.1f') + ' dB'}   "
                  f"({r['crossbars']} crossbars, {r['seconds']} s)", flush=True)
    out = {"workload": args.workload, "preset": args.preset, "items": int(len(X)), "spec": spec.to_dict(),
           "rows": rows, "command": "scripts/eval/adc_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    p = Path(args.out) / f"{args.workload}_{args.preset}_adc.json"
    W.write_json(p, out)
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
