"""Activation quantisation (the DAC side): data-free, one scale per call and tensor; signed input is
fed to the wordlines with an offset that the digital side corrects."""

from __future__ import annotations

import numpy as np

from .options import SimError


def quantize_activations(x: np.ndarray, act_bits: int) -> tuple[np.ndarray, float, int]:
    """Data-free activation quantisation of one tensor.

    Returns ``(q, s_x, o_x)``: integer levels ``q`` (float32, exact), the scale
    (``x ~ s_x * q``) and the wordline offset (0 for unsigned input,
    ``2**(a-1)`` for signed input, where the crossbars see ``q + o_x``).
    """
    x64 = np.asarray(x, dtype=np.float64)
    if x64.size == 0:
        return np.zeros(x64.shape, np.float32), 1.0, 0
    lo, hi = float(x64.min()), float(x64.max())
    if lo >= 0:
        top, bottom, offset = (1 << act_bits) - 1, 0, 0
        peak = hi
    else:
        if act_bits < 2:
            raise SimError(f"signed input needs act_bits >= 2, got {act_bits}")
        top = (1 << (act_bits - 1)) - 1
        bottom, offset = -top, 1 << (act_bits - 1)
        peak = max(hi, -lo)
    scale = peak / top if peak > 0 else 1.0
    t = np.divide(x64, scale)                # in place from here on: large temporaries are costly
    np.rint(t, out=t)
    np.clip(t, bottom, top, out=t)
    return t.astype(np.float32), float(scale), offset
