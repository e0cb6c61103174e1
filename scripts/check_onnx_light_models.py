#!/usr/bin/env python
"""Compile the ONNX backend 'light' models with --target pim-psq, check float mode against the references
and the simulator against golden (every PIM layer, sim-vs-golden max relative error).

The models ship with the ``onnx`` package under ``onnx/backend/test/data/light/``
(weights built by ``ConstantOfShape``, reference output ``light_<name>_output_0.pb``).
The input is the one ONNX's backend runner generates (``generate_dummy_data(random=False)``),
tolerances are ONNX's own per-model rtol (atol raised to 1e-5 for float32 summation-order
differences in our im2col convolution).  Prints one row per model; exit code 1 if any fails.

    python scripts/check_onnx_light_models.py [--models resnet50,vgg19] [--preset isaac] [--keep DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper

RTOL = {"densenet121": 2e-3}
ATOL = 1e-5


def dummy_input(model):
    from onnx.backend.test.runner import Runner

    inits = {i.name for i in model.graph.initializer}
    produced = {o for n in model.graph.node for o in n.output}
    return {x.name: Runner.generate_dummy_data(x, seed=0, random=False)
            for x in model.graph.input if x.name not in inits and x.name not in produced}


def main(argv=None) -> int:
    import psq_tvm
    from psq_tvm.runtime.verify import EXACT_RTOL, is_exact, layer_errors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated subset (e.g. resnet50,vgg19)")
    ap.add_argument("--preset", default="isaac")
    ap.add_argument("--keep", metavar="DIR", help="also write each package to DIR/<model>.tar")
    a = ap.parse_args(argv)
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    paths = sorted(glob.glob(os.path.join(light, "light_*.onnx")))
    if a.models:
        want = set(a.models.split(","))
        paths = [p for p in paths if os.path.basename(p)[6:-5] in want]
    rows, failed = [], 0
    print(f"{'model':<14} {'status':<6} {'compile s':>9} {'run s':>7} {'max abs err':>12} {'max |ref|':>10} "
          f"{'PIM':>4} {'host':>4} {'xbars PSQ':>9} {'u16':>7} {'u8':>7} {'avg bits':>8} {'sim/golden':>11} "
          f"{'sim s':>6}", flush=True)
    for path in paths:
        name = os.path.basename(path)[6:-5]
        try:
            model = onnx.load(path)
            ref = numpy_helper.to_array(onnx.load_tensor(path[:-5] + "_output_0.pb"))
            feeds = dummy_input(model)
            t0 = time.perf_counter()
            pkg = psq_tvm.compile(path, "pim-psq", preset=a.preset)
            tc = time.perf_counter() - t0
            if a.keep:
                os.makedirs(a.keep, exist_ok=True)
                pkg.save(os.path.join(a.keep, f"{name}.tar"))
            t0 = time.perf_counter()
            out = pkg.run(feeds, "float")[0]
            tr = time.perf_counter() - t0
            t0 = time.perf_counter()
            worst = max(rel for _, rel, _ in layer_errors(pkg, feeds))   # simulator vs golden, every PIM layer
            ts = time.perf_counter() - t0
            sim_ok = worst <= EXACT_RTOL if is_exact(pkg)[0] else True
            rtol = RTOL.get(name, 1e-3)
            ok = out.shape == ref.shape and np.allclose(out, ref, rtol=rtol, atol=ATOL) and sim_ok
            err = float(np.abs(out - ref).max()) if out.shape == ref.shape else float("nan")
            rep = pkg.report
            c = rep["crossbars"]
            print(f"{name:<14} {'ok' if ok else 'FAIL':<6} {tc:>9.2f} {tr:>7.2f} {err:>12.3e} "
                  f"{float(np.abs(ref).max()):>10.3e} {rep['n_pim_layers']:>4} {rep['n_host_layers']:>4} "
                  f"{c['psq']:>9} {c['uniform16']:>7} {c['uniform8']:>7} "
                  f"{(rep['avg_bits'] or 0):>8.2f} {worst:>11.2e} {ts:>6.1f}", flush=True)
            failed += not ok
            for h in rep["host_layers"][:3]:
                print(f"{'':<14} host: {h['name']} ({h['op']}): {h['reason']}")
            if len(rep["host_layers"]) > 3:
                print(f"{'':<14} ... and {len(rep['host_layers']) - 3} more host layers")
            del pkg
        except Exception as e:  # report and continue with the next model
            failed += 1
            print(f"{name:<14} ERROR  {' '.join(str(e).split())[:300]}", flush=True)
    print(f"{len(paths) - failed}/{len(paths)} models compile with pim-psq, match their reference in float mode, "
          f"and (lossless ADC) every PIM layer's simulator output matches golden within {EXACT_RTOL:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
