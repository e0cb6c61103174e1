"""BYOC patterns (prefix ``pim_psq``) for the layers a crossbar can hold, and the rules that decide.

Registered in TVM's pattern registry on import:

* ``pim_psq.conv2d``       -- ``nn.conv2d(x, W)``, ``W`` constant, any stride/padding/dilation/groups;
* ``pim_psq.conv2d_bias``  -- ``add(nn.conv2d(x, W), b)``, ``b`` a per-output-channel constant;
* ``pim_psq.dense``        -- ``matmul(x, W)``, ``W`` a constant 2-D matrix (ONNX Gemm's transposed
  weight arrives folded, ``transA`` as a host ``permute_dims`` on ``x``);
* ``pim_psq.dense_bias``   -- ``add(matmul(x, W), b)``;
* ``pim_psq.dense_left``   -- ``matmul(C, x)``, constant left operand (computed as ``(x^T C^T)^T``).

The check functions consult the crossbar spec of the compile in progress (set by
:func:`active_spec`), so that e.g. depthwise convs that would waste a crossbar stay on the host.
:func:`host_reason` gives the same verdict, with its reason, for any conv/matmul call.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
from tvm import relax
from tvm.ir.expr import Call, Constant
from tvm.relax.backend.pattern_registry import register_patterns
from tvm.relax.dpl.pattern import is_const, is_op, wildcard
from tvm.relax.transform import PatternCheckContext

from ..core.crossbar import CrossbarSpec, preset
from ..frontend.onnx_import import const_array
from ..core.tiling import WeightError, check_weight, grouped_conv_rule

PREFIX = "pim_psq"
_SPEC: list[CrossbarSpec] = [preset()]


@contextlib.contextmanager
def active_spec(spec: CrossbarSpec) -> Iterator[None]:
    """Make ``spec`` the one the pattern checks use while partitioning."""
    _SPEC.append(spec)
    try:
        yield
    finally:
        _SPEC.pop()


def _shape(expr) -> list[int] | None:
    si = expr.ty
    if not isinstance(si, relax.TensorType) or si.shape is None or not isinstance(si.shape, relax.ShapeExpr):
        return None
    dims = []
    for d in si.shape.values:
        if not isinstance(d, (int,)) and not hasattr(d, "value"):
            return None
        dims.append(int(d.value) if hasattr(d, "value") else int(d))
    return dims


def _dtype(expr) -> str:
    si = expr.ty
    return str(si.dtype) if isinstance(si, relax.TensorType) else "?"


def conv_reason(call: Call, spec: CrossbarSpec) -> str | None:
    """None when the conv2d call can go to the crossbars, else why it stays on the host."""
    x, w = call.args[0], call.args[1]
    a = call.attrs
    if not isinstance(w, Constant):
        return "weight is computed at run time, not a constant"
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
        return f"layout {a.data_layout}/{a.kernel_layout} not supported (NCHW/OIHW only)"
    if not _dtype(x).startswith("float") or not _dtype(w).startswith("float"):
        return f"dtype {_dtype(x)}/{_dtype(w)} is not floating point"
    if _shape(call) is None or _shape(x) is None:
        return "dynamic shape (give --input-shapes)"
    wnp = const_array(w)
    try:
        check_weight("conv2d", wnp)
    except WeightError as e:
        return str(e)
    on_pim, why = grouped_conv_rule(spec.rows, spec.cols, wnp.shape, int(a.groups))
    return None if on_pim else why


def dense_reason(call: Call, spec: CrossbarSpec, left: bool = False) -> str | None:
    """None when the matmul call can go to the crossbars (constant right, or left with ``left``)."""
    x, w = (call.args[1], call.args[0]) if left else (call.args[0], call.args[1])
    if not isinstance(w, Constant):
        return "weight operand is computed at run time, not a constant"
    ws = _shape(w)
    if ws is None or len(ws) != 2:
        return f"constant operand has shape {ws}; only 2-D weight matrices map to crossbars"
    if not _dtype(x).startswith("float") or not _dtype(w).startswith("float"):
        return f"dtype {_dtype(x)}/{_dtype(w)} is not floating point"
    xs = _shape(x)
    if xs is None or _shape(call) is None:
        return "dynamic shape (give --input-shapes)"
    if left and len(xs) < 2:
        return "constant-left matmul with a 1-D right operand"
    try:
        check_weight("matmul", const_array(w))
    except WeightError as e:
        return str(e)
    return None


def host_reason(call: Call, spec: CrossbarSpec) -> str:
    """Why a conv/matmul call that was not partitioned stays on the host."""
    op = call.op.name
    if op == "relax.nn.conv2d":
        return conv_reason(call, spec) or "not matched by a pim_psq pattern"
    if op == "relax.matmul":
        a, b = call.args[0], call.args[1]
        if isinstance(b, Constant):
            return dense_reason(call, spec) or "not matched by a pim_psq pattern"
        if isinstance(a, Constant):
            return dense_reason(call, spec, left=True) or "not matched by a pim_psq pattern"
        return "both operands are computed at run time (activation x activation matmul)"
    return f"{op.split('.')[-1]} has no crossbar mapping (only conv2d and dense/matmul do)"


#: ops that carry weights but stay on the host; listed in host_layers with a reason
WEIGHT_OPS = ("relax.nn.conv2d", "relax.matmul", "relax.nn.conv1d", "relax.nn.conv3d",
              "relax.nn.conv2d_transpose", "relax.nn.conv1d_transpose")


def bias_ok(add: Call, root_out: relax.Expr, channel_axis: int) -> bool:
    """True when ``add``'s constant operand is a per-output-channel bias that does not change the shape."""
    b = add.args[1]
    bs, os_ = _shape(b), _shape(root_out)
    if bs is None or os_ is None or _shape(add) != os_ or not _dtype(b).startswith("float"):
        return False
    n = os_[channel_axis]
    if int(np.prod(bs)) != n:
        return False
    # the channel dim must line up with the output's channel axis under broadcasting
    pad = [1] * (len(os_) - len(bs)) + list(bs)
    return len(pad) == len(os_) and pad[channel_axis] == n and all(d == 1 for k, d in enumerate(pad) if k != channel_axis % len(os_))


def _single_use(ctx: PatternCheckContext, expr) -> bool:
    var = ctx.value_to_bound_var.get(expr)
    if var is None:
        return True
    return len(ctx.var_usages.get(var, [])) <= 1


def _check_conv(ctx: PatternCheckContext) -> bool:
    return conv_reason(ctx.annotated_expr["root_op"], _SPEC[-1]) is None


def _check_conv_bias(ctx: PatternCheckContext) -> bool:
    conv = ctx.annotated_expr["root_op"]
    return (_check_conv(ctx) and _single_use(ctx, conv) and bias_ok(ctx.annotated_expr["root"], conv, 1))


def _check_dense(ctx: PatternCheckContext) -> bool:
    return dense_reason(ctx.annotated_expr["root_op"], _SPEC[-1]) is None and isinstance(
        ctx.annotated_expr["root_op"].args[1], Constant)


def _check_dense_bias(ctx: PatternCheckContext) -> bool:
    mm = ctx.annotated_expr["root_op"]
    return _check_dense(ctx) and _single_use(ctx, mm) and bias_ok(ctx.annotated_expr["root"], mm, -1)


def _check_dense_left(ctx: PatternCheckContext) -> bool:
    return dense_reason(ctx.annotated_expr["root_op"], _SPEC[-1], left=True) is None


def _patterns():
    x, w = wildcard(), is_const()
    conv = is_op("relax.nn.conv2d")(x, w)
    b = is_const()
    conv_b = is_op("relax.add")(conv, b)
    x2, w2 = wildcard(), is_const()
    mm = is_op("relax.matmul")(x2, w2)
    b2 = is_const()
    mm_b = is_op("relax.add")(mm, b2)
    c3, x3 = is_const(), wildcard()
    mm_l = is_op("relax.matmul")(c3, x3)
    # registry order: later entries have higher priority
    return [
        (f"{PREFIX}.dense_left", mm_l, {"input": x3, "weight": c3, "root_op": mm_l, "root": mm_l}, _check_dense_left),
        (f"{PREFIX}.dense", mm, {"input": x2, "weight": w2, "root_op": mm, "root": mm}, _check_dense),
        (f"{PREFIX}.dense_bias", mm_b, {"input": x2, "weight": w2, "bias": b2, "root_op": mm, "root": mm_b},
         _check_dense_bias),
        (f"{PREFIX}.conv2d", conv, {"input": x, "weight": w, "root_op": conv, "root": conv}, _check_conv),
        (f"{PREFIX}.conv2d_bias", conv_b, {"input": x, "weight": w, "bias": b, "root_op": conv, "root": conv_b},
         _check_conv_bias),
    ]


register_patterns(_patterns())
