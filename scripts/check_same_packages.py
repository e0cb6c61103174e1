#!/usr/bin/env python
"""Check that a refactoring left the compiled packages unchanged: compile the same models with the
code of a base git revision and with the working tree, and compare every tar member but
``timing.json`` (measured durations) byte for byte.

The base revision is checked out into a temporary ``git worktree`` and run with ``PYTHONPATH``
pointing at it, in a separate process, so both sides use the same installed TVM and onnx.

    python scripts/check_same_packages.py --base REV [--models bundled,squeezenet,resnet50]
                                          [-- extra tvmc compile options]

Models: ``bundled`` (``psq_tvm/data/fashion_cnn.onnx``) and any ONNX backend "light" model by its
short name (``onnx/backend/test/data/light/light_<name>.onnx``).  Exit code 1 on any difference.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IGNORED = {"timing.json"}


def model_path(name: str) -> str:
    if name == "bundled":
        return os.path.join(ROOT, "psq_tvm", "data", "fashion_cnn.onnx")
    import onnx

    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")


def compile_with(tree: str, model: str, out: str, extra: list[str]) -> None:
    """``tvmc compile --target pim-psq`` with the psq_tvm found in ``tree``."""
    env = dict(os.environ, PYTHONPATH=tree)
    code = "import sys; from psq_tvm.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "compile", "--target", "pim-psq", model, "-o", out, "-q", *extra]
    subprocess.run(cmd, env=env, cwd=tree, check=True)


def digests(path: str) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                for m in tar.getmembers() if m.isfile() and m.name not in IGNORED}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1, a commit)")
    ap.add_argument("--models", default="bundled,squeezenet,resnet50")
    ap.add_argument("extra", nargs="*", help="extra options for tvmc compile (after --)")
    a = ap.parse_args(argv)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="psq-same-") as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", base_tree, a.base], check=True)
        try:
            for name in a.models.split(","):
                model = model_path(name)
                old, new = os.path.join(tmp, f"{name}.base.tar"), os.path.join(tmp, f"{name}.new.tar")
                compile_with(base_tree, model, old, a.extra)
                compile_with(ROOT, model, new, a.extra)
                d_old, d_new = digests(old), digests(new)
                diff = sorted(k for k in set(d_old) | set(d_new) if d_old.get(k) != d_new.get(k))
                status = "same" if not diff else "DIFFERENT: " + ", ".join(diff)
                failed += bool(diff)
                print(f"{name:<12} {len(d_new):>3} members (timing.json excluded): {status}", flush=True)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base_tree], check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
