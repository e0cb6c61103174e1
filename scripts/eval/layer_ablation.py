#!/usr/bin/env python3
"""Which PIM layers cost the accuracy?  One layer quantised at a time, the rest float.

    .venv/bin/python scripts/eval/layer_ablation.py efficientnet [--budget reduction=3.5]
        [--objective mse] [--granularity column] [--items 62]

Runs one whole-model PSQ search (the sweep's method, same tiles and packer), then for every PIM
layer substitutes only that layer's fake-quantised weight into the ONNX model and evaluates the
workload (weight-only, TVM host build) on a deterministic subset (default: the centre crop of
every photo for efficientnet).  Prints per layer: tiles, average bits, the layer's relative
weight error ||W_q - W|| / ||W||, and the metric against float.  Writes
``docs/results/<workload>_layer_ablation.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import methods as M  # noqa: E402
import workloads as W  # noqa: E402
from sweep import restrict_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload")
    ap.add_argument("--preset", default="isaac")
    ap.add_argument("--budget", default="reduction=3.5")
    ap.add_argument("--objective", default="mse")
    ap.add_argument("--granularity", default="column")
    ap.add_argument("--items", type=int, default=None,
                    help="evenly strided subset (default: efficientnet centre crops, else all)")
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    args = ap.parse_args(argv)

    import onnx
    import psq_tvm

    wl = W.get_workload(args.workload)
    onnx_path = wl.onnx_path()
    model = onnx.load(str(onnx_path))
    n = wl.num_items
    if args.items:
        idx = np.linspace(0, n - 1, args.items).round().astype(int)
    elif args.workload == "efficientnet":
        idx = np.arange(0, n, len(W.CROPS))          # the centre crop of every photo
    else:
        idx = np.arange(n)
    restrict_workload(wl, idx)
    pkg = psq_tvm.compile(str(onnx_path), target="pim-psq", preset=args.preset,
                          input_shapes={k: list(v) for k, v in wl.input_shapes.items()})
    tiles, spec = pkg.quant_result.tiles, pkg.quant_result.spec
    mapping = M.match_initializers(model, tiles.layers)
    qr = psq_tvm.psq_search(tiles.layers, spec, tiles=tiles, budget=args.budget,
                            config=psq_tvm.SearchConfig(objective=args.objective, granularity=args.granularity))
    name = f"psq-{args.objective}{'-column' if args.granularity == 'column' else ''} {args.budget}"
    qws = [qr.dequantized(li) for li in range(len(tiles.layers))]
    ref = wl._concat(wl.run_tvm(model))
    key = wl.primary_metric
    print(f"{args.workload}: {len(idx)} items, {len(tiles.layers)} PIM layers; {name}: {qr.crossbars} crossbars")
    rows = []
    floats = [np.asarray(l.weight, np.float32) for l in tiles.layers]
    t_all = time.perf_counter()
    for li, lay in enumerate(tiles.layers):
        ws = list(floats)
        ws[li] = qws[li]
        out = wl._concat(wl.run_tvm(M.onnx_with_weights(model, mapping, ws)))
        m = wl.metrics([out], reference=ref)
        ids = tiles.layer_tiles(li)
        err = float(np.linalg.norm(qws[li] - floats[li]) / max(np.linalg.norm(floats[li]), 1e-30))
        bits = float(qr.bits[ids].mean())
        r = {"layer": lay.name, "kind": lay.kind, "shape": list(lay.weight.shape), "tiles": int(len(ids)),
             "avg_bits": bits,
             "rel_weight_error": err, "metric": m.get(key), "kl_mean": m.get("kl_mean")}
        rows.append(r)
        print(f"{li:3d} {lay.name:28s} {str(list(lay.weight.shape)):22s} tiles {len(ids):4d} "
              f"bits {bits:4.2f} rel err {err:.3f}  {key} {m.get(key):.4f}  kl {m.get('kl_mean', float('nan')):.4f}", flush=True)
    out = {"workload": args.workload, "preset": args.preset, "method": name, "items": int(len(idx)),
           "crossbars": int(qr.crossbars), "rows": rows, "seconds": round(time.perf_counter() - t_all, 1),
           "command": "scripts/eval/layer_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    p = Path(args.out) / f"{args.workload}_layer_ablation.json"
    W.write_json(p, out)
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
