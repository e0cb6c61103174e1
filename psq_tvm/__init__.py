"""psq-tvm: PSQ data-free per-tile quantisation for crossbar PIM accelerators, on Apache TVM.

The layers, one direction of imports (``docs/architecture.md``)::

    core      numpy only: crossbar model, tiling, candidates, search, allocation, packing, tables, report
    frontend  ONNX import, computed-shape folding, BatchNorm statistics             (core)
    passes    Relax passes: PartitionForPIM, AnnotatePSQ, LowerToPIM                 (core, frontend)
    runtime   package, session, crossbar simulator, verification                    (core)
    targets   the pim-psq target: tag, options, compile pipeline of named stages   (all of the above)
    api, cli  psq_tvm.compile / psq_tvm.load, the ``tvmc`` command                  (targets, runtime)

``import psq_tvm`` loads the numpy core only; the TVM layers load on first use
(``psq_tvm.compile``, ``psq_tvm.passes``, ...).  The ``pim-psq`` target tag is registered when
``psq_tvm.targets`` or ``psq_tvm.passes`` is imported (or at ``import psq_tvm`` if TVM is already loaded).
"""

import importlib
import sys

from .core import (
    DEFAULT_BUDGET, OBJECTIVES, PRESETS, Budget, BudgetError, CrossbarSpec, Layer, ModelTiles, Placement,
    QuantResult, SearchConfig, SpecError, WeightError, allocate_budget, allocate_tolerance, compare,
    grouped_conv_rule, pack, parse_bits, preset, psq_search, quantize_levels, roll, rtn_per_tile, tiles,
    uniform_crossbars, uniform_per_layer, unroll, untile,
)

__version__ = "0.1.0"

__all__ = [
    "Budget", "BudgetError", "CrossbarSpec", "DEFAULT_BUDGET", "Layer", "ModelTiles", "OBJECTIVES", "PRESETS",
    "Placement", "QuantResult", "SearchConfig", "SpecError", "WeightError", "allocate_budget",
    "allocate_tolerance", "compare", "grouped_conv_rule", "pack", "parse_bits", "preset", "psq_search",
    "quantize_levels", "roll", "rtn_per_tile", "tiles", "uniform_crossbars", "uniform_per_layer", "unroll",
    "untile", "__version__", "compile", "load",
]

_SUBPACKAGES = ("core", "frontend", "passes", "runtime", "targets")


def compile(model_or_path, target="pim-psq", **options):  # noqa: A001 (mirrors tvm.compile)
    """Compile an ONNX model for ``pim-psq`` (or ``llvm``); see :func:`psq_tvm.api.compile`."""
    from .api import compile as _compile
    return _compile(model_or_path, target, **options)


def load(path, expect_digest=None):
    """Load and validate a compiled package; see :func:`psq_tvm.api.load`."""
    from .api import load as _load
    return _load(path, expect_digest)


def __getattr__(name):  # psq_tvm.passes, psq_tvm.targets, ... without importing TVM up front
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "tvm" in sys.modules:  # TVM already loaded: make tvm.target.Target("pim-psq") work at once
    from .targets import tag as _tag
    _tag.register_tag()
