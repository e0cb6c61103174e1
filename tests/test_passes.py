"""The pim-psq Relax passes: patterns, host fallback with reasons, annotate, lower, import folding."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

tvm = pytest.importorskip("tvm")

import psq_tvm  # noqa: E402  (registers the pim-psq tag)
from psq_tvm.core.crossbar import preset  # noqa: E402
from psq_tvm.frontend.onnx_import import ModelImportError, import_onnx  # noqa: E402
from psq_tvm.passes import AnnotatePSQ, LowerToPIM, PartitionForPIM, composite_calls, host_layers  # noqa: E402

from test_onnx_models import (act_matmul_model, conv_model, gemm_model, matmul_model, reference,  # noqa: E402
                              shape_concat_model, small_cnn)

SMALL = preset("isaac", rows=16, cols=16)


def partition(m, spec=SMALL):
    mod, info = import_onnx(m)
    return PartitionForPIM(spec, info["names"])(mod)


def patterns_of(mod):
    return [str(mod[gv].attrs["Composite"]) for _, _, gv in composite_calls(mod)]


def check_float(m, feeds, spec=SMALL, mode="float", atol=1e-4):
    pkg = psq_tvm.compile(m, spec=spec, budget="avg-bits=6", bias_correction="none")  # fake-quant checks: weights only
    out = pkg.run(feeds, mode)[0]
    ref = reference(m, feeds)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=atol)
    return pkg


def test_target_tag_registered():
    t = tvm.target.Target("pim-psq")
    assert "pim_psq" in list(t.keys)
    assert str(t.kind.name) == "llvm"


@pytest.mark.parametrize("kw,pattern", [
    (dict(), "pim_psq.conv2d_bias"),
    (dict(bias=False), "pim_psq.conv2d"),
    (dict(stride=2, pad=0), "pim_psq.conv2d_bias"),
    (dict(dilation=2, pad=2), "pim_psq.conv2d_bias"),
    (dict(groups=2, cin=8, cout=16), "pim_psq.conv2d_bias"),
])
def test_conv_patterns(kw, pattern):
    m = conv_model(**kw)
    mod = partition(m)
    assert patterns_of(mod) == [pattern]
    assert host_layers(mod) == []
    cin = kw.get("cin", 4)
    x = np.random.default_rng(1).standard_normal((1, cin, 9, 9)).astype(np.float32)
    pkg = check_float(m, {"x": x})
    lay = pkg.layers[0]
    assert lay["name"] == "conv" and lay["op"] == "conv2d"
    assert lay["groups"] == kw.get("groups", 1)
    assert lay["strides"] == [kw.get("stride", 1)] * 2 and lay["dilation"] == [kw.get("dilation", 1)] * 2
    p = kw.get("pad", 1)
    assert lay["padding"] == [p, p, p + 1, p]   # top, left, bottom, right (asymmetric on purpose)
    assert (lay["bias"] is None) == (kw.get("bias", True) is False)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 1), (0, 0), (1, 1), (1, 0)])
def test_gemm_patterns(trans_a, trans_b):
    m = gemm_model(trans_a=trans_a, trans_b=trans_b)
    mod = partition(m)
    assert patterns_of(mod) == ["pim_psq.dense_bias"]
    x = np.random.default_rng(2).standard_normal((40, 2) if trans_a else (2, 40)).astype(np.float32)
    pkg = check_float(m, {"x": x})
    assert pkg.layers[0]["matrix_shape"] == [40, 12]     # [K, N] whatever transB was


@pytest.mark.parametrize("left", [False, True])
def test_matmul_constant_right_and_left(left):
    m = matmul_model(left=left)
    mod = partition(m)
    assert patterns_of(mod) == ["pim_psq.dense_left" if left else "pim_psq.dense"]
    x = np.random.default_rng(3).standard_normal((24, 3) if left else (1, 3, 24)).astype(np.float32)
    pkg = check_float(m, {"x": x})
    assert pkg.layers[0]["operand"] == ("left" if left else "right")
    # fake-quant from the stored cells is the model with the search's fake-quantised weight, computed by
    # the ONNX reference evaluator (a left operand C [5, k] is stored as the matrix C^T [k, 5])
    wq = pkg.quant_result.dequantized(0)
    name = m.graph.initializer[0].name
    mq = onnx.ModelProto()
    mq.CopyFrom(m)
    mq.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array((wq.T if left else wq).astype(np.float32), name))
    fq = pkg.run({"x": x}, "fake-quant")[0]
    np.testing.assert_allclose(fq, reference(mq, {"x": x}), rtol=1e-5, atol=1e-5)
    assert not np.allclose(fq, reference(m, {"x": x}), rtol=1e-5, atol=1e-5)   # quantisation did something


def test_host_fallback_with_reasons():
    mod = partition(small_cnn(), preset())            # depthwise 3x3 on 128x128: host
    hl = host_layers(mod)
    assert [h["name"] for h in hl] == ["dw"]
    assert "kept on host" in hl[0]["reason"] and "16-group" in hl[0]["reason"]
    assert patterns_of(mod) == ["pim_psq.conv2d_bias", "pim_psq.dense_bias"]
    mod = partition(act_matmul_model())
    assert patterns_of(mod) == []
    assert host_layers(mod)[0]["reason"].startswith("both operands are computed at run time")


def test_mixed_model_runs_and_reports_host_layers():
    m = small_cnn()
    x = np.random.default_rng(4).standard_normal((1, 3, 12, 12)).astype(np.float32)
    pkg = check_float(m, {"x": x}, spec=preset())
    rep = pkg.report
    assert rep["n_pim_layers"] == 2 and rep["host_layers"][0]["name"] == "dw"


def test_passes_compose_in_sequential():
    m = small_cnn()
    mod, info = import_onnx(m)
    spec = preset()
    ann = AnnotatePSQ(spec, budget="avg-bits=5")
    seq = tvm.transform.Sequential([PartitionForPIM(spec, info["names"]), ann, LowerToPIM()])
    out = seq(mod)
    text = out.script()
    assert text.count('call_dps_packed("pim_psq.layer"') == 2
    assert "conv2d" in text                 # the depthwise conv stayed on the host
    assert not [gv for gv in out.get_global_vars() if gv.name_hint.startswith("pim_psq_")]
    res = ann.annotation.result
    assert res.tiles.n_tiles == sum(len(res.tiles.layer_tiles(i)) for i in range(2))
    # tile decisions are attached to the composite functions before lowering
    part = tvm.transform.Sequential([PartitionForPIM(spec, info["names"]), AnnotatePSQ(spec)])(mod)
    for _, _, gv in composite_calls(part):
        tiles = json.loads(str(part[gv].attrs["pim_psq.tiles"]))
        assert tiles and all({"bits", "scale"} <= set(t) for t in tiles)
    ex = tvm.compile(out, target=tvm.target.Target("pim-psq"))
    # the executable runs: in a session of the package the compile pipeline builds with the same options
    # (same tables: checked), fake-quant gives the ONNX reference evaluator's output with the search's
    # fake-quantised weights (the depthwise conv stays float, on the host)
    from psq_tvm.runtime.session import Session
    pkg = psq_tvm.compile(m, spec=spec, budget="avg-bits=5", bias_correction="none")
    assert pkg.quant_result.bits.tolist() == res.bits.tolist()
    ref_q = onnx.ModelProto()
    ref_q.CopyFrom(m)
    names = [i.name for i in ref_q.graph.initializer]
    for li, (lay, init) in enumerate(zip(res.tiles.layers, ("W1", "W2"))):
        wq = res.dequantized(li)
        if lay.kind == "dense":                    # Gemm transB=1 stores W2 as [N, K]; the layer as [K, N]
            wq = wq.T
        ref_q.graph.initializer[names.index(init)].CopyFrom(onnx.numpy_helper.from_array(wq.astype(np.float32), init))
    x = np.random.default_rng(8).standard_normal((1, 3, 12, 12)).astype(np.float32)
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    with Session(pkg, "fake-quant"):
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, reference(ref_q, {"x": x}), rtol=1e-4, atol=1e-5)


def test_partition_numbers_layers_and_lower_needs_the_numbers():
    """PartitionForPIM gives every composite its layer id in program order (what the compile pipeline's
    lower stage relies on); a composite without one is refused by LowerToPIM with what to run first."""
    mod = partition(small_cnn())
    ids = [int(mod[gv].attrs["pim_psq.layer_id"]) for _, _, gv in composite_calls(mod)]
    assert ids == list(range(len(ids))) and len(ids) >= 2
    lowered = LowerToPIM()(mod)
    text = lowered.script()
    for k in ids:
        assert f'R.str("{k}")' in text or f'"{k}"' in text
    _, _, gv = composite_calls(mod)[0]
    mod[gv] = mod[gv].without_attr("pim_psq.layer_id")
    with pytest.raises(Exception, match="PartitionForPIM"):
        LowerToPIM()(mod)


def test_one_search_across_layers_meets_budget():
    m = small_cnn()
    pkg = psq_tvm.compile(m, budget="avg-bits=3.5", weight_bits="2-8")
    rep = pkg.report
    assert rep["avg_bits"] <= 3.5 + 1e-9
    bits = {b for l in pkg.layers for t in l["tiles"] for b in [t["bits"]]}
    assert bits <= set(range(2, 9))


def test_shape_concat_reshape_and_constant_of_shape_fold():
    m = shape_concat_model()
    mod, info = import_onnx(m, {"x": [2, 3, 8, 8]})
    assert info["inputs"] == [{"name": "x", "shape": [2, 3, 8, 8], "dtype": "float32"}]
    mod = PartitionForPIM(SMALL, info["names"])(mod)
    assert patterns_of(mod) == ["pim_psq.conv2d", "pim_psq.dense"]
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    pkg = psq_tvm.compile(m, input_shapes="x:[2,3,8,8]", spec=SMALL)
    np.testing.assert_allclose(pkg.run({"x": x}, "float")[0], reference(m, {"x": x}), rtol=1e-4, atol=1e-4)


def test_symbolic_dim_needs_input_shapes():
    m = shape_concat_model()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(ModelImportError, match="--input-shapes"):
        import_onnx(m)


def test_batchnorm_folded_into_conv():
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from test_onnx_models import model, vi

    r = np.random.default_rng(7)
    inits = [nh.from_array(r.standard_normal((8, 3, 3, 3)).astype(np.float32), "W")]
    for name, v in (("g", r.uniform(0.5, 2, 8)), ("b", r.standard_normal(8)), ("m", r.standard_normal(8)),
                    ("v", r.uniform(0.5, 2, 8))):
        inits.append(nh.from_array(v.astype(np.float32), name))
    nodes = [h.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)]
    m = model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 8, 6, 6])], inits)
    x = r.standard_normal((1, 3, 6, 6)).astype(np.float32)
    c = reference(model([nodes[0]], [vi("x", [1, 3, 6, 6])], [vi("c", [1, 8, 6, 6])], inits[:1]), {"x": x})
    g, b, mu, var = (nh.to_array(t).reshape(1, -1, 1, 1) for t in inits[1:])
    want = (c - mu) / np.sqrt(var + 1e-3) * g + b     # (computed by hand: onnx's reference BN disagrees here)
    pkg = psq_tvm.compile(m, spec=SMALL)
    np.testing.assert_allclose(pkg.run({"x": x}, "float")[0], want, rtol=1e-4, atol=1e-4)
    assert pkg.layers[0]["bias"] is not None and pkg.layers[0]["pattern"] == "pim_psq.conv2d_bias"
    kept = psq_tvm.compile(m, spec=SMALL, fold_batchnorm=False)
    assert kept.layers[0]["bias"] is None
    np.testing.assert_allclose(kept.run({"x": x}, "float")[0], want, rtol=1e-4, atol=1e-4)


def test_parse_input_shapes():
    from psq_tvm.frontend.onnx_import import parse_input_shapes

    assert parse_input_shapes("input:[1,3,224,224] mask:[1, 7]") == {"input": [1, 3, 224, 224], "mask": [1, 7]}
    with pytest.raises(ModelImportError):
        parse_input_shapes("input=1x3")


def test_gemm_weight_from_expand_folds_through_bindings(monkeypatch):
    """VGG-19 (onnx light) pattern: W = Expand(c, [N, K]) then Gemm(transB=1). The fold must chain
    broadcast_to -> permute_dims through the dataflow bindings so the layer goes to PIM, and the
    folded intermediates must not stay behind as dead constants in the host library."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from test_onnx_models import model, vi

    import psq_tvm.frontend.onnx_import
    monkeypatch.setattr(psq_tvm.frontend.onnx_import, "_MAX_FOLD_ELEMS", 1000)   # leave the Expand to Relax, as on VGG-19
    n, k = 300, 200
    inits = [nh.from_array(np.full((1, k), 0.25, np.float32), "c"),
             nh.from_array(np.array([n, k], np.int64), "shape")]
    nodes = [h.make_node("Expand", ["c", "shape"], ["W"], name="expand"),
             h.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)]
    m = model(nodes, [vi("x", [2, k])], [vi("y", None)], inits)
    mod = partition(m)
    assert patterns_of(mod) == ["pim_psq.dense"]
    x = np.random.default_rng(5).standard_normal((2, k)).astype(np.float32)
    pkg = check_float(m, {"x": x})
    assert pkg.layers[0]["matrix_shape"] == [k, n]
    assert len(pkg.host_library) < n * k * 4        # the 240 kB weight is not embedded on the host


def test_numpy_fold_keeps_scalar_constants(monkeypatch):
    """A 0-d constant computed in Relax (EfficientNet's Clip bounds) stays 0-d after the numpy fold."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from test_onnx_models import model, vi

    import psq_tvm.frontend.onnx_import
    monkeypatch.setattr(psq_tvm.frontend.onnx_import, "_MAX_FOLD_ELEMS", 0)      # leave the Reshape to Relax
    inits = [nh.from_array(np.array([-0.5], np.float32), "c"), nh.from_array(np.array([0.7], np.float32), "d"),
             nh.from_array(np.zeros(0, np.int64), "scalar"),
             nh.from_array(np.random.default_rng(6).standard_normal((8, 6)).astype(np.float32), "W")]
    nodes = [h.make_node("Reshape", ["c", "scalar"], ["lo"], name="lo_scalar"),
             h.make_node("Reshape", ["d", "scalar"], ["hi"], name="hi_scalar"),
             h.make_node("MatMul", ["x", "W"], ["z"], name="mm"),
             h.make_node("Clip", ["z", "lo", "hi"], ["y"], name="clip")]
    m = model(nodes, [vi("x", [2, 8])], [vi("y", None)], inits)
    x = np.random.default_rng(7).standard_normal((2, 8)).astype(np.float32)
    check_float(m, {"x": x})
