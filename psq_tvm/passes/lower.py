"""Lower: every annotated ``pim_psq`` composite becomes ``R.call_dps_packed("pim_psq.layer", ...)``.

The packed function is registered by :mod:`psq_tvm.runtime`; it receives the layer
input, the layer id (a string) and the output buffer, and runs the layer from the
loaded package's crossbar tables (mode ``sim``, ``fake-quant`` or ``float``).
Everything else in the module stays ordinary Relax and builds with ``llvm``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import Call
from tvm.relax.expr_functor import PyExprMutator, mutator

from .partition import LAYER_ATTR, composite_calls

RUNTIME_FUNC = "pim_psq.layer"


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, layer_of: dict):
        super().__init__(mod)
        self.layer_of = layer_of

    def visit_call_(self, call: Call) -> relax.Expr:  # noqa: N802 (TVM naming)
        call = super().visit_call_(call)
        if isinstance(call.op, relax.GlobalVar) and call.op.name_hint in self.layer_of:
            args = list(call.args) + [tvm.ir.StringImm(str(self.layer_of[call.op.name_hint]))]
            return relax.call_dps_packed(RUNTIME_FUNC, relax.Tuple(args), call.ty)
        return call


@tvm.transform.module_pass(opt_level=0, name="pim_psq.LowerToPIM")
class LowerToPIM:
    """Replace annotated PIM composites by calls into the PIM runtime and drop their functions."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        layer_of = {}
        for _, _, gv in composite_calls(mod):
            func = mod[gv]
            if func.attrs is None or LAYER_ATTR not in func.attrs:
                raise ValueError(f"composite {gv.name_hint} has no {LAYER_ATTR}: run PartitionForPIM before LowerToPIM")
            layer_of[gv.name_hint] = int(func.attrs[LAYER_ATTR])
        if not layer_of:
            return mod
        rw = _Rewriter(mod, layer_of)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function) and gv.name_hint not in layer_of:
                rw.builder_.update_func(gv, rw.visit_expr(func))
        new = rw.builder_.get()
        for name in layer_of:
            new = _without(new, name)
        return new


def _without(mod: tvm.IRModule, name: str) -> tvm.IRModule:
    funcs = {gv: f for gv, f in mod.functions.items() if gv.name_hint != name}
    return tvm.IRModule(funcs, attrs=mod.attrs)
