"""Partition: group every crossbar-mappable layer into a ``pim_psq.*`` composite function."""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Call, Constant
from tvm.relax.backend.pattern_registry import get_patterns_with_prefix
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..core.crossbar import CrossbarSpec, preset
from ..frontend.onnx_import import check_relax_weights, const_array, fingerprint, fold_constants_numpy
from .patterns import PREFIX, WEIGHT_OPS, _shape, active_spec, host_reason

ATTR_NAME = "pim_psq.name"
#: index of a PIM layer in the manifest's layer list (program order), read by LowerToPIM
LAYER_ATTR = "pim_psq.layer_id"
HOST_ATTR = "pim_psq.host_layers"


def composite_calls(mod: tvm.IRModule, func_name: str = "main") -> list[tuple[relax.Var, Call, relax.GlobalVar]]:
    """(bound var, call, callee) of every call to a ``pim_psq`` composite function, in program order."""
    out = []
    func = mod[func_name]
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, Call) and isinstance(v.op, relax.GlobalVar):
                callee = mod[v.op]
                comp = callee.attrs.get("Composite") if callee.attrs is not None else None
                if comp is not None and str(comp).startswith(PREFIX + "."):
                    out.append((b.var, v, v.op))
    return out


def inner_calls(func: relax.Function) -> dict[str, Call]:
    """The op calls inside a composite function by op name (conv2d / matmul / add)."""
    calls: dict[str, Call] = {}

    def visit(e):
        if isinstance(e, Call) and isinstance(e.op, tvm.ir.Op):
            calls.setdefault(e.op.name, e)

    relax.analysis.post_order_visit(func.body, visit)
    return calls


def weight_of(func: relax.Function) -> Any:
    """The numpy weight constant of a composite (for naming)."""
    calls = inner_calls(func)
    comp = str(func.attrs["Composite"])
    if "conv2d" in comp:
        return const_array(calls["relax.nn.conv2d"].args[1])
    mm = calls["relax.matmul"]
    return const_array(mm.args[0] if comp.endswith("dense_left") else mm.args[1])


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


def layer_records(mod: tvm.IRModule) -> list[dict[str, Any]]:
    """Manifest layer records of every PIM composite, in layer-id order."""
    return [layer_record(mod[gv], call, k) for k, (_, call, gv) in enumerate(composite_calls(mod))]


def _unique(name: str, used: set[str]) -> str:
    base, k = name, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


@mutator
class _Namer(PyExprMutator):
    """Give every composite call site its own function, named after its model layer.

    FuseOpsByPattern shares one function between structurally equal layers (same
    weights, e.g. constant-initialised models); each layer needs its own tiles.
    """

    def __init__(self, mod, names, used, counts):
        super().__init__(mod)
        self.mod_, self.names, self.used, self.counts = mod, names, used, counts
        self.seen: set[str] = set()
        self.drop: set[str] = set()

    def run(self) -> tvm.IRModule:
        gv = self.mod_.get_global_var("main")
        self.builder_.update_func(gv, self.visit_expr(self.mod_["main"]))
        out = self.builder_.get()
        funcs = {g: f for g, f in out.functions.items() if g.name_hint not in self.drop}
        return tvm.IRModule(funcs, attrs=out.attrs)

    def visit_call_(self, call):  # noqa: N802
        call = super().visit_call_(call)
        if not isinstance(call.op, relax.GlobalVar):
            return call
        func = self.mod_[call.op]
        comp = func.attrs.get("Composite") if func.attrs is not None else None
        if comp is None or not str(comp).startswith(PREFIX + "."):
            return call
        op = "conv2d" if "conv2d" in str(comp) else "dense"
        name = self.names.get(fingerprint(weight_of(func))) or f"{op}_{self.counts.get(op, 0)}"
        self.counts[op] = self.counts.get(op, 0) + 1
        name = _unique(name, self.used)
        self.drop.add(call.op.name_hint)
        new_gv = self.builder_.add_func(func.with_attr(ATTR_NAME, name), f"pim_psq_{_ident(name)}")
        return Call(new_gv, call.args, call.attrs, call.ty_args, call.span, ret_ty=call.ty)


def _ident(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)


@tvm.transform.module_pass(opt_level=0, name="pim_psq.PartitionForPIM")
class PartitionForPIM:
    """Fuse conv2d/dense layers with constant weights into ``pim_psq.*`` composites (BYOC idiom).

    ``spec`` decides borderline layers (grouped/depthwise convs); ``names`` maps weight
    fingerprints to model layer names (from :func:`psq_tvm.importer.weight_names`).
    Layers left on the host are recorded, with the reason, in the module attribute
    ``pim_psq.host_layers`` (a JSON list of ``{name, op, reason}``).  A constant weight with NaN/Inf
    values or no elements is an error (:class:`~psq_tvm.frontend.ModelImportError`, which TVM's pass
    machinery re-raises as ``RuntimeError``), as at ONNX import.
    """

    def __init__(self, spec: CrossbarSpec | None = None, names: Mapping[str, str] | None = None):
        self.spec = spec or preset()
        self.names = dict(names or {})

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        mod = relax.transform.ConvertToDataflow()(mod)
        mod, left = fold_constants_numpy(mod)          # e.g. Gemm's permute_dims(W) becomes a constant
        if left:
            mod = relax.transform.FoldConstant()(mod)
        check_relax_weights(mod, "<module>")          # NaN/Inf/empty weights: an error, not a silent host layer
        with active_spec(self.spec):
            patterns = get_patterns_with_prefix(PREFIX)
            mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=True, annotate_codegen=False)(mod)
        used: set[str] = set()
        counts: dict[str, int] = {}
        mod = _Namer(mod, self.names, used, counts).run()
        for k, (_, _, gv) in enumerate(composite_calls(mod)):
            mod[gv] = mod[gv].with_attr(LAYER_ATTR, k)
        host = []
        k = 0
        for block in mod["main"].body.blocks:
            for b in block.bindings:
                v = b.value
                if isinstance(v, Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in WEIGHT_OPS:
                    op = v.op.name.split(".")[-1]
                    name = None
                    for a in v.args[:2]:
                        if isinstance(a, Constant):
                            name = self.names.get(fingerprint(const_array(a)))
                    host.append({"name": _unique(name or f"host_{op}_{k}", used), "op": op,
                                 "reason": host_reason(v, self.spec), "macs": host_macs(v)})
                    k += 1
        return mod.with_attr(HOST_ATTR, json.dumps(host))


def host_macs(call: Call) -> int | None:
    """Multiply-accumulates of one host weight op per run (None when a shape is not static)."""
    out, a, w = _shape(call), _shape(call.args[0]), _shape(call.args[1])
    if out is None or a is None or w is None:
        return None
    if call.op.name == "relax.matmul":
        return int(np.prod(out)) * int(a[-1])
    per = int(np.prod(w[1:]))                      # conv weight [O, I/g, k...]; transposed [I, O/g, k...]
    return (int(np.prod(a)) if "transpose" in call.op.name else int(np.prod(out))) * per


def host_layers(mod: tvm.IRModule) -> list[dict[str, str]]:
    """The host-layer list recorded by :class:`PartitionForPIM` (empty if it did not run)."""
    attrs = mod.attrs
    if attrs is None or HOST_ATTR not in attrs:
        return []
    return json.loads(str(attrs[HOST_ATTR]))
