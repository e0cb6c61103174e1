"""Synthetic inputs in the model's own normalised space: a graph that starts with ``(x - mean) / std``
(per channel, or scalar constants, initializers or Constant nodes) gets inputs that are N(0, 1) after it."""

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from psq_tvm.frontend.input_ranges import input_normalization, synthetic_inputs
from test_onnx_models import model, vi

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1) * 255


def _normalising_model(const_nodes: bool = False, extra_use: bool = False) -> onnx.ModelProto:
    inits = [nh.from_array(np.ones((4, 3, 1, 1), np.float32), "W")]
    nodes = []
    if const_nodes:
        nodes += [h.make_node("Constant", [], ["m"], value=nh.from_array(MEAN)),
                  h.make_node("Constant", [], ["s"], value=nh.from_array(STD))]
    else:
        inits += [nh.from_array(MEAN, "m"), nh.from_array(STD, "s")]
    inits.append(nh.from_array(np.array(2.0, np.float32), "two"))
    nodes += [h.make_node("Sub", ["x", "m"], ["a"]), h.make_node("Div", ["a", "s"], ["b"]),
              h.make_node("Mul", ["two", "b"], ["c"]),                 # constant on the left of a Mul is fine
              h.make_node("Conv", ["c", "W"], ["y0"])]
    outs = [vi("y0", None)]
    if extra_use:                                                      # the raw input is used elsewhere too
        nodes.append(h.make_node("Relu", ["x"], ["y1"]))
        outs.append(vi("y1", None))
    return model(nodes, [vi("x", [2, 3, 8, 8])], outs, inits)


@pytest.mark.parametrize("const_nodes", [False, True])
def test_normalisation_found_and_inverted(const_nodes):
    norm = input_normalization(_normalising_model(const_nodes), {"x": [2, 3, 8, 8]})
    a, b = (np.asarray(norm["x"][k]) for k in ("scale", "shift"))
    # the graph computes z = 2 * (x - mean) / std, i.e. a = 2 / std, b = -2 * mean / std (worked by hand)
    np.testing.assert_allclose(a, 2 / STD, rtol=1e-6)
    np.testing.assert_allclose(b, -2 * MEAN / STD, rtol=1e-6)
    info = [{"name": "x", "shape": [4000, 3, 8, 8], "dtype": "float32", "normalization": norm["x"]}]
    x = synthetic_inputs(info, {}, np.random.default_rng(0))[0].astype(np.float64)
    z = 2 * (x - MEAN) / STD                                           # what the model's first ops compute
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(x[:, 0].mean() - MEAN[0, 0, 0, 0]) < 0.02 * STD[0, 0, 0, 0]   # raw pixels around the mean


def test_no_normalisation_when_the_raw_input_is_used_elsewhere():
    assert input_normalization(_normalising_model(extra_use=True), {"x": [2, 3, 8, 8]}) == {}


def test_without_normalisation_inputs_stay_standard_normal():
    info = [{"name": "x", "shape": [3, 4], "dtype": "float32"}]
    got = synthetic_inputs(info, {}, np.random.default_rng(1))[0]
    np.testing.assert_array_equal(got, np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32))
