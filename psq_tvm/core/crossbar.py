"""Crossbar hardware model: the numbers every other module counts in.

A :class:`CrossbarSpec` describes one physical crossbar array and its
periphery (DAC, ADC, cell precision, how signed weights are encoded).  The
unrolled weight matrix of a layer has inputs on the rows (wordlines) and
outputs on the columns (bitlines); a tile of ``rows x cols`` weights with
bitwidth ``b`` occupies ``crossbars_per_tile(b)`` physical crossbars.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

ENCODINGS = ("offset", "differential")
#: how an ADC's full scale is set: the worst-case bitline sum, or calibrated at compile time from the sums that
#: occur on data-free inputs (psq_tvm.core.adc_range); only matters when the ADC is not lossless
ADC_RANGES = ("worst", "calibrated")
MIN_BITS = 2
MAX_BITS = 16


class SpecError(ValueError):
    """An impossible or unsupported crossbar specification."""


@dataclasses.dataclass(frozen=True)
class CrossbarSpec:
    """One crossbar array and its periphery.

    rows, cols   -- wordlines (inputs) x bitlines (outputs) of one array
    cell_bits    -- bits stored per cell (levels 0 .. 2**cell_bits - 1)
    encoding     -- "offset": weights stored as unsigned ``q + 2**(b-1)``, the
                    offset removed digitally (ISAAC); "differential": a + and
                    a - array per slice, ``q = q+ - q-``
    dac_bits     -- input bits applied per cycle (bit-serial inputs)
    act_bits     -- activation precision (inputs quantised to this many bits)
    adc_bits     -- ADC resolution; ``None`` means lossless
    weight_bits  -- candidate weight bitwidths the search may choose from
    baseline_bits -- the uniform bitwidth of the design's own baseline
    adc_range    -- how each ADC's full scale is set when the ADC is lossy: "calibrated" (default: per
                    crossbar, from the bitline sums that occur on data-free inputs, stored in the package)
                    or "worst" (the worst-case sum ``rows (2**dac-1)(2**cell-1)``, never clips)
    """

    rows: int = 128
    cols: int = 128
    cell_bits: int = 2
    encoding: str = "offset"
    dac_bits: int = 1
    act_bits: int = 8
    adc_bits: int | None = 9
    weight_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    baseline_bits: int = 16
    name: str = "custom"
    adc_range: str = "calibrated"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_bits", tuple(sorted(set(int(b) for b in self.weight_bits))))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`SpecError` naming the field when the spec is impossible."""
        for field in ("rows", "cols", "cell_bits", "dac_bits", "act_bits", "baseline_bits"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"crossbar spec {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.rows > 65536 or self.cols > 65536:
            raise SpecError(f"crossbar spec {self.name!r}: rows/cols above 65536 are not supported, got {self.rows}x{self.cols}")
        if self.cell_bits > 8:
            raise SpecError(f"crossbar spec {self.name!r}: cell_bits must be 1..8, got {self.cell_bits}")
        if self.encoding not in ENCODINGS:
            raise SpecError(f"crossbar spec {self.name!r}: encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.dac_bits > self.act_bits:
            raise SpecError(f"crossbar spec {self.name!r}: dac_bits ({self.dac_bits}) cannot exceed act_bits ({self.act_bits})")
        if self.act_bits > 16:
            raise SpecError(f"crossbar spec {self.name!r}: act_bits must be 1..16, got {self.act_bits}")
        if self.adc_bits is not None and (not isinstance(self.adc_bits, int) or not 1 <= self.adc_bits <= 32):
            raise SpecError(f"crossbar spec {self.name!r}: adc_bits must be 1..32 or None (lossless), got {self.adc_bits!r}")
        if self.adc_range not in ADC_RANGES:
            raise SpecError(f"crossbar spec {self.name!r}: adc_range must be one of {ADC_RANGES}, got {self.adc_range!r}")
        if not self.weight_bits:
            raise SpecError(f"crossbar spec {self.name!r}: weight_bits must name at least one bitwidth")
        for b in self.weight_bits + (self.baseline_bits,):
            if not MIN_BITS <= b <= MAX_BITS:
                raise SpecError(
                    f"crossbar spec {self.name!r}: weight bitwidth {b} is outside {MIN_BITS}..{MAX_BITS} "
                    "(1-bit symmetric levels hold only 0; use 2..16)")

    # ---------------------------------------------------------------- counting
    @property
    def polarities(self) -> int:
        """Arrays per slice: 2 for differential (+/-), 1 for offset."""
        return 2 if self.encoding == "differential" else 1

    def magnitude_bits(self, bits: int) -> int:
        """Bits each polarity must store for a signed ``bits``-bit weight."""
        return bits - 1 if self.encoding == "differential" else bits

    def slices(self, bits: int) -> int:
        """Crossbars per polarity needed for one tile of bitwidth ``bits``."""
        return math.ceil(self.magnitude_bits(bits) / self.cell_bits)

    def crossbars_per_tile(self, bits: int) -> int:
        """Physical crossbars one full tile of bitwidth ``bits`` occupies."""
        return self.slices(bits) * self.polarities

    def adc_lossless(self, rows: int | None = None) -> bool:
        """True when the ADC resolves every possible bitline sum exactly."""
        if self.adc_bits is None:
            return True
        r = self.rows if rows is None else rows
        peak = r * (2 ** self.dac_bits - 1) * (2 ** self.cell_bits - 1)
        return 2 ** self.adc_bits - 1 >= peak

    # ------------------------------------------------------------ conversions
    def replace(self, **overrides: Any) -> "CrossbarSpec":
        """A copy with some fields changed (validated)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SpecError(f"unknown crossbar option(s) {sorted(unknown)}; known: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weight_bits"] = list(self.weight_bits)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CrossbarSpec":
        d = dict(d)
        if "weight_bits" in d:
            d["weight_bits"] = tuple(d["weight_bits"])
        return cls(**d)


PRESETS: dict[str, CrossbarSpec] = {
    # values from the designs' published configurations (DESIGN.md section 4)
    "isaac": CrossbarSpec(128, 128, 2, "offset", 1, 8, 9, (2, 3, 4, 5, 6, 7, 8), 16, "isaac"),
    "puma": CrossbarSpec(128, 128, 2, "offset", 1, 8, 8, (2, 3, 4, 5, 6, 7, 8), 16, "puma"),
    "prime": CrossbarSpec(256, 256, 4, "differential", 3, 6, 6, (2, 3, 4, 5, 6, 7, 8), 8, "prime"),
    "neurosim": CrossbarSpec(128, 128, 1, "offset", 1, 8, 5, (2, 3, 4, 5, 6, 7, 8), 8, "neurosim"),
    "mnsim": CrossbarSpec(256, 256, 1, "differential", 1, 8, 6, (2, 3, 4, 5, 6, 7, 8), 8, "mnsim"),
}
DEFAULT_PRESET = "isaac"


def preset(name: str = DEFAULT_PRESET, **overrides: Any) -> CrossbarSpec:
    """A named preset, optionally with fields overridden."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise SpecError(f"unknown crossbar preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base


def parse_bits(text: str) -> tuple[int, ...]:
    """Parse ``"2-8"`` or ``"2,3,4,8"`` into a tuple of bitwidths."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise SpecError(f"cannot parse bitwidths {text!r}: expected e.g. '2-8' or '2,4,8'") from None
    if not out:
        raise SpecError(f"cannot parse bitwidths {text!r}: no bitwidth given")
    for b in out:
        if not MIN_BITS <= b <= MAX_BITS:
            raise SpecError(f"bitwidth {b} in {text!r} is outside {MIN_BITS}..{MAX_BITS}")
    return tuple(sorted(set(out)))
