"""Data-free input statistics of the PIM layers of a compiled model, and what the compile derives from them.

Two sources, neither needs user data: seeded N(0, 1) model inputs run through the float model
(``synthetic``), or the model's BatchNorm parameters propagated in closed form
(``bn``, :mod:`psq_tvm.frontend.bn_stats`).  From them: per-layer input means and second moments
(:func:`layer_input_stats`), DFQ bias corrections (:func:`bias_corrections`) and per-layer output
sensitivity (:func:`output_sensitivity`).  Every function here takes a
:class:`~psq_tvm.runtime.package.Package` (run in ``float`` mode) and the manifest's layer records.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from ..frontend.input_ranges import synthetic_inputs

#: synthetic samples for the data-free input statistics (seeded standard normal in the input space)
SYNTHETIC_SAMPLES = 32


def synthetic_feeds(pkg, samples: int, seed: int) -> list[list[np.ndarray]]:
    """Seeded synthetic feeds for the package's inputs, enough batches for ``samples`` items (no data):
    N(0, 1) for float inputs, uniform ids for embedding indices (the manifest input's ``index_range``),
    ones for other integer inputs (:func:`psq_tvm.frontend.input_ranges.synthetic_inputs`)."""
    info = pkg.manifest["inputs"]
    ranges = {i["name"]: int(i["index_range"]) for i in info if i.get("index_range")}
    rng = np.random.default_rng(seed)
    batch = max(1, int(info[0]["shape"][0]) if info[0]["shape"] else 1)
    return [synthetic_inputs(info, ranges, rng) for _ in range(max(1, -(-samples // batch)))]


def conv_row_means(x: np.ndarray, layer: Mapping[str, Any]) -> np.ndarray:
    """Mean of every im2col row of a conv layer's input ``x`` [N, C, H, W] over batch and output
    positions, padding zeros included: ``[C * kh * kw]`` in the unrolled matrices' row order."""
    kh, kw = (int(v) for v in layer["weight_shape"][2:])
    sh, sw = (int(v) for v in layer["strides"])
    dh, dw = (int(v) for v in layer["dilation"])
    top, left, bottom, right = (int(v) for v in layer["padding"])
    ho, wo = (int(v) for v in layer["output_shape"][2:])
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out = np.empty((x.shape[1], kh, kw), dtype=np.float64)
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, :, a * dh:a * dh + sh * (ho - 1) + 1:sh, b * dw:b * dw + sw * (wo - 1) + 1:sw]
            out[:, a, b] = patch.mean(axis=(0, 2, 3), dtype=np.float64)
    return out.reshape(-1)


def traced_layer_inputs(pkg, feeds_list) -> Iterator[tuple[str, dict, np.ndarray]]:
    """``(layer id, manifest layer, input as float64)`` of every PIM layer call in float runs of the
    package on ``feeds_list``; a constant-left matmul's input is given with its inputs last (``[..., K]``)."""
    by_id = {str(l["id"]): l for l in pkg.manifest["layers"]}
    for feeds in feeds_list:
        _, trace = pkg.run(feeds, "float", trace=True)
        for lid, x, _y in trace:
            lay = by_id[lid]
            x = np.asarray(x, dtype=np.float64)
            if lay["op"] != "conv2d" and lay.get("operand") == "left" and x.ndim >= 2:
                x = np.swapaxes(x, -1, -2)
            yield lid, lay, x


def float_input_stats(pkg, feeds_list) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Input statistics of every PIM layer from float runs of the package on ``feeds_list``:
    ``(E[x] per unrolled row, E[x^2] per input channel)``, ``None`` for a layer never reached.

    Rows: a dense layer's inputs; for a conv the im2col rows (:func:`conv_row_means`, padding zeros
    counted, so a bias correction from these means is exact on these inputs).
    """
    layers = pkg.manifest["layers"]
    sums: dict[str, list] = {}
    for lid, lay, x in traced_layer_inputs(pkg, feeds_list):
        if lay["op"] == "conv2d":
            flat = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            row_mean = conv_row_means(x, lay)
        else:
            flat = x.reshape(-1, x.shape[-1])
            row_mean = flat.mean(axis=0)
        acc = sums.setdefault(lid, [0.0, 0.0, 0])
        acc[0] = acc[0] + row_mean
        acc[1] = acc[1] + np.einsum("ij,ij->j", flat, flat) / flat.shape[0]
        acc[2] += 1
    out = []
    for l in layers:
        acc = sums.get(str(l["id"]))
        out.append(None if acc is None else (acc[0] / acc[2], acc[1] / acc[2]))
    return out


def synthetic_input_stats(pkg, samples: int = SYNTHETIC_SAMPLES, seed: int = 0
                          ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """:func:`float_input_stats` on seeded synthetic inputs (:func:`synthetic_feeds`; no data)."""
    return float_input_stats(pkg, synthetic_feeds(pkg, samples, seed))


def batchnorm_layer_stats(layers: list[dict], bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]]
                          ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """:func:`psq_tvm.bn_stats.batchnorm_input_stats` per PIM layer (matched by ONNX node name), as
    ``(E[x] per unrolled row, E[x^2] per input channel)`` like :func:`synthetic_input_stats`.

    Conv row means count the conv's zero padding (:func:`conv_row_means` of the constant-mean image).
    ``None`` for layers without BatchNorm statistics or whose channel count does not match.
    """
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for lay in layers:
        st = bn_stats.get(lay["name"])
        if lay["op"] == "conv2d":
            cin = int(lay["weight_shape"][1]) * int(lay["groups"])
        else:
            cin = int(lay["matrix_shape"][0])
        if st is None or st[0].size != cin or lay.get("operand") == "left":
            out.append(None)
            continue
        mean, ms = (np.asarray(v, np.float64) for v in st)
        if lay["op"] == "conv2d":
            shape = [int(v) for v in lay["input_shape"]]
            img = np.broadcast_to(mean.reshape(1, -1, 1, 1), [1, cin] + shape[2:])
            row_mean = conv_row_means(img, lay)
        else:
            row_mean = mean
        out.append((row_mean, ms))
    return out


def layer_input_stats(pkg, kind: str, bn_stats: Mapping[str, Any] | None = None
                      ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Data-free input statistics of every PIM layer, from ``kind`` = 'synthetic' or 'bn'."""
    if kind == "synthetic":
        return synthetic_input_stats(pkg)
    if kind == "bn":
        return batchnorm_layer_stats(pkg.manifest["layers"], bn_stats or {})
    raise ValueError(f"unknown input statistics {kind!r}; choose 'synthetic' or 'bn'")


def synthetic_input_moments(pkg, samples: int = SYNTHETIC_SAMPLES, seed: int = 0) -> list[np.ndarray | None]:
    """``E[x^2]`` per input channel of every PIM layer (:func:`synthetic_input_stats`), for the sensitivity."""
    return [None if st is None else st[1] for st in synthetic_input_stats(pkg, samples, seed)]


def bias_corrections(result, stats: list[tuple[np.ndarray, np.ndarray] | None]) -> list[np.ndarray | None]:
    """Per PIM layer, the term to add to its bias cancelling the expected output shift ``E[x]^T dW``
    of the quantised weights in ``result`` (DFQ bias correction), ``E[x]`` from ``stats``
    (:func:`layer_input_stats`); ``None`` for a layer whose input statistics are unknown."""
    from ..core.sensitivity import bias_correction

    return [None if st is None else bias_correction(result, li, st[0]) for li, st in enumerate(stats)]


def output_sensitivity(pkg, result, samples: int = 8, seed: int = 0) -> np.ndarray:
    """Per-layer output sensitivity from seeded synthetic inputs (no data): ``[n_layers]``.

    For every PIM layer ``l``, the float model is run with only that layer's weight replaced by its
    quantised version in ``result`` (a probe allocation); the factor is the relative output error
    ``||y_l - y||^2 / ||y||^2`` divided by the layer's relative weight error ``||dW||^2 / ||W||^2``,
    i.e. how much of a layer's weight error reaches the network output.  Normalised to geometric
    mean 1.
    """
    from ..core.tiling import unroll

    layers = pkg.manifest["layers"]
    feeds_list = synthetic_feeds(pkg, samples, seed)

    def outputs(weights=None) -> np.ndarray:
        return np.concatenate([np.concatenate([np.asarray(o, np.float64).ravel()
                                               for o in pkg.run(f, "float", weights=weights)]) for f in feeds_list])

    y0 = outputs()
    e0 = max(float(y0 @ y0), 1e-300)
    factor = np.ones(len(layers))
    for li, lay in enumerate(layers):
        w = np.asarray(result.tiles.layers[li].weight, np.float64)
        wq = result.dequantized(li).astype(np.float64)
        rel_w = float(((wq - w) ** 2).sum() / max((w ** 2).sum(), 1e-300))
        if rel_w <= 0:
            continue
        kind = "conv2d" if lay["op"] == "conv2d" else "dense"
        mats = [np.ascontiguousarray(m, dtype=np.float64) for m in unroll(wq, kind, int(lay["groups"]))]
        d = outputs({str(lay["id"]): mats}) - y0
        factor[li] = max(float(d @ d) / e0, 1e-30) / rel_w
    return factor / np.exp(np.log(factor).mean())
