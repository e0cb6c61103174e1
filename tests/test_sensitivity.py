import numpy as np
import pytest

from psq_tvm import Layer, ModelTiles, preset, psq_search
from psq_tvm.core.sensitivity import bias_correction, input_weighted_importance, row_statistic


def _layers(rng):
    return [Layer("conv", rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "conv2d"),
            Layer("gconv", rng.normal(size=(32, 4, 3, 3)).astype(np.float32), "conv2d", 4),
            Layer("fc", rng.normal(size=(300, 10)).astype(np.float32))]


def test_row_statistic_im2col_order(rng):
    lay = Layer("g", rng.normal(size=(8, 2, 2, 3)).astype(np.float32), "conv2d", 2)
    rows = row_statistic(lay, np.array([1.0, 2.0, 3.0, 4.0]))
    assert [r.tolist() for r in rows] == [[1.0] * 6 + [2.0] * 6, [3.0] * 6 + [4.0] * 6]
    with pytest.raises(ValueError, match="channel statistics"):
        row_statistic(lay, np.ones(3))


def test_uniform_moments_give_unit_importance(rng):
    layers = _layers(rng)
    mt = ModelTiles(layers, 128, 128)
    imp = input_weighted_importance(mt, [np.full(3, 2.5), np.full(16, 0.3), None])
    np.testing.assert_allclose(imp, 1.0, rtol=1e-12)


def test_importance_finite_deterministic_and_used(rng):
    layers = _layers(rng)
    mt = ModelTiles(layers, 128, 128)
    ms = [rng.uniform(0.1, 5, 3), rng.uniform(0, 2, 16), rng.uniform(0, 1, 300)]
    a = input_weighted_importance(mt, ms)
    b = input_weighted_importance(mt, [m.copy() for m in ms])
    assert np.all(np.isfinite(a)) and a.tobytes() == b.tobytes()
    # fc has 3 row tiles: the tile that sees the loudest inputs weighs most
    fc = mt.layer_tiles(2)
    means = [ms[2][mt.row0[t]:mt.row0[t] + mt.nrows[t]].mean() for t in fc]
    assert np.argmax(a[fc]) == np.argmax(means)
    r = psq_search(layers, preset(), budget="avg-bits=4", tile_importance=a)
    assert r.avg_bits <= 4
    with pytest.raises(ValueError, match="finite"):
        input_weighted_importance(mt, [np.full(3, np.nan), None, None])


def test_bias_correction_cancels_mean_shift(rng):
    layers = _layers(rng)
    r = psq_search(layers, preset(), budget="avg-bits=3")
    for li, lay in enumerate(layers):
        cin = lay.weight.shape[1] * lay.groups if lay.kind == "conv2d" else lay.weight.shape[0]
        mean = rng.uniform(0, 1, cin)
        corr = bias_correction(r, li, mean)
        rows = row_statistic(lay, mean)
        from psq_tvm.core.tiling import unroll
        ref = np.concatenate([x @ m for x, m in zip(rows, lay.matrices)])
        q = np.concatenate([x @ m for x, m in zip(rows, unroll(r.dequantized(li), lay.kind, lay.groups))])
        np.testing.assert_allclose(q + corr, ref, rtol=1e-4, atol=1e-4)
