"""The GPTQ reference of the evaluation (scripts/eval/methods.py): same levels, less output error."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "eval"))

import methods as M  # noqa: E402
from psq_tvm import Layer, ModelTiles, SearchConfig, preset, psq_search  # noqa: E402
from psq_tvm.core.tiling import unroll  # noqa: E402


def _setup(rng):
    layers = [Layer("fc", rng.normal(size=(200, 150)).astype(np.float32)),
              Layer("conv", rng.normal(size=(40, 8, 3, 3)).astype(np.float32), "conv2d")]
    tiles = ModelTiles(layers, 128, 128)
    qr = psq_search(layers, preset(), tiles=tiles, budget="avg-bits=4",
                    config=SearchConfig(objective="mse", granularity="column", rounding="nearest"))
    return tiles, qr


def _output_error(lay, w, H):
    d = unroll(w, lay.kind, lay.groups)[0].astype(np.float64) - lay.matrices[0].astype(np.float64)
    return float(np.einsum("ij,ik,kj->", d, H, d))


def test_white_inputs_give_plain_rounding(rng):
    tiles, qr = _setup(rng)
    covs = [np.eye(200), np.eye(72)]
    g = M.gptq(qr, covs, damp=0.0)
    for li in range(2):
        np.testing.assert_array_equal(g.weights[li], qr.dequantized(li))
    assert g.crossbars == qr.crossbars


def test_correlated_inputs_reduce_output_error_on_the_same_grid(rng):
    tiles, qr = _setup(rng)
    covs = []
    for lay in tiles.layers:
        K = lay.matrices[0].shape[0]
        A = rng.normal(size=(K, 8))
        covs.append(A @ A.T + 0.05 * np.eye(K))       # strongly correlated inputs
    g = M.gptq(qr, covs)
    for li, lay in enumerate(tiles.layers):
        # every weight is still a level of its tile's grid: same scale and bitwidth per column
        w = unroll(g.weights[li], lay.kind, lay.groups)[0]
        for t in tiles.layer_tiles(li):
            r0, c0, nr, nc = (int(v[t]) for v in (tiles.row0, tiles.col0, tiles.nrows, tiles.ncols))
            s = qr.scales[t][:nc]
            L = 2 ** (int(qr.bits[t]) - 1) - 1
            lv = w[r0:r0 + nr, c0:c0 + nc] / s
            np.testing.assert_allclose(lv, np.rint(lv), atol=1e-3)
            assert np.abs(lv).max() <= L + 1e-3
        assert _output_error(lay, g.weights[li], covs[li]) < 0.7 * _output_error(lay, qr.dequantized(li), covs[li])
