"""Hardware cost model: energy, latency and area of a crossbar mapping, per layer and per model.

Everything is counted from the crossbar tables (per-tile bitwidth -> slices, tile sizes, the physical
crossbars each tile occupies after packing) and the :class:`~psq_tvm.core.crossbar.CrossbarSpec`, with
component numbers from a :class:`CostParams` (one per preset, every number cited where it is defined).

Per PIM layer, ``n_vec`` input vectors per inference (conv: batch x output pixels; dense: rows of the
input), ``B = ceil(act_bits / dac_bits)`` input bit-cycles per vector.  Per tile ``t`` of ``r x c``
weights with ``s`` slices on ``p`` polarities, per inference:

* crossbar reads: ``n_vec * B * s * p`` reads of ``r`` of the ``R`` rows (energy ``xbar_read_pj * r / R``);
* DAC drives: ``n_vec * B * s * p * r``;
* ADC conversions: ``n_vec * B * s * p * c`` at the spec's ADC resolution (lossless: the bits the
  worst-case bitline sum needs); one shift-and-add per conversion;
* digital: per vector and tile column one multiply (the tile / column scale) and one add (row-tile
  accumulation); per layer output one add (bias);
* activation buffer (eDRAM + bus): ``n_vec * K * act_bits`` bits read, ``n_vec * N * out_bits`` written;
* host layers: ``macs * host_mac_pj`` when their MAC count is known.

Latency (one inference, layers in sequence): per layer ``n_vec * (B * t_cycle + (row_tiles - 1) *
digital_ns)`` with ``t_cycle = max(read_ns, ceil(conversions per cycle / ADCs) * t_conv)``; the layer's
ADCs are ``adcs_per_unit / crossbars_per_unit`` per occupied crossbar (ADC sharing), ``t_conv`` one
sample (``1 / adc_gsps``) or MNSIM's ``(bits + 2) / adc_gsps``.  The ISAAC-style inter-layer pipeline
runs every layer at once: its interval (time between inferences) is the slowest layer; with weight
replication the spare crossbars of the chips the model needs copy the slowest layers (greedy) and the
interval falls.

Area: occupied crossbars grouped into the preset's units (ISAAC: IMAs of 8 arrays with their ADCs, DACs,
S+H, S+A, IR, OR), units into tiles (eDRAM, bus, router share, ...), tiles into chips; the model area is
``units * unit_area + tiles * tile_overhead``; ``chips`` = tiles / tiles per chip, rounded up.

Units: energy pJ, time ns, area um^2 inside; reports give uJ, us and mm^2.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from .crossbar import CrossbarSpec
from .packing import pack


class CostError(ValueError):
    """Cost parameters that cannot be used (unknown field, bad value, unreadable file)."""


def _adc_table(d: Mapping[Any, float]) -> dict[int, float]:
    return {int(k): float(v) for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class CostParams:
    """Component numbers of one design (energies pJ, times ns, areas um^2).  Sources: :data:`COST_SOURCES`."""

    name: str = "isaac"
    # ---------------------------------------------------------------- timing
    read_ns: float = 100.0
    """One crossbar read (one input bit-cycle on every row)."""
    adc_gsps: float = 1.28
    """ADC sample rate, GS/s (conversions per ns)."""
    adc_rule: str = "sample"
    """Conversion time: ``sample`` = 1 / rate; ``mnsim`` = (bits + 2) / rate (MNSIM 2.0's ADC model)."""
    digital_ns: float = 1.0
    """One digital add in the periphery (row-tile accumulation, in sequence; PUMA ``cycle_time`` = 1 ns)."""
    # ---------------------------------------------------------------- energy, pJ
    xbar_read_pj: float = 30.0
    """One read of a whole array (all rows driven), one input bit-cycle."""
    dac_pj: float = 0.41667
    """One DAC drive of one wordline for one cycle."""
    adc_pj: Mapping[int, float] = dataclasses.field(default_factory=dict)
    """Energy per conversion by resolution; resolutions not listed scale by 2x per bit from the nearest."""
    adc_mw: float = 0.0
    """ADC power while converting; used (x conversion time) when ``adc_pj`` is empty."""
    shift_add_pj: float = 0.021
    """One shift-and-add of one ADC sample."""
    mul_pj: float = 0.5653
    """One digital multiply (per-column scale)."""
    add_pj: float = 0.2652
    """One digital add (bias, row-tile accumulation)."""
    buffer_pj_per_bit: float = 20.45 / 256 + 0.054
    """Activation buffer traffic per bit (eDRAM access + bus)."""
    out_bits: int = 16
    """Bits per layer output written to the buffer."""
    host_mac_pj: float = 0.8305
    """One multiply-accumulate of a host (digital) layer."""
    # ---------------------------------------------------------------- area, um^2 and grouping
    xbar_um2: float = 25.0
    """One array."""
    adc_um2: Mapping[int, float] = dataclasses.field(default_factory=dict)
    """One ADC by resolution (same extrapolation as ``adc_pj``)."""
    dac_um2: float = 0.166
    """One DAC (one per row of every array of a unit)."""
    unit_other_um2: float = 3150.0
    """Everything else of one unit (S+H, S+A, input/output registers)."""
    tile_other_um2: float = 214600.0
    """Everything of one tile besides its units (eDRAM, bus, router share, activation, pooling, OR)."""
    chip_other_um2: float = 22.88e6
    """Everything of one chip besides its tiles (off-chip links)."""
    crossbars_per_unit: int = 8
    adcs_per_unit: int = 8
    units_per_tile: int = 12
    tiles_per_chip: int = 168

    def __post_init__(self) -> None:
        object.__setattr__(self, "adc_pj", _adc_table(self.adc_pj))
        object.__setattr__(self, "adc_um2", _adc_table(self.adc_um2))
        if self.adc_rule not in ("sample", "mnsim"):
            raise CostError(f"cost parameters {self.name!r}: adc_rule must be 'sample' or 'mnsim', got {self.adc_rule!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "adc_rule"):
                continue
            vals = v.values() if isinstance(v, Mapping) else [v]
            for x in vals:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    raise CostError(f"cost parameters {self.name!r}: {f.name} must be a finite number >= 0, got {x!r}")
        for f in ("crossbars_per_unit", "adcs_per_unit", "units_per_tile", "tiles_per_chip", "out_bits"):
            if int(getattr(self, f)) != getattr(self, f) or getattr(self, f) < 1:
                raise CostError(f"cost parameters {self.name!r}: {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.read_ns <= 0 or self.adc_gsps <= 0:
            raise CostError(f"cost parameters {self.name!r}: read_ns and adc_gsps must be > 0")
        if not self.adc_pj and self.adc_mw <= 0:
            raise CostError(f"cost parameters {self.name!r}: give adc_pj (per resolution) or adc_mw")

    # ------------------------------------------------------------------ ADC
    def adc_bits(self, spec: CrossbarSpec) -> int:
        """The ADC resolution the cost counts: the spec's, or (lossless) what the worst-case bitline sum needs."""
        if spec.adc_bits is not None:
            return int(spec.adc_bits)
        peak = spec.rows * (2 ** spec.dac_bits - 1) * (2 ** spec.cell_bits - 1)
        return max(1, math.ceil(math.log2(peak + 1)))

    @staticmethod
    def _by_bits(table: Mapping[int, float], bits: int) -> float:
        near = min(table, key=lambda b: (abs(b - bits), b))
        return table[near] * 2.0 ** (bits - near)

    def adc_ns(self, bits: int) -> float:
        """Time of one conversion."""
        return (bits + 2) / self.adc_gsps if self.adc_rule == "mnsim" else 1.0 / self.adc_gsps

    def adc_energy_pj(self, bits: int) -> float:
        """Energy of one conversion at ``bits``."""
        if self.adc_pj:
            return self._by_bits(self.adc_pj, bits)
        return self.adc_mw * self.adc_ns(bits)

    def adc_area_um2(self, bits: int) -> float:
        return self._by_bits(self.adc_um2, bits) if self.adc_um2 else 0.0

    # ------------------------------------------------------------------ area
    def unit_um2(self, spec: CrossbarSpec) -> float:
        """One unit (ISAAC: IMA): its arrays, ADCs, DACs and the rest."""
        return (self.crossbars_per_unit * (self.xbar_um2 + spec.rows * self.dac_um2)
                + self.adcs_per_unit * self.adc_area_um2(self.adc_bits(spec)) + self.unit_other_um2)

    def tile_um2(self, spec: CrossbarSpec) -> float:
        return self.units_per_tile * self.unit_um2(spec) + self.tile_other_um2

    def chip_um2(self, spec: CrossbarSpec) -> float:
        return self.tiles_per_chip * self.tile_um2(spec) + self.chip_other_um2

    @property
    def crossbars_per_chip(self) -> int:
        return self.crossbars_per_unit * self.units_per_tile * self.tiles_per_chip

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adc_pj"] = {str(k): v for k, v in sorted(self.adc_pj.items())}
        d["adc_um2"] = {str(k): v for k, v in sorted(self.adc_um2.items())}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostParams":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CostError(f"unknown cost parameter(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**dict(d))

    def replace(self, overrides: Mapping[str, Any]) -> "CostParams":
        d = self.to_dict()
        unknown = set(overrides) - set(d)
        if unknown:
            raise CostError(f"unknown cost parameter(s) {sorted(unknown)}; known: {sorted(d)}")
        d.update(overrides)
        return CostParams.from_dict(d)


# ISAAC (Shafiee et al., ISCA 2016) Table I, 32 nm, as transcribed in
#   Accelergy-Project/hwcomponents-library hwcomponents_library/library/isaac.py (commit 8b56f7e):
#     IsaacADC: 8-bit 1.2 GS/s, "16*10^-3 W / (1.2*8*10^9)" = 1.666666667 pJ, "9600um^2 / 8" = 1200 um^2;
#       scaled rows 4..10 bits: 0.79, 0.99, 1.20, 1.42, 1.67, 1.969078145, 2.379022742 pJ and
#       361.04, 476.91, 626.91, 845.18, 1200, 1827.911647, 3002.008032 um^2
#     IsaacDAC: 1-bit 0.41667 pJ per drive, 0.166015625 um^2 ("170um^2 / 128 / 8")
#     IsaacShiftAdd: 0.021 pJ, 60 um^2 ("There are 4 of these in an ISAAC IMA")
#     IsaacEDRAM: 20.45 pJ per 256-bit access, 83000 um^2; IsaacEDRAMBus: 0.054 pJ per bit,
#       7500 um^2 per IMA; IsaacRouterSharedByFour: 37500 um^2
#   Aayush-Ankit/puma-simulator include/constants.py (commit a206f75), "Models from ISAAC paper":
#     xbar_pow_dict['2']['128'] = 0.3 mW, xbar_area_dict['2']['128'] = 2.5e-5 mm^2 (ISAAC: 8 arrays 2.4 mW,
#     0.0002 mm^2); snh_area = 0.00004 / 8 / 128 mm^2; sna_area = 0.00006 mm^2; act_area = 0.0003 mm^2
#     ("Sigmoid/Tanh ... Taken from ISAAC paper", 2 per tile); noc_inter_area = 22.88 mm^2 (HyperTransport)
#   ISAAC Table I rows not in those files (IMA input register 2 KB 0.0021 mm^2, output register 256 B
#   0.00077 mm^2; tile output register 3 KB 0.0032 mm^2, max-pool 0.00024 mm^2): ISAAC paper, Table I.
#   ADC rate 1.28 GS/s: MNSIM-2.0 MNSIM/Hardware_Model/ADC.py ADC_sample_rate_dict[2] ("reference: ISAAC"),
#   128 columns in one 100 ns read cycle.
#   Digital multiply/add: PUMA include/constants.py alu_pow_mul_dyn = 0.795*32/45 mW,
#   alu_pow_others_dyn = 0.373*32/45 mW at cycle_time = 1 ns -> 0.5653 pJ, 0.2652 pJ; a host MAC = both.
ISAAC_ADC_PJ = {4: 0.79, 5: 0.99, 6: 1.20, 7: 1.42, 8: 1.666666667, 9: 1.969078145, 10: 2.379022742}
ISAAC_ADC_UM2 = {4: 361.04, 5: 476.91, 6: 626.91, 7: 845.18, 8: 1200.0, 9: 1827.911647, 10: 3002.008032}
_ISAAC = CostParams(
    name="isaac", read_ns=100.0, adc_gsps=1.28, adc_rule="sample", digital_ns=1.0,
    xbar_read_pj=0.3 * 100.0,                       # 0.3 mW per 128x128 array x 100 ns
    dac_pj=0.41667, adc_pj=ISAAC_ADC_PJ, shift_add_pj=0.021,
    mul_pj=0.795 * 32 / 45, add_pj=0.373 * 32 / 45, buffer_pj_per_bit=20.45 / 256 + 0.054, out_bits=16,
    host_mac_pj=(0.795 + 0.373) * 32 / 45,
    xbar_um2=25.0, adc_um2=ISAAC_ADC_UM2, dac_um2=0.166015625,
    unit_other_um2=40.0 + 4 * 60.0 + 2100.0 + 770.0,              # S+H, 4 S+A, IR 2 KB, OR 256 B
    tile_other_um2=83000.0 + 12 * 7500.0 + 37500.0 + 600.0 + 60.0 + 240.0 + 3200.0,
    chip_other_um2=22.88e6, crossbars_per_unit=8, adcs_per_unit=8, units_per_tile=12, tiles_per_chip=168)

# PUMA (Ankit et al., ASPLOS 2019), Aayush-Ankit/puma-simulator include/constants.py + include/config.py
# (commit a206f75): xbar 128x128 0.3 mW, latency xbar_lat_dict['2']['128'] = 128 ns, 2.5e-5 mm^2;
# ADC 8-bit adc_pow_dyn 1.8 + adc_pow_leak 0.2 mW, adc_lat_dict['8'] = 100 ns for a 128-column crossbar
# (1.28 GS/s), 0.0012 mm^2; DAC (0.00350625 + 0.000390625) mW x dac_lat 1 ns, 1.67e-7 mm^2; sna 0.05 mW x 1 ns,
# 0.00006 mm^2; edram_pow_dyn 17.2/2 mW x edram_lat 2 ns per 256 bits ("0.0172 nJ"); edram_bus_pow_dyn
# 6/2 mW per 384 bits x 1 ns; config: num_adc_per_matrix = 2 ADCs per MVMU (8 crossbars of 16-bit weights
# in 2-bit cells), num_matrix = 2 MVMUs per core, num_ima = 8 cores per tile, num_tile_max = 168 tiles;
# unit other = snh 1024 x 0.00004/1024 + sna 0.00006 + xbar in/out memory 2 x 0.00078 + half a core's
# ALUs (4 x 0.00567*32/45), data memory 0.00392, instruction memory 0.00108*sqrt(8), control 0.00145*2.25;
# tile other = edram 0.086 + bus 0.090 + edram ctrl 0.00145 + receive buffer 0.0022*2 + tile instruction
# memory 0.0041*sqrt(8) + tcu 0.00145 + counter buffer 0.0041*sqrt(8) + router 0.047 / 4 (cmesh_c = 4).
_PUMA_CORE = 4 * 0.00567 * 32 / 45 + 0.00392 + 0.00108 * math.sqrt(8) + 0.00145 * 2.25
_PUMA = CostParams(
    name="puma", read_ns=128.0, adc_gsps=1.28, adc_rule="sample", digital_ns=1.0,
    xbar_read_pj=0.3 * 128.0, dac_pj=(0.00350625 + 0.000390625) * 1.0,
    adc_pj={8: (1.8 + 0.2) * 100.0 / 128}, shift_add_pj=0.05 * 1.0,
    mul_pj=0.795 * 32 / 45, add_pj=0.373 * 32 / 45,
    buffer_pj_per_bit=17.2 / 256 + 3.0 / 384, out_bits=16, host_mac_pj=(0.795 + 0.373) * 32 / 45,
    xbar_um2=25.0, adc_um2={8: 1200.0}, dac_um2=0.167,
    unit_other_um2=1e6 * (0.00004 + 0.00006 + 2 * 0.00078 + _PUMA_CORE / 2),
    tile_other_um2=1e6 * (0.086 + 0.090 + 0.00145 + 0.0022 * 2 + 2 * 0.0041 * math.sqrt(8) + 0.00145 + 0.047 / 4),
    chip_other_um2=22.88e6, crossbars_per_unit=8, adcs_per_unit=2, units_per_tile=16, tiles_per_chip=168)

# MNSIM 2.0 (thu-nics/MNSIM-2.0, commit ca39ccb), default SimConfig.ini: ADC_Choice = 6 -> ADC.py 6-bit,
# 1.26e-3 W, 1 GS/s, 1650 um^2, latency (bits + 2) / rate, energy = latency x power; DAC_Choice = 1 ->
# DAC.py 1-bit 0.0039e-3 W, 1 GS/s, 0.166 um^2, latency (1 + 2) / rate; Read_Latency = 3.16 ns;
# crossbar read energy = power x latency with Read_Voltage 0.15 V over Device_Resistance 1e6 / 1e4 Ohm:
# at the mean conductance, 256 x 256 x 0.15^2 x (1e-4 + 1e-6) / 2 W x 3.16 ns = 235 pJ per full read;
# Xbar_Polarity = 2 and Group_Num = 1 (a PE: one + and one - crossbar), ADC_Num = 128 per subarray
# (Subarray_Size = 256: one per crossbar), PE_Num = 2,2 per tile, Tile_Num = 64,64, Digital_Frequency =
# 500 MHz (2 ns digital ops).  Digital, buffer and shift-and-add energies and the areas besides the ADC/DAC:
# the ISAAC numbers (MNSIM computes them from circuit models; override with --target-pim-psq-cost).
_MNSIM = dataclasses.replace(
    _ISAAC, name="mnsim", read_ns=3.16, adc_gsps=1.0, adc_rule="mnsim", digital_ns=2.0,
    xbar_read_pj=256 * 256 * 0.15 ** 2 * (1e-4 + 1e-6) / 2 * 3.16 * 1e3, dac_pj=0.0039 * 3.0,
    adc_pj={}, adc_mw=1.26, adc_um2={6: 1650.0}, dac_um2=0.166, xbar_um2=100.0,
    crossbars_per_unit=2, adcs_per_unit=2 * 128, units_per_tile=4, tiles_per_chip=64 * 64)

# NeuroSim V1.4 (neurosim/DNN_NeuroSim_V1.4, commit ac828e6) Inference_pytorch/NeuroSIM/Param.cpp defaults:
# numColMuxed = 8 (8 columns share one ADC -> 16 ADCs per 128-column array), clkFreq = 1e9 (one read and
# one conversion per 1 ns clock), levelOutput = 32 (5-bit ADC).  NeuroSim computes energies from circuit
# models at run time (no constants to quote): the component energies/areas here are ISAAC's (5-bit ADC row
# of the hwcomponents table).
_NEUROSIM = dataclasses.replace(
    _ISAAC, name="neurosim", adcs_per_unit=16 * 8, adc_gsps=1.0, read_ns=1.0)

COST_PRESETS: dict[str, CostParams] = {p.name: p for p in (_ISAAC, _PUMA, _MNSIM, _NEUROSIM)}
# prime: no simulator constants to quote; ISAAC's components, an array read and area scaled by PRIME's
# 256x256 cells (4x a 128x128 array's)
COST_PRESETS["prime"] = dataclasses.replace(_ISAAC, name="prime", xbar_read_pj=4 * 30.0, xbar_um2=100.0)


def cost_params(preset_name: str, overrides: Mapping[str, Any] | str | None = None) -> CostParams:
    """The cost numbers of a preset (``isaac`` for a custom spec), with overrides (a dict or a JSON file path)."""
    base = COST_PRESETS.get(preset_name, _ISAAC)
    if overrides is None:
        return base
    return base.replace(_read_overrides(overrides))


# ------------------------------------------------------------------------------ the mapping to cost
@dataclasses.dataclass
class TileMapping:
    """Tiles of a model as the cost model sees them (from a QuantResult or from a package manifest)."""

    layer: np.ndarray      # [T] layer index
    nrows: np.ndarray      # [T]
    ncols: np.ndarray      # [T]
    slices: np.ndarray     # [T] slices per polarity
    set_of_tile: np.ndarray  # [T] crossbar set (tiles of one set share its physical crossbars)
    n_crossbars: int       # physical crossbars of the whole model (packed)


def mapping_from_placement(layer, nrows, ncols, slices, placement) -> TileMapping:
    return TileMapping(np.asarray(layer), np.asarray(nrows), np.asarray(ncols), np.asarray(slices),
                       np.asarray(placement.set_of_tile), int(placement.n_crossbars))


def uniform_mapping(m: TileMapping, spec: CrossbarSpec, bits: int) -> TileMapping:
    """The same tiles, every one at ``bits``, packed by the same code."""
    sl = np.full(len(m.layer), spec.slices(bits), dtype=np.int64)
    return mapping_from_placement(m.layer, m.nrows, m.ncols, sl,
                                  pack(m.nrows, m.ncols, sl, spec.rows, spec.cols, spec.polarities))


def mapping_from_manifest(layers: Sequence[Mapping[str, Any]]) -> TileMapping:
    """The tile mapping of a package's manifest layers (``tiles`` with nrows, ncols, slices, crossbars)."""
    rows = []
    for li, lay in enumerate(layers):
        for t in lay.get("tiles") or []:
            rows.append((t["id"], li, t["nrows"], t["ncols"], t["slices"], min(min(c) for c in t["crossbars"])))
    if not rows:
        raise CostError("the package has no PIM tiles to cost")
    rows.sort()
    a = np.array(rows, dtype=np.int64)
    first = a[:, 5]
    _, set_of_tile = np.unique(first, return_inverse=True)
    n = 1 + max(max(max(c) for c in t["crossbars"]) for lay in layers for t in (lay.get("tiles") or []))
    return TileMapping(a[:, 1], a[:, 2], a[:, 3], a[:, 4], set_of_tile.astype(np.int64), int(n))


def vectors_per_inference(layer: Mapping[str, Any]) -> int:
    """Input vectors one PIM layer processes per inference: output elements / output channels."""
    out = layer.get("output_shape")
    if not out:
        raise CostError(f"layer {layer.get('name')!r}: no output_shape to count its input vectors")
    n_out = layer["weight_shape"][0] if layer["op"] == "conv2d" else layer["weight_shape"][1]
    return int(np.prod(out)) // int(n_out)


# ------------------------------------------------------------------------------ the model
class CostModel:
    """Energy, latency and area of tile mappings of one model on one spec with one set of numbers."""

    def __init__(self, spec: CrossbarSpec, params: CostParams, n_vec: Sequence[int], names: Sequence[str],
                 n_rows: Sequence[int] | None = None, n_cols: Sequence[int] | None = None,
                 row_tiles: Sequence[int] | None = None, host_macs: float = 0.0):
        self.spec, self.params = spec, params
        self.n_vec = np.asarray(n_vec, dtype=np.float64)
        self.names = list(names)
        self.K = None if n_rows is None else np.asarray(n_rows, dtype=np.float64)
        self.N = None if n_cols is None else np.asarray(n_cols, dtype=np.float64)
        self.row_tiles = np.ones(len(self.n_vec)) if row_tiles is None else np.asarray(row_tiles, np.float64)
        self.host_macs = float(host_macs)
        self.cycles = math.ceil(spec.act_bits / spec.dac_bits)
        self.bits = params.adc_bits(spec)
        self.e_adc = params.adc_energy_pj(self.bits)
        self.t_conv = params.adc_ns(self.bits)

    @classmethod
    def from_layers(cls, layers: Sequence[Mapping[str, Any]], spec: CrossbarSpec, params: CostParams,
                    host_layers: Sequence[Mapping[str, Any]] = ()) -> "CostModel":
        """From manifest layer records (``op``, ``weight_shape``, ``groups``, ``matrix_shape``, ``output_shape``)."""
        n_vec = [vectors_per_inference(l) for l in layers]
        K = [int(l["matrix_shape"][0]) * int(l.get("groups", 1)) for l in layers]
        N = [int(l["matrix_shape"][1]) * int(l.get("groups", 1)) for l in layers]
        row_tiles = [-(-int(l["matrix_shape"][0]) // spec.rows) for l in layers]
        macs = sum(float(h.get("macs", 0) or 0) for h in host_layers)
        return cls(spec, params, n_vec, [l["name"] for l in layers], K, N, row_tiles, macs)

    # -------------------------------------------------------------- energy
    def tile_energy_pj(self, nrows, ncols, slices, layer) -> np.ndarray:
        """Per-tile energy per inference (pJ): array reads, DACs, ADCs, shift-and-add, scale and accumulate."""
        p, s = self.params, self.spec
        nrows, ncols = np.asarray(nrows, np.float64), np.asarray(ncols, np.float64)
        reads = self.n_vec[layer] * self.cycles * np.asarray(slices, np.float64) * s.polarities
        analog = reads * (p.xbar_read_pj * nrows / s.rows + p.dac_pj * nrows + (self.e_adc + p.shift_add_pj) * ncols)
        return analog + self.n_vec[layer] * ncols * (p.mul_pj + p.add_pj)

    def energy_parts(self, m: TileMapping) -> dict[str, np.ndarray]:
        """Energy per layer (pJ) by component."""
        p, s = self.params, self.spec
        L = len(self.names)
        reads = self.n_vec[m.layer] * self.cycles * m.slices * s.polarities

        def per_layer(v):
            return np.bincount(m.layer, weights=v, minlength=L)

        parts = {"crossbar": per_layer(reads * p.xbar_read_pj * m.nrows / s.rows),
                 "dac": per_layer(reads * p.dac_pj * m.nrows),
                 "adc": per_layer(reads * self.e_adc * m.ncols),
                 "shift_add": per_layer(reads * p.shift_add_pj * m.ncols),
                 "digital": per_layer(self.n_vec[m.layer] * m.ncols * (p.mul_pj + p.add_pj))}
        if self.N is not None:
            parts["digital"] = parts["digital"] + self.n_vec * self.N * p.add_pj
            parts["buffer"] = self.n_vec * (self.K * s.act_bits + self.N * p.out_bits) * p.buffer_pj_per_bit
        return parts

    # -------------------------------------------------------------- crossbars per layer
    def layer_crossbars(self, m: TileMapping) -> np.ndarray:
        """Physical crossbars each layer occupies (a crossbar shared by packing counts for every layer on it)."""
        L = len(self.names)
        S = int(m.set_of_tile.max()) + 1 if len(m.set_of_tile) else 1
        set_xbars = np.zeros(S)
        set_xbars[m.set_of_tile] = m.slices * self.spec.polarities
        pairs = np.unique(m.layer.astype(np.int64) * S + m.set_of_tile)
        return np.bincount(pairs // S, weights=set_xbars[pairs % S], minlength=L)

    # -------------------------------------------------------------- latency
    def layer_latency_ns(self, m: TileMapping, xbars: np.ndarray | None = None) -> np.ndarray:
        """Per layer, one inference: ``n_vec * (B * t_cycle + (row_tiles - 1) * digital_ns)``."""
        p, s = self.params, self.spec
        L = len(self.names)
        xbars = self.layer_crossbars(m) if xbars is None else xbars
        conv = np.bincount(m.layer, weights=m.slices * s.polarities * m.ncols.astype(np.float64), minlength=L)
        adcs = np.maximum(1.0, np.floor(xbars * p.adcs_per_unit / p.crossbars_per_unit))
        t_cycle = np.maximum(p.read_ns, np.ceil(conv / adcs) * self.t_conv)
        return self.n_vec * (self.cycles * t_cycle + (self.row_tiles - 1) * p.digital_ns)

    def replicate(self, lat: np.ndarray, xbars: np.ndarray, spare: float) -> np.ndarray:
        """Replicas per layer from ``spare`` crossbars: copy the slowest layer while it fits (greedy)."""
        reps = np.ones(len(lat), dtype=np.int64)
        heap = [(-float(t), k) for k, t in enumerate(lat)]      # slowest first, ties by layer order
        heapq.heapify(heap)
        while heap:
            neg, k = heap[0]
            if -neg <= 0 or xbars[k] > spare or reps[k] >= self.n_vec[k]:
                break                                   # the slowest layer cannot be copied: the interval stays
            spare -= xbars[k]
            reps[k] += 1
            heapq.heapreplace(heap, (-float(lat[k]) / reps[k], k))
        return reps

    # -------------------------------------------------------------- area
    def grouping(self, n_crossbars: int) -> dict[str, int]:
        p = self.params
        units = math.ceil(n_crossbars / p.crossbars_per_unit)
        tiles = math.ceil(units / p.units_per_tile)
        chips = max(1, math.ceil(tiles / p.tiles_per_chip))
        return {"crossbars": int(n_crossbars), "units": units, "tiles": tiles, "chips": chips}

    def area_um2(self, n_crossbars: int) -> float:
        g = self.grouping(n_crossbars)
        return g["units"] * self.params.unit_um2(self.spec) + g["tiles"] * self.params.tile_other_um2

    def crossbar_area_um2(self) -> float:
        """Area one crossbar brings with it, unrounded (its share of its unit and tile)."""
        p = self.params
        return (p.unit_um2(self.spec) + p.tile_other_um2 / p.units_per_tile) / p.crossbars_per_unit

    # -------------------------------------------------------------- one mapping, everything
    def evaluate(self, m: TileMapping) -> dict[str, Any]:
        """Per-layer and total energy (uJ), latency (us), area (mm^2), chips, pipeline, of one mapping."""
        parts = self.energy_parts(m)
        e_layer = sum(parts.values())
        xbars = self.layer_crossbars(m)
        lat = self.layer_latency_ns(m, xbars)
        g = self.grouping(m.n_crossbars)
        spare = g["chips"] * self.params.crossbars_per_chip - m.n_crossbars
        reps = self.replicate(lat, xbars, spare)
        host_pj = self.host_macs * self.params.host_mac_pj
        layers = []
        for li, name in enumerate(self.names):
            layers.append({"name": name, "energy_uj": float(e_layer[li]) * 1e-6,
                           "energy_parts_uj": {k: float(v[li]) * 1e-6 for k, v in parts.items()},
                           "latency_us": float(lat[li]) * 1e-3, "crossbars": int(xbars[li]),
                           "area_mm2": float(xbars[li] * self.crossbar_area_um2()) * 1e-6,
                           "replicas": int(reps[li])})
        total_parts = {k: float(v.sum()) * 1e-6 for k, v in parts.items()}
        total_parts["host"] = host_pj * 1e-6
        return {
            "energy_uj": float(e_layer.sum() + host_pj) * 1e-6, "energy_parts_uj": total_parts,
            "latency_us": float(lat.sum()) * 1e-3,
            "pipeline": {"interval_us": float(lat.max()) * 1e-3 if len(lat) else 0.0,
                         "interval_replicated_us": float((lat / reps).max()) * 1e-3 if len(lat) else 0.0,
                         "spare_crossbars": int(spare)},
            "area_mm2": self.area_um2(m.n_crossbars) * 1e-6, **g,
            "fits_one_chip": g["chips"] == 1, "layers": layers}

    def measure(self, kind: str, m: TileMapping) -> float:
        """One figure of a mapping for the budgets: ``energy`` (uJ), ``latency`` (us) or ``area`` (mm^2)."""
        if kind == "energy":
            return float(sum(v.sum() for v in self.energy_parts(m).values()) + self.host_macs * self.params.host_mac_pj) * 1e-6
        if kind == "latency":
            return float(self.layer_latency_ns(m).sum()) * 1e-3
        if kind == "area":
            return self.area_um2(m.n_crossbars) * 1e-6
        raise CostError(f"unknown cost measure {kind!r}; use energy, latency or area")


def cost_section(m: TileMapping, spec: CrossbarSpec, model: CostModel) -> dict[str, Any]:
    """The report's ``cost`` section: PSQ and uniform 16/8-bit on the same numbers, side by side."""
    out: dict[str, Any] = {"params": model.params.name, "adc_bits": model.bits,
                           "input_cycles": model.cycles, "units": {"energy": "uJ per inference",
                                                                   "latency": "us per inference", "area": "mm^2"}}
    for key, mm in (("psq", m), ("uniform16", uniform_mapping(m, spec, 16)), ("uniform8", uniform_mapping(m, spec, 8))):
        out[key] = model.evaluate(mm)
    return out


def chips_warning(section: Mapping[str, Any], params: CostParams) -> str | None:
    """A warning when the PSQ mapping needs more than one chip."""
    psq = section.get("psq") or {}
    if psq.get("chips", 1) > 1:
        return (f"the model does not fit one chip: it needs {psq['chips']} chips ({psq['crossbars']} crossbars in "
                f"{psq['tiles']} tiles; one {params.name} chip holds {params.crossbars_per_chip} crossbars in "
                f"{params.tiles_per_chip} tiles); its latency and energy assume the chips work as one pipeline")
    return None


def cost_from_manifest(manifest: Mapping[str, Any], overrides: Mapping[str, Any] | str | None = None) -> dict[str, Any]:
    """The ``cost`` section recomputed from a package manifest alone (its tiles, layer shapes, spec and stored
    cost numbers), with optional overrides of those numbers: what ``tvmc report --cost FILE`` prints."""
    spec = CrossbarSpec.from_dict(manifest["spec"])
    stored = (manifest.get("report") or {}).get("cost") or {}
    base = CostParams.from_dict(stored["params_values"]) if "params_values" in stored else cost_params(spec.name)
    params = base if overrides is None else base.replace(_read_overrides(overrides))
    layers = manifest["layers"]
    model = CostModel.from_layers(layers, spec, params, manifest.get("host_layers", []))
    out = cost_section(mapping_from_manifest(layers), spec, model)
    out["params_values"] = params.to_dict()
    return out


def _read_overrides(overrides: Mapping[str, Any] | str) -> Mapping[str, Any]:
    if not isinstance(overrides, str):
        return overrides
    try:
        with open(overrides, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CostError(f"cannot read cost parameters from {overrides!r}: {e}; give a JSON object of "
                        "CostParams fields (e.g. {\"adc_pj\": {\"8\": 1.5}})") from None
    if not isinstance(d, dict):
        raise CostError(f"{overrides!r}: the cost parameter file must hold a JSON object of CostParams fields")
    return d
