"""BatchNorm input statistics against activations sampled through the model itself.

The graph is real-style: conv + bias -> BN -> ReLU feeding several consumers (a 1x1 conv, an average
pool, a depthwise conv + BN -> ReLU6), plus a max pool.  Every BatchNorm's running statistics are set
the way training sets them -- to the mean and variance of its input on the data -- so on Gaussian
inputs its output has exactly mean beta and standard deviation |gamma| per channel.  The propagated
E[x], E[x^2] of every PIM layer's input are then compared with the same moments of the tensors the
ONNX reference evaluator computes on those inputs (no code of psq_tvm involved on that side).
"""

import numpy as np
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator
from test_onnx_models import model, vi

from psq_tvm.frontend.bn_stats import batchnorm_input_stats

N = 500           # sampled inputs (x 36 positions per channel)


def _calibrated_model():
    r = np.random.default_rng(11)
    W1 = r.standard_normal((6, 3, 3, 3)) * 0.4
    B1 = r.standard_normal(6)
    Wd = r.standard_normal((6, 1, 3, 3)) * 0.5
    Wc = r.standard_normal((4, 6, 1, 1))
    g1, b1 = r.uniform(0.5, 2.0, 6) * r.choice([-1, 1], 6), r.normal(0, 1, 6)
    g2, b2 = r.uniform(0.5, 2.0, 6), r.normal(1, 1, 6)
    f32 = lambda a: np.asarray(a, np.float32)
    inits = [nh.from_array(f32(v), k) for k, v in dict(W1=W1, B1=B1, Wd=Wd, Wc=Wc, Wp=Wc, Wm=Wc, W3=Wc,
                                                       g1=g1, b1=b1, g2=g2, b2=b2, lo=0.0, hi=6.0,
                                                       half=0.5).items()]
    # running statistics: placeholders, replaced by the calibration below
    for k in ("m1", "v1", "m2", "v2"):
        inits.append(nh.from_array(np.zeros(6, np.float32) if k[0] == "m" else np.ones(6, np.float32), k))
    nodes = [
        h.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1"),                      # no padding
        h.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"], name="bn1", epsilon=0.0),
        h.make_node("Relu", ["n1"], ["r1"]),
        h.make_node("Conv", ["r1", "Wc"], ["y_a"], name="conv_a"),                          # consumer 1
        h.make_node("AveragePool", ["r1"], ["p1"], kernel_shape=[2, 2]),
        h.make_node("Conv", ["p1", "Wp"], ["y_p"], name="conv_pool"),                       # consumer 2
        h.make_node("MaxPool", ["r1"], ["mp"], kernel_shape=[2, 2]),
        h.make_node("Conv", ["mp", "Wm"], ["y_m"], name="conv_maxpool"),                    # unknown
        h.make_node("Conv", ["n1", "Wd"], ["d1"], name="dw", group=6),                      # consumer 3 of BN1
        h.make_node("BatchNormalization", ["d1", "g2", "b2", "m2", "v2"], ["n2"], name="bn2", epsilon=0.0),
        h.make_node("Clip", ["n2", "lo", "hi"], ["a2"]),
        h.make_node("Conv", ["a2", "W3"], ["y_3"], name="conv3"),
        # a residual around an activation: both Add branches are functions of BN1's output (correlated)
        h.make_node("Add", ["n1", "r1"], ["res"]),
        h.make_node("Conv", ["res", "Wc"], ["y_res"], name="conv_res"),
        h.make_node("HardSigmoid", ["n1"], ["gate"], alpha=1 / 6, beta=0.5),
        h.make_node("Mul", ["n1", "gate"], ["swish"]),
        h.make_node("Mul", ["n1", "half"], ["n1h"]),
        h.make_node("Add", ["swish", "n1h"], ["res2"]),
        h.make_node("Conv", ["res2", "Wc"], ["y_res2"], name="conv_res2"),
    ]
    outs = [vi(n, None) for n in ("y_a", "y_p", "y_m", "y_3", "y_res", "y_res2", "n1", "r1", "p1", "a2", "c1", "d1",
                                   "res", "res2")]
    m = model(nodes, [vi("x", [N, 3, 8, 8])], outs, inits)
    x = np.random.default_rng(12).standard_normal((N, 3, 8, 8)).astype(np.float32)

    def set_stats(mean_name, var_name, t):
        for init in m.graph.initializer:
            if init.name in (mean_name, var_name):
                a = t.mean(axis=(0, 2, 3)) if init.name == mean_name else t.var(axis=(0, 2, 3))
                init.CopyFrom(nh.from_array(a.astype(np.float32), init.name))

    names = [o.name for o in m.graph.output]
    set_stats("m1", "v1", ReferenceEvaluator(m).run(["c1"], {"x": x})[0].astype(np.float64))
    set_stats("m2", "v2", ReferenceEvaluator(m).run(["d1"], {"x": x})[0].astype(np.float64))
    acts = dict(zip(names, ReferenceEvaluator(m).run(names, {"x": x})))
    return m, acts


@pytest.fixture(scope="module")
def sampled():
    m, acts = _calibrated_model()
    return batchnorm_input_stats(m), acts


def _moments(t):
    t = t.astype(np.float64)
    return t.mean(axis=(0, 2, 3)), (t * t).mean(axis=(0, 2, 3))


def test_which_layers_get_statistics(sampled):
    st, _ = sampled
    # conv1 reads the model input, conv_maxpool a max pool: unknown; the depthwise conv is host-side
    # but its input statistics are still known (it reads BN1's output)
    assert set(st) == {"conv_a", "conv_pool", "dw", "conv3", "conv_res", "conv_res2"}


@pytest.mark.parametrize("layer, tensor", [("conv_a", "r1"), ("dw", "n1"), ("conv3", "a2")])
def test_relu_consumers_match_sampled_moments(sampled, layer, tensor):
    """conv + bias -> BN -> ReLU -> 1x1 conv; the same BN -> depthwise conv (a second consumer) -> BN ->
    ReLU6 -> conv: E[x] and E[x^2] per channel within 3 % of the sampled ones.  (The depthwise conv reads
    the BN output itself, so its output is Gaussian and BN2's output exactly N(beta2, gamma2^2); after a
    ReLU, a 3x3 depthwise sum of 9 clipped values is only roughly Gaussian and the clipped-Gaussian
    moments of the next ReLU6 are off by up to ~20 % on some channels -- the data-free model's limit.)"""
    st, acts = sampled
    m1, m2 = _moments(acts[tensor])
    np.testing.assert_allclose(st[layer][0], m1, rtol=0.03, atol=0.01)
    np.testing.assert_allclose(st[layer][1], m2, rtol=0.03, atol=0.01)


def test_average_pool_passes_the_mean(sampled):
    """Average pooling keeps the channel mean exactly; its variance reduction is documented as ignored, so
    the propagated E[x^2] is an upper bound of the sampled one."""
    st, acts = sampled
    m1, m2 = _moments(acts["p1"])
    np.testing.assert_allclose(st["conv_pool"][0], m1, rtol=0.03, atol=0.01)
    assert np.all(st["conv_pool"][1] >= m2 * 0.97)
    assert np.all(st["conv_pool"][1] <= _moments(acts["r1"])[1] * 1.03)


@pytest.mark.parametrize("layer, tensor", [("conv_res", "res"), ("conv_res2", "res2")])
def test_correlated_add_branches_match_sampled_moments(sampled, layer, tensor):
    """BN1 + Relu(BN1), and swish(BN1) + 0.5 BN1: the branches are not independent (taking them so
    put E[x^2] up to 37 % low); the propagated moments match the sampled ones."""
    st, acts = sampled
    m1, m2 = _moments(acts[tensor])
    np.testing.assert_allclose(st[layer][0], m1, rtol=0.03, atol=0.01)
    np.testing.assert_allclose(st[layer][1], m2, rtol=0.03, atol=0.01)
