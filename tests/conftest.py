import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _fresh_search_caches_under_mutmut():
    """mutmut (make mutation) runs its mutants in forks of one warm process: empty the search's memo
    caches (functools.lru_cache) before each test there, so a mutant of a function only reached
    through a cache is really executed.  Nothing changes in a normal test run."""
    if os.environ.get("MUTANT_UNDER_TEST"):
        from psq_tvm.core import candidates
        for obj in vars(candidates).values():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()
    yield
