#!/usr/bin/env python3
"""What the ADC costs: full-simulator accuracy against ADC bits, one workload, one preset.

    .venv/bin/python scripts/eval/adc_sweep.py [mnist_digits] [--preset prime] [--adc 6,8,10,12,none]

Compiles the workload once per ADC width (default objective and budget; the ADC does not change
the search), runs the whole evaluation set through the crossbar simulator (``mode="sim"``; the ADC's
full scale is the tile's worst-case bitline sum, ``rows (2^dac-1)(2^cell-1)``) and through the
golden model (fake-quantised weights and activations, no ADC), and prints top-1 for each.  Writes
``docs/results/<workload>_<preset>_adc.json``.
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
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    args = ap.parse_args(argv)

    import psq_tvm
    from psq_tvm.runtime.simulator import SimOptions

    wl = W.get_workload(args.workload)
    if len(wl.input_names) != 1 or wl.labels is None:
        raise SystemExit(f"adc_sweep: {args.workload} is not a single-input labelled workload")
    X = np.concatenate([wl.feed(x)[wl.input_name] for x, _ in wl.batches()])[: wl.num_items]
    y = wl.labels
    rows = []
    golden = None
    for a in args.adc.split(","):
        adc = None if a.strip().lower() == "none" else int(a)
        t0 = time.perf_counter()
        pkg = psq_tvm.compile(str(wl.onnx_path()), target="pim-psq", preset=args.preset,
                              adc_bits="none" if adc is None else adc,
                              input_shapes={k: list(v) for k, v in wl.input_shapes.items()})
        spec = pkg.quant_result.spec
        sim = pkg.run_batched(X, mode="sim", sim_options=SimOptions(seed=0)).argmax(1)
        if golden is None:
            golden = pkg.run_batched(X, mode="golden").argmax(1)
        r = {"adc_bits": spec.adc_bits, "lossless": bool(spec.adc_lossless()),
             "sim_top1": float((sim == y).mean()), "golden_top1": float((golden == y).mean()),
             "crossbars": int(pkg.quant_result.crossbars), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(r)
        print(f"adc {str(spec.adc_bits):>4}: sim top-1 {r['sim_top1']:.4f}   golden (no ADC) {r['golden_top1']:.4f}"
              f"   ({r['crossbars']} crossbars, {r['seconds']} s)", flush=True)
    out = {"workload": args.workload, "preset": args.preset, "items": int(len(X)), "spec": spec.to_dict(),
           "rows": rows, "command": "scripts/eval/adc_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    p = Path(args.out) / f"{args.workload}_{args.preset}_adc.json"
    W.write_json(p, out)
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
