"""Import of real-world ONNX graph shapes (computed Reshape targets as torch and paddle2onnx write them)
and bad weights, on models the tests build (no network, no torch at test time)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

pytest.importorskip("tvm")

import psq_tvm  # noqa: E402
from psq_tvm.frontend import onnx_import  # noqa: E402
from psq_tvm.frontend.bn_stats import batchnorm_input_stats  # noqa: E402
from psq_tvm.frontend.onnx_import import ModelImportError, import_onnx, prepare_onnx  # noqa: E402
from psq_tvm.frontend.onnx_import import fold_onnx, fold_shapes  # noqa: E402


def _model(nodes, inputs, outputs, inits, opset=13, producer="pytorch"):
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    m.producer_name = producer
    # outputs declared without a shape (None) get the inferred one, so the checker accepts the model
    inferred = onnx.shape_inference.infer_shapes(m)
    for o, io in zip(m.graph.output, inferred.graph.output):
        if not o.type.tensor_type.HasField("shape"):
            o.CopyFrom(io)
    onnx.checker.check_model(m)
    return m


def _i64(name, values):
    return nh.from_array(np.array(values, dtype=np.int64), name)


# ------------------------------------------------------------------------- numpy reference ops
def np_conv(x, w, b=None, pad=0):
    """NCHW x OIHW, stride 1, symmetric zero padding."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))      # N C H W kh kw
    y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def np_bn(x, gamma, beta, mean, var, eps=1e-5):
    r = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
    return r(gamma) * (x - r(mean)) / np.sqrt(r(var) + eps) + r(beta)


# ------------------------------------------------------------------------- torch-style (dynamic_axes)
def torch_dynamic_model(head="Gemm", seed=0):
    """What ``torch.onnx.export(net, x, dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})`` writes
    for ``conv -> relu -> x.view(x.size(0), -1) -> linear``: the flatten is Shape -> Gather -> Unsqueeze ->
    Concat -> Reshape, so its target is only known once the input shape is."""
    r = np.random.default_rng(seed)
    w1 = r.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = r.standard_normal(4).astype(np.float32) * 0.1
    k = 4 * 6 * 6
    w2 = r.standard_normal((5, k)).astype(np.float32) * 0.05           # torch Linear: [out, in]
    b2 = r.standard_normal(5).astype(np.float32) * 0.1
    inits = [nh.from_array(w1, "conv.weight"), nh.from_array(b1, "conv.bias"),
             _i64("/Constant_output_0", 0), _i64("/Constant_1_output_0", [0]), _i64("/Constant_2_output_0", [-1])]
    nodes = [
        h.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["/conv/Conv_output_0"], name="/conv/Conv",
                    kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["/conv/Conv_output_0"], ["/relu/Relu_output_0"], name="/relu/Relu"),
        h.make_node("Shape", ["/relu/Relu_output_0"], ["/Shape_output_0"], name="/Shape"),
        h.make_node("Gather", ["/Shape_output_0", "/Constant_output_0"], ["/Gather_output_0"], name="/Gather", axis=0),
        h.make_node("Unsqueeze", ["/Gather_output_0", "/Constant_1_output_0"], ["/Unsqueeze_output_0"],
                    name="/Unsqueeze"),
        h.make_node("Concat", ["/Unsqueeze_output_0", "/Constant_2_output_0"], ["/Concat_output_0"], name="/Concat",
                    axis=0),
        h.make_node("Reshape", ["/relu/Relu_output_0", "/Concat_output_0"], ["/Reshape_output_0"], name="/Reshape"),
    ]
    if head == "Gemm":
        inits += [nh.from_array(w2, "fc.weight"), nh.from_array(b2, "fc.bias")]
        nodes.append(h.make_node("Gemm", ["/Reshape_output_0", "fc.weight", "fc.bias"], ["y"], name="/fc/Gemm",
                                 alpha=1.0, beta=1.0, transB=1))
    else:     # torch exports a bias-free linear on a >2-D input, or x @ W, as MatMul
        inits += [nh.from_array(np.ascontiguousarray(w2.T), "onnx::MatMul_20")]
        nodes.append(h.make_node("MatMul", ["/Reshape_output_0", "onnx::MatMul_20"], ["y"], name="/fc/MatMul"))
        b2 = None
    m = _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, ["batch", 3, "height", "width"])],
               [h.make_tensor_value_info("y", TP.FLOAT, ["batch", 5])], inits, opset=17)

    def ref(x):
        c = np.maximum(np_conv(x, w1, b1, pad=1), 0).reshape(x.shape[0], -1)
        y = c @ w2.T
        return y if b2 is None else y + b2
    return m, ref


@pytest.mark.parametrize("head", ["Gemm", "MatMul"])
def test_torch_dynamic_axes_model_imports_compiles_and_matches_numpy(head):
    m, ref = torch_dynamic_model(head)
    pkg = psq_tvm.compile(m, input_shapes={"x": [2, 3, 6, 6]})
    assert pkg.report["n_pim_layers"] == 2 and pkg.report["host_layers"] == []
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(pkg.run({"x": x}, "float")[0], ref(x), rtol=1e-4, atol=1e-5)
    names = {lay["name"] for lay in pkg.manifest["layers"]}
    assert {"/conv/Conv", f"/fc/{head}"} <= names


def test_symbolic_spatial_dims_need_input_shapes():
    m, _ = torch_dynamic_model()
    with pytest.raises(ModelImportError, match=r"symbolic dim 2 \(height\).*--input-shapes"):
        import_onnx(m)


# ------------------------------------------------------------------------- paddle2onnx-style
def paddle_model(seed=0):
    """paddle2onnx style: input dims -1, a Conv -> BatchNormalization -> Relu -> Conv block, then
    ``Shape -> Cast(int32) -> Slice -> Cast(int64) -> Concat -> Reshape`` twice, the second one reading the
    Shape of a tensor produced by the first computed-shape Reshape (through a Transpose)."""
    r = np.random.default_rng(seed)
    w1 = r.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    gamma = (r.random(8) + 0.5).astype(np.float32)
    beta = r.standard_normal(8).astype(np.float32) * 0.2
    mean = r.standard_normal(8).astype(np.float32) * 0.1
    var = (r.random(8) + 0.5).astype(np.float32)
    w2 = r.standard_normal((6, 8, 1, 1)).astype(np.float32) * 0.3
    hw = 4 * 4
    w3 = r.standard_normal((hw * 6, 10)).astype(np.float32) * 0.05
    inits = [nh.from_array(w1, "conv2d_0.w_0"), nh.from_array(gamma, "batch_norm2d_0.w_0"),
             nh.from_array(beta, "batch_norm2d_0.b_0"), nh.from_array(mean, "batch_norm2d_0.w_1"),
             nh.from_array(var, "batch_norm2d_0.w_2"), nh.from_array(w2, "conv2d_1.w_0"),
             nh.from_array(w3, "linear_0.w_0"),
             _i64("p2o.helper.constant.0", [0]), _i64("p2o.helper.constant.1", [2]),
             _i64("p2o.helper.constant.2", [1]), _i64("p2o.helper.constant.3", [-1]),
             _i64("p2o.helper.constant.4", [0]), _i64("p2o.helper.constant.5", [1])]
    nodes = [
        h.make_node("Conv", ["x", "conv2d_0.w_0"], ["conv2d_0.tmp_0"], name="p2o.Conv.0", pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["conv2d_0.tmp_0", "batch_norm2d_0.w_0", "batch_norm2d_0.b_0",
                                           "batch_norm2d_0.w_1", "batch_norm2d_0.w_2"],
                    ["batch_norm2d_0.tmp_2"], name="p2o.BatchNormalization.0", epsilon=1e-5),
        h.make_node("Relu", ["batch_norm2d_0.tmp_2"], ["relu_0.tmp_0"], name="p2o.Relu.0"),
        h.make_node("Conv", ["relu_0.tmp_0", "conv2d_1.w_0"], ["conv2d_1.tmp_0"], name="p2o.Conv.1"),
        # first computed shape: [N, C, -1]
        h.make_node("Shape", ["conv2d_1.tmp_0"], ["p2o.Shape.1"], name="p2o.Shape.0"),
        h.make_node("Cast", ["p2o.Shape.1"], ["shape_0.tmp_0"], name="p2o.Cast.0", to=TP.INT32),
        h.make_node("Slice", ["shape_0.tmp_0", "p2o.helper.constant.0", "p2o.helper.constant.1",
                              "p2o.helper.constant.4"], ["shape_0.tmp_0_slice_0"], name="p2o.Slice.0"),
        h.make_node("Cast", ["shape_0.tmp_0_slice_0"], ["p2o.Cast.1"], name="p2o.Cast.1", to=TP.INT64),
        h.make_node("Concat", ["p2o.Cast.1", "p2o.helper.constant.3"], ["p2o.helper.concat.0"], name="p2o.Concat.0",
                    axis=0),
        h.make_node("Reshape", ["conv2d_1.tmp_0", "p2o.helper.concat.0"], ["reshape2_0.tmp_0"], name="p2o.Reshape.0"),
        h.make_node("Transpose", ["reshape2_0.tmp_0"], ["transpose_0.tmp_0"], name="p2o.Transpose.0", perm=[0, 2, 1]),
        # second computed shape, from the Shape of a tensor downstream of the first Reshape: [N, -1]
        h.make_node("Shape", ["transpose_0.tmp_0"], ["p2o.Shape.3"], name="p2o.Shape.2"),
        h.make_node("Cast", ["p2o.Shape.3"], ["shape_1.tmp_0"], name="p2o.Cast.2", to=TP.INT32),
        h.make_node("Slice", ["shape_1.tmp_0", "p2o.helper.constant.0", "p2o.helper.constant.2",
                              "p2o.helper.constant.4"], ["shape_1.tmp_0_slice_0"], name="p2o.Slice.1"),
        h.make_node("Cast", ["shape_1.tmp_0_slice_0"], ["p2o.Cast.3"], name="p2o.Cast.3", to=TP.INT64),
        h.make_node("Concat", ["p2o.Cast.3", "p2o.helper.constant.3"], ["p2o.helper.concat.1"], name="p2o.Concat.1",
                    axis=0),
        h.make_node("Reshape", ["transpose_0.tmp_0", "p2o.helper.concat.1"], ["reshape2_1.tmp_0"],
                    name="p2o.Reshape.1"),
        h.make_node("MatMul", ["reshape2_1.tmp_0", "linear_0.w_0"], ["y"], name="p2o.MatMul.0"),
    ]
    x_vi = h.make_tensor_value_info("x", TP.FLOAT, [-1, 3, -1, -1])
    m = _model(nodes, [x_vi], [h.make_tensor_value_info("y", TP.FLOAT, [-1, 10])], inits, opset=11,
               producer="PaddlePaddle")

    def ref(x):
        a = np.maximum(np_bn(np_conv(x, w1, pad=1), gamma, beta, mean, var), 0)
        c = np_conv(a, w2)
        t = c.reshape(c.shape[0], c.shape[1], -1).transpose(0, 2, 1)
        return t.reshape(t.shape[0], -1) @ w3
    return m, ref


def _shape_input_folded(m, node_name):
    inits = {t.name for t in m.graph.initializer}
    n = next(n for n in m.graph.node if n.name == node_name)
    return n.input[1] in inits


def test_paddle_model_needs_more_than_one_folding_round():
    m, _ = paddle_model()
    onnx_import.set_input_shapes(m, {"x": [1, 3, 4, 4]})
    one = fold_onnx(m)
    assert _shape_input_folded(one, "p2o.Reshape.0") and not _shape_input_folded(one, "p2o.Reshape.1")
    full = fold_shapes(m)
    assert _shape_input_folded(full, "p2o.Reshape.0") and _shape_input_folded(full, "p2o.Reshape.1")
    ops = [n.op_type for n in full.graph.node]
    assert "Shape" not in ops and ops.count("BatchNormalization") == 1      # BatchNorm kept for bn_stats


def test_shape_inference_sees_large_weights_as_typed_inputs(monkeypatch):
    """Shape inference gets weights above _INFER_MAX_ELEMS as typed inputs (shape only, no values);
    folding must come out the same (here every weight is 'large', the shape constants are not)."""
    m, _ = paddle_model()
    onnx_import.set_input_shapes(m, {"x": [1, 3, 4, 4]})
    ref = fold_shapes(m)
    monkeypatch.setattr(onnx_import, "_INFER_MAX_ELEMS", 40)
    light = fold_shapes(m)
    assert light.SerializeToString() == ref.SerializeToString()
    assert _shape_input_folded(light, "p2o.Reshape.1")


def test_paddle_model_fails_with_one_round(monkeypatch):
    m, _ = paddle_model()
    monkeypatch.setattr(onnx_import, "MAX_FOLD_ROUNDS", 1)
    with pytest.raises(ModelImportError, match=r"Reshape requires.*'p2o\.Reshape\.1'.*--input-shapes"):
        import_onnx(m, {"x": [1, 3, 4, 4]})


def test_paddle_model_imports_compiles_and_keeps_batchnorm_stats():
    m, ref = paddle_model()
    folded, _ = prepare_onnx(onnx.ModelProto.FromString(m.SerializeToString()), {"x": [2, 3, 4, 4]}, batchnorm=False)
    stats = batchnorm_input_stats(folded)
    assert set(stats) == {"p2o.Conv.1"}
    pkg = psq_tvm.compile(m, input_shapes="x:[2,3,4,4]")
    assert set(pkg.bn_stats) == {"p2o.Conv.1"}
    for a, b in zip(pkg.bn_stats["p2o.Conv.1"], stats["p2o.Conv.1"]):
        np.testing.assert_allclose(a, b)
    assert pkg.report["n_pim_layers"] == 3 and pkg.report["host_layers"] == []
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(pkg.run({"x": x}, "float")[0], ref(x), rtol=1e-4, atol=1e-5)


def test_torch_model_shape_chain_is_folded_away():
    m, _ = torch_dynamic_model()
    folded, _ = prepare_onnx(m, {"x": [2, 3, 6, 6]})
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Reshape", "Gemm"]
    reshape = folded.graph.node[2]
    target = next(t for t in folded.graph.initializer if t.name == reshape.input[1])
    assert nh.to_array(target).tolist() == [2, -1]


# ------------------------------------------------------------------------- bad weights
def _bad_weight_model(case):
    """One small model per bad-weight case; returns (model, needles the error must contain)."""
    r = np.random.default_rng(0)
    x = h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 5, 5])
    y = h.make_tensor_value_info("y", TP.FLOAT, None)
    w = r.standard_normal((4, 3, 3, 3)).astype(np.float32)
    if case in ("nan", "inf", "nan+inf"):
        if case != "inf":
            w[0, 0, 0, 0] = np.nan
            w[1, 2, 1, 1] = np.nan
        if case != "nan":
            w[3, 1, 2, 0] = np.inf if case == "inf" else -np.inf
        nodes = [h.make_node("Conv", ["x", "backbone.conv1.weight"], ["y"], name="backbone/conv1")]
        counts = {"nan": "2 NaN value(s)", "inf": "1 Inf value(s)", "nan+inf": "2 NaN and 1 Inf value(s)"}[case]
        return (_model(nodes, [x], [y], [nh.from_array(w, "backbone.conv1.weight")]),
                ["initializer 'backbone.conv1.weight'", "weight of Conv node 'backbone/conv1'", counts, "out of 108"])
    if case == "gemm-inf-bias":
        fc = r.standard_normal((7, 75)).astype(np.float32)
        b = np.zeros(7, np.float32)
        b[3] = np.inf
        nodes = [h.make_node("Flatten", ["x"], ["f"]), h.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1)]
        return (_model(nodes, [x], [y], [nh.from_array(fc, "fc.w"), nh.from_array(b, "fc.b")]),
                ["initializer 'fc.b'", "bias of Gemm node 'gemm_1'", "1 Inf value(s) out of 7"])
    if case == "empty-matmul":
        nodes = [h.make_node("Flatten", ["x"], ["f"]), h.make_node("MatMul", ["f", "head.w"], ["y"], name="head")]
        return (_model(nodes, [x], [y], [nh.from_array(np.zeros((75, 0), np.float32), "head.w")]),
                ["initializer 'head.w'", "weight of MatMul node 'head'", "is empty (shape [75, 0]"])
    if case == "empty-conv":
        nodes = [h.make_node("Conv", ["x", "w0"], ["y"], name="c0")]
        return (_model(nodes, [x], [y], [nh.from_array(np.zeros((0, 3, 3, 3), np.float32), "w0")]),
                ["initializer 'w0'", "Conv node 'c0'", "is empty (shape [0, 3, 3, 3]"])
    if case == "convtranspose-nan":
        wt = r.standard_normal((3, 2, 2, 2)).astype(np.float32)
        wt[1, 1, 1, 1] = np.nan
        nodes = [h.make_node("ConvTranspose", ["x", "up.w"], ["y"], name="up")]
        return (_model(nodes, [x], [y], [nh.from_array(wt, "up.w")]),
                ["initializer 'up.w'", "weight of ConvTranspose node 'up'", "1 NaN value(s) out of 24"])
    if case == "constant-node":
        w[2, 2, 2, 2] = np.nan
        nodes = [h.make_node("Constant", [], ["cw"], value=nh.from_array(w, "cw")),
                 h.make_node("Conv", ["x", "cw"], ["y"], name="conv")]
        return _model(nodes, [x], [y], []), ["Constant 'cw'", "Conv node 'conv'", "1 NaN value(s)"]
    if case == "constant-of-shape":      # a large generated weight (not folded in ONNX), filled with NaN
        nodes = [h.make_node("ConstantOfShape", ["shp"], ["big"], name="fill",
                             value=nh.from_array(np.array([np.nan], np.float32), "v")),
                 h.make_node("Flatten", ["x"], ["f"]), h.make_node("MatMul", ["f", "big"], ["y"], name="mm")]
        return (_model(nodes, [x], [y], [_i64("shp", [75, 1000])]),
                ["constant 'big' (output of ConstantOfShape node 'fill', evaluated at import)",
                 "weight of MatMul node 'mm'", "75000 NaN value(s) out of 75000"])
    if case == "transposed":             # weight stored transposed, Transpose folded at import
        wt = r.standard_normal((75, 7)).astype(np.float32)
        wt[0, 0] = np.inf
        nodes = [h.make_node("Transpose", ["fcT"], ["fcw"], perm=[1, 0]), h.make_node("Flatten", ["x"], ["f"]),
                 h.make_node("Gemm", ["f", "fcw"], ["y"], name="fc", transB=1)]
        return (_model(nodes, [x], [y], [nh.from_array(wt, "fcT")]),
                ["constant 'fcw' (output of Transpose node 'fcw', evaluated at import)", "Gemm node 'fc'", "1 Inf"])
    if case == "batchnorm-var":          # negative variance: the BN-folded conv weight would be NaN
        var = np.ones(4, np.float32)
        var[2] = -3.0
        nodes = [h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                 h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
        inits = [nh.from_array(w, "w"), nh.from_array(np.ones(4, np.float32), "g"),
                 nh.from_array(np.zeros(4, np.float32), "b"), nh.from_array(np.zeros(4, np.float32), "m"),
                 nh.from_array(var, "v")]
        return (_model(nodes, [x], [y], inits),
                ["BatchNormalization node 'bn'", "Conv node 'conv'", "27 NaN/Inf weight value(s)",
                 "var + epsilon <= 0: 1"])
    raise AssertionError(case)


BAD_CASES = ["nan", "inf", "nan+inf", "gemm-inf-bias", "empty-matmul", "empty-conv", "convtranspose-nan",
             "constant-node", "constant-of-shape", "transposed", "batchnorm-var"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_weights_fail_at_import_naming_the_initializer(case):
    m, needles = _bad_weight_model(case)
    with pytest.raises(ModelImportError) as e:
        psq_tvm.compile(m)
    msg = str(e.value)
    assert msg.startswith("model <model>: ") and msg.endswith("fix or re-export the model"), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("case", ["nan", "inf", "empty-conv"])
def test_cli_bad_weights_one_line_error(tmp_path, capsys, case):
    from psq_tvm.cli import main

    m, needles = _bad_weight_model(case)
    path = tmp_path / f"bad_{case.replace('-', '_')}.onnx"
    onnx.save(m, path)
    rc = main(["compile", "--target", "pim-psq", str(path), "-o", str(tmp_path / "out.tar"), "-q"])
    err = capsys.readouterr().err
    assert rc != 0 and not (tmp_path / "out.tar").exists()
    assert err.startswith("tvmc: error: model ") and path.name in err and err.count("\n") == 1, err
    assert needles[0] in err and "fix or re-export the model" in err


def test_bad_weight_in_relax_only_constant_is_caught():
    """A NaN weight that only becomes a constant after TVM's import (a large Expand, not folded in
    ONNX) still fails at import: the Relax-level backstop."""
    nodes = [h.make_node("Expand", ["nanv", "shp"], ["big"], name="grow"),
             h.make_node("Flatten", ["x"], ["f"]), h.make_node("MatMul", ["f", "big"], ["y"], name="mm")]
    m = _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 5, 5])],
               [h.make_tensor_value_info("y", TP.FLOAT, None)],
               [nh.from_array(np.array([[np.nan]], np.float32), "nanv"), _i64("shp", [75, 1000])])
    with pytest.raises(ModelImportError, match=r"75000 NaN value\(s\) out of 75000; fix or re-export the model"):
        psq_tvm.compile(m)


def test_weight_computed_at_run_time_stays_on_host_with_reason():
    """Weights that are computed from the input cannot be checked at compile time: they compile, on the
    host, and the report says why (patterns.host_reason)."""
    r = np.random.default_rng(0)
    w = r.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [h.make_node("ReduceMean", ["x"], ["s"], keepdims=0),
             h.make_node("Mul", ["w", "s"], ["ws"]),                   # weight scaled by a data-dependent scalar
             h.make_node("Conv", ["x", "ws"], ["y"], name="dyn_conv")]
    m = _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [1, 3, 5, 5])],
               [h.make_tensor_value_info("y", TP.FLOAT, None)], [nh.from_array(w, "w")])
    pkg = psq_tvm.compile(m)
    assert pkg.report["n_pim_layers"] == 0
    (host,) = pkg.report["host_layers"]
    assert "computed at run time" in host["reason"]
