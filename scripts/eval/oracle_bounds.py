#!/usr/bin/env python3
"""Upper bounds that use the evaluation data (NOT data-free): what limits EfficientNet at 3.5x?

    .venv/bin/python scripts/eval/oracle_bounds.py [--workload efficientnet] [--calib 64]
    .venv/bin/python scripts/eval/oracle_bounds.py --workload efficientnet_bn --ablation efficientnet

Separates the things a data-free method has to get right, by giving each one the real answer:

* **allocation**: the whole-model budget with each layer's real sensitivity, i.e. mean softmax KL
  on the evaluation photos per unit of relative weight error when only that layer is quantised
  (from ``docs/results/<workload>_layer_ablation.json``, made by ``layer_ablation.py``), as the
  per-tile importance of PSQ mse per column;
* **bias correction**: the DFQ correction with every PIM layer's input mean measured on the first
  ``--calib`` evaluation items (float run) instead of estimated without data;
* **rounding**: GPTQ (error-compensating rounding) on the data-free allocation's own scales and
  bitwidths, with every PIM layer's input second-moment matrix ``E[x x^T]`` measured on the same
  ``--calib`` items, plus the measured-mean bias correction: how much of the remaining loss
  better rounding could recover if it knew the input correlations (data-free statistics give
  only the diagonal, for which error-compensating rounding reduces to round-to-nearest);
  the same rounding with the correlations of seeded N(0,1) inputs instead is data-free;
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


def input_covariances(pkg, feeds_list) -> list:
    """``E[x x^T]`` over the unrolled rows of every PIM layer (groups == 1) from float runs of the package;
    ``None`` for grouped convs and layers never reached."""
    from psq_tvm.runtime.session import im2col
    from psq_tvm.targets.input_stats import traced_layer_inputs

    acc: dict = {}
    for lid, lay, x in traced_layer_inputs(pkg, feeds_list):
        if lay["op"] == "conv2d":
            if int(lay["groups"]) != 1:
                continue
            kh, kw = (int(v) for v in lay["weight_shape"][2:])
            flat = im2col(x, kh, kw, lay["strides"], lay["padding"], lay["dilation"]).reshape(-1, x.shape[1] * kh * kw)
        else:
            flat = x.reshape(-1, x.shape[-1])
        a = acc.setdefault(lid, [0.0, 0])
        a[0] = a[0] + flat.T @ flat
        a[1] += flat.shape[0]
    layers = pkg.manifest["layers"]
    return [None if str(l["id"]) not in acc else acc[str(l["id"])][0] / acc[str(l["id"])][1] for l in layers]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="efficientnet")
    ap.add_argument("--calib", type=int, default=64, help="evaluation items whose layer input means are measured")
    ap.add_argument("--ablation", default=None,
                    help="workload whose layer ablation JSON gives the real sensitivities (default: --workload; "
                    "efficientnet_bn has the same PIM layers as efficientnet)")
    ap.add_argument("--out", default=str(W.REPO_ROOT / "docs" / "results"))
    args = ap.parse_args(argv)

    import onnx
    import psq_tvm
    from psq_tvm import SearchConfig, psq_search
    from psq_tvm.frontend.onnx_import import fold_batchnorm
    from psq_tvm.core.sensitivity import input_weighted_importance, weight_bias_correction
    from psq_tvm.targets.input_stats import float_input_stats, layer_input_stats, synthetic_feeds

    t_start = time.perf_counter()
    wl = W.get_workload(args.workload)
    onnx_path = wl.onnx_path()
    model = fold_batchnorm(onnx.load(str(onnx_path)))       # as the sweep evaluates it (no-op without BN)
    pkg = psq_tvm.compile(str(onnx_path), target="pim-psq", preset="isaac",
                          input_shapes={k: list(v) for k, v in wl.input_shapes.items()})
    tiles, spec = pkg.quant_result.tiles, pkg.quant_result.spec
    mapping = M.match_initializers(model, tiles.layers)
    cache = S.SWEEP_CACHE / f"{args.workload}_isaac"
    cache.mkdir(parents=True, exist_ok=True)
    ref = np.load(cache / "float.npz")["out"] if (cache / "float.npz").exists() else wl._concat(wl.run_tvm(model))
    abl = json.loads((Path(args.out) / f"{args.ablation or args.workload}_layer_ablation.json").read_text())
    if [r["layer"] for r in abl["rows"]] != [l.name for l in tiles.layers]:
        raise SystemExit("oracle_bounds: the layer ablation JSON was made for other PIM layers; re-run layer_ablation.py")
    sens = np.array([r["kl_mean"] / r["rel_weight_error"] ** 2 for r in abl["rows"]])

    calib = []
    for i, (x, _) in enumerate(wl.batches()):
        if i * wl.batch_size >= args.calib:
            break
        calib.append([x])
    real = float_input_stats(pkg, calib)           # measured on real inputs: (E[x] per row, E[x^2])
    covs = input_covariances(pkg, calib)           # E[x x^T] per PIM layer, measured on the same inputs
    syn_covs = input_covariances(pkg, synthetic_feeds(pkg, args.calib, 0))   # the same from N(0,1) inputs
    bn = layer_input_stats(pkg, "bn", pkg.bn_stats)
    has_bn = any(st is not None for st in bn)
    imp = input_weighted_importance(tiles, [None if st is None else st[1] for st in bn]) if has_bn else None
    fam = "mse-column-bnsens-bnbc" if has_bn else "mse-column"
    bc_stats = bn if has_bn else layer_input_stats(pkg, "synthetic")   # the data-free GPTQ row's bias correction

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
        # the best data-free family of this workload (BatchNorm statistics if the model has them),
        # then GPTQ rounding with the measured input correlations on its scales and bitwidths
        r = M.psq(tiles, spec, "mse", "column", budget=b, importance=imp, sens="bnsens" if has_bn else None,
                  bias_stats=bn if has_bn else None, bc="bn")
        record(r, f"data-free: psq-{fam} (the reference for the next row)")
        data_free = psq_search(tiles.layers, spec, tiles=tiles, budget=b, tile_importance=imp,
                               config=SearchConfig(objective="mse", granularity="column"))
        g = M.gptq(data_free, covs)
        g.name, g.family = f"psq-{fam}+gptq-realbc {b}", f"psq-{fam}+gptq-realbc"
        g.bias_deltas = [None if st is None else weight_bias_correction(lay, w, st[0])
                         for lay, w, st in zip(tiles.layers, g.weights, real)]
        record(g, f"GPTQ rounding with E[x x^T] and bias correction with E[x], both measured on {args.calib} "
               "evaluation items, on the scales/bitwidths of the row above")
        # the data-free version: correlations from seeded N(0,1) inputs through the float model
        g = M.gptq(data_free, syn_covs)
        g.name, g.family = f"psq-{fam}+gptq-synthetic {b}", f"psq-{fam}+gptq-synthetic"
        g.bias_deltas = [None if st is None else weight_bias_correction(lay, w, st[0])
                         for lay, w, st in zip(tiles.layers, g.weights, bc_stats)]
        record(g, f"data-free: GPTQ rounding with E[x x^T] from {args.calib} seeded N(0,1) inputs, bias correction "
               f"from {'BatchNorm' if has_bn else 'synthetic'} means, on the scales/bitwidths of the data-free row")
    for bits in (4, 6, 8):
        qr = psq_search(tiles.layers, spec, tiles=tiles, bits=(bits,), tolerance=1e9,
                        config=SearchConfig(objective="mse", granularity="column"))
        record(M._from_quant_result(f"mse-column uniform{bits}", "uniform-column", qr, {"bits": bits}),
               f"every tile at {bits} bits, per-column mse scales")
    from psq_tvm.core.quant import uniform_crossbars
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
