"""Quantisation methods of the evaluation sweep (issue 5 / issue 6), all on one ModelTiles.

Every method maps the PIM layers of a compiled package (``pkg.quant_result.tiles``:
the layers the pim-psq partitioner sent to the crossbars, already tiled) to

* a fake-quantised weight per layer (``dequantized(li)``, the layer's own shape), and
* a crossbar count from the one packer of :mod:`psq_tvm.core.quant` (same tiles, same packer),

so every row of the tables quantises the same weights and is counted the same way.

Methods: uniform per-layer (16, 8 bits), per-tile round-to-nearest (max-abs scale),
HQQ per tile (``hqq.core.quantize.Quantizer``: one scale + zero point per tile,
half-quadratic optimisation, data-free; counted as uniform ``b``-bit tiles), and PSQ
(``psq_search``) with either objective, per-tile or per-column scales, in budget or
tolerance mode.  :func:`onnx_with_weights` writes the fake-quantised weights into the
ONNX initializers they came from (matched by array equality; fails loudly otherwise).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from psq_tvm import SearchConfig, psq_search, rtn_per_tile, uniform_per_layer
from psq_tvm.core.quant import uniform_crossbars
from psq_tvm.core.tiling import ModelTiles, canonical_blocks, empty_like_layout, roll


@dataclasses.dataclass
class MethodResult:
    """What a method gives the sweep: dequantised weights per PIM layer + its accounting."""

    name: str
    family: str
    weights: list            # [n_layers] float32 arrays, the layers' own shapes
    crossbars: int
    avg_bits: float
    search_seconds: float
    config: dict
    note: str = ""
    scale_values: int | None = None
    bias_deltas: list | None = None   # [n_layers] per-output-channel terms added to the layers' biases (or None)


def _from_quant_result(name: str, family: str, qr, config: dict) -> MethodResult:
    ws = [qr.dequantized(li) for li in range(len(qr.tiles.layers))]
    return MethodResult(name, family, ws, int(qr.crossbars), float(qr.avg_bits), float(qr.search_seconds),
                        config, note=qr.note, scale_values=int(qr.scale_storage()))


def uniform(tiles: ModelTiles, spec, bits: int) -> MethodResult:
    t0 = time.perf_counter()
    qr = uniform_per_layer(tiles, spec, bits)
    qr.search_seconds = time.perf_counter() - t0
    return _from_quant_result(f"uniform{bits}-layer", "uniform-layer", qr, {"bits": bits})


def rtn(tiles: ModelTiles, spec, bits: int) -> MethodResult:
    t0 = time.perf_counter()
    qr = rtn_per_tile(tiles, spec, bits)
    qr.search_seconds = time.perf_counter() - t0
    return _from_quant_result(f"rtn{bits}-tile", "rtn-tile", qr, {"bits": bits})


def rtn_per_channel(tiles: ModelTiles, spec, bits: int = 8) -> MethodResult:
    """Per-output-channel max-abs round-to-nearest over the whole layer (issue 6's reference).

    One scale per output channel of the layer (all its row tiles share it), every tile at
    ``bits``; counted as uniform ``bits``-bit tiles (the scales live in the digital stage).
    """
    t0 = time.perf_counter()
    L = 2 ** (bits - 1) - 1
    ws = []
    for lay in tiles.layers:
        w = np.asarray(lay.weight, dtype=np.float64)
        axis = 0 if lay.kind == "conv2d" else w.ndim - 1          # conv [Cout, ...]; dense [K, N]
        red = tuple(a for a in range(w.ndim) if a != axis)
        mx = np.abs(w).max(axis=red, keepdims=True)
        s = np.where(mx > 0, mx / L, 1.0)
        ws.append((np.clip(np.round(w / s), -L, L) * s).astype(np.float32))
    dt = time.perf_counter() - t0
    n_channels = sum(int(lay.weight.shape[0 if lay.kind == "conv2d" else -1]) for lay in tiles.layers)
    return MethodResult(f"rtn{bits}-channel", "rtn-channel", ws, int(uniform_crossbars(tiles, spec, bits)),
                        float(bits), dt, {"bits": bits}, note="one max-abs scale per output channel of the "
                        f"layer, counted as uniform {bits}-bit tiles", scale_values=n_channels)


def psq(tiles: ModelTiles, spec, objective: str = "mse", granularity: str = "tile", budget: str | None = None,
        tolerance: float | None = None, importance: np.ndarray | None = None, sens: str | None = None,
        bias_stats: list | None = None, bc: str = "synthetic") -> MethodResult:
    """PSQ search; ``importance`` = per-tile sensitivity weights, family suffix ``-<sens>`` (sens/osens);
    ``bias_stats`` = per-layer ``(E[x] per row, E[x^2])`` (``layer_input_stats``): bias correction from ``bc``
    statistics, suffix ``-bc`` (synthetic) or ``-bnbc`` (bn)."""
    cfg = SearchConfig(objective=objective, granularity=granularity)
    qr = psq_search(tiles.layers, spec, config=cfg, budget=budget, tolerance=tolerance, tiles=tiles,
                    tile_importance=importance)
    fam = (f"psq-{objective}" + ("-column" if granularity == "column" else "")
           + (f"-{sens or 'sens'}" if importance is not None else "")
           + (("-bnbc" if bc == "bn" else "-bc") if bias_stats is not None else ""))
    point = budget if budget is not None else f"tol={tolerance:g}"
    res = _from_quant_result(f"{fam} {point}", fam, qr, {"objective": objective, "granularity": granularity,
                                                        "budget": budget, "tolerance": tolerance,
                                                        "sensitivity": (sens or "sens") if importance is not None else None,
                                                        "bias_correction": bc if bias_stats is not None else None})
    if bias_stats is not None:
        from psq_tvm.core.sensitivity import bias_correction
        res.bias_deltas = [None if st is None else bias_correction(qr, li, st[0]) for li, st in enumerate(bias_stats)]
    return res


def gptq(qr, covariances: list, damp: float = 0.01) -> MethodResult:
    """GPTQ rounding (Frantar et al., ICLR 2023) on the scales and bitwidths of a PSQ result ``qr``.

    The rows (inputs) of every unrolled matrix are rounded in order with the tile's levels; each
    row's rounding error is compensated on the rows not yet rounded through the inverse input
    second-moment matrix ``covariances[li] = E[x x^T]`` (``None``: plain rounding).  Same tiles,
    bitwidths and scales, so the same crossbars.  Needs input statistics with cross terms, i.e.
    data: used by ``oracle_bounds.py`` as a bound on what better rounding can recover.
    """
    from psq_tvm.core.quant import quantize_levels

    t0 = time.perf_counter()
    tiles = qr.tiles
    ws = [qr.dequantized(li) for li in range(len(tiles.layers))]
    for li, _gi, m, grid, first in tiles.matrices():
        lay = tiles.layers[li]
        if covariances[li] is None or lay.groups != 1:
            continue
        K = m.shape[0]
        scale = empty_like_layout(m, np.float64)
        bits = empty_like_layout(m, np.int64)
        for (view, ids), (sv, _), (bv, _) in zip(canonical_blocks(m, grid), canonical_blocks(scale, grid),
                                                 canonical_blocks(bits, grid)):
            sv[...] = np.broadcast_to(qr._scale_view(first + ids, view.shape[3]), view.shape)
            bv[...] = np.broadcast_to(qr.bits[first + ids][:, None, :, None], view.shape)
        H = np.array(covariances[li], dtype=np.float64)
        dead = np.diag(H) <= 0
        H[dead, dead] = 1.0                                   # inputs that are always 0: any value
        H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
        U = np.linalg.cholesky(np.linalg.inv(H)).T             # upper factor of H^-1
        w = np.array(m, dtype=np.float64)
        q = np.empty_like(w)
        for i in range(K):
            q[i] = quantize_levels(w[i], scale[i], bits[i]) * scale[i]
            err = (w[i] - q[i]) / U[i, i]
            w[i + 1:] -= np.outer(U[i, i + 1:], err)
        ws[li] = roll([q], lay.kind, lay.weight.shape, lay.groups).astype(np.float32)
    dt = time.perf_counter() - t0
    return MethodResult(f"gptq {qr.note}", "gptq", ws, int(qr.crossbars), float(qr.avg_bits),
                        float(qr.search_seconds) + dt, {"damp": damp}, note="GPTQ rounding on PSQ scales/bits",
                        scale_values=int(qr.scale_storage()))


def _blockwise_apply(tiles: ModelTiles, fn: Callable[[np.ndarray], np.ndarray]) -> list:
    per_layer: dict[int, list] = {}
    for li, _, m, grid, _first in tiles.matrices():
        out = empty_like_layout(m, np.float64)
        for (view, _ids), (oview, _) in zip(canonical_blocks(m, grid), canonical_blocks(out, grid)):
            nr, tr, nc, tc = view.shape
            flat = np.ascontiguousarray(view.transpose(0, 2, 1, 3), dtype=np.float32).reshape(nr * nc, tr * tc)
            oview[...] = fn(flat).reshape(nr, nc, tr, tc).transpose(0, 2, 1, 3)
        per_layer.setdefault(li, []).append(out)
    return [roll(per_layer[li], lay.kind, lay.weight.shape, lay.groups).astype(np.float32)
            for li, lay in enumerate(tiles.layers)]


def hqq(tiles: ModelTiles, spec, bits: int = 4) -> MethodResult:
    """HQQ per tile: one (scale, zero) per tile row of the flattened tile, optimised (half-quadratic)."""
    import torch
    from hqq.core.quantize import Quantizer

    torch.manual_seed(0)

    def fn(flat: np.ndarray) -> np.ndarray:
        W = torch.from_numpy(flat)
        q, meta = Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=None, optimize=True,
                                     axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
        return Quantizer.dequantize(q, meta).reshape(flat.shape).float().numpy().astype(np.float64)

    t0 = time.perf_counter()
    ws = _blockwise_apply(tiles, fn)
    dt = time.perf_counter() - t0
    return MethodResult(f"hqq{bits}-tile", "hqq-tile", ws, int(uniform_crossbars(tiles, spec, bits)), float(bits),
                        dt, {"bits": bits}, note="asymmetric (scale + zero point per tile), counted as uniform "
                        f"{bits}-bit tiles", scale_values=2 * int(tiles.n_tiles))


# ------------------------------------------------------------------ ONNX weight substitution
def match_initializers(model, layers) -> list[tuple[str, bool]]:
    """For every PIM layer, (initializer name, transposed?) of the ONNX initializer holding its weight.

    Dense layers are ``[K, N]`` (x @ W): a Gemm with transB=1 stores ``W.T``; MatMul stores ``W``.
    Raises ``RuntimeError`` naming the layer if no initializer equals the weight.
    """
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    used: set = set()
    out = []
    for lay in layers:
        w = np.asarray(lay.weight)
        found = None
        for name, a in inits.items():
            if name in used or a.dtype.kind != "f":
                continue
            if a.shape == w.shape and np.array_equal(a.astype(np.float32), w.astype(np.float32)):
                found = (name, False)
                break
            if lay.kind == "dense" and a.ndim == 2 and a.shape == w.shape[::-1] and \
                    np.array_equal(a.T.astype(np.float32), w.astype(np.float32)):
                found = (name, True)
                break
        if found is None:
            raise RuntimeError(f"PIM layer {lay.name!r} ({lay.kind}, weight {list(w.shape)}) matches no ONNX "
                               "initializer (by value, or its transpose for dense)")
        used.add(found[0])
        out.append(found)
    return out


def onnx_with_weights(model, mapping, weights, bias_deltas=None):
    """A copy of ``model`` with the mapped initializers replaced by ``weights``; ``bias_deltas[i]`` (if
    given and not None) is added to the bias of the Conv/Gemm reading weight ``i`` (a zero bias is
    added when the node has none)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    by_name = {i.name: i for i in m.graph.initializer}
    for (name, transposed), w in zip(mapping, weights):
        init = by_name[name]
        arr = np.ascontiguousarray(w.T if transposed else w).astype(numpy_helper.to_array(init).dtype)
        init.CopyFrom(numpy_helper.from_array(arr, name))
    for (name, _), d in zip(mapping, bias_deltas or []):
        if d is None:
            continue
        node = next((n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
                     and n.input[1] == name), None)
        if node is None:
            raise RuntimeError(f"bias correction: no Conv/Gemm/MatMul reads weight {name!r}")
        if node.op_type == "MatMul":                       # y = x @ W (+ d): an Add after it
            bname, tmp = f"{name}__bias_correction", f"{node.output[0]}__before_bias_correction"
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(d, np.float32), bname))
            out = node.output[0]
            node.output[0] = tmp
            idx = list(m.graph.node).index(node)
            m.graph.node.insert(idx + 1, onnx.helper.make_node("Add", [tmp, bname], [out]))
            continue
        if len(node.input) > 2 and node.input[2]:
            b = numpy_helper.to_array(by_name[node.input[2]])
            by_name[node.input[2]].CopyFrom(numpy_helper.from_array((b + d).astype(b.dtype), node.input[2]))
        else:
            bname = f"{name}__bias_correction"
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(d, np.float32), bname))
            del node.input[2:]
            node.input.append(bname)
    return m
