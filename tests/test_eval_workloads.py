"""The evaluation workloads package (scripts/eval/workloads/): registry, Conv+BN folding, probability KL, rendering."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "eval"))

import workloads as W  # noqa: E402
from workloads import orientation as O  # noqa: E402


def test_registry_collects_every_family_in_order():
    assert list(W.WORKLOADS) == ["fashion", "mnist_digits", "efficientnet", "efficientnet_bn", "minilm_lee",
                                 "minilm_wordsim", "orientation", "orientation_folded"]
    assert list(W.EXTRA_WORKLOADS) == ["mnist_digits_pad4"]
    assert set(W.FAMILY_OF.values()) == set(W.FAMILIES)
    for name, wl in {**W.WORKLOADS, **W.EXTRA_WORKLOADS}.items():
        assert wl.name == name and W.get_workload(name) is wl
    # names other scripts use through ``import workloads as W``
    for k in ("CACHE", "REPO_ROOT", "CROPS", "write_json", "write_text", "Workload", "cpu_pipeline"):
        assert hasattr(W, k), k
    assert W.CACHE.parent.name == "eval"


def _conv_bn_model(rng, bias: bool):
    from onnx import TensorProto, helper, numpy_helper

    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bn = [rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.1, 3, 4)]
    inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(a.astype(np.float32), n)
                                                  for a, n in zip(bn, ("g", "b", "m", "v"))]
    conv_in = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "cb"))
        conv_in.append("cb")
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y0"], epsilon=1e-3),
             helper.make_node("Relu", ["y0"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


@pytest.mark.parametrize("bias", [False, True])
def test_fold_conv_bn_keeps_outputs(rng, bias):
    import copy

    from onnx.reference import ReferenceEvaluator

    m = _conv_bn_model(rng, bias)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    y = ReferenceEvaluator(m).run(None, {"x": x})[0]
    f, n = O.fold_conv_bn(copy.deepcopy(m))
    assert n == 1 and [nd.op_type for nd in f.graph.node] == ["Conv", "Relu"]
    assert {i.name for i in f.graph.initializer}.isdisjoint({"g", "b", "m", "v"})
    np.testing.assert_allclose(ReferenceEvaluator(f).run(None, {"x": x})[0], y, rtol=1e-5, atol=1e-5)


def test_kl_on_probability_outputs():
    logits = np.array([[2.0, 0.0, -1.0, 0.5], [0.0, 3.0, 0.0, 0.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    q_logits = logits + np.array([[0.3, 0.0, 0.0, 0.0], [0.0, -0.5, 0.2, 0.0]])
    q = np.exp(q_logits) / np.exp(q_logits).sum(1, keepdims=True)
    want = np.sum(p * (np.log(p) - np.log(q)), 1).mean()
    # the model outputs probabilities: the KL must be the KL of those, not of a softmax over them
    m = O._metrics(q, np.array([0, 1]), p)
    assert m["kl_mean"] == pytest.approx(want, rel=1e-9)
    assert O._metrics(q_logits, np.array([0, 1]), logits)["kl_mean"] == pytest.approx(want, rel=1e-9)
    assert m["agree_top1"] == 1.0 and m["top1"] == 1.0


@pytest.mark.skipif(not O.FONT_DIR.is_dir(), reason="Debian fonts-dejavu not installed")
def test_rendering_is_deterministic_and_preprocessed_like_the_package():
    words = "the quick brown fox jumps over 12 lazy dogs in 2026 and 3.5 more".split()
    a, da = O.render_image(7, words)
    b, db = O.render_image(7, words)
    assert da == db and np.array_equal(np.asarray(a), np.asarray(b))
    x = O.preprocess(O.rotate_clockwise(a, 90))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert O.rotate_clockwise(a, 90).size == (a.size[1], a.size[0])
