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

import tvm

from ..core.crossbar import CrossbarSpec, preset
from ..core.quant import QuantResult
from ..core.search import DEFAULT_GRANULARITY, DEFAULT_OBJECTIVE, SearchConfig, psq_search
from ..core.tiling import Layer
from .partition import LAYER_ATTR, composite_calls, host_layers, layer_record

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
