import numpy as np
import pytest

from psq_tvm.core.tiling import (Layer, ModelTiles, TileGrid, WeightError, group_packing, grouped_conv_rule, roll, tiles, unroll,
                            untile)


@pytest.mark.parametrize("K,N,R,C", [(300, 70, 128, 128), (128, 256, 128, 128), (5, 3, 4, 2), (1, 1, 128, 128)])
def test_tiles_roundtrip(rng, K, N, R, C):
    m = rng.normal(size=(K, N)).astype(np.float32)
    t = tiles(m, R, C)
    assert len(t) == -(-K // R) * -(-N // C)
    assert all(x.base is not None for x in t)  # views, not copies
    assert np.array_equal(untile(t, K, N, R, C), m)


def test_conv_unroll_im2col_order(rng):
    w = rng.normal(size=(6, 4, 3, 2)).astype(np.float32)  # Cout=6, Cin/g=4, groups=2 -> Cin=8
    mats = unroll(w, "conv2d", groups=2)
    assert len(mats) == 2 and mats[0].shape == (4 * 3 * 2, 3)
    for g in range(2):
        for co in range(3):
            for ci in range(4):
                for i in range(3):
                    for j in range(2):
                        assert mats[g][(ci * 3 + i) * 2 + j, co] == w[g * 3 + co, ci, i, j]
    assert np.array_equal(roll(mats, "conv2d", w.shape, 2), w)


def test_dense_unroll_is_identity(rng):
    w = rng.normal(size=(7, 5)).astype(np.float32)
    assert unroll(w, "dense")[0] is w
    assert np.array_equal(roll([w], "dense", w.shape), w)


def test_blocks_cover_every_tile_once():
    g = TileGrid(300, 270, 128, 128)
    seen = np.concatenate([ids.ravel() for *_, ids in g.blocks()])
    assert sorted(seen.tolist()) == list(range(g.n_tiles))


def test_model_tiles_table(rng):
    layers = [Layer("d", rng.normal(size=(200, 10)).astype(np.float32)),
              Layer("c", rng.normal(size=(8, 2, 3, 3)).astype(np.float32), "conv2d", groups=4)]
    mt = ModelTiles(layers, 128, 128)
    assert mt.n_tiles == 2 + 4
    assert mt.layer.tolist() == [0, 0, 1, 1, 1, 1]
    assert mt.group.tolist() == [0, 0, 0, 1, 2, 3]
    assert mt.nrows.tolist() == [128, 72, 18, 18, 18, 18]
    assert mt.ncols.tolist() == [10, 10, 2, 2, 2, 2]


@pytest.mark.parametrize("w,msg", [
    (np.zeros((0, 4), np.float32), "empty"),
    (np.array([[1.0, np.nan]], np.float32), "NaN/Inf"),
    (np.array([[1.0, np.inf]], np.float32), "NaN/Inf"),
    (np.ones((2, 2), np.int32), "floating"),
])
def test_bad_weights(w, msg):
    with pytest.raises(WeightError, match=msg):
        Layer("bad", w)


def test_bad_groups_and_kind(rng):
    with pytest.raises(WeightError, match="groups"):
        Layer("c", rng.normal(size=(6, 1, 3, 3)).astype(np.float32), "conv2d", groups=4)
    with pytest.raises(WeightError, match="kind"):
        Layer("x", rng.normal(size=(3, 3)).astype(np.float32), "conv3d")
    with pytest.raises(WeightError, match="unique"):
        ModelTiles([Layer("a", np.ones((2, 2), np.float32)), Layer("a", np.ones((2, 2), np.float32))], 4, 4)


def test_grouped_rule():
    on, why = grouped_conv_rule(128, 128, (64, 1, 3, 3), 64)     # depthwise 3x3
    assert not on and "host" in why
    on, why = grouped_conv_rule(128, 128, (240, 80, 1, 1), 3)    # shufflenet-style group conv
    assert on and "block-diagonally" in why
    assert grouped_conv_rule(128, 128, (64, 64, 3, 3), 1)[0]


@pytest.mark.parametrize("R, C, shape, groups, k, util", [
    # per group: r = cin/g * kh * kw rows, c = cout/g columns; k = min(R // r, C // c, groups) groups per crossbar
    (128, 128, (64, 1, 3, 3), 64, 14, 14 * 9 * 1 / 16384),        # depthwise 3x3: rows limit
    (128, 128, (240, 80, 1, 1), 3, 1, 80 * 80 / 16384),
    (64, 256, (96, 4, 2, 2), 3, 3, 3 * 16 * 32 / 16384),          # r 16, c 32: the group count limits
    (64, 256, (160, 4, 2, 2), 5, 4, 4 * 16 * 32 / 16384),         # rows limit (64 // 16)
    (256, 64, (80, 16, 1, 1), 5, 4, 4 * 16 * 16 / 16384),         # columns limit (64 // 16)
    (256, 64, (75, 16, 1, 1), 5, 4, 4 * 16 * 15 / 16384),         # columns limit, not a divisor (64 // 15)
    (128, 128, (64, 32, 3, 3), 2, 1, 128 * 32 / 16384),           # r = 288 > R: one group, clipped to R
    (128, 128, (512, 2, 1, 1), 2, 1, 2 * 128 / 16384),            # c = 256 > C: clipped to C
])
def test_group_packing_hand_computed(R, C, shape, groups, k, util):
    assert group_packing(R, C, shape, groups) == (k, pytest.approx(util, rel=1e-12))


def test_grouped_rule_threshold_and_reasons():
    # exactly 12.5 % of the cells: on PIM (the rule is util >= 1/8)
    on, why = grouped_conv_rule(64, 256, (160, 4, 2, 2), 5)
    assert on and why == "5 groups packed block-diagonally, 4 per crossbar, 12.5% cell utilisation"
    on, why = grouped_conv_rule(256, 64, (80, 16, 1, 1), 5)          # 6.25 %
    assert not on and why == ("5-group conv fills only 6.2% of a 256x64 crossbar even block-diagonally packed "
                              "(< 12.5%); kept on host")
    assert grouped_conv_rule(128, 128, (64, 32, 3, 3), 1) == (True, "dense matrix")
    assert grouped_conv_rule(128, 128, (64, 32, 3, 3), 2)[0] is True        # 25 %


@pytest.mark.parametrize("make, needle", [
    (lambda: Layer("fc7", np.array([[1.0, np.nan], [np.inf, -np.inf]], np.float32)),
     r"^layer 'fc7': weight has 3 NaN/Inf value\(s\); fix the model \(or keep this layer on the host\)$"),
    (lambda: Layer("d", np.ones((2, 2), np.float32), "dense", groups=2), r"^dense layers have no groups$"),
    (lambda: Layer("d", np.ones((2, 2, 2), np.float32), "dense"), r"^dense weight must be 2-D \[K, N\], got shape \(2, 2, 2\)$"),
    (lambda: Layer("c", np.ones((2, 2), np.float32), "conv2d"),
     r"^conv2d weight must be 4-D \[Cout, Cin/g, kh, kw\], got shape \(2, 2\)$"),
    (lambda: unroll(np.ones((2, 2), np.float32), "conv3d"), r"^unknown layer kind 'conv3d'; expected one of \('dense', 'conv2d'\)$"),
    (lambda: ModelTiles([], 4, 4), r"^no layers to map: the model has no dense/conv weights$"),
    (lambda: untile([np.ones((2, 2))], 4, 4, 2, 2), r"^expected 4 tiles for a 4x4 matrix in 2x2 tiles, got 1$"),
])
def test_error_messages_name_the_problem(make, needle):
    with pytest.raises((WeightError, ValueError), match=needle):
        make()


def test_roll_copies_and_untile_keeps_the_dtype(rng):
    w = rng.normal(size=(5, 3)).astype(np.float32)
    back = roll(unroll(w, "dense"), "dense", w.shape)
    back[0, 0] += 1.0
    assert back[0, 0] != w[0, 0]                                # a copy, not a view of the weight
    conv = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(roll(unroll(conv, "conv2d", 3), "conv2d", conv.shape, 3), conv)
    q = np.arange(35, dtype=np.int8).reshape(5, 7)
    out = untile(tiles(q, 2, 3), 5, 7, 2, 3)
    assert out.dtype == np.int8 and np.array_equal(out, q)


def test_layer_tiles_are_the_layers_own(rng):
    layers = [Layer("a", rng.normal(size=(300, 10)).astype(np.float32)), Layer("b", rng.normal(size=(5, 200)).astype(np.float32))]
    mt = ModelTiles(layers, 128, 128)
    assert mt.layer_tiles(0).tolist() == [0, 1, 2] and mt.layer_tiles(1).tolist() == [3, 4]
