"""Fuzz suite (CI, deterministic, bounded): mutated ONNX files, packages, .npz inputs and random command
lines through `tvmc`, each checked against the invariants of tests/fuzz_harness.py.  Cases that once
failed are kept in tests/fuzz_corpus/ and replayed by test_corpus.

Hypothesis runs derandomized (the same examples every run) with no example database, and a bounded
number of examples per test (``FUZZ_EXAMPLES`` multiplies them, e.g. FUZZ_EXAMPLES=10 for a longer
local hunt)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto  # noqa: E402
from onnx import helper as h  # noqa: E402

from fuzz_harness import corpus_case, invoke, invoke_child, tiny_cnn, tiny_mlp  # noqa: E402
from test_package_integrity import tar_bytes  # noqa: E402
from psq_tvm.cli import main  # noqa: E402

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_corpus")
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
COMPILE = ["-q", "--psq-budget", "avg-bits=4", "--target-pim-psq-rows", "16", "--target-pim-psq-cols", "16"]


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A sandbox with the tiny models, a compiled package of each, and a valid input file."""
    d = tmp_path_factory.mktemp("fuzz")
    onnx.save(tiny_mlp(), d / "mlp.onnx")
    onnx.save(tiny_cnn(), d / "cnn.onnx")
    for name in ("mlp", "cnn"):
        assert main(["compile", str(d / f"{name}.onnx"), "-o", str(d / f"{name}.tar"), *COMPILE]) == 0
    np.savez(d / "x.npz", x=np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32))
    return d


def sandbox(base, tmp_path_factory, *names):
    """A fresh directory with copies of base's files (so a case can only write into it)."""
    d = tmp_path_factory.mktemp("case")
    for n in names:
        shutil.copy(base / n, d / n)
    return d


# ----------------------------------------------------------------------------------------- ONNX
ATTRS = {"Conv": ["pads", "strides", "dilations", "group", "kernel_shape"], "Gemm": ["transB", "transA", "alpha"],
         "Flatten": ["axis"], "MatMul": ["bogus"], "Relu": ["alpha"]}
DTYPES = [TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BOOL, TensorProto.INT8,
          TensorProto.STRING, 0, 999]
DIMS = st.sampled_from([0, -1, 1, 2, 3, 5, 7, 16, 100000])


@st.composite
def onnx_mutation(draw):
    which = draw(st.sampled_from(["mlp", "cnn"]))
    m = tiny_mlp() if which == "mlp" else tiny_cnn()
    g = m.graph
    kind = draw(st.sampled_from(["bytes", "truncate", "input_shape", "input_dtype", "init_dtype", "init_shape",
                                 "attribute", "drop_init", "cycle", "nan_weight", "dangling", "dup_output",
                                 "opset", "op_type"]))
    if kind == "input_shape":
        dims = g.input[0].type.tensor_type.shape.dim
        k = draw(st.integers(0, len(dims) - 1))
        v = draw(DIMS)
        if v < 0:
            dims[k].dim_param = "n"
        else:
            dims[k].dim_value = v
    elif kind == "input_dtype":
        g.input[0].type.tensor_type.elem_type = draw(st.sampled_from(DTYPES))
    elif kind == "init_dtype":
        init = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        init.data_type = draw(st.sampled_from(DTYPES))
    elif kind == "init_shape":
        init = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        init.dims[draw(st.integers(0, len(init.dims) - 1))] = draw(DIMS)
    elif kind == "attribute":
        nodes = [n for n in g.node if n.op_type in ATTRS]
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        name = draw(st.sampled_from(ATTRS[node.op_type]))
        val = draw(st.one_of(st.integers(-3, 9), st.lists(st.integers(-2, 9), min_size=0, max_size=5),
                             st.floats(allow_nan=True, allow_infinity=True)))
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        attr = (h.make_attribute(name, val, attr_type=onnx.AttributeProto.INTS) if isinstance(val, list)
                else h.make_attribute(name, val))
        node.attribute.extend(keep + [attr])
    elif kind == "drop_init":
        del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
    elif kind == "cycle":
        n0 = g.node[0]
        n0.input[0] = g.node[-1].output[0]                 # the first node reads the last node's output
    elif kind == "nan_weight":
        init = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        a = onnx.numpy_helper.to_array(init).copy()
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e38]))
        init.CopyFrom(onnx.numpy_helper.from_array(a, init.name))
    elif kind == "dangling":
        g.node[draw(st.integers(0, len(g.node) - 1))].input.append("nowhere")
    elif kind == "dup_output":
        g.node.append(g.node[draw(st.integers(0, len(g.node) - 1))])
    elif kind == "opset":
        m.opset_import[0].version = draw(st.sampled_from([1, 6, 11, 99, 0]))
    elif kind == "op_type":
        g.node[draw(st.integers(0, len(g.node) - 1))].op_type = draw(st.sampled_from(["Bogus", "Conv", "MatMul",
                                                                                       "LSTM", "If"]))
    data = m.SerializeToString()
    if kind == "bytes":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        data = bytes(b)
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    return kind, data


@fuzz(40)
@given(case=onnx_mutation())
def test_fuzz_onnx(case, base, tmp_path_factory):
    kind, data = case
    d = sandbox(base, tmp_path_factory)
    (d / "m.onnx").write_bytes(data)
    invoke(["compile", "m.onnx", "-o", "out.tar", *COMPILE], str(d))


# -------------------------------------------------------------------------------------- packages
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.sampled_from([0, -1, 10**12, 2**63]),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                 st.lists(st.integers(-3, 300), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON object, lists sampled to their first 3 entries."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k in sorted(obj):
            yield from _paths(obj[k], prefix + (k,))
    elif isinstance(obj, list):
        for k, v in enumerate(obj[:3]):
            yield from _paths(v, prefix + (k,))




@st.composite
def package_mutation(draw, base_dir):
    which = draw(st.sampled_from(["mlp", "cnn"]))
    raw = (base_dir / f"{which}.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        items = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    kind = draw(st.sampled_from(["bytes", "truncate", "append", "drop", "duplicate", "unlisted", "manifest",
                                 "manifest", "manifest", "blob"]))
    if kind == "bytes":
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 6))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return which, kind, bytes(b)
    if kind == "truncate":
        return which, kind, raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "append":
        return which, kind, raw + draw(st.binary(min_size=1, max_size=2048))
    k = draw(st.integers(0, len(items) - 1))
    if kind == "drop":
        del items[k]
    elif kind == "duplicate":
        items.append(items[k])
    elif kind == "unlisted":
        items.append((draw(st.sampled_from(["x.bin", "manifest.json.bak", "weight_99.bin", "a/b"])), b"\0" * 10))
    elif kind == "manifest":
        names = [n for n, _ in items]
        mi = names.index("manifest.json")
        man = json.loads(items[mi][1])
        paths = [p for p, _ in _paths(man) if p]
        path = paths[draw(st.integers(0, len(paths) - 1))]
        obj = man
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = draw(JUNK)
        items[mi] = ("manifest.json", json.dumps(man).encode())
    elif kind == "blob":                               # flip cells/values and fix the checksum: loads
        names = [n for n, _ in items]
        mi = names.index("manifest.json")
        man = json.loads(items[mi][1])
        blob = draw(st.sampled_from(sorted(man["blobs"])))
        fi = names.index(man["blobs"][blob]["file"])
        b = bytearray(items[fi][1])
        if b:
            for _ in range(draw(st.integers(1, 16))):
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        items[fi] = (items[fi][0], bytes(b))
        man["blobs"][blob]["sha256"] = hashlib.sha256(bytes(b)).hexdigest()
        items[mi] = ("manifest.json", json.dumps(man).encode())
    return which, kind, tar_bytes(items)


def test_fuzz_packages(base, tmp_path_factory):
    @fuzz(60)
    @given(case=package_mutation(base), cmd=st.sampled_from(["report", "report-json", "run", "run-sim"]))
    def one(case, cmd):
        which, kind, data = case
        d = sandbox(base, tmp_path_factory)
        (d / "p.tar").write_bytes(data)
        argv = {"report": ["report", "p.tar"], "report-json": ["report", "p.tar", "--json"],
                "run": ["run", "p.tar", "-q", "--mode", "fake-quant", "--outputs", "o.npz"],
                "run-sim": ["run", "p.tar", "-q", "--mode", "sim"]}[cmd]
        invoke(argv, str(d))
    one()


# ------------------------------------------------------------------------------------------ .npz
@st.composite
def npz_mutation(draw):
    kind = draw(st.sampled_from(["dtype", "shape", "values", "names", "labels", "bytes", "object", "empty"]))
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    arrays = {"x": x}
    if kind == "dtype":
        arrays["x"] = x.astype(draw(st.sampled_from(["int64", "float16", "float64", "bool", "complex64", "uint8",
                                                      "int8", "U3"])))
    elif kind == "shape":
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 16, 17]), min_size=0, max_size=4))
        arrays["x"] = np.zeros(shape, np.float32)
    elif kind == "values":
        arrays["x"] = x.copy()
        arrays["x"].flat[draw(st.integers(0, 15))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -0.0]))
    elif kind == "names":
        arrays = {draw(st.sampled_from(["y", "labels", "input", ""])): x, **({"z": x} if draw(st.booleans()) else {})}
    elif kind == "labels":
        arrays["labels"] = draw(st.sampled_from([np.array([1, 2]), np.array(["a"]), np.array([[0]]), np.zeros(1)]))
    elif kind == "empty":
        arrays = {}
    buf = io.BytesIO()
    if kind == "object":
        np.savez(buf, x=np.array([{"a": 1}], dtype=object))
    else:
        np.savez(buf, **arrays)
    data = buf.getvalue()
    if kind == "bytes":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        data = bytes(b)
    return kind, data


@fuzz(30)
@given(case=npz_mutation(), mode=st.sampled_from(["sim", "fake-quant", "float", "golden"]))
def test_fuzz_npz_inputs(case, mode, base, tmp_path_factory):
    kind, data = case
    d = sandbox(base, tmp_path_factory, "mlp.tar")
    (d / "in.npz").write_bytes(data)
    invoke(["run", "mlp.tar", "--inputs", "in.npz", "-q", "--mode", mode], str(d))


# -------------------------------------------------------------------------------------- options
OPTIONS = {
    "compile": ["-o", "--target", "--input-shapes", "--target-pim-psq-preset", "--target-pim-psq-rows",
                "--target-pim-psq-cols", "--target-pim-psq-cell-bits", "--target-pim-psq-encoding",
                "--target-pim-psq-adc-bits", "--target-pim-psq-dac-bits", "--target-pim-psq-act-bits",
                "--target-pim-psq-weight-bits", "--psq-objective", "--psq-granularity", "--psq-budget",
                "--psq-tolerance", "--psq-min-fidelity", "--psq-bits", "--psq-sensitivity", "--psq-bias-correction",
                "--calib-inputs", "--emit-c-header", "--no-float-weights", "--no-fold-batchnorm"],
    "run": ["--inputs", "--outputs", "--print-top", "--mode", "--verify", "--max-loss", "--sim-act-bits",
            "--sim-adc-full-scale", "--sim-force-bitserial", "--sim-conductance-sigma", "--sim-stuck-at-min",
            "--sim-stuck-at-max", "--sim-adc-offset", "--sim-seed", "--expect-digest"],
    "report": ["--json", "--plot", "--expect-digest"],
}
VALUES = st.sampled_from(["0", "1", "-1", "2", "3", "8", "64", "1000000", "0.5", "nan", "inf", "-inf", "1e999", "",
                          "none", "auto", "isaac", "prime", "differential", "offset", "x", "2-8", "8-2", "2,4",
                          "avg-bits=4", "avg-bits=0", "reduction=1e9", "crossbars=1", "crossbars=-3", "top1=0.5",
                          "accuracy=2", "x:[1,16]", "x:[0,16]", "x:[1,-16]", "x:[]", "rtn8", "rtn8-99", "mse",
                          "sim", "golden", "x.npz", "out.tar", "sub/out.tar", "o.npz", "p.png", "h.h", "mlp.tar",
                          "a" * 64, "0" * 64])


@st.composite
def command_line(draw):
    cmd = draw(st.sampled_from(["compile", "run", "report"]))
    argv = [cmd, {"compile": "mlp.onnx", "run": "mlp.tar", "report": "mlp.tar"}[cmd]]
    if cmd == "compile":
        argv += ["-q", "--psq-budget", "avg-bits=4"]
    if cmd == "run":
        argv += ["-q"]
    for _ in range(draw(st.integers(0, 4))):
        opt = draw(st.sampled_from(OPTIONS[cmd] + ["--bogus", "-x", "--json=1"]))
        argv.append(opt)
        if draw(st.integers(0, 9)) > 1:
            argv.append(draw(VALUES))
    return argv


@fuzz(50)
@given(argv=command_line())
def test_fuzz_command_lines(argv, base, tmp_path_factory):
    d = sandbox(base, tmp_path_factory, "mlp.onnx", "mlp.tar", "x.npz")
    invoke(argv, str(d))


# ---------------------------------------------------------------------- real exit codes (children)
def test_fuzz_children_exit_codes(base, tmp_path_factory):
    """Three children (each pays the TVM import): a damaged package, a bad option, a digest mismatch."""
    d = sandbox(base, tmp_path_factory, "mlp.tar")
    (d / "junk.tar").write_bytes(b"\0" * 100 + b"not a tar" * 50)
    cases = [(["report", "junk.tar"], 1), (["run", "mlp.tar", "--mode", "bogus"], 2),
             (["run", "mlp.tar", "--expect-digest", "0" * 64], 5)]
    for argv, want in cases:
        code, _, err = invoke_child(argv, str(d))
        assert code == want, (argv, err)


# ------------------------------------------------------------------------------------------ corpus
CASES = sorted(os.listdir(CORPUS)) if os.path.isdir(CORPUS) else []


@pytest.mark.parametrize("name", [c for c in CASES if not c.endswith(".md")])
def test_corpus(name, base, tmp_path_factory):
    """Every input that once broke an invariant (README.md in the folder says what each was)."""
    d = sandbox(base, tmp_path_factory, "mlp.onnx", "mlp.tar", "x.npz")
    ext = os.path.splitext(name)[1]
    if ext != ".json":
        shutil.copy(os.path.join(CORPUS, name), d / f"case{ext}")
    argv = corpus_case(os.path.join(CORPUS, name))
    invoke(argv, str(d))
    if ext == ".tar":
        invoke(["run", "case.tar", "-q", "--mode", "sim"], str(d))
