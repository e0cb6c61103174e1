"""Device non-idealities of the crossbar cells (off by default, deterministic for a given seed).

Per cell: stuck-at-min (level 0) with rate ``stuck_at_min``, else stuck-at-max (level ``2**c - 1``)
with rate ``stuck_at_max``, then programmed-conductance variation ``g = level * (1 + sigma * z)``,
``z ~ N(0, 1)``, clipped at 0.  The random numbers of physical crossbar ``i`` come from
``default_rng([seed, i])`` drawn over the whole ``R x C`` array, so a cell's fault does not depend on
which layer or tile reads it.  (``adc_offset`` is the ADC's, see :mod:`.adc`.)  The digital
correction constants use the intended (programmed) levels.
"""

from __future__ import annotations

import numpy as np

from .options import SimOptions
from .strips import Strip, gather


def device_key(opts: SimOptions) -> tuple:
    """The options that determine the perturbed conductances (a cache key)."""
    return (opts.conductance_sigma, opts.stuck_at_min, opts.stuck_at_max, int(opts.seed))


def perturbed_conductances(cells: np.ndarray, strips: list[Strip], cell_bits: int,
                           opts: SimOptions) -> list[np.ndarray]:
    """Per strip, the conductances with stuck-at faults and variation (float64, bit-serial column order)."""
    gmax = float((1 << cell_bits) - 1)
    memo: dict[int, np.ndarray] = {}

    def device(xb: int) -> np.ndarray:
        if xb not in memo:
            rng = np.random.default_rng([int(opts.seed), xb])
            g = cells[xb].astype(np.float64)
            u = rng.random(g.shape)
            z = rng.standard_normal(g.shape)
            g[u < opts.stuck_at_min] = 0.0
            g[(u >= opts.stuck_at_min) & (u < opts.stuck_at_min + opts.stuck_at_max)] = gmax
            if opts.conductance_sigma > 0:
                g = np.maximum(g * (1.0 + opts.conductance_sigma * z), 0.0)
            memo[xb] = g
        return memo[xb]

    return [gather(st, device) for st in strips]
