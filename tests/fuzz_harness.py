"""The invariants every `tvmc` invocation must keep, checked in-process (fast) or in a child (real exit codes).

* the exit code is 0 or a documented error code (``DOCUMENTED``);
* a failure prints exactly one ``tvmc: error: ...`` line, every stderr line is tvmc's (no traceback,
  no TVM internals), and an ``-o``/``--outputs``/``--emit-c-header``/``--plot`` file is either complete or absent;
* nothing is written anywhere in the sandbox directory but the outputs the command names, and no
  temporary file is left;
* peak resident memory stays under ``MAX_RSS``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from psq_tvm.cli import EXIT_CODES, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTED = set(EXIT_CODES)              # README "Exit codes" and `tvmc --help`
MAX_RSS = 3 << 30                           # bytes; the tiny models of the fuzz need < 1 GiB
OUTPUT_FLAGS = ("-o", "--output", "--outputs", "--emit-c-header", "--plot")


def tiny_mlp() -> onnx.ModelProto:
    """x[1,16] -> MatMul+Add -> Relu -> MatMul -> y[1,5]: two PIM dense layers, compiles in ~1 s."""
    r = np.random.default_rng(0)
    inits = [nh.from_array(r.standard_normal((16, 24)).astype(np.float32) * 0.3, "W1"),
             nh.from_array(r.standard_normal(24).astype(np.float32) * 0.1, "B1"),
             nh.from_array(r.standard_normal((24, 5)).astype(np.float32) * 0.3, "W2")]
    nodes = [h.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"), h.make_node("Add", ["m1", "B1"], ["a1"]),
             h.make_node("Relu", ["a1"], ["r1"]), h.make_node("MatMul", ["r1", "W2"], ["y"], name="fc2")]
    g = h.make_graph(nodes, "tiny", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def tiny_cnn() -> onnx.ModelProto:
    """x[1,2,6,6] -> Conv(3x3, pad 1) -> Relu -> Flatten -> Gemm -> y[1,3]."""
    r = np.random.default_rng(1)
    inits = [nh.from_array(r.standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.3, "Wc"),
             nh.from_array(r.standard_normal(4).astype(np.float32) * 0.1, "Bc"),
             nh.from_array(r.standard_normal((3, 144)).astype(np.float32) * 0.1, "Wg")]
    nodes = [h.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[1, 1]),
             h.make_node("Relu", ["c"], ["r"]), h.make_node("Flatten", ["r"], ["f"]),
             h.make_node("Gemm", ["f", "Wg"], ["y"], name="fc", transB=1)]
    g = h.make_graph(nodes, "tinycnn", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                     [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file and symlink under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def named_outputs(argv: list[str], cwd: str) -> set[str]:
    """Paths (relative to cwd's sandbox) the command line names as outputs."""
    outs = set()
    for k, tok in enumerate(argv):
        for flag in OUTPUT_FLAGS:
            val = None
            if tok == flag and k + 1 < len(argv):
                val = argv[k + 1]
            elif tok.startswith(flag + "=") and flag.startswith("--"):
                val = tok[len(flag) + 1:]
            if val:
                outs.add(os.path.normpath(os.path.relpath(os.path.join(cwd, val), cwd)))
    if argv[:1] == ["compile"] and not any(t in ("-o", "--output") or t.startswith("--output=") for t in argv):
        outs.add("module.tar")
    return outs


def check(code, out: str, err: str, argv: list[str], before: dict, after: dict) -> None:
    """Assert the invariants for one finished invocation."""
    where = f"argv={argv!r}\nstderr={err[-3000:]!r}"
    assert code in DOCUMENTED, f"undocumented exit code {code!r}\n{where}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, where
    help_only = not set(argv) & {"compile", "run", "report"} and err.startswith("usage: ")
    if help_only:
        lines = []                       # `tvmc` without a command prints its help (exit 2)
    assert all(ln.startswith("tvmc: ") for ln in lines), f"foreign stderr\n{where}"
    errors = [ln for ln in lines if ln.startswith("tvmc: error:")]
    if code != 0 and not help_only:
        assert len(errors) == 1, f"a failure needs exactly one 'tvmc: error:' line\n{where}"
    allowed = named_outputs(argv, ".")
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    stray = {p for p in changed if p not in allowed}
    assert not stray, f"wrote outside the named outputs: {sorted(stray)}\n{where}"
    tmp = [p for p in after if ".tmp" in os.path.basename(p) or os.path.basename(p).startswith(".psq-")]
    assert not tmp, f"temporary files left: {tmp}\n{where}"
    if code != 0:
        new = {p for p in changed if p in after and p not in before}
        for p in new:                    # an output that failed half-way must not exist (complete ones may)
            assert _complete(p), f"half-written output {p}\n{where}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss < MAX_RSS, f"peak RSS {rss >> 20} MiB\n{where}"


def _complete(path: str) -> bool:
    """A finished output: a tar/npz that opens, a PNG/header with content."""
    try:
        if path.endswith(".tar"):
            with tarfile.open(path) as t:
                return "manifest.json" in t.getnames()
        if path.endswith(".npz"):
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None
        return os.path.getsize(path) > 0
    except Exception:
        return False


def _cli_warning_filters() -> None:
    """Python warnings as a `tvmc` process shows them (pytest would otherwise record them silently)."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", cat)
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def invoke(argv: list[str], sandbox: str) -> tuple[int, str, str]:
    """Run tvmc's main in-process with cwd = sandbox; check the invariants; return (code, stdout, stderr)."""
    argv = [str(a) for a in argv]
    before = snapshot(sandbox)
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(sandbox)
    try:
        with tempfile.TemporaryFile() as native, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            _cli_warning_filters()
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(native.fileno(), 2)        # what native code (TVM, LLVM) writes to fd 2 is seen too
            try:
                code = main(argv)
            except SystemExit as e:            # argparse usage errors and --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            native.seek(0)
            err.write(native.read().decode(errors="replace"))
        check(code, out.getvalue(), err.getvalue(), argv, before, snapshot(sandbox))
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def invoke_child(argv: list[str], sandbox: str, timeout: float = 300) -> tuple[int, str, str]:
    """The same in a child process (real exit codes, and stderr written by native code is seen too)."""
    argv = [str(a) for a in argv]
    before = snapshot(sandbox)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PSQ_TVM_TRACEBACK", None)
    p = subprocess.run([sys.executable, "-m", "psq_tvm.cli", *argv], cwd=sandbox, env=env, capture_output=True,
                       text=True, timeout=timeout)
    check(p.returncode, p.stdout, p.stderr, argv, before, snapshot(sandbox))
    return p.returncode, p.stdout, p.stderr


def corpus_case(path: str) -> list[str]:
    """argv of a corpus file (relative to the sandbox it is copied into, as ``case.<ext>``).

    ``*.onnx``: compile it; ``*.tar``: report it, then run it; ``*.npz``: run the base package on it;
    ``*.json``: {"argv": [...]} a command line as is."""
    ext = os.path.splitext(path)[1]
    if ext == ".json":
        with open(path) as f:
            return json.load(f)["argv"]
    return {".onnx": ["compile", "case.onnx", "-o", "out.tar", "-q", "--psq-budget", "avg-bits=4"],
            ".tar": ["report", "case.tar"],
            ".npz": ["run", "mlp.tar", "--inputs", "case.npz", "-q", "--mode", "sim"]}[ext]
