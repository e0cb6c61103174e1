"""Whole-model bitwidth allocation against brute force on instances small enough to enumerate."""
import itertools

import numpy as np
import pytest

from psq_tvm import Layer, ModelTiles, preset, psq_search
from psq_tvm.core.allocation import Budget, BudgetError, allocate_budget, allocate_tolerance
from psq_tvm.core.candidates import CandidateTable


def _table(dist: np.ndarray, bits=(2, 4, 8)) -> CandidateTable:
    """A candidate table with the given distortion [T, B] (the allocation reads nothing else)."""
    T, B = dist.shape
    z = np.zeros((T, B))
    return CandidateTable(tuple(bits), z, np.asarray(dist, dtype=np.float64), z, np.ones((T, B)), np.ones(T))


def _full_tiles(n: int) -> ModelTiles:
    """``n`` layers of one full 128x128 tile each (equal weight counts, one crossbar set each)."""
    return ModelTiles([Layer(f"l{i}", np.ones((128, 128), np.float32)) for i in range(n)], 128, 128)


def _brute_force(dist, feasible):
    """The feasible allocation of least total distortion, by enumerating every one."""
    best, best_d = None, np.inf
    for choice in itertools.product(range(dist.shape[1]), repeat=dist.shape[0]):
        d = sum(dist[t, c] for t, c in enumerate(choice))
        if feasible(choice) and d < best_d - 1e-12:
            best, best_d = choice, d
    return best, best_d


# three identical tiles: the Lagrangian moves them all at the same lambda, so on its own it can only
# give all-2 (under the budget) or all-4 (over it); the optimum upgrades two of them
IDENTICAL = np.array([[10.0, 1.0, 0.0]] * 3)


@pytest.mark.parametrize("budget, feasible", [
    # avg-bits over equal-size tiles: the mean bitwidth
    ("avg-bits=3.34", lambda c: np.mean([(2, 4, 8)[k] for k in c]) <= 3.34),
    # isaac (2-bit cells, offset): 2, 4 and 8 bits take 1, 2 and 4 crossbars; full tiles share nothing
    ("crossbars=5", lambda c: sum((1, 2, 4)[k] for k in c) <= 5),
])
def test_budget_spent_like_brute_force(budget, feasible):
    choice, note = allocate_budget(_table(IDENTICAL), _full_tiles(3), preset("isaac"), Budget.parse(budget))
    want, want_d = _brute_force(IDENTICAL, feasible)
    assert feasible(tuple(choice)), (choice, note)
    assert IDENTICAL[np.arange(3), choice].sum() == pytest.approx(want_d)   # 12: two tiles at 4 bits, one at 2
    assert sorted(choice.tolist()) == sorted(want)


def test_random_instances_match_brute_force_when_convex(rng):
    """Convex, decreasing distortion curves (each extra bit saves less): the allocation is optimal."""
    bits = (2, 3, 4, 5, 6)
    for trial in range(6):
        T = 4
        saves = np.sort(rng.uniform(0.1, 10, size=(T, len(bits) - 1)), axis=1)[:, ::-1]   # decreasing savings
        dist = np.concatenate([np.full((T, 1), 50.0), 50.0 - np.cumsum(saves, axis=1)], axis=1)
        limit = rng.uniform(2.5, 5.5)
        choice, _ = allocate_budget(_table(dist, bits), _full_tiles(T), preset("isaac", weight_bits=bits),
                                    Budget("avg-bits", limit))
        feasible = lambda c, limit=limit: np.mean([bits[k] for k in c]) <= limit + 1e-9
        _, want_d = _brute_force(dist, feasible)
        assert feasible(tuple(choice))
        assert dist[np.arange(T), choice].sum() == pytest.approx(want_d, rel=1e-9), (trial, limit)


def test_importance_moves_bits_to_the_important_tile(rng):
    """Two identical layers: without importance they get the same bits; weighting one of them 1000x
    gives it more bits and the other fewer, under the same budget."""
    w = (rng.standard_t(3, size=(128, 128)) * 0.05).astype(np.float32)
    layers = [Layer("a", w), Layer("b", w.copy())]
    spec = preset()
    plain = psq_search(layers, spec, budget="avg-bits=4")
    assert plain.bits[0] == plain.bits[1]
    for hot in (0, 1):
        imp = np.ones(2)
        imp[hot] = 1000.0
        r = psq_search(layers, spec, budget="avg-bits=4", tile_importance=imp)
        assert r.bits[hot] > r.bits[1 - hot], (hot, r.bits)
        assert r.avg_bits <= 4 + 1e-9
        # the table the allocation reads is the plain distortion scaled tile by tile
        np.testing.assert_allclose(r.candidates.distortion, plain.candidates.distortion * imp[:, None], rtol=1e-12)


def test_budget_exactly_at_the_floor_or_at_the_best_is_met():
    spec, tiles = preset("isaac"), _full_tiles(3)
    # every tile at 2 bits is exactly avg-bits=2: allowed
    choice, note = allocate_budget(_table(IDENTICAL), tiles, spec, Budget("avg-bits", 2.0))
    assert choice.tolist() == [0, 0, 0] and note == "budget avg-bits=2 met: avg bits 2.0000 (limit avg bits 2.0000)"
    # the distortion-free allocation (8 bits everywhere) costs exactly avg-bits=8: the budget does not bind
    choice, note = allocate_budget(_table(IDENTICAL), tiles, spec, Budget("avg-bits", 8.0))
    assert choice.tolist() == [2, 2, 2]
    assert note == "budget avg-bits=8 not binding: best distortion fits (avg bits 8.0000)"
    choice, note = allocate_budget(_table(IDENTICAL), tiles, spec, Budget("crossbars", 12))   # 3 tiles x 4 slices
    assert choice.tolist() == [2, 2, 2] and note == "budget crossbars=12 not binding: best distortion fits (12 crossbars)"


def test_notes_and_refusals_say_what_was_measured():
    spec, tiles = preset("isaac"), _full_tiles(3)
    _, note = allocate_budget(_table(IDENTICAL), tiles, spec, Budget.parse("avg-bits=3.34"))
    assert note == "budget avg-bits=3.34 met: avg bits 3.3333 (limit avg bits 3.3400)"
    _, note = allocate_budget(_table(IDENTICAL), tiles, spec, Budget.parse("crossbars=5"))
    assert note == "budget crossbars=5 met: 5 crossbars (limit 5 crossbars)"
    with pytest.raises(BudgetError, match=r"^budget crossbars=2 cannot be met: even the smallest bitwidth \(2\) on "
                       r"every tile needs 3 crossbars \(limit 2 crossbars\); raise the budget or allow smaller "
                       r"bitwidths$"):
        allocate_budget(_table(IDENTICAL), tiles, spec, Budget.parse("crossbars=2"))


@pytest.mark.parametrize("text, needle", [
    ("avg-bits=0", "budget avg-bits=0.0 must be a positive number"),
    ("avg-bits=-1", "budget avg-bits=-1.0 must be a positive number"),
    ("crossbars=inf", "budget crossbars=inf must be a positive number"),
    ("reduction=nan", "budget reduction=nan must be a positive number"),
    ("avg-bits=4=5", r"cannot parse budget 'avg-bits=4=5': '4=5' is not a number"),
    ("avg-bits", r"cannot parse budget 'avg-bits': expected KIND=VALUE"),
])
def test_bad_budgets_refused(text, needle):
    with pytest.raises(BudgetError, match=needle):
        Budget.parse(text)


def test_tolerance_edges():
    """Per tile the first bitwidth whose nsr <= tolerance (equality counts); none: the largest."""
    nsr = np.array([[0.5, 0.1, 0.0],       # meets 0.1 at 4 bits (exactly), 0 at 8
                    [0.5, 0.2, 0.01],      # meets 0.1 only at 8
                    [0.5, 0.3, 0.2]])      # never meets 0.1: the largest bitwidth
    t = _table(np.zeros((3, 3)))
    t.nsr = nsr
    assert allocate_tolerance(t, 0.1).tolist() == [1, 2, 2]
    assert allocate_tolerance(t, 0.0).tolist() == [2, 2, 2]       # a tolerance of 0 is allowed
    assert allocate_tolerance(t, 0.5).tolist() == [0, 0, 0]
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(BudgetError, match="tolerance must be a finite number >= 0"):
            allocate_tolerance(t, bad)


def test_greedy_fill_is_bounded_and_still_fills():
    """300 identical tiles, budget avg-bits=3: exactly 150 of them can go from 2 to 4 bits.  The Lagrangian
    alone gives all-2; the greedy fill checks at most 256 upgrades and keeps the 150 that fit."""
    choice, _ = allocate_budget(_table(np.array([[10.0, 1.0, 0.0]] * 300)), _full_tiles(300), preset("isaac"),
                                Budget("avg-bits", 3.0))
    assert np.bincount(choice, minlength=3).tolist() == [150, 150, 0]


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e4])
def test_allocation_does_not_depend_on_the_distortion_scale(scale):
    """Scaling every distortion by the same factor changes no optimum (brute force: two tiles at 4 bits).
    Small distortions make lambda = 1 feasible at once, so the bisection starts from lo = 0."""
    choice, _ = allocate_budget(_table(IDENTICAL * scale), _full_tiles(3), preset("isaac"), Budget("avg-bits", 3.34))
    assert sorted(choice.tolist()) == [0, 1, 1]
