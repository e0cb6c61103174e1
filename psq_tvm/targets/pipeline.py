"""``tvmc compile --target pim-psq`` as a sequence of named stages over one :class:`CompileContext`.

Default stages (:data:`STAGES`), each a function ``stage(ctx) -> None`` that reads and fills named
fields of the context (its docstring says which):

==================  =====================================================================
``import``          ONNX -> Relax (:mod:`psq_tvm.frontend`): ``mod``, ``info``
``partition``       :class:`~psq_tvm.passes.PartitionForPIM`: ``mod``, ``layers``, ``host_layers``, ``tiles``
``lower``           :class:`~psq_tvm.passes.LowerToPIM`: PIM layers become runtime calls: ``mod``
``build_host``      ``tvm.compile`` + export of the host module: ``host_library``, ``outputs``
``input_stats``     data-free input statistics the options need (BatchNorm / synthetic / calibration)
``candidates``      PSQ candidate table (every bitwidth x clipping ratio of every tile): ``candidates``
``allocate``        bitwidths under the budget (``auto``: fewest crossbars meeting the fidelity): ``result``
``bias_correction`` DFQ bias corrections from the input means: ``bias_corrections``
``fidelity``        the quantised model against float on data-free inputs: ``fidelity`` (+ a warning)
``adc_calibration`` a lossy ADC: each crossbar's full scale from the bitline sums on data-free inputs
                    (``spec.adc_range``), simulator vs golden: ``adc_full_scales``, ``adc`` (+ a warning)
``cost``            energy, latency, area of PSQ and uniform 16/8 (:mod:`psq_tvm.core.cost`): ``cost``
``package``         crossbar tables, manifest, report; the :class:`~psq_tvm.runtime.Package`, once
==================  =====================================================================

A user runs the same stages from Python and inserts their own::

    from psq_tvm.targets.pipeline import CompileContext, CompileOptions, Pipeline
    def print_bits(ctx):                       # a stage of one's own
        print(ctx.result.avg_bits)
    pipe = Pipeline.default().insert_after("allocate", "print_bits", print_bits)
    pkg = pipe.run(CompileContext("model.onnx", CompileOptions(budget="reduction=3"))).package

Stages for the next features (cost model, ADC calibration, streaming) slot in by name the same way.
The ``llvm`` target runs ``import``, ``build_host`` and ``package`` only.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import __version__
from ..core.allocation import Budget, allocate_budget, allocate_tolerance
from ..core.candidates import DEFAULT_GRANULARITY, DEFAULT_OBJECTIVE, SearchConfig, evaluate_candidates
from ..core.cost import CostModel, chips_warning, cost_params, cost_section, mapping_from_placement
from ..core.crossbar import CrossbarSpec, parse_bits
from ..core.quant import DEFAULT_ROUNDING
from ..core.report import build_report
from ..core.search import quant_result
from ..core.sensitivity import DEFAULT_BIAS_CORRECTION, input_weighted_importance
from ..core.tables import crossbar_cells
from ..core.tiling import Layer, ModelTiles, unroll
from ..runtime.package import FORMAT, VERSION, Package
from . import fidelity as F
from .adc_calibration import stage_adc_calibration
from .input_stats import (batchnorm_layer_stats, bias_corrections, float_input_stats,
                          synthetic_feeds, synthetic_input_stats)
from .tag import TAG, register_tag

TARGETS = ("pim-psq", "llvm")
#: the compile's default budget: the fewest crossbars whose fidelity meets --psq-min-fidelity
DEFAULT_COMPILE_BUDGET = "auto"
#: where input statistics may come from (``calib``: the user's --calib-inputs; ``bn+synthetic``: the
#: BatchNorm statistics where the model has them, the synthetic ones for the other layers)
STAT_KINDS = ("synthetic", "bn", "bn+synthetic", "calib")
#: the choices of --psq-sensitivity and --psq-bias-correction
STAT_SOURCES = ("none",) + STAT_KINDS
#: the auto budget scans crossbar budgets n_top / step (n_top: every tile at its least distortion) ...
AUTO_STEPS = (1.1, 1.2, 1.3, 1.45, 1.6, 1.8, 2.0, 2.25, 2.5, 2.8, 3.2, 3.6, 4.0, 5.0)
#: ... then bisects between the last pass and the first failure to this relative precision
AUTO_PRECISION = 0.03


class CompileError(ValueError):
    """Options that cannot work together, or a compile that cannot go on (message says what to do)."""


@dataclasses.dataclass
class CompileOptions:
    """Everything a user sets for one compile (CLI ``tvmc compile`` flags / ``psq_tvm.compile`` keywords)."""

    target: str = TAG
    """``pim-psq`` (PIM layers on crossbars, the rest on llvm) or ``llvm`` (plain host build)."""
    input_shapes: Mapping[str, Sequence[int]] | str | None = None
    """Fixed input shapes, ``{name: shape}`` or ``"input:[1,3,224,224]"``; a symbolic batch dim defaults to 1."""
    spec: CrossbarSpec | None = None
    """The crossbar model (default: the ``isaac`` preset)."""
    objective: str = DEFAULT_OBJECTIVE
    """Per-tile distortion the search minimises: ``mse`` or ``cdf-kl``."""
    granularity: str = DEFAULT_GRANULARITY
    """``tile``: one scale per crossbar tile; ``column``: one per tile column (bitline), in the digital stage."""
    rounding: str = DEFAULT_ROUNDING
    """How levels are formed: ``nearest``, or ``balanced`` (rounding errors cancel along every bitline)."""
    budget: str | None = None
    """``auto`` (default), ``avg-bits=X``, ``crossbars=N`` or ``reduction=R``; exclusive with ``tolerance``."""
    tolerance: float | None = None
    """Instead of a budget: each tile takes the smallest bitwidth whose distortion is under it."""
    bits: Sequence[int] | str | None = None
    """Candidate bitwidths (default: the spec's ``weight_bits``)."""
    sensitivity: str = "none"
    """Tile weighting in the budget from input energies: ``none``, ``synthetic``, ``bn`` or ``calib``."""
    bias_correction: str = DEFAULT_BIAS_CORRECTION
    """Where DFQ bias correction takes input means from: ``none``, ``synthetic``, ``bn`` or ``calib``."""
    min_fidelity: str | float | None = None
    """Fidelity the ``auto`` budget must meet and below which compile warns (``fidelity.parse_min_fidelity``)."""
    calib_inputs: Mapping[str, np.ndarray] | None = None
    """A few real (unlabelled) inputs, ``{input name: array [n, ...]}``: the guard measures on them."""
    emit_c_header: bool = False
    """Build the C output (``package.c_sources``: ``pim_psq_tables.h``/``.c``, :mod:`psq_tvm.targets.c_header`)."""
    float_weights: bool = True
    """Keep the original float weights in the package (``tvmc run --mode float``, ``--verify``)."""
    fold_batchnorm: bool = True
    """Fold inference BatchNorm into the preceding conv before quantisation."""
    cost: Mapping[str, Any] | str | None = None
    """Overrides of the preset's hardware cost numbers (``CostParams`` fields, or a JSON file of them)."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise CompileError(f"unknown target {self.target!r}; choose one of {TARGETS}")
        if isinstance(self.bits, str):
            self.bits = parse_bits(self.bits)
        if self.budget is not None and self.tolerance is not None:
            raise CompileError("give either --psq-budget or --psq-tolerance, not both")
        if self.budget is None and self.tolerance is None:
            self.budget = DEFAULT_COMPILE_BUDGET
        if self.budget is not None and str(self.budget).strip() != "auto":
            Budget.parse(self.budget)                       # a clear error now, not after the import
        for what, value in (("sensitivity", self.sensitivity), ("bias correction", self.bias_correction)):
            if value not in STAT_SOURCES:
                raise CompileError(f"unknown {what} {value!r}; choose one of {STAT_SOURCES}")
        if "calib" in (self.sensitivity, self.bias_correction) and self.calib_inputs is None:
            raise CompileError("--psq-sensitivity/--psq-bias-correction calib need --calib-inputs")
        F.parse_min_fidelity(self.min_fidelity)
        if self.cost is not None:
            cost_params("isaac", self.cost)                 # a clear error now, not after the import
        try:
            SearchConfig(objective=self.objective, granularity=self.granularity, rounding=self.rounding)
        except ValueError as e:
            raise CompileError(str(e)) from None

    @property
    def auto(self) -> bool:
        return self.tolerance is None and str(self.budget).strip() == "auto"


@dataclasses.dataclass
class CompileContext:
    """The state the stages share: the inputs, and what each stage fills in."""

    model: Any
    """ONNX model: a path, bytes or an ``onnx.ModelProto``."""
    options: CompileOptions = dataclasses.field(default_factory=CompileOptions)
    say: Callable[[str], None] = lambda msg: None
    """Progress messages (the CLI prints them on stderr)."""
    warn: Callable[[str], None] = lambda msg: None
    """Warnings (the CLI prints them on stderr even with -q)."""
    # ---- filled by the stages
    mod: Any = None                     # the Relax module (import -> partition -> lower)
    info: dict = dataclasses.field(default_factory=dict)        # import: inputs, names, bn_stats, index ranges
    layers: list = dataclasses.field(default_factory=list)      # partition: manifest layer records (+ numpy weight)
    host_layers: list = dataclasses.field(default_factory=list)
    tiles: ModelTiles | None = None
    host_library: bytes | None = None
    outputs: list = dataclasses.field(default_factory=list)     # build_host: [{shape, dtype}] of the outputs
    stats: dict = dataclasses.field(default_factory=dict)       # kind -> per-layer (E[x] per row, E[x^2]) | None
    candidates: Any = None
    result: Any = None                  # allocate: the QuantResult behind the tables
    auto_budget: dict | None = None     # allocate (auto): the points tried and the choice
    bias_corrections: list | None = None
    fidelity: dict | None = None
    cost: dict | None = None            # cost: energy/latency/area of PSQ and uniform 16/8 (the report's section)
    adc_full_scales: list | None = None  # adc_calibration: per layer {tile id: [slices][polarities] full scale}
    adc: dict | None = None              # adc_calibration: the report's "adc" section
    package: Package | None = None
    timing: dict = dataclasses.field(default_factory=dict)
    _float_model: Package | None = None
    _probe: Any = None
    _threshold: dict | None = None
    _rtn8: dict | None = None

    @property
    def spec(self) -> CrossbarSpec:
        if self.options.spec is None:
            from ..core.crossbar import preset
            self.options.spec = preset()
        return self.options.spec

    @property
    def model_name(self) -> str:
        m = self.model
        return os.path.basename(os.fspath(m)) if isinstance(m, (str, os.PathLike)) else "model"

    # ---------------------------------------------------------------- helpers the stages share
    def manifest_layers(self) -> list[dict]:
        """Manifest layer records (weights as blob names; tiles when a result exists)."""
        out = []
        for li, rec in enumerate(self.layers):
            e = {k: v for k, v in rec.items() if k not in ("weight", "bias_array")}
            e["bias"] = f"bias_{rec['id']}" if rec["bias_array"] is not None else None
            e["float_weight"] = f"weight_{rec['id']}"
            e["bias_correction"] = None
            if self.bias_corrections is not None and self.bias_corrections[li] is not None:
                e["bias_correction"] = f"bias_correction_{rec['id']}"
            if self.result is not None:
                e["tiles"] = tile_entries(self.result, li)
                if self.adc_full_scales is not None:
                    for t in e["tiles"]:
                        if t["id"] in self.adc_full_scales[li]:
                            t["adc_full_scale"] = self.adc_full_scales[li][t["id"]]
            out.append(e)
        return out

    def cost_model(self) -> CostModel:
        """The hardware cost model of this model on this spec (the preset's numbers + ``options.cost``)."""
        return CostModel.from_layers(self.layers, self.spec, cost_params(self.spec.name, self.options.cost),
                                     self.host_layers)

    def float_model(self) -> Package:
        """A runnable package of the float model (host library + float PIM weights), for the probes."""
        if self._float_model is None:
            blobs = {"crossbars": np.zeros((0, self.spec.rows, self.spec.cols), np.uint8)}
            for rec in self.layers:
                blobs[f"weight_{rec['id']}"] = np.ascontiguousarray(rec["weight"], dtype=np.float32)
                if rec["bias_array"] is not None:
                    blobs[f"bias_{rec['id']}"] = rec["bias_array"].astype(np.float32)
            layers = [{k: v for k, v in e.items() if k != "tiles"} for e in self.manifest_layers()]
            for e in layers:
                e["bias_correction"] = None
            man = {"format": FORMAT, "version": VERSION, "spec": self.spec.to_dict(), "inputs": self.info["inputs"],
                   "outputs": self.outputs, "layers": layers}
            self._float_model = Package(man, blobs, self.host_library)
        return self._float_model

    def calib_feeds(self) -> list[list[np.ndarray]]:
        """The --calib-inputs as feeds in compiled-batch chunks (the last chunk padded by repetition)."""
        info = self.info["inputs"]
        given = dict(self.options.calib_inputs)
        if len(info) == 1 and len(given) == 1:                 # a single array names the single input
            given = {info[0]["name"]: next(iter(given.values()))}
        arrays = []
        for i in info:
            if i["name"] not in given:
                raise CompileError(f"--calib-inputs lacks input {i['name']!r}; the model takes "
                                   f"{[j['name'] for j in info]}")
            a = np.asarray(given[i["name"]])
            if list(a.shape[1:]) != list(i["shape"][1:]):
                raise CompileError(f"--calib-inputs {i['name']!r} has items of shape {list(a.shape[1:])}, the model "
                                   f"takes {i['shape'][1:]} (give an array [n] + item shape)")
            arrays.append(a.astype(i["dtype"], copy=False))
        n, b = len(arrays[0]), max(1, int(info[0]["shape"][0]))
        if n == 0 or any(len(a) != n for a in arrays):
            raise CompileError("--calib-inputs must give the same number (>= 1) of items for every input")
        return [[a[np.arange(s, s + b).clip(max=n - 1)] for a in arrays] for s in range(0, n, b)]

    def input_statistics(self, kind: str) -> list:
        """Per PIM layer ``(E[x] per unrolled row, E[x^2] per input channel)`` or None, from ``kind``, once."""
        if kind not in self.stats:
            if kind == "bn":
                self.stats[kind] = batchnorm_layer_stats(self.manifest_layers(), self.info.get("bn_stats") or {})
            elif kind == "synthetic":
                self.stats[kind] = synthetic_input_stats(self.float_model())
            elif kind == "bn+synthetic":
                self.stats[kind] = [b if b is not None else s for b, s in
                                    zip(self.input_statistics("bn"), self.input_statistics("synthetic"))]
            elif kind == "calib":
                self.stats[kind] = float_input_stats(self.float_model(), self.calib_feeds())
            else:
                raise CompileError(f"unknown input statistics {kind!r}; choose one of {STAT_KINDS}")
        return self.stats[kind]

    def weights_of(self, result, corrections: list | None) -> tuple[dict, dict]:
        """Per layer id: the fake-quantised unrolled matrices and bias (+ correction) of ``result``: what
        ``--mode fake-quant`` of the package computes with, held in float32 (the probes accumulate in float32:
        twice as fast, and its rounding is far below any quantisation error)."""
        weights, biases = {}, {}
        for li, rec in enumerate(self.layers):
            lid = str(rec["id"])
            kind = "conv2d" if rec["op"] == "conv2d" else "dense"
            weights[lid] = [np.ascontiguousarray(m, np.float32)
                            for m in unroll(result.dequantized(li), kind, int(rec["groups"]))]
            b, c = rec["bias_array"], None if corrections is None else corrections[li]
            biases[lid] = b if c is None else (c.astype(np.float32) if b is None else (b + c).astype(np.float32))
        return weights, biases

    def probe(self) -> F.FidelityProbe:
        """The fidelity guard's inputs and float reference (synthetic, or the --calib-inputs)."""
        if self._probe is None:
            if self.options.calib_inputs is not None:
                feeds = self.calib_feeds()
                n = sum(len(f[0]) for f in feeds)
                src = f"{len(next(iter(self.options.calib_inputs.values())))} calibration input(s)"
            else:
                feeds = synthetic_feeds(self.float_model(), F.FIDELITY_SAMPLES, seed=1)
                n = sum(len(f[0]) for f in feeds)
                src = f"{n} seeded synthetic input(s)"
            self._probe = F.FidelityProbe(self.float_model(), feeds, src)
        return self._probe

    def threshold(self) -> dict[str, Any]:
        """The fidelity threshold (output SQNR, dB): the lowest of the --psq-min-fidelity rules."""
        if self._threshold is None:
            parts = []
            for rule, value in F.parse_min_fidelity(self.options.min_fidelity):
                if rule == "db":
                    parts.append((value, f"{value:g} dB"))
                else:
                    ref = self.reference_rtn8()["sqnr_db"]
                    parts.append((ref + value, f"per-channel 8-bit RTN ({ref:.1f} dB){f' {value:+g} dB' if value else ''}"))
            value, why = min(parts)
            rule = why if len(parts) == 1 else f"lowest of {', '.join(p[1] for p in parts)}: {why}"
            self._threshold = {"rule": rule, "sqnr_db": value}
        return self._threshold

    def reference_rtn8(self) -> dict[str, Any]:
        """Output metrics of per-output-channel 8-bit round-to-nearest weights on the probe's inputs."""
        if self._rtn8 is None:
            w = {str(r["id"]): F.rtn8_channel_matrices(r, r["weight"]) for r in self.layers}
            b = {str(r["id"]): r["bias_array"] for r in self.layers}
            self._rtn8 = self.probe().output_metrics(w, b)
        return self._rtn8


def tile_entries(result, li: int) -> list[dict[str, Any]]:
    """Manifest tile records of layer ``li`` of a QuantResult."""
    tiles, pl = result.tiles, result.placement
    out = []
    for t in tiles.layer_tiles(li):
        t = int(t)
        out.append({"id": t, "group": int(tiles.group[t]), "row0": int(tiles.row0[t]), "col0": int(tiles.col0[t]),
                    "nrows": int(tiles.nrows[t]), "ncols": int(tiles.ncols[t]), "bits": int(result.bits[t]),
                    "scale": result.tile_scale(t), "slices": int(result.slices[t]),
                    "crossbars": pl.crossbar_ids(t).tolist(), "row_off": int(pl.row_off[t]),
                    "col_off": int(pl.col_off[t])})
    return out


# ------------------------------------------------------------------------------------------- stages
def stage_import(ctx: CompileContext) -> None:
    """ONNX -> Relax with constant weights (reads ``model``, ``options``; fills ``mod``, ``info``)."""
    from ..frontend.onnx_import import import_onnx

    register_tag()
    ctx.say("importing ONNX model")
    ctx.mod, ctx.info = import_onnx(ctx.model, ctx.options.input_shapes, batchnorm=ctx.options.fold_batchnorm)
    for i in ctx.info["inputs"]:
        if i["name"] in ctx.info.get("index_ranges", {}):
            i["index_range"] = int(ctx.info["index_ranges"][i["name"]])
        if i["name"] in ctx.info.get("input_normalization", {}):
            i["normalization"] = ctx.info["input_normalization"][i["name"]]


def stage_partition(ctx: CompileContext) -> None:
    """PIM layers into ``pim_psq`` composites (fills ``mod``, ``layers``, ``host_layers``, ``tiles``)."""
    from ..passes import PartitionForPIM, host_layers
    from ..passes.partition import layer_records

    ctx.say("partitioning (pim_psq patterns)")
    ctx.mod = PartitionForPIM(ctx.spec, ctx.info["names"])(ctx.mod)
    ctx.layers = layer_records(ctx.mod)
    ctx.host_layers = host_layers(ctx.mod)
    if ctx.layers:
        ctx.tiles = ModelTiles([Layer(r["name"], r["weight"], "conv2d" if r["op"] == "conv2d" else "dense",
                                      r["groups"]) for r in ctx.layers], ctx.spec.rows, ctx.spec.cols)


def stage_lower(ctx: CompileContext) -> None:
    """PIM composites become ``pim_psq.layer`` runtime calls (fills ``mod``)."""
    from ..passes import LowerToPIM

    ctx.say(f"lowering {len(ctx.layers)} PIM layer(s) to runtime calls; {len(ctx.host_layers)} weight layer(s) on host")
    ctx.mod = LowerToPIM()(ctx.mod)


def stage_build_host(ctx: CompileContext) -> None:
    """``tvm.compile`` and export of the host module (fills ``host_library``, ``outputs``)."""
    import tvm

    ctx.say(f"building host module ({ctx.options.target})")
    ctx.outputs = _io_info(ctx.mod)
    ex = tvm.compile(ctx.mod, target=tvm.target.Target(TAG if ctx.options.target == TAG else "llvm"))
    ctx.host_library = _export(ex)


def stage_input_stats(ctx: CompileContext) -> None:
    """Data-free input statistics the options ask for (fills ``stats``)."""
    o = ctx.options
    for kind in sorted({o.sensitivity, o.bias_correction} - {"none"}):
        st = ctx.input_statistics(kind)
        ctx.say(f"input statistics ({kind}): {sum(s is not None for s in st)} of {len(st)} PIM layers")


def stage_candidates(ctx: CompileContext) -> None:
    """Score every bitwidth x clipping ratio of every tile (fills ``candidates``)."""
    o = ctx.options
    t0 = time.perf_counter()
    bits = tuple(sorted(set(o.bits or ctx.spec.weight_bits)))
    imp = None
    if o.sensitivity != "none":
        imp = input_weighted_importance(ctx.tiles, [None if st is None else st[1]
                                                    for st in ctx.input_statistics(o.sensitivity)])
    ctx.say(f"PSQ candidates: {ctx.tiles.n_tiles} tiles x {len(bits)} bitwidths ({o.objective}, per {o.granularity})")
    ctx.candidates = evaluate_candidates(ctx.tiles, bits, SearchConfig(objective=o.objective, granularity=o.granularity,
                                                                       rounding=o.rounding),
                                         imp)
    ctx.timing["search_seconds"] = time.perf_counter() - t0


def stage_allocate(ctx: CompileContext) -> None:
    """Bitwidths under the budget or tolerance (fills ``result``; ``auto_budget`` for ``auto``)."""
    o = ctx.options
    t0, fid0 = time.perf_counter(), ctx.timing.get("fidelity_seconds", 0.0)
    if o.tolerance is not None:
        choice, note = allocate_tolerance(ctx.candidates, o.tolerance), f"tolerance {o.tolerance:g}"
    elif o.auto:
        choice, note = _auto_budget(ctx)
    else:
        budget = Budget.parse(o.budget)
        choice, note = allocate_budget(ctx.candidates, ctx.tiles, ctx.spec, budget,
                                       ctx.cost_model() if budget.cost_kind else None)
    ctx.result = quant_result(ctx.candidates, ctx.tiles, ctx.spec, choice, o.objective, note=note,
                              rounding=o.rounding)
    measuring = ctx.timing.get("fidelity_seconds", 0.0) - fid0          # auto: the fidelity runs, not search
    ctx.timing["search_seconds"] = ctx.timing.get("search_seconds", 0.0) + time.perf_counter() - t0 - measuring
    ctx.result.search_seconds = ctx.timing["search_seconds"]
    ctx.say(f"allocation: {note}")


def stage_bias_correction(ctx: CompileContext) -> None:
    """DFQ bias corrections of ``result`` (fills ``bias_corrections``)."""
    kind = ctx.options.bias_correction
    if kind == "none":
        return
    ctx.bias_corrections = _corrections(ctx, ctx.result)
    ctx.say(f"bias correction ({kind} input means): {sum(c is not None for c in ctx.bias_corrections)} of "
            f"{len(ctx.layers)} PIM layers")


def stage_fidelity(ctx: CompileContext) -> None:
    """The quantised model against float on data-free (or --calib) inputs (fills ``fidelity``; warns)."""
    t0 = time.perf_counter()
    probe = ctx.probe()
    w, b = ctx.weights_of(ctx.result, _guard_corrections(ctx, ctx.result, ctx.bias_corrections))
    relative = any(rule == "rtn8" for rule, _ in F.parse_min_fidelity(ctx.options.min_fidelity))
    ctx.fidelity = F.fidelity_section(probe, w, b, ctx.threshold(), ctx.reference_rtn8() if relative else None)
    if ctx.auto_budget is not None:
        ctx.fidelity["auto_budget"] = ctx.auto_budget
    if _guard_drops_synthetic(ctx):
        ctx.fidelity["bias_correction_measured"] = (
            "BatchNorm-derived corrections only: the synthetic-statistics corrections are fitted to inputs like "
            "the probe's, so they are left out of the measure (what they gain on real data is not counted)")
    ctx.timing["fidelity_seconds"] = ctx.timing.get("fidelity_seconds", 0.0) + time.perf_counter() - t0
    o = ctx.fidelity["output"]
    ctx.say(f"fidelity on {probe.source}: output SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.4f}"
            + (f", top-1 agreement {o['top1_agreement']:.3f}" if "top1_agreement" in o else "")
            + f" (threshold {ctx.fidelity['threshold']['sqnr_db']:.1f} dB)")
    msg = F.warning_text(ctx.fidelity)
    if msg:
        ctx.warn(msg)


def stage_cost(ctx: CompileContext) -> None:
    """Energy, latency and area of PSQ and uniform 16/8-bit on the same numbers (fills ``cost``; warns)."""
    r = ctx.result
    m = mapping_from_placement(r.tiles.layer, r.tiles.nrows, r.tiles.ncols, r.slices, r.placement)
    model = ctx.cost_model()
    ctx.cost = cost_section(m, ctx.spec, model)
    ctx.cost["params_values"] = model.params.to_dict()
    p = ctx.cost["psq"]
    ctx.say(f"cost ({model.params.name} numbers): {p['energy_uj']:.4g} uJ, {p['latency_us']:.4g} us per inference, "
            f"{p['area_mm2']:.4g} mm^2, {p['chips']} chip(s)")
    msg = chips_warning(ctx.cost, model.params)
    if msg:
        ctx.warn(msg)


def stage_package(ctx: CompileContext) -> None:
    """Crossbar tables, manifest and report; the Package, built once (fills ``package``)."""
    import tvm

    o = ctx.options
    pim = o.target == TAG
    blobs: dict[str, np.ndarray] = {}
    layers = ctx.manifest_layers() if pim else []
    if pim and ctx.result is not None:
        blobs["crossbars"] = crossbar_cells(ctx.result)
    else:
        blobs["crossbars"] = np.zeros((0, ctx.spec.rows, ctx.spec.cols), dtype=np.uint8)
    for li, (rec, e) in enumerate(zip(ctx.layers if pim else [], layers)):
        if e["bias"]:
            blobs[e["bias"]] = rec["bias_array"].astype(np.float32)
        if e["bias_correction"]:
            blobs[e["bias_correction"]] = ctx.bias_corrections[li].astype(np.float32)
        if o.float_weights:
            blobs[e["float_weight"]] = np.ascontiguousarray(rec["weight"], dtype=np.float32)
        else:
            e["float_weight"] = None
    report = build_report(ctx.result if pim else None, ctx.host_layers, ctx.spec, layers)
    if ctx.fidelity is not None:
        report["fidelity"] = ctx.fidelity
    if pim and ctx.cost is not None:
        report["cost"] = ctx.cost
    if ctx.adc is not None:
        report["adc"] = ctx.adc
    manifest = {
        "format": FORMAT, "version": VERSION, "target": o.target, "model": ctx.model_name,
        "producer": {"psq_tvm": __version__, "tvm": tvm.__version__},
        "spec": ctx.spec.to_dict(), "inputs": ctx.info["inputs"], "outputs": ctx.outputs,
        "layers": layers, "host_layers": ctx.host_layers, "report": report,
        "fold_batchnorm": bool(o.fold_batchnorm),
        "search": {"objective": o.objective, "budget": o.budget, "tolerance": o.tolerance,
                   "granularity": o.granularity, "rounding": o.rounding, "sensitivity": o.sensitivity, "bias_correction": o.bias_correction,
                   "min_fidelity": str(o.min_fidelity or F.DEFAULT_MIN_FIDELITY),
                   "bits": list(o.bits) if o.bits else None,
                   "note": ctx.result.note if ctx.result is not None else ""},
        "runtime": {"function": "pim_psq.layer", "modes": ["sim", "golden", "fake-quant", "float"]},
    }
    ctx.timing.setdefault("search_seconds", 0.0)
    ctx.timing["compile_seconds"] = time.perf_counter() - ctx.timing.pop("_t0", time.perf_counter())
    pkg = Package(manifest, blobs, ctx.host_library, timing=dict(ctx.timing))
    pkg.quant_result = ctx.result               # in memory only: the search result behind the tables
    pkg.bn_stats = ctx.info.get("bn_stats")     # in memory only: BatchNorm input statistics of the ONNX model
    if o.emit_c_header:                         # in memory: the C files carry the package digest, so they
        from .c_header import package_c_sources   # are written next to the package, not into it
        pkg.c_sources = package_c_sources(pkg)
    ctx.package = pkg
    ctx.say(f"done in {ctx.timing['compile_seconds']:.2f} s (PSQ search {ctx.timing['search_seconds']:.3f} s)")


# ------------------------------------------------------------------------------------------ pipeline
Stage = tuple[str, Callable[[CompileContext], None]]
#: the stages every pim-psq compile runs, in order
STAGES: tuple[Stage, ...] = (
    ("import", stage_import), ("partition", stage_partition), ("lower", stage_lower),
    ("build_host", stage_build_host), ("input_stats", stage_input_stats), ("candidates", stage_candidates),
    ("allocate", stage_allocate), ("bias_correction", stage_bias_correction), ("fidelity", stage_fidelity),
    ("adc_calibration", stage_adc_calibration), ("cost", stage_cost), ("package", stage_package),
)
#: the stages of a plain llvm build
LLVM_STAGES = ("import", "build_host", "package")


class Pipeline:
    """An ordered list of named stages; :meth:`run` applies them to one context."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = list(stages)
        names = [n for n, _ in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")

    @classmethod
    def default(cls) -> "Pipeline":
        return cls(STAGES)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.stages]

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no stage {name!r}; stages: {self.names}") from None

    def insert_after(self, after: str, name: str, fn: Callable[[CompileContext], None]) -> "Pipeline":
        k = self._index(after) + 1
        return Pipeline(self.stages[:k] + [(name, fn)] + self.stages[k:])

    def insert_before(self, before: str, name: str, fn: Callable[[CompileContext], None]) -> "Pipeline":
        k = self._index(before)
        return Pipeline(self.stages[:k] + [(name, fn)] + self.stages[k:])

    def replace(self, name: str, fn: Callable[[CompileContext], None]) -> "Pipeline":
        k = self._index(name)
        return Pipeline(self.stages[:k] + [(name, fn)] + self.stages[k + 1:])

    def without(self, name: str) -> "Pipeline":
        k = self._index(name)
        return Pipeline(self.stages[:k] + self.stages[k + 1:])

    def run(self, ctx: CompileContext, until: str | None = None) -> CompileContext:
        """Run the stages in order (an ``llvm`` target runs only :data:`LLVM_STAGES`); stop after ``until``."""
        ctx.timing.setdefault("_t0", time.perf_counter())
        for name, fn in self.stages:
            if ctx.options.target != TAG and name not in LLVM_STAGES:
                continue
            if name not in ("import", "partition", "lower", "build_host", "package") and not ctx.layers:
                continue                                    # nothing on PIM: no search, no fidelity
            fn(ctx)
            if name == until:
                break
        return ctx


def build(model_or_path: Any, target: str = TAG, *, progress: Callable[[str], None] | None = None,
          warn: Callable[[str], None] | None = None, pipeline: Pipeline | None = None, **options: Any) -> Package:
    """Compile an ONNX model for ``pim-psq`` (or a plain ``llvm`` host build) through the stages; a Package."""
    ctx = CompileContext(model_or_path, CompileOptions(target=target, **options), say=progress or (lambda m: None),
                         warn=warn or (lambda m: None))
    return (pipeline or Pipeline.default()).run(ctx).package


# ------------------------------------------------------------------------------------ stage helpers
def _corrections(ctx: CompileContext, result) -> list | None:
    kind = ctx.options.bias_correction
    return None if kind == "none" else bias_corrections(result, ctx.input_statistics(kind))


def _guard_drops_synthetic(ctx: CompileContext) -> bool:
    """True when the fidelity guard measures on synthetic inputs and the bias correction uses synthetic
    statistics: a correction fitted to inputs drawn like the probe's would credit itself."""
    return ctx.options.calib_inputs is None and ctx.options.bias_correction in ("synthetic", "bn+synthetic")


def _guard_corrections(ctx: CompileContext, result, corrections: list | None = None) -> list | None:
    """The bias corrections the fidelity guard measures with: ``corrections`` (default: those of
    ``result``), less the ones from synthetic statistics when :func:`_guard_drops_synthetic`."""
    if corrections is None and ctx.options.bias_correction != "none":
        corrections = _corrections(ctx, result)
    if corrections is None or not _guard_drops_synthetic(ctx):
        return corrections
    bn = ctx.input_statistics("bn") if ctx.options.bias_correction == "bn+synthetic" else [None] * len(corrections)
    return [c if st is not None else None for c, st in zip(corrections, bn)]


def _auto_budget(ctx: CompileContext) -> tuple[np.ndarray, str]:
    """The fewest crossbars whose output fidelity meets the threshold, over the whole-model Lagrangian.

    Each point allocates for a crossbar budget, applies the bias correction and measures the output
    SQNR on the probe's inputs.  The scan goes down from the best allocation (every tile at its least
    distortion) in steps of :data:`AUTO_STEPS` and stops at the first budget that fails; then bisection
    between the last pass and that failure, to :data:`AUTO_PRECISION`.  Going down and stopping at the
    first failure keeps the choice safe where fidelity is not monotone in the budget (a noisy measure).
    """
    from ..core.packing import count_crossbars

    table, tiles, spec = ctx.candidates, ctx.tiles, ctx.spec
    thr = ctx.threshold()["sqnr_db"]
    slices = np.array([spec.slices(b) for b in table.bits])

    def crossbars(choice) -> int:
        return int(count_crossbars(tiles.nrows, tiles.ncols, slices[choice], spec.rows, spec.cols, spec.polarities))

    top = np.argmin(table.distortion, axis=1)                               # least distortion, no budget
    floor = np.lexsort((table.distortion, np.broadcast_to(slices, table.distortion.shape)), axis=1)[:, 0]
    n_top, n_floor = crossbars(top), crossbars(floor)
    points: dict[int, tuple[np.ndarray, float]] = {}

    def meets(n: int, choice: np.ndarray | None = None) -> bool:
        if n not in points:
            if choice is None:
                choice = allocate_budget(table, tiles, spec, Budget("crossbars", n))[0]
            result = quant_result(table, tiles, spec, choice, ctx.options.objective, rounding=ctx.options.rounding)
            w, b = ctx.weights_of(result, _guard_corrections(ctx, result))
            points[n] = (choice, ctx.probe().output_metrics(w, b)["sqnr_db"])
            ctx.say(f"  auto budget: {crossbars(choice)} crossbars -> output SQNR {points[n][1]:.1f} dB "
                    f"(need {thr:.1f})")
        return points[n][1] >= thr

    t0 = time.perf_counter()
    ctx.say(f"auto budget: fewest crossbars with output SQNR >= {thr:.1f} dB ({ctx.threshold()['rule']}), "
            f"between {n_floor} and {n_top}")
    if not meets(n_top, top):
        chosen, why = n_top, "threshold not reached even by the best allocation: best fidelity kept"
    else:
        chosen, fail = n_top, None
        for step in AUTO_STEPS:
            n = max(n_floor, int(n_top / step))
            if n >= chosen:
                continue
            if not meets(n, floor if n == n_floor else None):
                fail = n
                break
            chosen = n
            if n == n_floor:
                break
        while fail is not None and chosen - fail > max(1, int(AUTO_PRECISION * chosen)):
            mid = int(round(np.sqrt(chosen * fail)))
            mid = min(max(mid, fail + 1), chosen - 1)
            if meets(mid):
                chosen = mid
            else:
                fail = mid
        why = "smallest candidate bitwidths meet it" if chosen == n_floor else \
            f"fewest crossbars meeting it (scan down, stop at the first failure; within {AUTO_PRECISION:.0%})"
    choice = points[chosen][0]
    ctx.timing["fidelity_seconds"] = ctx.timing.get("fidelity_seconds", 0.0) + time.perf_counter() - t0
    ctx.auto_budget = {"threshold_db": thr, "chosen_crossbars": crossbars(choice), "why": why,
                       "points": [{"budget_crossbars": int(n), "crossbars": crossbars(c), "sqnr_db": float(v)}
                                  for n, (c, v) in sorted(points.items())]}
    return choice, f"budget auto met: {crossbars(choice)} crossbars, output SQNR {points[chosen][1]:.1f} dB " \
                   f"(threshold {thr:.1f} dB; {why})"


def require_c_compiler() -> str:
    """The C compiler TVM's ``export_library`` links the host library with; a clear error when there is none."""
    import shutil

    from tvm.support.cc import get_cc

    cc = get_cc()
    if cc and shutil.which(cc.split()[0]):
        return cc
    where = f"$CC/$CXX names {cc!r}, which is not an executable" if cc else \
        "no g++, gcc, clang++, clang, c++ or cc on PATH"
    raise RuntimeError(f"no C compiler ({where}): TVM links the host library with one; install one "
                       "(e.g. `apt-get install gcc`, `dnf install gcc`, `xcode-select --install`) or set CC "
                       "to its path")


def _export(ex) -> bytes:
    require_c_compiler()
    with tempfile.TemporaryDirectory(prefix="psq-build-") as d:
        p = os.path.join(d, "host_library.so")
        ex.export_library(p)
        with open(p, "rb") as f:
            return f.read()


def _io_info(mod) -> list[dict[str, Any]]:
    from tvm import relax

    ret = mod["main"].ret_ty
    tys = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    out = []
    for t in tys:
        if isinstance(t, relax.TensorType):
            shp = None
            try:
                shp = [int(d) for d in t.shape.values]
            except Exception:
                pass
            out.append({"shape": shp, "dtype": str(t.dtype)})
    return out
