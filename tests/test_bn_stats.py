"""Data-free input statistics from BatchNorm parameters (psq_tvm.frontend.bn_stats) and their use in compile."""

import math

import numpy as np
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

import psq_tvm
from psq_tvm.frontend.bn_stats import batchnorm_input_stats, clipped_gaussian_moments
from psq_tvm.core.crossbar import preset
from test_onnx_models import model, vi


@pytest.mark.parametrize("lo,hi", [(0.0, math.inf), (0.0, 6.0), (-1.0, 2.0), (-math.inf, math.inf)])
def test_clipped_gaussian_moments_match_sampling(lo, hi):
    r = np.random.default_rng(0)
    mu = np.array([-2.0, 0.0, 0.7, 3.0, 8.0])
    sd = np.array([0.5, 1.0, 2.0, 3.0, 1.5])
    m, v = clipped_gaussian_moments(mu, sd ** 2, lo, hi)
    x = np.clip(r.normal(mu, sd, size=(400000, 5)), lo, hi)
    np.testing.assert_allclose(m, x.mean(0), atol=4 * sd.max() / math.sqrt(4e5) + 1e-12)
    np.testing.assert_allclose(v, x.var(0), rtol=0.02, atol=1e-3)


def _bn_model(seed=0):
    """x -> conv1 -> BN1 -> Clip(0,6) -> conv2 -> BN2 -> (+ BN1 branch via Relu) -> conv3; conv1 has no BN input."""
    r = np.random.default_rng(seed)
    inits = [nh.from_array(r.standard_normal((8, 3, 3, 3)).astype(np.float32), "W1"),
             nh.from_array(r.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3, "W2"),
             nh.from_array(r.standard_normal((6, 8, 3, 3)).astype(np.float32) * 0.3, "W3"),
             nh.from_array(np.array(0.0, np.float32), "lo"), nh.from_array(np.array(6.0, np.float32), "hi")]
    for p in ("1", "2"):
        for name, v in (("g", r.uniform(0.3, 3, 8)), ("b", r.standard_normal(8)), ("m", r.standard_normal(8)),
                        ("v", r.uniform(0.5, 2, 8))):
            inits.append(nh.from_array(v.astype(np.float32), name + p))
    nodes = [h.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"], name="bn1"),
             h.make_node("Clip", ["n1", "lo", "hi"], ["a1"], name="relu6"),
             h.make_node("Conv", ["a1", "W2"], ["c2"], name="conv2"),
             h.make_node("BatchNormalization", ["c2", "g2", "b2", "m2", "v2"], ["n2"], name="bn2"),
             h.make_node("Relu", ["n1"], ["r1"], name="relu"),
             h.make_node("Add", ["n2", "r1"], ["s"], name="add"),
             h.make_node("Conv", ["s", "W3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    return model(nodes, [vi("x", [1, 3, 6, 6])], [vi("y", [1, 6, 6, 6])], inits), r


def test_batchnorm_input_stats_propagate_through_clip_relu_add():
    """Expected moments by sampling the data-free model (BN outputs N(beta, gamma^2), the two Add branches
    independent), not by the closed form under test."""
    m, _ = _bn_model()
    st = batchnorm_input_stats(m)
    assert set(st) == {"conv2", "conv3"}                 # conv1 reads the model input: unknown
    arr = {i.name: nh.to_array(i).astype(np.float64) for i in m.graph.initializer}
    r = np.random.default_rng(5)
    n1 = r.normal(arr["b1"], np.abs(arr["g1"]), size=(400_000, 8))
    n2 = r.normal(arr["b2"], np.abs(arr["g2"]), size=(400_000, 8))
    a1 = np.clip(n1, 0.0, 6.0)                          # Clip(0, 6) -> conv2
    s = n2 + np.maximum(n1, 0.0)                        # BN2 + Relu(BN1) -> conv3
    for name, x in (("conv2", a1), ("conv3", s)):
        np.testing.assert_allclose(st[name][0], x.mean(0), rtol=0.01, atol=0.01)
        np.testing.assert_allclose(st[name][1], (x * x).mean(0), rtol=0.01, atol=0.01)


def test_activation_moments_through_real_style_graphs_match_sampling():
    """BN -> HardSwish -> conv; BN -> swish (x * HardSigmoid(x)) -> * 0.5 + 1 -> conv: the propagated
    E[x], E[x^2] per channel equal the moments of sampled N(beta, gamma^2) pushed through the same ops."""
    r = np.random.default_rng(3)
    g, b = r.uniform(0.5, 2.5, 4), r.normal(0, 1.5, 4)
    inits = [nh.from_array(g.astype(np.float32), "g"), nh.from_array(b.astype(np.float32), "b"),
             nh.from_array(np.zeros(4, np.float32), "m"), nh.from_array(np.ones(4, np.float32), "v"),
             nh.from_array(r.standard_normal((4, 4, 1, 1)).astype(np.float32), "W"),
             nh.from_array(np.array(0.5, np.float32), "half"), nh.from_array(np.array(1.0, np.float32), "one")]
    nodes = [h.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn", epsilon=0.0),
             h.make_node("HardSwish", ["n"], ["hs"]), h.make_node("Conv", ["hs", "W"], ["y1"], name="conv_hs"),
             h.make_node("HardSigmoid", ["n"], ["gate"], alpha=1 / 6, beta=0.5),
             h.make_node("Mul", ["n", "gate"], ["sw"]), h.make_node("Mul", ["sw", "half"], ["sw2"]),
             h.make_node("Add", ["sw2", "one"], ["sw3"]), h.make_node("Conv", ["sw3", "W"], ["y2"], name="conv_sw")]
    m = model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y1", [1, 4, 3, 3]), vi("y2", [1, 4, 3, 3])], inits, opset=14)
    st = batchnorm_input_stats(m)
    x = r.normal(b, g, size=(1_000_000, 4))
    hs = x * np.clip(x / 6 + 0.5, 0, 1)
    sw = x * np.clip(x / 6 + 0.5, 0, 1) * 0.5 + 1.0
    for name, y in (("conv_hs", hs), ("conv_sw", sw)):
        np.testing.assert_allclose(st[name][0], y.mean(0), atol=5e-3)
        np.testing.assert_allclose(st[name][1], (y * y).mean(0), rtol=5e-3, atol=5e-3)


def test_bn_bias_correction_and_sensitivity_in_compile():
    m, _ = _bn_model()
    spec = preset("isaac", rows=32, cols=32)
    pkg = psq_tvm.compile(m, spec=spec, budget="avg-bits=3", bias_correction="bn", sensitivity="bn")
    names = {l["name"]: l for l in pkg.layers}
    assert set(names) == {"conv1", "conv2", "conv3"}      # BatchNorms folded into conv1/conv2
    assert names["conv1"]["bias_correction"] is None      # no statistics for the first layer
    from psq_tvm.core.sensitivity import bias_correction
    from psq_tvm.targets.input_stats import conv_row_means
    st = batchnorm_input_stats(m)
    for name in ("conv2", "conv3"):
        lay = names[name]
        li = pkg.layers.index(lay)
        img = np.broadcast_to(st[name][0].reshape(1, -1, 1, 1), [1, 8, 6, 6])
        want = bias_correction(pkg.quant_result, li, conv_row_means(img, lay))
        np.testing.assert_array_equal(pkg.blob(lay["bias_correction"]), want)
        assert np.abs(want).max() > 0
    # the padded conv3: border rows see fewer non-zero inputs than interior ones
    r = conv_row_means(np.broadcast_to(st["conv3"][0].reshape(1, -1, 1, 1), [1, 8, 6, 6]), names["conv3"])
    assert r.shape == (8 * 9,) and not np.allclose(r.reshape(8, 9)[:, 4], r.reshape(8, 9)[:, 0])
    again = psq_tvm.compile(m, spec=spec, budget="avg-bits=3", bias_correction="bn", sensitivity="bn")
    assert again.blob("crossbars").tobytes() == pkg.blob("crossbars").tobytes()
    # without BatchNorms in the model nothing is corrected
    from test_onnx_models import small_cnn
    plain = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=3", bias_correction="bn")
    assert all(l["bias_correction"] is None for l in plain.layers)
