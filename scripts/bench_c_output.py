#!/usr/bin/env python
"""How long gcc takes on the C output (--emit-c-header) of a large model: ONNX's light ResNet-50.

    python scripts/bench_c_output.py [--model resnet50] [--budget reduction=4] [--in-source-mb 1]

Compiles the model (isaac, the given budget), writes its C output, and times, with
``gcc -std=c99 -Wall -Wextra -pedantic``: the tables' ``.c`` file, two translation units that include the
header, and the link (wall seconds and the largest gcc resident set).  Then the same for a tables file with
the cells in the source, cut to ``--in-source-mb`` MB of cells (how the in-source size limit was chosen).
Prints one line per step; no assertion on time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"]
USER_C = '#include "{name}.h"\nunsigned long f{k}(void) {{ return PIM_PSQ_N_TILES + pim_psq_tiles[0].bits; }}\n'
MAIN_C = ('#include <stdio.h>\n#include "{name}.h"\nunsigned long f1(void);\n'
          'int main(void) {{ printf("%lu %u\\n", f1(), pim_psq_layers[0].n_tiles); return 0; }}\n')


def gcc(args, cwd) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, from ``/usr/bin/time -f %M``: gcc and the cc1 it waits for; NaN
    without /usr/bin/time) of one gcc run."""
    timer = ["/usr/bin/time", "-f", "%M"] if os.path.exists("/usr/bin/time") else []
    t0 = time.perf_counter()
    r = subprocess.run([*timer, "gcc", *args], cwd=cwd, capture_output=True, text=True)
    s = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"gcc {' '.join(args)} failed:\n{r.stderr}")
    return s, (int(r.stderr.strip().splitlines()[-1]) / 1024 if timer else float("nan"))


def main(argv=None) -> int:
    import psq_tvm
    from psq_tvm.targets import c_header

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--budget", default="reduction=4")
    ap.add_argument("--in-source-mb", type=float, default=1.0)
    a = ap.parse_args(argv)
    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{a.model}.onnx")
    t0 = time.perf_counter()
    pkg = psq_tvm.compile(path, "pim-psq", budget=a.budget)
    print(f"compile {a.model} ({a.budget}): {time.perf_counter() - t0:.1f} s, "
          f"{pkg.blob('crossbars').shape[0]} crossbars", flush=True)
    with tempfile.TemporaryDirectory(prefix="psq-c-") as d:
        pkg.save(os.path.join(d, "m.tar"))
        t0 = time.perf_counter()
        written = c_header.write_c_output(pkg, os.path.join(d, "m.h"))
        sizes = ", ".join(f"{os.path.basename(p)} {os.path.getsize(p) / 1e6:.2f} MB" for p in written)
        print(f"C output written in {time.perf_counter() - t0:.1f} s: {sizes}", flush=True)
        for k in (1, 2):
            with open(os.path.join(d, f"user{k}.c"), "w") as f:
                f.write(USER_C.format(name="m", k=k))
        with open(os.path.join(d, "main.c"), "w") as f:
            f.write(MAIN_C.format(name="m"))
        total = 0.0
        for src in ("m.c", "user1.c", "user2.c", "main.c"):
            s, rss = gcc([*FLAGS, "-c", src], d)
            total += s
            print(f"gcc -c {src}: {s:.2f} s (peak RSS {rss:.0f} MB)", flush=True)
        s, rss = gcc(["m.o", "user1.o", "user2.o", "main.o", "-o", "prog"], d)
        total += s
        print(f"link: {s:.2f} s; run: {subprocess.run(['./prog'], cwd=d, capture_output=True, text=True).stdout.strip()}")
        print(f"total gcc: {total:.2f} s (goal <= 30 s)", flush=True)
        # the in-source variant, cut to --in-source-mb of cells
        n = max(1, int(a.in_source_mb * 1e6 // (pkg.spec.rows * pkg.spec.cols)))
        cut = {"crossbars": np.ascontiguousarray(pkg.blob("crossbars")[:n])}
        man = {**pkg.manifest, "layers": []}
        old = c_header.CELLS_IN_SOURCE_MAX
        c_header.CELLS_IN_SOURCE_MAX = 1 << 40
        try:
            src = c_header.c_sources(man, b"{}", cut, "cut")
        finally:
            c_header.CELLS_IN_SOURCE_MAX = old
        for name, data in src.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        s, rss = gcc([*FLAGS, "-c", "cut.c"], d)
        print(f"in-source cells, {cut['crossbars'].nbytes / 1e6:.1f} MB of cells ({len(src['cut.c']) / 1e6:.1f} MB "
              f"of C): gcc -c {s:.2f} s (peak RSS {rss:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
