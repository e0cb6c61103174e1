#!/usr/bin/env python
"""Peak resident memory and wall time of `tvmc compile` and `tvmc run --mode sim`, beside `tvm.compile`.

For each model, three child processes, one after the other (each measured alone: peak RSS from the
``wait4`` rusage of exactly that child, wall time around it):

* **tvm.compile** -- ``from_onnx`` + ``FoldConstant`` + ``tvm.compile(target="llvm")`` + ``export_library``
  of the float model (given the model after our ONNX shape folding, as ``scripts/bench_compile.py`` does);
* **tvmc compile** -- ``tvmc compile --target pim-psq MODEL -o OUT.tar -q`` (+ ``--psq-args``);
* **tvmc run sim** -- ``tvmc run OUT.tar --mode sim -q`` on the seeded synthetic input (one batch).

The **float weight bytes** are counted from the ONNX file: float initializers, ``Constant`` nodes and the
outputs of ``ConstantOfShape`` nodes with a constant shape (how the light models build their weights).
A fourth child that only imports TVM and psq_tvm gives the floor every figure includes.
Prints one row per model with the ratios to the float weight bytes and to tvm.compile.

    python scripts/bench_resources.py [--models bundled,vgg19,densenet121] [--psq-args "..."] [--json OUT.json]

``bundled`` is psq_tvm/data/fashion_cnn.onnx; the others are the ONNX backend "light" models
(``onnx/backend/test/data/light/light_<name>.onnx``, as in scripts/check_onnx_light_models.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TVM_CHILD = r"""
import os, sys, tempfile, warnings
warnings.simplefilter("ignore")
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from psq_tvm.frontend.onnx_import import prepare_onnx

folded, _ = prepare_onnx(sys.argv[1])
mod = relax.transform.FoldConstant()(from_onnx(folded, keep_params_in_input=False))
ex = tvm.compile(mod, target="llvm")
with tempfile.TemporaryDirectory() as d:
    ex.export_library(os.path.join(d, "m.so"))
print("ok")
"""


def float_weight_bytes(path: str) -> int:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(path)
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    total = sum(a.nbytes for a in consts.values() if a.dtype.kind == "f")
    for n in g.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    a = numpy_helper.to_array(at.t)
                    consts[n.output[0]] = a
                    total += a.nbytes if a.dtype.kind == "f" else 0
        elif n.op_type == "ConstantOfShape" and n.input[0] in consts:
            dt = np.dtype(np.float32)
            for at in n.attribute:
                if at.name == "value":
                    dt = helper.tensor_dtype_to_np_dtype(at.t.data_type)
            if dt.kind == "f":
                total += int(np.prod(consts[n.input[0]])) * dt.itemsize
    return int(total)


def model_path(name: str) -> str:
    if name == "bundled":
        return os.path.join(ROOT, "psq_tvm", "data", "fashion_cnn.onnx")
    import onnx
    p = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")
    if not os.path.exists(p):
        raise SystemExit(f"bench_resources: no light model {name!r} at {p}")
    return p


def child(argv: list[str]) -> dict:
    """Run argv as a child; its exit code, wall seconds, peak RSS (bytes) and stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        res = {"exit": p.returncode, "seconds": wall, "peak_rss": ru.ru_maxrss * 1024,
               "stdout": out.read().decode(errors="replace")}
        if p.returncode:
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bundled,vgg19,densenet121")
    ap.add_argument("--psq-args", default="", help="extra tvmc compile arguments")
    ap.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    a = ap.parse_args(argv)
    py = sys.executable
    rows = []
    floor = child([py, "-c", "import tvm, psq_tvm.targets, psq_tvm.cli"])
    print(f"floor: a child that only imports TVM and psq_tvm peaks at {floor['peak_rss'] / (1 << 20):.0f} MiB "
          f"({floor['seconds']:.1f} s)", flush=True)
    hdr = (f"{'model':<12} {'weights MB':>10} | {'tvm.compile':>11} {'s':>6} | {'compile MB':>10} {'s':>6} "
           f"{'xW':>5} {'xTVM':>5} {'t xTVM':>6} | {'run sim MB':>10} {'s':>6} {'xW':>5} {'xTVM':>5}")
    print(hdr, flush=True)
    for name in a.models.split(","):
        path = model_path(name)
        tv = child([py, "-c", TVM_CHILD, path])
        if tv["exit"]:
            raise SystemExit(f"bench_resources: tvm.compile of {name} failed")
        wbytes = float_weight_bytes(path)
        with tempfile.TemporaryDirectory() as d:
            pkg = os.path.join(d, "m.tar")
            cp = child([py, "-m", "psq_tvm.cli", "compile", "--target", "pim-psq", path, "-o", pkg, "-q",
                        *a.psq_args.split()])
            if cp["exit"]:
                raise SystemExit(f"bench_resources: tvmc compile of {name} failed")
            rn = child([py, "-m", "psq_tvm.cli", "run", pkg, "--mode", "sim", "-q"])
            if rn["exit"]:
                raise SystemExit(f"bench_resources: tvmc run of {name} failed")
            pkg_bytes = os.path.getsize(pkg)
        mb = 1 << 20
        row = {"model": name, "float_weight_bytes": wbytes, "package_bytes": pkg_bytes,
               "tvm_compile": {"peak_rss": tv["peak_rss"], "seconds": round(tv["seconds"], 2)},
               "tvmc_compile": {"peak_rss": cp["peak_rss"], "seconds": round(cp["seconds"], 2)},
               "tvmc_run_sim": {"peak_rss": rn["peak_rss"], "seconds": round(rn["seconds"], 2)}}
        row["import_floor_rss"] = floor["peak_rss"]
        rows.append(row)
        print(f"{name:<12} {wbytes / mb:>10.1f} | {tv['peak_rss'] / mb:>11.0f} {tv['seconds']:>6.1f} | "
              f"{cp['peak_rss'] / mb:>10.0f} {cp['seconds']:>6.1f} {cp['peak_rss'] / wbytes:>5.1f} "
              f"{cp['peak_rss'] / tv['peak_rss']:>5.2f} {cp['seconds'] / tv['seconds']:>6.2f} | "
              f"{rn['peak_rss'] / mb:>10.0f} {rn['seconds']:>6.1f} {rn['peak_rss'] / wbytes:>5.1f} "
              f"{rn['peak_rss'] / tv['peak_rss']:>5.2f}", flush=True)
    print("MB = MiB of peak resident memory (whole process, Python + TVM included); xW = / float weight bytes; "
          "xTVM = / the tvm.compile child's peak (or time, 't xTVM')")
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
