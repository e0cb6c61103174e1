"""The ADC that reads one bitline sum ``v = x_j . g`` of a row strip.

With ``n = spec.adc_bits``, ``d = spec.dac_bits``, ``c = spec.cell_bits`` and the lossless peak
``peak = nrows (2**d-1)(2**c-1)``, the ADC is *lossless* (``code = v``) when ``n`` is None or
``2**n - 1 >= peak`` and no full scale is forced (and ``adc_offset`` is 0); otherwise
``delta = FS / (2**n - 1)`` and ``code = clip(rint(v / delta + adc_offset), 0, 2**n - 1)``; the read is
worth ``delta * code``.  ``FS`` is, in this order: ``options.adc_full_scale`` (one value forced for every
read), the tile's calibrated ``adc_full_scale`` (one value per crossbar the tile occupies, chosen at
compile time from the sums that occur, :mod:`psq_tvm.core.adc_range`), or ``peak`` (worst case).
Lossless-ness is decided per row strip, so a short ragged strip can be lossless while full ones are not.
"""

from __future__ import annotations

import numpy as np

from ...core.crossbar import CrossbarSpec
from .options import SimOptions


def adc(spec: CrossbarSpec, nrows: int, opts: SimOptions, full_scale: np.ndarray | None = None
        ) -> tuple[bool, float | np.ndarray, int | None]:
    """(identity, delta, top) of the ADC reading a strip of ``nrows`` rows: whether it is lossless, its
    step in bitline-sum units and its largest code (None: no ADC, ``spec.adc_bits`` is None).

    ``full_scale``: the strip's calibrated full scales, one per bit-serial column (NaN: none stored for
    that column, the worst case applies); ``delta`` is then an array over those columns."""
    n = spec.adc_bits
    if n is None:
        return opts.adc_offset == 0, 1.0, None
    top = (1 << n) - 1
    peak = nrows * ((1 << spec.dac_bits) - 1) * ((1 << spec.cell_bits) - 1)
    if opts.adc_full_scale is not None:
        return False, float(opts.adc_full_scale) / top, top
    if full_scale is not None:
        fs = np.where(np.isnan(full_scale), float(peak), full_scale)
        return False, fs / top, top
    if top >= peak:
        return opts.adc_offset == 0, 1.0, top
    return False, peak / top, top


def adc_codes(v: np.ndarray, delta: float, top: int | None, offset: float) -> np.ndarray:
    """ADC codes of bitline sums ``v`` (float64 arithmetic, the reference definition)."""
    code = np.rint(np.asarray(v, dtype=np.float64) / delta + offset)
    if top is not None:
        np.clip(code, 0, top, out=code)
    return code
