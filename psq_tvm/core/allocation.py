"""Bitwidth allocation over tiles: tolerance mode and whole-model budget mode.

Budget mode minimises the summed (weighted) distortion of all tiles subject
to one budget for the whole model:

* ``avg-bits=X``   -- weight-count weighted average bitwidth <= X;
* ``crossbars=N``  -- occupied crossbars after block reassembly <= N;
* ``reduction=R``  -- crossbars <= uniform-16-bit crossbars / R;
* ``energy=E`` (uJ per inference), ``latency=T`` (us per inference), ``area=A`` (mm^2) -- the hardware
  cost model (:mod:`psq_tvm.core.cost`) in place of crossbars; ``energy-reduction=R`` etc.: that figure
  of uniform 16-bit / R.

It is solved by Lagrangian relaxation (each tile independently minimises
``distortion + lambda * cost``), bisection on ``lambda`` against the *exact*
budget measure (packing included), then a greedy pass that spends what is
left of the budget on the upgrades with the best distortion saved per cost.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from .crossbar import CrossbarSpec
from .packing import count_crossbars
from .quant import uniform_crossbars
from .tiling import ModelTiles

if TYPE_CHECKING:  # pragma: no cover
    from .candidates import CandidateTable
    from .cost import CostModel

COST_KINDS = ("energy", "latency", "area")
COST_UNITS = {"energy": "uJ", "latency": "us", "area": "mm^2"}
BUDGET_KINDS = ("avg-bits", "crossbars", "reduction") + COST_KINDS + tuple(f"{k}-reduction" for k in COST_KINDS)
#: the whole-model budget when neither a budget nor a tolerance is given
DEFAULT_BUDGET = "reduction=4"


class BudgetError(ValueError):
    """A budget that no allocation can meet, or that cannot be parsed."""


@dataclasses.dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise BudgetError(f"unknown budget kind {self.kind!r}; use one of {BUDGET_KINDS} (e.g. 'avg-bits=4.5')")
        if not math.isfinite(self.value) or self.value <= 0:
            raise BudgetError(f"budget {self.kind}={self.value} must be a positive number")

    @classmethod
    def parse(cls, text: "Budget | str") -> "Budget":
        """``"avg-bits=4.5"``, ``"crossbars=800"``, ``"reduction=3.5"``, ``"energy=12.5"``, ``"energy-reduction=3"``..."""
        if isinstance(text, Budget):
            return text
        kind, sep, value = str(text).partition("=")
        if not sep:
            raise BudgetError(f"cannot parse budget {text!r}: expected KIND=VALUE with KIND one of {BUDGET_KINDS}")
        try:
            v = float(value)
        except ValueError:
            raise BudgetError(f"cannot parse budget {text!r}: {value!r} is not a number") from None
        return cls(kind.strip(), v)

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    @property
    def cost_kind(self) -> str | None:
        """``energy``/``latency``/``area`` for hardware-cost budgets, else None."""
        k = self.kind.removesuffix("-reduction")
        return k if k in COST_KINDS else None


def allocate_tolerance(table: "CandidateTable", tolerance: float) -> np.ndarray:
    """Per tile, the smallest bitwidth whose best objective (relative MSE / divergence) is <= tolerance.

    Tiles that meet the tolerance at no candidate get the largest bitwidth.
    Returns indices into ``table.bits``.
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise BudgetError(f"tolerance must be a finite number >= 0, got {tolerance}")
    ok = table.nsr <= tolerance
    first = np.argmax(ok, axis=1)
    return np.where(ok.any(axis=1), first, len(table.bits) - 1).astype(np.int64)


class _Measure:
    """The exact budget measure of an allocation, and a per-tile cost estimate for the Lagrangian."""

    def __init__(self, table: "CandidateTable", tiles: ModelTiles, spec: CrossbarSpec, budget: Budget,
                 cost: "CostModel | None" = None):
        self.tiles, self.spec, self.bits = tiles, spec, np.array(table.bits, dtype=np.int64)
        n = tiles.n_weights.astype(np.float64)
        self.slices_of = np.array([spec.slices(b) for b in table.bits], dtype=np.int64)
        self.cost_model = cost
        if budget.cost_kind is not None:
            self._init_cost(budget, cost)
        elif budget.kind == "avg-bits":
            self.kind = "avg-bits"
            self.limit = budget.value
            self.cost = (n / n.sum())[:, None] * self.bits[None, :]
        else:
            self.kind = "crossbars"
            if budget.kind == "reduction":
                self.limit = math.floor(uniform_crossbars(tiles, spec, 16) / budget.value)
            else:
                self.limit = budget.value
            share = np.maximum(tiles.nrows / spec.rows, tiles.ncols / spec.cols)
            self.cost = share[:, None] * (self.slices_of * spec.polarities)[None, :]

    def _init_cost(self, budget: Budget, cost: "CostModel | None") -> None:
        if cost is None:
            raise BudgetError(f"budget {budget} needs the hardware cost model (layer shapes and cost numbers): "
                              "use it through the compile pipeline or pass cost=CostModel(...)")
        t, spec, kind = self.tiles, self.spec, budget.cost_kind
        self.kind = kind
        if kind == "energy":
            self.cost = np.stack([cost.tile_energy_pj(t.nrows, t.ncols, np.full(t.n_tiles, sl), t.layer) * 1e-6
                                  for sl in self.slices_of], axis=1)
            self.fixed = cost.measure("energy", self._mapping(np.zeros(t.n_tiles, np.int64), pack_it=False)) - \
                float(self.cost[:, 0].sum())
        elif kind == "area":
            share = np.maximum(t.nrows / spec.rows, t.ncols / spec.cols)
            self.cost = share[:, None] * (self.slices_of * spec.polarities)[None, :] * cost.crossbar_area_um2() * 1e-6
        else:
            # conversions of the tile over the ADCs of its share of crossbars: a direction for the Lagrangian
            # (the exact measure below decides)
            conv = (t.ncols * cost.n_vec[t.layer] * cost.cycles * cost.t_conv * 1e-3)[:, None]
            self.cost = conv * (self.slices_of * spec.polarities)[None, :] / max(
                1.0, spec.cols * cost.params.adcs_per_unit / cost.params.crossbars_per_unit)
        if budget.kind.endswith("-reduction"):
            u16 = np.full(t.n_tiles, spec.slices(16))
            self.limit = cost.measure(kind, self._mapping_slices(u16)) / budget.value
        else:
            self.limit = budget.value

    def _mapping_slices(self, slices: np.ndarray, pack_it: bool = True):
        from .cost import TileMapping
        from .packing import pack

        t, s = self.tiles, self.spec
        if not pack_it:
            return TileMapping(t.layer, t.nrows, t.ncols, slices, np.arange(t.n_tiles), 0)
        pl = pack(t.nrows, t.ncols, slices, s.rows, s.cols, s.polarities)
        return TileMapping(t.layer, t.nrows, t.ncols, slices, pl.set_of_tile, pl.n_crossbars)

    def _mapping(self, choice: np.ndarray, pack_it: bool = True):
        return self._mapping_slices(self.slices_of[choice], pack_it)

    def __call__(self, choice: np.ndarray) -> float:
        if self.kind == "avg-bits":
            return float(self.cost[np.arange(len(choice)), choice].sum())
        if self.kind == "energy":       # additive per tile: exact without packing
            return float(self.cost[np.arange(len(choice)), choice].sum()) + self.fixed
        if self.kind in ("latency", "area"):
            return self.cost_model.measure(self.kind, self._mapping(choice))
        t = self.tiles
        return float(count_crossbars(t.nrows, t.ncols, self.slices_of[choice], self.spec.rows,
                                     self.spec.cols, self.spec.polarities))

    def describe(self, value: float) -> str:
        if self.kind == "avg-bits":
            return f"avg bits {value:.4f}"
        if self.kind in COST_UNITS:
            return f"{self.kind} {value:.6g} {COST_UNITS[self.kind]}"
        return f"{int(value)} crossbars"


def _choose(dist: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    return np.argmin(dist + lam * cost, axis=1)


def allocate_budget(table: "CandidateTable", tiles: ModelTiles, spec: CrossbarSpec,
                    budget: Budget, cost: "CostModel | None" = None) -> tuple[np.ndarray, str]:
    """Whole-model allocation under ``budget``; returns (bitwidth indices [T], a note saying what was met).

    ``cost`` (a :class:`~psq_tvm.core.cost.CostModel`) is needed for energy/latency/area budgets."""
    budget = Budget.parse(budget)
    measure = _Measure(table, tiles, spec, budget, cost)
    dist, cost = table.distortion, measure.cost
    # cheapest possible allocation (ties by lower distortion)
    cheapest = np.lexsort((dist, cost), axis=1)[:, 0]
    floor_value = measure(cheapest)
    if floor_value > measure.limit + 1e-9:
        raise BudgetError(
            f"budget {budget} cannot be met: even the smallest bitwidth ({int(measure.bits.min())}) on every "
            f"tile needs {measure.describe(floor_value)} (limit {measure.describe(measure.limit)}); "
            "raise the budget or allow smaller bitwidths")
    best = _choose(dist, cost, 0.0)
    if measure(best) <= measure.limit + 1e-9:
        return best, f"budget {budget} not binding: best distortion fits ({measure.describe(measure(best))})"
    # bracket lambda: lo infeasible, hi feasible
    lo, hi = 0.0, 1.0
    for _ in range(200):
        if measure(_choose(dist, cost, hi)) <= measure.limit + 1e-9:
            break
        lo, hi = hi, hi * 4
    else:
        hi = math.inf
    if math.isinf(hi):
        choice_hi = cheapest
    else:
        for _ in range(60):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1024
            if measure(_choose(dist, cost, mid)) <= measure.limit + 1e-9:
                hi = mid
            else:
                lo = mid
            if lo > 0 and hi / lo < 1 + 1e-9:
                break
        choice_hi = _choose(dist, cost, hi)
    choice_lo = _choose(dist, cost, lo)
    choice = _greedy_fill(choice_hi, choice_lo, dist, cost, measure)
    return choice, f"budget {budget} met: {measure.describe(measure(choice))} (limit {measure.describe(measure.limit)})"


def _greedy_fill(choice: np.ndarray, richer: np.ndarray, dist: np.ndarray, cost: np.ndarray,
                 measure: _Measure, max_checks: int = 256) -> np.ndarray:
    """Move tiles towards the richer allocation while the budget still holds, best gain per cost first."""
    choice = choice.copy()
    diff = np.flatnonzero(choice != richer)
    if not len(diff):
        return choice
    t = diff
    gain = dist[t, choice[t]] - dist[t, richer[t]]
    extra = cost[t, richer[t]] - cost[t, choice[t]]
    order = t[np.lexsort((t, -(gain / np.maximum(extra, 1e-300))))]
    for k, tile in enumerate(order):
        if k >= max_checks:
            break
        old = choice[tile]
        choice[tile] = richer[tile]
        if measure(choice) > measure.limit + 1e-9:
            choice[tile] = old
    return choice
