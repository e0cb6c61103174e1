#!/usr/bin/env python
"""Compile overhead: `tvmc compile --target pim-psq` vs TVM's own `tvm.compile(..., target="llvm")`, side by side.

For each model, alternately (same process, same machine state):

* **tvm**   -- ``from_onnx`` + ``FoldConstant`` + ``tvm.compile(mod, target="llvm")`` of the float model
  (what a plain TVM user runs), and the same plus ``export_library`` (what a deployable build costs).
  TVM is given the ONNX model *after* our shape inference/folding (done outside the timing),
  because its importer rejects some real exports as they are (EfficientNet-Lite0 from PyTorch:
  "Dynamic pads are not supported yet"); this favours the TVM side;
* **psq**   -- ``tvmc compile --target pim-psq MODEL -o OUT.tar`` run in-process (import with ONNX
  folding, partition, whole-model PSQ search, lowering, llvm build, export, tables, package write).

Prints medians and the ratio psq / tvm.  Goal: <= 1.5x.

    python scripts/bench_compile.py [--repeat 3] [MODEL.onnx ...]   (default: the bundled fashion_cnn.onnx)
"""

from __future__ import annotations

import argparse
import os
import warnings
import statistics
import sys
import tempfile
import time


def tvm_compile(model, export: bool) -> float:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    t0 = time.perf_counter()
    mod = from_onnx(model, keep_params_in_input=False)
    mod = relax.transform.FoldConstant()(mod)
    ex = tvm.compile(mod, target="llvm")
    if export:
        with tempfile.TemporaryDirectory() as d:
            ex.export_library(os.path.join(d, "m.so"))
    return time.perf_counter() - t0


def psq_compile(path: str, extra: list[str]) -> float:
    from psq_tvm.cli import main

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rc = main(["compile", "--target", "pim-psq", path, "-o", os.path.join(d, "out.tar"), "-q", *extra])
        dt = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"tvmc compile failed on {path}")
    return dt


def main(argv=None) -> int:
    import psq_tvm  # noqa: F401  (warm imports so neither side pays them)
    import psq_tvm.passes  # noqa: F401

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--psq-args", default="", help="extra tvmc compile arguments, e.g. '--psq-budget avg-bits=4'")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    models = a.models or [os.path.join(os.path.dirname(psq_tvm.__file__), "data", "fashion_cnn.onnx")]
    extra = a.psq_args.split()
    print(f"{'model':<24} {'tvm.compile s':>13} {'+export s':>10} {'tvmc pim-psq s':>14} {'ratio':>6} "
          f"{'ratio vs +export':>16}")
    worst = 0.0
    from psq_tvm.frontend.onnx_import import prepare_onnx

    for path in models:
        folded, _ = prepare_onnx(path)
        tvm_compile(folded, False)       # warm-up (LLVM init, op registry, caches) for both
        psq_compile(path, extra)
        t_tvm, t_tvm_x, t_psq = [], [], []
        for _ in range(a.repeat):
            t_tvm.append(tvm_compile(folded, False))
            t_tvm_x.append(tvm_compile(folded, True))
            t_psq.append(psq_compile(path, extra))
        m_tvm, m_x, m_psq = (statistics.median(v) for v in (t_tvm, t_tvm_x, t_psq))
        worst = max(worst, m_psq / m_tvm)
        print(f"{os.path.basename(path)[:24]:<24} {m_tvm:>13.3f} {m_x:>10.3f} {m_psq:>14.3f} {m_psq / m_tvm:>6.2f} "
              f"{m_psq / m_x:>16.2f}", flush=True)
    print(f"median of {a.repeat} runs each; worst ratio (pim-psq / tvm.compile) {worst:.2f} (goal <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
