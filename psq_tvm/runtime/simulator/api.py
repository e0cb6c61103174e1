"""The public functions: the compiled-layer cache (:func:`compile_layer`, :func:`clear_cache`),
:func:`run_layer`, :func:`golden_layer`, :func:`layer_integers`, and :func:`layer_program` (the
manifest-style layer dict of a ``QuantResult`` layer)."""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from ...core.crossbar import CrossbarSpec
from .layer import CompiledLayer, _weakrefable
from .options import SimOptions, _options


# ------------------------------------------------------------------ cache
_CACHE: dict[int, tuple[Any, dict]] = {}


def clear_cache() -> None:
    """Forget compiled layers (call after modifying a cells array in place)."""
    _CACHE.clear()


def _layer_key(layer: Mapping[str, Any], spec: CrossbarSpec) -> Any:
    def freeze(v: Any) -> Any:
        if isinstance(v, Mapping):
            return tuple(sorted((k, freeze(w)) for k, w in v.items()))
        if isinstance(v, (list, tuple)):
            return tuple(freeze(w) for w in v)
        if isinstance(v, np.ndarray):
            return (v.shape, v.tobytes())
        return v
    return (freeze(layer), spec)


def compile_layer(layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec) -> CompiledLayer:
    """A (cached) :class:`CompiledLayer` for ``layer`` on ``cells``.

    The cache is keyed by the cells object (its identity) and the layer's
    content; cells are treated as immutable -- call :func:`clear_cache` after
    changing them in place.
    """
    key = _layer_key(layer, spec)
    entry = _CACHE.get(id(cells))
    if entry is None or entry[0]() is not cells:
        if _weakrefable(cells):
            ref = weakref.ref(cells, lambda _r, i=id(cells): _CACHE.pop(i, None))
        else:   # pragma: no cover
            ref = lambda c=cells: c
        entry = (ref, {})
        _CACHE[id(cells)] = entry
    comp = entry[1].get(key)
    if comp is None:
        comp = CompiledLayer(layer, cells, spec)
        entry[1][key] = comp
    return comp


def run_layer(x: Any, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec, bias: Any = None,
              options: SimOptions | Mapping[str, Any] | None = None) -> np.ndarray:
    """Simulate one PIM layer on ``x`` reading weights from ``cells`` only (float32 output).

    Dense ``x [..., K] -> [..., N]``; conv2d ``x`` NCHW -> NCHW.  The fast exact
    path is used automatically for strips whose ADC is lossless (and without
    non-idealities), the bit-serial path otherwise or with
    ``options.force_bitserial``.
    """
    return compile_layer(layer, cells, spec).run(x, bias, _options(options))


def golden_layer(x: Any, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec, bias: Any = None,
                 options: SimOptions | Mapping[str, Any] | None = None) -> np.ndarray:
    """Fake-quantised float64 reference of the layer (weights = scale x levels decoded from the cells).

    Same activation quantisation as :func:`run_layer` (``options.act_bits``); no ADC, no device effects.
    """
    return compile_layer(layer, cells, spec).golden(x, bias, _options(options))


def layer_integers(x: Any, layer: Mapping[str, Any], cells: np.ndarray, spec: CrossbarSpec,
                   options: SimOptions | Mapping[str, Any] | None = None, path: str = "auto") -> list[dict]:
    """Per row strip, the integer results of ``path`` before scaling (``q_x . q_w`` when lossless).

    ``path``: ``"exact"`` (one matmul per strip, always the ideal integers), ``"bitserial"`` (per-cycle
    reads, ADC, shift-and-add, corrections) or ``"auto"`` (what :func:`run_layer` uses).  Each entry has
    ``group``, ``row0``, ``nrows``, ``cols`` (output columns), ``scale`` (per column), ``act_scale`` and
    ``values`` ``[M, len(cols)]``.
    """
    return compile_layer(layer, cells, spec).integers(x, _options(options), path)


def layer_program(result: Any, li: int, cells: np.ndarray | None = None, *, strides: Sequence[int] = (1, 1),
                  padding: Sequence[int] = (0, 0, 0, 0), dilation: Sequence[int] = (1, 1),
                  bias: str | None = None, layer_id: Any = None) -> dict:
    """The manifest-style layer dict of layer ``li`` of a :class:`~psq_tvm.quant.QuantResult`.

    ``cells`` is accepted for symmetry with :func:`run_layer` and not read.
    Conv hyper-parameters are not part of a ``QuantResult`` and are given here.
    """
    del cells
    tiles, pl = result.tiles, result.placement
    lay = tiles.layers[li]
    slices = result.slices
    out_tiles = []
    for t in tiles.layer_tiles(li):
        t = int(t)
        out_tiles.append({
            "id": t, "group": int(tiles.group[t]), "row0": int(tiles.row0[t]), "col0": int(tiles.col0[t]),
            "nrows": int(tiles.nrows[t]), "ncols": int(tiles.ncols[t]), "bits": int(result.bits[t]),
            "scale": result.tile_scale(t), "slices": int(slices[t]),
            "crossbars": pl.crossbar_ids(t).tolist(),
            "row_off": int(pl.row_off[t]), "col_off": int(pl.col_off[t]),
        })
    return {
        "id": li if layer_id is None else layer_id, "name": lay.name, "op": lay.kind,
        "weight_shape": [int(v) for v in lay.weight.shape], "matrix_shape": [int(v) for v in lay.matrix_shape],
        "groups": int(lay.groups), "strides": [int(v) for v in strides], "padding": [int(v) for v in padding],
        "dilation": [int(v) for v in dilation], "bias": bias, "tiles": out_tiles,
    }
