"""What the inputs of an ONNX model expect, so data-free probes can synthesise plausible values.

Token ids feed a ``Gather`` on a constant embedding table: a valid synthetic id is uniform in
``[0, rows)``.  Other integer inputs (attention masks, segment ids without a table) get ones.
A float input that the graph first normalises with constants (``Sub``/``Div``/``Mul``/``Add``, as
image models do with ``(x - mean) / std``) gets inputs that are N(0, 1) *after* that normalisation,
i.e. in the range the model was trained on (:func:`input_normalization`); other float inputs get N(0, 1).
"""

from __future__ import annotations

import numpy as np


def index_ranges(model) -> dict[str, int]:
    """``{input name: number of rows}`` for integer graph inputs used as ``Gather`` indices of a constant."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    ints = {i.name for i in model.graph.input if i.name not in inits and i.type.tensor_type.elem_type in (
        TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8)}
    # follow Cast / Identity / Unsqueeze / Reshape / Squeeze between the input and the Gather
    alias = {n: n for n in ints}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape", "Squeeze", "Flatten") and node.input \
                and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in alias:
            continue
        table = inits.get(node.input[0])
        if table is None or not table.dims:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        rows = int(table.dims[axis % len(table.dims)])
        name = alias[node.input[1]]
        out[name] = min(out.get(name, rows), rows)
    return out


def _constant_values(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    out[node.output[0]] = np.asarray(a.f if a.name == "value_float" else a.i)
    return out


#: elementwise ops of an input normalisation chain, as the affine map they apply to ``a*x + b``
_AFFINE_OPS = ("Sub", "Add", "Mul", "Div")


def input_normalization(model, shapes: dict[str, list[int]]) -> dict[str, dict[str, list]]:
    """``{input name: {"scale": a, "shift": b}}`` for float graph inputs whose only use is a chain of
    ``Sub``/``Add``/``Mul``/``Div`` by constants, i.e. the graph computes ``z = a * x + b`` first
    (``a``, ``b`` nested lists broadcastable to the input's shape ``shapes[name]``, e.g. per channel).

    Only chains that keep the input's shape and have a finite, nonzero ``a`` everywhere are reported.
    """
    from onnx import TensorProto

    consts = _constant_values(model)
    inits = {t.name for t in model.graph.initializer}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outs = {o.name for o in model.graph.output}
    result: dict[str, dict[str, list]] = {}
    for gi in model.graph.input:
        name = gi.name
        if name in inits or name not in shapes or gi.type.tensor_type.elem_type not in (
                TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            continue
        shape = tuple(int(d) for d in shapes[name])
        a, b = np.ones(()), np.zeros(())
        cur, steps = name, 0
        while cur not in outs and len(users.get(cur, [])) == 1:
            node = users[cur][0]
            if node.op_type not in _AFFINE_OPS or len(node.input) != 2:
                break
            k = 1 - list(node.input).index(cur)
            if node.input[k] not in consts or (k == 0 and node.op_type in ("Sub", "Div")) or node.input[0] == node.input[1]:
                break
            c = np.asarray(consts[node.input[k]], np.float64)
            try:
                if np.broadcast_shapes(shape, c.shape) != shape:
                    break
            except ValueError:
                break
            if node.op_type == "Sub":
                b = b - c
            elif node.op_type == "Add":
                b = b + c
            elif node.op_type == "Mul":
                a, b = a * c, b * c
            else:
                a, b = a / c, b / c
            cur, steps = node.output[0], steps + 1
        if steps and np.all(np.isfinite(a)) and np.all(a != 0) and np.all(np.isfinite(b)):
            a, b = np.broadcast_arrays(a, b)
            result[name] = {"scale": a.tolist(), "shift": b.tolist()}
    return result


def synthetic_inputs(inputs: list[dict], ranges: dict[str, int], rng: np.random.Generator) -> list[np.ndarray]:
    """One seeded synthetic value per model input (``inputs``: ``[{name, shape, dtype}]``, optionally
    ``normalization`` from :func:`input_normalization`): N(0, 1) for float inputs -- after the model's own
    input normalisation where it has one, ``x = (z - b) / a`` --, uniform ids in ``[0, rows)`` for
    embedding indices, ones for other integer inputs."""
    out = []
    for i in inputs:
        dt = np.dtype(i["dtype"])
        if dt.kind == "f":
            z = rng.standard_normal(i["shape"])
            norm = i.get("normalization")
            if norm:
                z = (z - np.asarray(norm["shift"], np.float64)) / np.asarray(norm["scale"], np.float64)
            out.append(z.astype(dt))
        elif i["name"] in ranges:
            out.append(rng.integers(0, ranges[i["name"]], size=i["shape"]).astype(dt))
        else:
            out.append(np.ones(i["shape"], dtype=dt))
    return out
