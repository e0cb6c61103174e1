"""ADC full scale chosen from the bitline sums that occur (data-free ADC range calibration).

A crossbar read gives, per bitline, the integer sum ``v = sum_r x_j[r] g[r, col]`` of one input bit plane
``x_j`` (``dac_bits`` wide) and the cell levels ``g``; an ``n``-bit ADC with full scale ``FS`` returns
``code = clip(rint(v / delta), 0, 2**n - 1)``, ``delta = FS / (2**n - 1)``, worth ``delta * code``.
The worst-case full scale ``rows (2**dac - 1)(2**cell - 1)`` never clips, but the sums that actually occur
are a small fraction of it, so a 6-bit ADC then resolves almost nothing.  :func:`calibrated_full_scale`
chooses, from a histogram of the sums that occur on the calibration inputs (weighted by how much each read
counts after the shift-and-add), either the largest sum seen (rule ``max``, the default: no clipping on the
calibration inputs) or the full scale minimising the expected squared read error, clipping plus rounding
(rule ``mse``).  Measured (docs/results/adc.md): ``mse`` fitted to synthetic inputs clips real Fashion-MNIST
sums (64 % top-1 against 92.6 % lossless at 6 bits); ``max`` keeps it within 0.4 pt.
"""

from __future__ import annotations

import numpy as np

from .crossbar import ADC_RANGES  # noqa: F401  (the choices, defined with the spec field)

#: full scales tried between the smallest useful one (delta = 1) and the largest sum seen (rule ``mse``)
CANDIDATES = 96
#: how the full scale is chosen from the sums seen: ``max`` (the largest) or ``mse`` (least read error)
RULES = ("max", "mse")
DEFAULT_RULE = "max"


def read_error(hist: np.ndarray, full_scale: float, adc_bits: int) -> float:
    """Weighted squared error ``sum_v hist[v] (delta code(v) - v)**2`` of an ``adc_bits`` ADC with
    ``full_scale`` over integer sums ``v = 0 .. len(hist)-1`` occurring with weights ``hist``."""
    top = (1 << adc_bits) - 1
    delta = float(full_scale) / top
    v = np.arange(len(hist), dtype=np.float64)
    read = delta * np.clip(np.rint(v / delta), 0, top)
    return float(np.dot(np.asarray(hist, np.float64), (read - v) ** 2))


def calibrated_full_scale(hist: np.ndarray, adc_bits: int, peak: int, rule: str = DEFAULT_RULE) -> float:
    """The full scale (bitline-sum units) for the sums in ``hist``: rule ``max``, the largest sum seen; rule
    ``mse``, the one minimising :func:`read_error` over ``hist``.

    ``hist[v]``: weight of integer bitline sum ``v``; ``peak``: the worst-case sum (upper bound).  Never
    below ``2**n - 1`` (a step under one sum unit gains nothing on integer sums: ``delta = 1`` reads every
    sum up to ``2**n - 1`` exactly) nor above ``peak``.  Candidates: a geometric grid of :data:`CANDIDATES`
    values from ``2**n - 1`` to the largest sum seen; ties go to the larger full scale (less clipping on
    inputs unlike the calibration's).  An empty histogram gives ``peak``.
    """
    if rule not in RULES:
        raise ValueError(f"ADC range rule must be one of {RULES}, got {rule!r}")
    top = (1 << adc_bits) - 1
    hist = np.asarray(hist, np.float64)
    nz = np.flatnonzero(hist)
    if nz.size == 0:
        return float(max(peak, top))
    vmax = int(nz[-1])
    lo = float(top)
    hi = float(min(max(vmax, top), max(peak, top)))
    if hi <= lo or rule == "max":
        return max(lo, hi)
    grid = np.unique(np.concatenate([np.geomspace(lo, hi, CANDIDATES), [hi]]))
    h = hist[:vmax + 1]
    errs = np.array([read_error(h, fs, adc_bits) for fs in grid])
    best = np.flatnonzero(errs <= errs.min() * (1 + 1e-12))[-1]
    return float(grid[best])
