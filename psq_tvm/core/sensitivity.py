"""Data-free input statistics for the whole-model budget, and bias correction.

The search sums tile distortions over the model.  With plain per-layer
normalisation a tile's weight error counts the same whatever input it sees.
When the second moments ``E[x_i^2]`` of each layer's inputs are known (from
a BatchNorm before the layer, or estimated without data, e.g. by running the
float model on seeded synthetic inputs), the output error of a layer is

    E||dW^T x||^2  ~=  sum_r E[x_r^2] * ||dW_r||^2        (rows r = inputs)

and it is compared with the layer's output energy ``sum_r E[x_r^2] ||W_r||^2``.
:func:`input_weighted_importance` turns that into the per-tile factor that
:func:`psq_tvm.search.psq_search` takes as ``tile_importance``.

Bias correction (as in DFQ, Nagel et al. 2019): the quantisation error shifts
the expected output by ``E[x]^T dW``; :func:`bias_correction` returns the
per-output-channel term to add to the bias to cancel it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .quant import QuantResult
from .tiling import Layer, ModelTiles, unroll

#: chosen from the evaluation (README, "Defaults"): BatchNorm statistics where the model has them, the
#: synthetic ones (N(0, 1) after the model's own input normalisation) for the other layers
DEFAULT_BIAS_CORRECTION = "bn+synthetic"


def row_statistic(layer: Layer, channel_stat: np.ndarray) -> list[np.ndarray]:
    """Expand a per-input-channel statistic to the rows of each unrolled matrix of ``layer``.

    For a conv the statistic may also be given per im2col row already (``Cin * kh * kw`` values in
    row order), e.g. means over the padded patches; it is then only split by group.
    """
    channel_stat = np.asarray(channel_stat, dtype=np.float64).ravel()
    if layer.kind == "dense":
        K = layer.matrices[0].shape[0]
        if channel_stat.size != K:
            raise ValueError(f"layer {layer.name!r}: {channel_stat.size} input statistics for {K} inputs")
        return [channel_stat]
    cout, cin_g, kh, kw = layer.weight.shape
    per_group = cin_g * kh * kw
    if kh * kw > 1 and channel_stat.size == per_group * layer.groups:
        return [channel_stat[g * per_group:(g + 1) * per_group] for g in range(layer.groups)]
    if channel_stat.size != cin_g * layer.groups:
        raise ValueError(f"layer {layer.name!r}: {channel_stat.size} channel statistics for "
                         f"{cin_g * layer.groups} input channels")
    return [np.repeat(channel_stat[g * cin_g:(g + 1) * cin_g], kh * kw) for g in range(layer.groups)]


def input_weighted_importance(tiles: ModelTiles, channel_ms: Sequence[np.ndarray | None]) -> np.ndarray:
    """Per-tile factor weighting a tile's distortion by the input energy its rows see.

    ``channel_ms[i]`` is ``E[x^2]`` per input channel of layer ``i`` (``None``:
    unknown, factor 1 for that layer).  For the layer-normalised objective the
    factor is ``mean_r E[x_r^2] * sum(W^2) / sum_r E[x_r^2] ||W_r||^2`` so that a
    tile's weighted distortion estimates its share of the layer's relative output error.
    """
    if len(channel_ms) != len(tiles.layers):
        raise ValueError(f"need one statistic entry per layer ({len(tiles.layers)}), got {len(channel_ms)}")
    out = np.ones(tiles.n_tiles, dtype=np.float64)
    for li, layer in enumerate(tiles.layers):
        if channel_ms[li] is None:
            continue
        rows = row_statistic(layer, channel_ms[li])
        if not all(np.all(np.isfinite(r)) and np.all(r >= 0) for r in rows):
            raise ValueError(f"layer {layer.name!r}: input second moments must be finite and >= 0")
        w_energy = 0.0
        out_energy = 0.0
        for m, r in zip(layer.matrices, rows):
            row_e = np.einsum("ij,ij->i", m, m, dtype=np.float64)
            w_energy += row_e.sum()
            out_energy += (r * row_e).sum()
        ids = tiles.layer_tiles(li)
        if out_energy <= 0:
            continue
        for t in ids:
            r0, nr = int(tiles.row0[t]), int(tiles.nrows[t])
            out[t] = rows[int(tiles.group[t])][r0:r0 + nr].mean() * w_energy / out_energy
    return out


def bias_correction(result: QuantResult, layer: int, channel_mean: np.ndarray) -> np.ndarray:
    """Term to add to the bias of ``layer`` (one per output channel) cancelling ``E[x]^T (W_q - W)``.

    ``channel_mean`` is ``E[x]`` per input channel, or for a conv per im2col row (exact with padding).
    """
    return weight_bias_correction(result.tiles.layers[layer], result.dequantized(layer), channel_mean)


def weight_bias_correction(lay: Layer, deq: np.ndarray, channel_mean: np.ndarray) -> np.ndarray:
    """:func:`bias_correction` for any fake-quantised weight ``deq`` of ``lay`` (the layer's own shape)."""
    rows = row_statistic(lay, channel_mean)
    dq_mats = unroll(deq, lay.kind, lay.groups)
    with np.errstate(over="ignore", invalid="ignore"):   # a model beyond float range: the fidelity stage refuses it
        return -np.concatenate([r @ (q.astype(np.float64) - m.astype(np.float64))
                                for r, q, m in zip(rows, dq_mats, lay.matrices)]).astype(np.float32)
