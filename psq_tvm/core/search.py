"""The PSQ search: a scale and a bitwidth for every crossbar tile, data-free.

:func:`psq_search` scores every candidate (:mod:`psq_tvm.core.candidates`), then
allocates bitwidths over the whole model (:mod:`psq_tvm.core.allocation`: tolerance or
budget) and returns a :class:`~psq_tvm.core.quant.QuantResult`.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .allocation import DEFAULT_BUDGET, Budget, allocate_budget, allocate_tolerance
from .candidates import (DEFAULT_GRANULARITY, DEFAULT_OBJECTIVE, GRANULARITIES, OBJECTIVES, CandidateTable,
                         SearchConfig, evaluate_candidates)
from .crossbar import CrossbarSpec
from .quant import QuantResult
from .tiling import Layer, ModelTiles

__all__ = ["CandidateTable", "DEFAULT_BUDGET", "DEFAULT_GRANULARITY", "DEFAULT_OBJECTIVE", "GRANULARITIES",
           "OBJECTIVES", "SearchConfig", "evaluate_candidates", "psq_search", "quant_result"]


def psq_search(layers: Sequence[Layer], spec: CrossbarSpec, *, config: SearchConfig | None = None,
               budget: Budget | str | None = None, tolerance: float | None = None,
               bits: Sequence[int] | None = None, tile_importance: np.ndarray | None = None,
               tiles: ModelTiles | None = None) -> QuantResult:
    """Run PSQ on ``layers``: per-tile scale and bitwidth under a tolerance or a whole-model budget.

    Exactly one of ``budget`` (e.g. ``"avg-bits=4.5"``, ``"crossbars=800"``,
    ``"reduction=3.5"``) and ``tolerance`` (largest acceptable per-tile
    relative MSE, or divergence for ``cdf-kl``) should be given; with neither,
    the default budget ``reduction=4`` is used.
    """
    start = time.perf_counter()
    config = config or SearchConfig()
    bits = tuple(sorted(set(bits or spec.weight_bits)))
    for b in bits:
        if not 2 <= b <= 16:
            raise ValueError(f"candidate bitwidth {b} outside 2..16")
    tiles = tiles or ModelTiles(layers, spec.rows, spec.cols)
    table = evaluate_candidates(tiles, bits, config, tile_importance)
    if budget is not None and tolerance is not None:
        raise ValueError("give either a budget or a tolerance, not both")
    if tolerance is not None:
        choice, note = allocate_tolerance(table, tolerance), f"tolerance {tolerance:g}"
    else:
        budget = Budget.parse(budget or DEFAULT_BUDGET)
        choice, note = allocate_budget(table, tiles, spec, budget)
    return quant_result(table, tiles, spec, choice, config.objective, time.perf_counter() - start, note,
                        rounding=config.rounding)


def quant_result(table: CandidateTable, tiles: ModelTiles, spec: CrossbarSpec, choice: np.ndarray,
                 objective: str, seconds: float = 0.0, note: str = "", rounding: str = "nearest") -> QuantResult:
    """The :class:`QuantResult` of one allocation ``choice`` (indices into ``table.bits``, one per tile), its
    levels formed by ``rounding`` (:data:`psq_tvm.core.quant.ROUNDINGS`)."""
    t = np.arange(tiles.n_tiles)
    return QuantResult(
        tiles=tiles, spec=spec, bits=np.array(table.bits, dtype=np.int64)[choice], scales=table.scales(choice),
        objective=table.objective[t, choice], method=f"psq-{objective}", search_seconds=seconds, note=note,
        candidates=table, rounding=rounding)

