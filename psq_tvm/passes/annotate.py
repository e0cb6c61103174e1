"""Annotate: one whole-model PSQ search over every partitioned layer; tile decisions attached.

Each ``pim_psq`` composite function gets the attributes ``pim_psq.layer_id`` (its index
in the manifest's layer list) and ``pim_psq.tiles`` (a JSON list of its tiles' bits and
scales).  The full result (the :class:`~psq_tvm.quant.QuantResult` and the layer
records the package writer needs) is kept in a side table reachable from the module
through :func:`annotation`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Call, Constant

from ..core.crossbar import CrossbarSpec, preset
from ..frontend.onnx_import import const_array
from ..core.quant import QuantResult
from ..core.search import DEFAULT_GRANULARITY, DEFAULT_OBJECTIVE, SearchConfig, psq_search
from ..core.tiling import Layer
from .partition import ATTR_NAME, composite_calls, host_layers, inner_calls
from .patterns import _shape

LAYER_ATTR = "pim_psq.layer_id"
TILES_ATTR = "pim_psq.tiles"
STATE_ATTR = "pim_psq.annotation"

_STATES: dict[str, "Annotation"] = {}
_counter = itertools.count()


@dataclasses.dataclass
class Annotation:
    """What the annotate pass decided, for lowering and for the package writer."""

    spec: CrossbarSpec
    layers: list[dict[str, Any]]        # manifest layer records (+ "weight"/"bias" numpy arrays)
    result: QuantResult | None
    host_layers: list[dict[str, str]]
    options: dict[str, Any]


def annotation(mod: tvm.IRModule) -> Annotation:
    """The :class:`Annotation` of a module that went through :class:`AnnotatePSQ`."""
    attrs = mod.attrs
    if attrs is None or STATE_ATTR not in attrs or str(attrs[STATE_ATTR]) not in _STATES:
        raise ValueError("module has no PSQ annotation: run psq_tvm.passes.AnnotatePSQ first")
    return _STATES[str(attrs[STATE_ATTR])]


def _ints(v) -> list[int]:
    return [int(x) for x in v]


def layer_record(func: relax.Function, call: Call, lid: int) -> dict[str, Any]:
    """Manifest layer record for one composite function (weights kept as numpy for the search)."""
    comp = str(func.attrs["Composite"])
    calls = inner_calls(func)
    bias = None
    if "relax.add" in calls:
        bias = const_array(calls["relax.add"].args[1]).astype(np.float32).reshape(-1)
    rec: dict[str, Any] = {"id": lid, "name": str(func.attrs[ATTR_NAME]), "pattern": comp}
    if "conv2d" in comp:
        conv = calls["relax.nn.conv2d"]
        w = const_array(conv.args[1]).astype(np.float32, copy=False)
        a = conv.attrs
        g = int(a.groups)
        rec.update(op="conv2d", weight_shape=list(w.shape), groups=g,
                   matrix_shape=[int(w.shape[1] * w.shape[2] * w.shape[3]), int(w.shape[0] // g)],
                   strides=_ints(a.strides), padding=_ints(a.padding), dilation=_ints(a.dilation), operand="right")
    else:
        mm = calls["relax.matmul"]
        left = comp.endswith("dense_left")
        w = const_array(mm.args[0] if left else mm.args[1]).astype(np.float32, copy=False)
        if left:
            w = np.ascontiguousarray(w.T)   # Y = C @ X  ==  (X^T @ C^T)^T
        rec.update(op="dense", weight_shape=list(w.shape), groups=1, matrix_shape=list(w.shape),
                   strides=[1, 1], padding=[0, 0, 0, 0], dilation=[1, 1], operand="left" if left else "right")
    rec["input_shape"] = _shape(call.args[0])
    rec["output_shape"] = _shape(call)
    rec["weight"] = w
    rec["bias_array"] = bias
    return rec


@tvm.transform.module_pass(opt_level=0, name="pim_psq.AnnotatePSQ")
class AnnotatePSQ:
    """Run one PSQ search across all partitioned layers and attach each layer's tile decisions.

    ``granularity`` ('tile' | 'column': one scale per tile or per tile column), ``objective`` ('mse' | 'cdf-kl'), ``budget`` (e.g. ``"avg-bits=4.5"``, ``"crossbars=N"``,
    ``"reduction=3.5"``), ``tolerance`` and ``bits`` are passed to :func:`psq_tvm.psq_search`.
    """

    def __init__(self, spec: CrossbarSpec | None = None, objective: str = DEFAULT_OBJECTIVE, budget: str | None = None,
                 tolerance: float | None = None, bits: Sequence[int] | None = None, granularity: str = DEFAULT_GRANULARITY):
        self.spec = spec or preset()
        self.options = {"objective": objective, "budget": budget, "tolerance": tolerance,
                        "bits": list(bits) if bits else None, "granularity": granularity}
        self.config = SearchConfig(objective=objective, granularity=granularity)
        self.annotation: Annotation | None = None

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        found = composite_calls(mod)
        records = [layer_record(mod[gv], call, k) for k, (_, call, gv) in enumerate(found)]
        result = None
        if records:
            layers = [Layer(r["name"], r["weight"], "conv2d" if r["op"] == "conv2d" else "dense", r["groups"])
                      for r in records]
            o = self.options
            result = psq_search(layers, self.spec, config=self.config, budget=o["budget"],
                                tolerance=o["tolerance"], bits=o["bits"])
            for k, (_, _, gv) in enumerate(found):
                ids = result.tiles.layer_tiles(k)
                tiles = [{"bits": int(result.bits[t]), "scale": result.tile_scale(int(t))} for t in ids]
                mod[gv] = mod[gv].with_attr(LAYER_ATTR, k).with_attr(TILES_ATTR, json.dumps(tiles))
        token = f"psq{next(_counter)}"
        self.annotation = Annotation(self.spec, records, result, host_layers(mod), dict(self.options))
        _STATES[token] = self.annotation
        return mod.with_attr(STATE_ATTR, token)
