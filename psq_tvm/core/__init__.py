"""The numpy core of psq-tvm: crossbar model, tiling, PSQ search and allocation, packing, tables, report.

Imports numpy only -- never TVM or onnx (``tests/test_layers.py`` checks it) -- so it can be used and
tested alone, e.g. by a planner that never builds a model.
"""

from .allocation import DEFAULT_BUDGET, Budget, BudgetError, allocate_budget, allocate_tolerance
from .candidates import CandidateTable, SearchConfig, evaluate_candidates
from .crossbar import PRESETS, CrossbarSpec, SpecError, parse_bits, preset
from .packing import Placement, pack
from .quant import QuantResult, compare, quantize_levels, rtn_per_tile, uniform_crossbars, uniform_per_layer
from .search import OBJECTIVES, psq_search
from .tiling import Layer, ModelTiles, WeightError, grouped_conv_rule, roll, tiles, unroll, untile

__all__ = [
    "Budget", "BudgetError", "CandidateTable", "CrossbarSpec", "DEFAULT_BUDGET", "Layer", "ModelTiles", "OBJECTIVES",
    "PRESETS", "Placement", "QuantResult", "SearchConfig", "SpecError", "WeightError", "allocate_budget",
    "allocate_tolerance", "compare", "evaluate_candidates", "grouped_conv_rule", "pack", "parse_bits", "preset",
    "psq_search", "quantize_levels", "roll", "rtn_per_tile", "tiles", "uniform_crossbars", "uniform_per_layer",
    "unroll", "untile",
]

from .cost import COST_PRESETS, CostModel, CostParams, cost_params  # noqa: E402  (hardware cost model)

__all__ += ["COST_PRESETS", "CostModel", "CostParams", "cost_params"]
