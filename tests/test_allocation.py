"""Whole-model bitwidth allocation against brute force on instances small enough to enumerate."""
import itertools

import numpy as np
import pytest

from psq_tvm import Layer, ModelTiles, preset, psq_search
from psq_tvm.core.allocation import Budget, allocate_budget
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
