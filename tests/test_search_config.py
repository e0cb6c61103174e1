"""SearchConfig's limits, the layer weighting of the budget's distortion, and CandidateTable.scales:
expected values from hand-written rules and direct sums over the raw weights."""

import re

import numpy as np
import pytest

from psq_tvm import Layer, ModelTiles, SearchConfig
from psq_tvm.core.candidates import CandidateTable, evaluate_candidates

BITS = (2, 3, 4, 6, 8)


@pytest.mark.parametrize("kwargs", [dict(column_bins=16), dict(n_scales=1), dict(min_clip=1.0),
                                    dict(granularity="tile", objective="cdf-kl", column_bins=100),
                                    dict(granularity="column", objective="mse", column_bins=100),
                                    dict(bins=16, thresholds=16)])
def test_limits_that_are_allowed(kwargs):
    SearchConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(column_bins=15, column_thresholds=32), "column_bins (15) must be >= 16 (and a multiple of column_thresholds (32, >= 2) for "
                           "cdf-kl per column)"),
    (dict(granularity="column", objective="cdf-kl", column_bins=100, column_thresholds=32),
     "column_bins (100) must be >= 16 (and a multiple of column_thresholds (32, >= 2) for cdf-kl per column)"),
    (dict(n_scales=0), "n_scales must be >= 1, got 0"),
    (dict(min_clip=1.01), "min_clip must be in (0, 1], got 1.01"),
    (dict(min_clip=0.0), "min_clip must be in (0, 1], got 0.0"),
    (dict(rounding="up"), "unknown rounding 'up'; choose one of ('nearest', 'balanced')"),
])
def test_limits_that_are_refused_say_why(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SearchConfig(**kwargs)


def _two_layers(rng):
    """A layer of ordinary weights and one so small that its sum of squares is far below 1; the second
    layer is split into two row tiles of 128 and 72 rows."""
    return [Layer("big", (rng.standard_normal((64, 24)) * 0.3).astype(np.float32)),
            Layer("small", (rng.standard_normal((200, 16)) * 0.004).astype(np.float32))]


@pytest.mark.parametrize("granularity", ["tile", "column"])
def test_mse_layer_weighting_divides_by_the_layers_energy(rng, granularity):
    """weighting=layer: a tile's distortion is its sum of squared error over its layer's sum of w^2
    (the histogram's estimate of it: checked against the raw weights to 2 %); weighting=none: the error."""
    layers = _two_layers(rng)
    tiles = ModelTiles(layers, 128, 128)
    assert list(tiles.layer) == [0, 1, 1]
    energy = np.array([float((l.weight.astype(np.float64) ** 2).sum()) for l in layers])
    assert energy[1] < 0.2                                          # the small layer: far below 1
    n_w = tiles.n_weights.astype(np.float64)
    cfg = dict(objective="mse", granularity=granularity)
    lay = evaluate_candidates(tiles, BITS, SearchConfig(weighting="layer", **cfg))
    none = evaluate_candidates(tiles, BITS, SearchConfig(weighting="none", **cfg))
    err = lay.objective * n_w[:, None]                              # sum of squared error per tile
    np.testing.assert_allclose(none.distortion, err, rtol=1e-9)
    np.testing.assert_allclose(lay.distortion * energy[tiles.layer][:, None], err, rtol=0.02)


def test_cdf_kl_layer_weighting_shares_by_weight_count(rng):
    """cdf-kl with weighting=layer: a tile's divergence counts by its share of its layer's weights."""
    layers = _two_layers(rng)
    tiles = ModelTiles(layers, 128, 128)
    share = np.array([64 * 24 / (64 * 24), 128 * 16 / (200 * 16), 72 * 16 / (200 * 16)])
    lay = evaluate_candidates(tiles, BITS, SearchConfig(objective="cdf-kl", weighting="layer"))
    none = evaluate_candidates(tiles, BITS, SearchConfig(objective="cdf-kl", weighting="none"))
    np.testing.assert_allclose(lay.distortion, lay.objective * share[:, None], rtol=1e-9)
    np.testing.assert_allclose(none.distortion, none.objective * tiles.n_weights[:, None], rtol=1e-9)


@pytest.mark.parametrize("per_column", [False, True])
def test_scales_without_a_zero_mask_treat_zero_maxabs_as_zero(per_column):
    """CandidateTable.scales: ratio * max|w| / (2^(b-1) - 1), and 1.0 where max|w| is 0 (no mask given)."""
    bits = (2, 4)
    if per_column:
        maxabs = np.array([[0.0, 2.0], [3.0, 0.0]])
        ratio = np.array([[[1.0, 0.5], [1.0, 0.5]], [[0.8, 0.6], [0.9, 0.7]]])
        got = CandidateTable(bits, np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), ratio, maxabs).scales(
            np.array([1, 0]))
        want = np.array([[1.0, 0.5 * 2.0 / 7], [0.8 * 3.0 / 1, 1.0]])
    else:
        maxabs = np.array([0.0, 2.0, 3.0])
        ratio = np.array([[1.0, 0.5], [1.0, 0.5], [0.8, 0.6]])
        got = CandidateTable(bits, np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((3, 2)), ratio, maxabs).scales(
            np.array([1, 1, 0]))
        want = np.array([1.0, 0.5 * 2.0 / 7, 0.8 * 3.0 / 1])
    np.testing.assert_allclose(got, want, rtol=1e-12)
