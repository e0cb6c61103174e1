"""Compile a workload with the real ``tvmc compile`` and run the package over the workload.

Shared by ``end_to_end.py`` and ``defaults_table.py``::

    import package_run as P
    pkg, compile_s, cached = P.compile_workload(wl, ["--psq-budget", "reduction=3"])
    out = P.run_package(pkg, wl, "fake-quant")         # [num_items, ...]
    m = wl.metrics([out], reference=ref)

``tvmc`` is the console script next to the running Python (``Path(sys.executable).with_name("tvmc")``);
it imports ``psq_tvm`` the same way this interpreter does, so ``PYTHONPATH`` selects the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import workloads as W  # noqa: E402

PKG_CACHE = W.CACHE / "packages"


def tvmc_path() -> Path:
    return Path(sys.executable).with_name("tvmc")


def shapes_arg(wl) -> str:
    """``--input-shapes`` value of a workload: ``name:[d0,d1,...] ...``."""
    return " ".join(f"{k}:[{','.join(str(d) for d in v)}]" for k, v in wl.input_shapes.items())


def tvmc_command(wl, tvmc_args, out_path) -> list[str]:
    return [str(tvmc_path()), "compile", "--target", "pim-psq", str(wl.onnx_path()), "--input-shapes",
            shapes_arg(wl), "-o", str(out_path)] + list(tvmc_args)


def tvmc_compile(wl, tvmc_args, out_path) -> float:
    """Run ``tvmc compile --target pim-psq MODEL --input-shapes ... -o out_path [tvmc_args]``; seconds taken.
    The subprocess inherits this environment (PYTHONPATH), so it compiles with the same psq_tvm."""
    t0 = time.perf_counter()
    subprocess.run(tvmc_command(wl, tvmc_args, out_path), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def psq_tvm_source_digest() -> str:
    """sha256 over the source of the psq_tvm that this interpreter imports (path + content of every .py)."""
    import importlib.util

    root = Path(importlib.util.find_spec("psq_tvm").origin).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def package_digest(pkg) -> str:
    """Digest of what a package computes: its manifest (search settings, layers, every blob's sha256), without
    the host library's checksum (a rebuilt .so need not be byte-identical) and the timings."""
    man = {k: v for k, v in pkg.manifest.items() if k != "host_library"}
    return hashlib.sha256(json.dumps(man, sort_keys=True, default=str).encode()).hexdigest()


def compile_workload(wl, tvmc_args, cache: bool = True, recompile: bool = False):
    """Compile ``wl`` with ``tvmc compile`` and load the package.  Returns ``(pkg, compile_s, cached)``.

    With ``cache`` the .tar is kept in ``.cache/packages/``, keyed by the ONNX file, the input shapes, the
    options and the psq_tvm source, so a re-run (or a resumed run) with unchanged code loads it instead of
    compiling again; ``compile_s`` is then the time the original compile took."""
    import psq_tvm

    key = hashlib.sha256(json.dumps([wl.name, _file_sha(wl.onnx_path()), shapes_arg(wl), list(tvmc_args),
                                     psq_tvm_source_digest()]).encode()).hexdigest()[:20]
    tar = PKG_CACHE / f"{wl.name}.{key}.tar"
    meta = tar.with_suffix(".json")
    if cache and not recompile and tar.exists() and meta.exists():
        return psq_tvm.load(str(tar)), json.loads(meta.read_text())["compile_s"], True
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.tar"
        compile_s = tvmc_compile(wl, tvmc_args, out)
        pkg = psq_tvm.load(str(out))
        if cache:
            PKG_CACHE.mkdir(parents=True, exist_ok=True)
            part = tar.with_name(f".{tar.name}.{os.getpid()}.tmp")
            shutil.copyfile(out, part)
            os.replace(part, tar)
            W.write_json(meta, {"workload": wl.name, "tvmc_args": list(tvmc_args), "compile_s": round(compile_s, 1),
                                "command": " ".join(tvmc_command(wl, tvmc_args, "OUT.tar"))})
    return pkg, compile_s, False


def run_package(pkg, wl, mode: str = "fake-quant", sim_options=None) -> np.ndarray:
    """Outputs [num_items, ...] of the package over the whole workload, in batches of the compiled size.

    Single-input workloads go through ``pkg.run_batched`` (what end_to_end.py has always done); multi-input
    ones (MiniLM) batch by batch over ``wl.batches()`` (the last batch padded by repeating its last item)."""
    if len(wl.input_names) == 1:
        X = np.concatenate([wl.feed(x)[wl.input_name] for x, _ in wl.batches()])[: wl.num_items]
        return pkg.run_batched(X, mode=mode, sim_options=sim_options)
    outs = [pkg.run(wl.feed(x), mode, sim_options)[0] for x, _ in wl.batches()]
    return wl._concat(outs)
