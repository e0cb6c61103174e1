"""How the simulator runs: :class:`SimOptions` (every device non-ideality off by default) and
:class:`SimError`, the one error it raises for bad input or a malformed layer program."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np


class SimError(ValueError):
    """Bad input or a malformed layer program; the message names the layer."""


@dataclasses.dataclass(frozen=True)
class SimOptions:
    """How the simulator runs (all device non-idealities off by default)."""

    act_bits: int | None = None
    """Activation bits; None = ``spec.act_bits``."""

    adc_full_scale: float | None = None
    """One ADC full scale for every read, in bitline-sum units (one DAC step x one cell level); None = each
    tile's stored ``adc_full_scale`` (calibrated at compile time) where it has one, else the tile's lossless
    peak ``nrows (2**dac-1)(2**cell-1)``.  Setting it always applies the ADC quantiser (never the
    identity); ignored when ``spec.adc_bits`` is None."""

    force_bitserial: bool = False
    """Use the per-cycle path even when the ADC is lossless."""

    conductance_sigma: float = 0.0
    """Relative sigma of the programmed conductance, per cell."""

    stuck_at_min: float = 0.0
    """Per-cell rate of stuck-at-min faults (level 0)."""

    stuck_at_max: float = 0.0
    """Per-cell rate of stuck-at-max faults (level ``2**cell_bits - 1``)."""

    adc_offset: float = 0.0
    """ADC offset in LSBs, added before rounding."""

    seed: int = 0
    """Seed of the device faults / variation."""

    chunk_elements: int = 1 << 20
    """Memory bound (elements) of one bit-serial work block."""

    def __post_init__(self) -> None:
        a = self.act_bits
        if a is not None and (not isinstance(a, (int, np.integer)) or isinstance(a, bool) or not 1 <= a <= 16):
            raise ValueError(f"SimOptions.act_bits must be 1..16 or None, got {self.act_bits!r}")
        if self.adc_full_scale is not None and not (math.isfinite(self.adc_full_scale) and self.adc_full_scale > 0):
            raise ValueError("SimOptions.adc_full_scale must be a positive number or None, "
                             f"got {self.adc_full_scale!r}")
        if not (math.isfinite(self.conductance_sigma) and self.conductance_sigma >= 0):
            raise ValueError(f"SimOptions.conductance_sigma must be >= 0, got {self.conductance_sigma!r}")
        for f in ("stuck_at_min", "stuck_at_max"):
            v = getattr(self, f)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"SimOptions.{f} must be a rate in [0, 1], got {v!r}")
        if self.stuck_at_min + self.stuck_at_max > 1.0:
            raise ValueError("SimOptions.stuck_at_min + stuck_at_max must not exceed 1")
        if not math.isfinite(self.adc_offset):
            raise ValueError(f"SimOptions.adc_offset must be finite, got {self.adc_offset!r}")
        if self.chunk_elements < 1:
            raise ValueError("SimOptions.chunk_elements must be positive")

    @property
    def cells_perturbed(self) -> bool:
        """True when the stored conductances differ from the programmed levels."""
        return self.conductance_sigma > 0 or self.stuck_at_min > 0 or self.stuck_at_max > 0

    @property
    def ideal(self) -> bool:
        """True when no device non-ideality is enabled."""
        return not self.cells_perturbed and self.adc_offset == 0

    def replace(self, **kw: Any) -> "SimOptions":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SimOptions":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown simulator option(s) {sorted(unknown)}; known: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**d)


def _options(options: SimOptions | Mapping[str, Any] | None) -> SimOptions:
    """``options`` as a :class:`SimOptions` (it may be one, a dict of its fields, or None)."""
    if options is None:
        return SimOptions()
    if isinstance(options, SimOptions):
        return options
    if isinstance(options, Mapping):
        return SimOptions.from_dict(options)
    raise TypeError(f"simulator options must be SimOptions, a dict or None, got {type(options).__name__}")
