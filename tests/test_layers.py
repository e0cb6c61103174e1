"""The tree is the architecture: the numpy core stays free of TVM/onnx, imports go one way between the
layers, and no module imports a module that imports it back."""

import ast
import os
import subprocess
import sys

import networkx as nx

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "psq_tvm")

#: layer of every sub-package / top-level module, and the layers each may import (docs/architecture.md)
LAYER_OF = {"core": "core", "frontend": "frontend", "passes": "passes", "runtime": "runtime",
            "targets": "targets", "api": "api", "cli": "api", "__init__": "api"}
ALLOWED = {
    "core": {"core"},
    "frontend": {"core", "frontend"},
    "passes": {"core", "frontend", "passes"},
    "runtime": {"core", "runtime"},
    "targets": {"core", "frontend", "passes", "runtime", "targets"},
    "api": {"core", "frontend", "passes", "runtime", "targets", "api"},
}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[:-9] if rel.endswith(".__init__") else rel


def _imports(path: str) -> set[str]:
    """psq_tvm modules imported anywhere in ``path`` (function-level imports included)."""
    mod = _module_name(path)
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("psq_tvm"):
                out.add(target)
                for a in node.names:       # "from . import simulator" names a module (or package)
                    cand = f"{target}.{a.name}"
                    base = os.path.join(os.path.dirname(ROOT), *cand.split("."))
                    if os.path.exists(base + ".py") or os.path.exists(os.path.join(base, "__init__.py")):
                        out.add(cand)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("psq_tvm"))
    return out


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                src = _module_name(p)
                g.add_node(src)
                for t in _imports(p):
                    if t != src and not src.startswith(t + "."):   # a module importing its own package
                        g.add_edge(src, t)
    return g


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return LAYER_OF["__init__"] if len(parts) == 1 else LAYER_OF[parts[1]]


def test_core_imports_neither_tvm_nor_onnx():
    code = ("import sys, psq_tvm.core, psq_tvm; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tvm', 'onnx', 'tvm_ffi')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(ROOT))
    assert r.returncode == 0, r.stdout + r.stderr


def test_imports_go_one_way_between_layers():
    g = _graph()
    wrong = [(a, b) for a, b in g.edges if _layer(b) not in ALLOWED[_layer(a)]]
    assert not wrong, f"imports against the layer order: {wrong}"


def test_no_module_imports_a_module_that_imports_it_back():
    g = _graph()
    # package __init__ re-exports are not circles of their own: drop edges into a package's __init__
    # from its own modules (a module importing its package is excluded in _graph)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import circles: {cycles}"


def test_checker_sees_a_planted_circle(tmp_path, monkeypatch):
    """The circle check is not vacuous: two modules importing each other are found."""
    pkg = tmp_path / "psq_tvm"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from .b import x\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(pkg))
    assert list(nx.simple_cycles(_graph()))
