"""psq-tvm: PSQ data-free per-tile quantisation for crossbar PIM accelerators, on Apache TVM.

The numpy core (crossbar model, tiling, search, packing) imports no TVM;
``psq_tvm.passes`` and ``psq_tvm.targets`` build on it.
"""

from .allocation import Budget, BudgetError, allocate_budget, allocate_tolerance
from .crossbar import PRESETS, CrossbarSpec, SpecError, parse_bits, preset
from .packing import Placement, pack
from .quant import QuantResult, compare, quantize_levels, rtn_per_tile, uniform_crossbars, uniform_per_layer
from .search import OBJECTIVES, SearchConfig, psq_search
from .tiling import Layer, ModelTiles, WeightError, grouped_conv_rule, roll, tiles, unroll, untile

__version__ = "0.1.0"

__all__ = [
    "Budget", "BudgetError", "CrossbarSpec", "Layer", "ModelTiles", "OBJECTIVES", "PRESETS", "Placement",
    "QuantResult", "SearchConfig", "SpecError", "WeightError", "allocate_budget", "allocate_tolerance",
    "compare", "grouped_conv_rule", "pack", "parse_bits", "preset", "psq_search", "quantize_levels", "roll",
    "rtn_per_tile", "tiles", "uniform_crossbars", "uniform_per_layer", "unroll", "untile", "__version__",
]


# --- TVM-facing API (pim-psq target): imported lazily so the numpy core stays light ---------------
def compile(model_or_path, target="pim-psq", **options):  # noqa: A001 (mirrors tvm.compile)
    """Compile an ONNX model for ``pim-psq`` (or ``llvm``); see :func:`psq_tvm.api.compile`."""
    from .api import compile as _compile
    return _compile(model_or_path, target, **options)


def load(path):
    """Load and validate a compiled package; see :func:`psq_tvm.api.load`."""
    from .api import load as _load
    return _load(path)


try:  # importing psq_tvm registers the "pim-psq" target tag when TVM is installed
    import tvm as _tvm  # noqa: F401
except ImportError:  # pragma: no cover - numpy-only install
    pass
else:
    from .targets.pim_psq import register_tag as _register_tag
    _register_tag()
    del _register_tag

__all__ += ["compile", "load"]
