"""What the integer inputs of an ONNX model index, so data-free probes can synthesise valid values.

Token ids feed a ``Gather`` on a constant embedding table: a valid synthetic id is uniform in
``[0, rows)``.  Other integer inputs (attention masks, segment ids without a table) get ones.
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


def synthetic_inputs(inputs: list[dict], ranges: dict[str, int], rng: np.random.Generator) -> list[np.ndarray]:
    """One seeded synthetic value per model input (``inputs``: ``[{name, shape, dtype}]``): N(0, 1) for
    float inputs, uniform ids in ``[0, rows)`` for embedding indices, ones for other integer inputs."""
    out = []
    for i in inputs:
        dt = np.dtype(i["dtype"])
        if dt.kind == "f":
            out.append(rng.standard_normal(i["shape"]).astype(dt))
        elif i["name"] in ranges:
            out.append(rng.integers(0, ranges[i["name"]], size=i["shape"]).astype(dt))
        else:
            out.append(np.ones(i["shape"], dtype=dt))
    return out
