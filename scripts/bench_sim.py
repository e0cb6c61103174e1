"""Benchmark of the functional crossbar simulator (psq_tvm.runtime.simulator).

For a ResNet 3x3 conv (64->64 on 56x56) and a 384x1536 dense layer it times,
in one run and single-threaded:

  (a) numpy float32 matmul of the same unrolled shapes ([M, K] @ [K, N]);
  (b) the simulator's exact path (lossless ADC): activation quantisation,
      im2col, one integer-exact matmul per row strip, scaling;
  (c) the bit-serial path with a lossy ADC (every input cycle, slice and
      polarity read through the ADC, shift-and-add).

and prints the medians (CPU time, robust on a shared machine; wall time in
brackets) and the ratios b/a and c/(a x cycles x slices x polarities) -- the
latter is the cost relative to the unavoidable per-cycle matmuls.  Goals:
b/a <= 2, c/(a J S P) <= 3.

    python scripts/bench_sim.py [--batch 1] [--tokens 256] [--repeat 5] [--preset puma]
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from psq_tvm import Layer, preset, rtn_per_tile  # noqa: E402
from psq_tvm.runtime.simulator import SimOptions, compile_layer, layer_program  # noqa: E402
from psq_tvm.core.tables import crossbar_cells  # noqa: E402


def tune_malloc() -> bool:
    """Keep freed memory in the glibc heap (no munmap/trim), so numpy temporaries are not page-faulted
    in again on every call; first-touch page faults are very expensive on some VMs.  Affects every
    candidate alike, the float matmul baseline included."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-1, 1 << 30)) and bool(libc.mallopt(-3, 1 << 25))  # M_TRIM_, M_MMAP_THRESHOLD
    except OSError:
        return False


def median_times(fns, repeat: int) -> list[tuple[float, float]]:
    """(median wall time, median CPU time) of each function, measured interleaved (round-robin).

    On a shared machine other processes preempt ours; CPU time (``time.process_time``, one BLAS
    thread) is what the computation itself costs and is the robust figure; wall time is printed too.
    """
    for fn in fns:
        fn()  # warm-up (and compile/cache)
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, w, c in zip(fns, wall, cpu):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            c.append(time.process_time() - c0)
            w.append(time.perf_counter() - t0)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def bench(name: str, layer: Layer, x: np.ndarray, M: int, spec_lossless, spec_lossy, bits: int, repeat: int,
          conv: dict | None = None) -> dict:
    rng = np.random.default_rng(1)
    K, N = layer.matrix_shape
    A = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((K, N)).astype(np.float32)
    out = {}
    res = rtn_per_tile([layer], spec_lossless, bits)
    cells = crossbar_cells(res)
    exact = compile_layer(layer_program(res, 0, **(conv or {})), cells, spec_lossless)
    res_l = rtn_per_tile([layer], spec_lossy, bits)
    cells_l = crossbar_cells(res_l)
    lossy = compile_layer(layer_program(res_l, 0, **(conv or {})), cells_l, spec_lossy)
    serial = SimOptions(force_bitserial=True)   # ragged strips may be lossless: read them bit-serially too
    J = -(-spec_lossy.act_bits // spec_lossy.dac_bits)
    S = spec_lossy.slices(bits)
    P = spec_lossy.polarities
    (ta, ma), (tb, mb), (tc, mc), (ta2, ma2) = median_times(
        [lambda: A @ W, lambda: exact.run(x), lambda: lossy.run(x, options=serial), lambda: A @ W], repeat)
    ta, ma = min(ta, ta2), min(ma, ma2)     # the faster of the two baseline measurements (conservative)
    assert not spec_lossy.adc_lossless(spec_lossy.rows)
    y, g = lossy.run(x, options=serial), lossy.golden(x)
    rel = float(np.abs(y - g).max() / np.abs(g).max())
    ye, ge = exact.run(x), exact.golden(x)
    rel_e = float(np.abs(ye - ge).max() / np.abs(ge).max())
    n = J * S * P
    print(f"{name}: M={M} K={K} N={N}, {bits}-bit weights, act {spec_lossy.act_bits} bits")
    print("      medians: CPU time [wall time]")
    print(f"  (a) float32 matmul                           {ma * 1e3:8.2f} ms [{ta * 1e3:.2f}]")
    print(f"  (b) exact path, {spec_lossless.name:<28} {mb * 1e3:8.2f} ms [{tb * 1e3:.2f}]   "
          f"b/a = {mb / ma:.2f} [{tb / ta:.2f}]   max|sim-golden|/max|golden| = {rel_e:.1e}")
    print(f"  (c) bit-serial, {spec_lossy.name} adc {spec_lossy.adc_bits} bits, J={J} S={S} P={P}   "
          f"{mc * 1e3:8.1f} ms [{tc * 1e3:.1f}]   c/(a*J*S*P) = {mc / (ma * n):.2f} [{tc / (ta * n):.2f}]   "
          f"lossy max rel err = {rel:.3f}")
    return {"a": ma, "b": mb, "c": mc, "J": J, "S": S, "P": P}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="conv batch (images)")
    ap.add_argument("--tokens", type=int, default=256, help="dense batch (rows)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--preset", default="puma", help="lossy preset for (c) (puma, prime, neurosim, mnsim)")
    ap.add_argument("--bits", type=int, default=8, help="weight bits of every tile")
    ap.add_argument("--only", choices=("conv", "dense"), help="run one of the two layers")
    ap.add_argument("--no-malloc-tune", action="store_true", help="leave glibc malloc thresholds at defaults")
    args = ap.parse_args()
    tuned = False if args.no_malloc_tune else tune_malloc()
    rng = np.random.default_rng(0)
    lossy = preset(args.preset)
    lossless = lossy.replace(adc_bits=None, name=args.preset + "-lossless")
    print(f"threads: OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; numpy {np.__version__}; "
          f"malloc tuned: {tuned}; repeat {args.repeat} (interleaved); load average {os.getloadavg()[0]:.2f}")
    w = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    x = np.maximum(rng.standard_normal((args.batch, 64, 56, 56)), 0).astype(np.float32)
    if args.only != "dense":
        bench(f"resnet conv3x3 64->64 56x56, batch {args.batch}", Layer("conv", w, "conv2d"), x,
              args.batch * 56 * 56, lossless, lossy, args.bits, args.repeat, conv={"padding": (1, 1, 1, 1)})
    wd = (rng.standard_normal((384, 1536)) * 0.05).astype(np.float32)
    xd = rng.standard_normal((args.tokens, 384)).astype(np.float32)
    if args.only != "conv":
        bench(f"dense 384x1536, {args.tokens} tokens (signed input)", Layer("fc", wd, "dense"), xd, args.tokens,
              lossless, lossy, args.bits, args.repeat)


if __name__ == "__main__":
    main()
