#!/usr/bin/env python3
"""Upper bounds that use the evaluation data (NOT data-free): what limits EfficientNet at 3.5x?

    .venv/bin/python scripts/eval/oracle_bounds.py [--workload efficientnet] [--calib 64]

Separates the two things a data-free method has to estimate, by giving each one the real answer:

* **allocation**: the whole-model budget with each layer's real sensitivity, i.e. mean softmax KL
  on the evaluation photos per unit of relative weight error when only that layer is quantised
  (from ``docs/results/<workload>_layer_ablation.json``, made by ``layer_ablation.py``), as the
  per-tile importance of PSQ mse per column;
* **bias correction**: the DFQ correction with every PIM layer's input mean measured on the first
  ``--calib`` evaluation items (float run) instead of estimated without data;
* and, for scale, uniform bitwidths with per-column mse scales (no allocation at all).

Everything else is the sweep's machinery (same tiles, packer, cache and metrics).  Writes
``docs/results/<workload>_oracle_bounds.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import methods as M  # noqa: E402
import sweep as S  # noqa: E402
import workloads as W  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="efficientnet")
    ap.add_argument("--calib", type=int, default=64, help="evaluation items whose layer input means are measured")
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    args = ap.parse_args(argv)

    import onnx
    import psq_tvm
    from psq_tvm import SearchConfig, psq_search
    from psq_tvm.targets.pim_psq import float_input_stats

    t_start = time.perf_counter()
    wl = W.get_workload(args.workload)
    onnx_path = wl.onnx_path()
    model = onnx.load(str(onnx_path))
    pkg = psq_tvm.compile(str(onnx_path), target="pim-psq", preset="isaac",
                          input_shapes={k: list(v) for k, v in wl.input_shapes.items()})
    tiles, spec = pkg.quant_result.tiles, pkg.quant_result.spec
    mapping = M.match_initializers(model, tiles.layers)
    cache = S.SWEEP_CACHE / f"{args.workload}_isaac"
    cache.mkdir(parents=True, exist_ok=True)
    ref = np.load(cache / "float.npz")["out"] if (cache / "float.npz").exists() else wl._concat(wl.run_tvm(model))
    abl = json.loads((Path(args.out) / f"{args.workload}_layer_ablation.json").read_text())
    if [r["layer"] for r in abl["rows"]] != [l.name for l in tiles.layers]:
        raise SystemExit("oracle_bounds: the layer ablation JSON was made for other PIM layers; re-run layer_ablation.py")
    sens = np.array([r["kl_mean"] / r["rel_weight_error"] ** 2 for r in abl["rows"]])

    calib = []
    for i, (x, _) in enumerate(wl.batches()):
        if i * wl.batch_size >= args.calib:
            break
        calib.append([x])
    real = float_input_stats(pkg, calib)           # measured on real inputs: (E[x] per row, E[x^2])

    rows = []

    def record(res, what):
        m, run_s, cached, _ = S.evaluate(wl, model, mapping, res, ref, cache, "")
        rows.append({"method": res.name, "what": what, "crossbars": res.crossbars, "avg_bits": res.avg_bits,
                     "metrics": m})
        S.log(f"{res.name:44s} xb {res.crossbars:5d} {wl.primary_metric} {m[wl.primary_metric]:.4f} "
              f"kl {m.get('kl_mean', float('nan')):.4f} ({run_s:.0f} s{', cached' if cached else ''})")

    for red in ("3.5", "3"):
        b = f"reduction={red}"
        r = M.psq(tiles, spec, "mse", "column", budget=b, importance=sens[tiles.layer], sens="oracle")
        record(r, "allocation with the real per-layer sensitivity (layer ablation KL / rel. error^2)")
        r = M.psq(tiles, spec, "mse", "column", budget=b, bias_stats=real, bc="synthetic")
        r.name, r.family = f"psq-mse-column-realbc {b}", "psq-mse-column-realbc"
        record(r, f"bias correction with input means measured on {args.calib} evaluation items")
    for bits in (4, 6, 8):
        qr = psq_search(tiles.layers, spec, tiles=tiles, bits=(bits,), tolerance=1e9,
                        config=SearchConfig(objective="mse", granularity="column"))
        record(M._from_quant_result(f"mse-column uniform{bits}", "uniform-column", qr, {"bits": bits}),
               f"every tile at {bits} bits, per-column mse scales")
    from psq_tvm.quant import uniform_crossbars
    u16 = uniform_crossbars(tiles, spec, 16)
    for r in rows:
        r["reduction_vs_u16"] = u16 / r["crossbars"]
    out = {"workload": args.workload, "preset": "isaac", "items": wl.num_items, "calib_items": args.calib,
           "note": "uses the evaluation data: upper bounds, not data-free methods", "rows": rows,
           "seconds": round(time.perf_counter() - t_start, 1),
           "command": "scripts/eval/oracle_bounds.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    p = Path(args.out) / f"{args.workload}_oracle_bounds.json"
    W.write_json(p, out)
    S.log(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
