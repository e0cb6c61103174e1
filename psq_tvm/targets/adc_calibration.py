"""The ``adc_calibration`` stage: each crossbar's ADC full scale from the bitline sums that occur, and a check
of what the ADC costs, both on data-free inputs.

Why per crossbar: in the designs the presets follow, one ADC serves all bitlines of a crossbar (ISAAC and
PUMA: one ADC per 128x128 array, time-multiplexed over its columns; NeuroSim's column multiplexer), so its
reference -- the full scale -- is one setting per ADC, i.e. per crossbar, not per column.  Several small
tiles packed on one crossbar are read in different operations (only one tile's wordlines are driven at a
time), so each tile stores the full scale of every crossbar it occupies (``adc_full_scale``
``[slices][polarities]``), and the reference is set when that tile is read.

How: the float model runs on the compile's data-free inputs (the same seeded synthetic inputs as the
``synthetic`` input statistics, or the ``--calib-inputs``); every PIM layer's traced input is quantised as
the simulator does at run time, cut into input bit planes and read against the stored cell levels, and
the sums of every crossbar read are collected per (tile, slice, polarity) as a histogram weighted by
``4**(j dac_bits)`` (the weight of input cycle ``j`` after the shift-and-add).  The full scale is the
largest sum seen (:mod:`psq_tvm.core.adc_range`, rule ``max``): the rule that minimises the squared read
error on these inputs clips real data the synthetic inputs do not resemble (docs/results/adc.md).

Then, for every spec whose ADC is not lossless (``worst`` ranges too), the quantised model runs in the
``sim`` and ``golden`` modes on the fidelity guard's inputs; the report's ``adc`` section gives the
simulator's output SQNR against golden, and compile warns when it is under :data:`ADC_MIN_SQNR_DB`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..core.adc_range import calibrated_full_scale
from ..core.tables import crossbar_cells
from ..runtime.package import FORMAT, VERSION, Package
from ..runtime.simulator import compile_layer
from . import fidelity as F
from .input_stats import synthetic_feeds

#: synthetic items whose PIM-layer inputs are read for the calibration (seed 0, as the synthetic statistics)
CALIBRATION_SAMPLES = 8
#: at most this many input vectors (im2col rows) per layer and call enter the histograms
CALIBRATION_ROWS = 2048
#: one full scale per crossbar read ("crossbar", the designs' shared ADC) or per bitline ("column")
GRANULARITY = "crossbar"
#: compile warns when the simulator's output SQNR against golden (synthetic inputs) is under this.  Evidence
#: (docs/results/adc.md, prime): worst-case ranges measure -15.6 to 4.4 dB and lose 3.6 to 71 pt of accuracy
#: (MNIST digits at 6 and 8 ADC bits, Fashion at 6); calibrated ranges measure 8.7 dB (MNIST, -0.2 pt) and
#: 21.7 dB (Fashion, -0.85 pt).  A coarse bar: the synthetic inputs are not the real data.
ADC_MIN_SQNR_DB = 6.0
#: items of the fidelity guard's inputs run through the simulator and golden to measure the ADC's cost
CHECK_SAMPLES = 4


def lossy_tiles(spec, layers: list[dict]) -> bool:
    """True when some tile's reads are not exact with the worst-case full scale (the ADC matters)."""
    return any(not spec.adc_lossless(int(t["nrows"])) for lay in layers for t in lay["tiles"])


def quantised_model(ctx, layers: list[dict], cells: np.ndarray) -> Package:
    """A runnable package of the quantised model (host library, crossbar cells, biases and corrections)."""
    blobs: dict[str, np.ndarray] = {"crossbars": cells}
    for li, (rec, e) in enumerate(zip(ctx.layers, layers)):
        if e["bias"]:
            blobs[e["bias"]] = rec["bias_array"].astype(np.float32)
        if e["bias_correction"]:
            blobs[e["bias_correction"]] = ctx.bias_corrections[li].astype(np.float32)
    man = {"format": FORMAT, "version": VERSION, "spec": ctx.spec.to_dict(), "inputs": ctx.info["inputs"],
           "outputs": ctx.outputs, "layers": [{**e, "float_weight": None} for e in layers]}
    return Package(man, blobs, ctx.host_library)


def calibrate(ctx, layers: list[dict], cells: np.ndarray) -> tuple[list[dict[int, list]], str]:
    """Per layer, ``{tile id: [slices][polarities] full scale}`` for the tiles whose reads are lossy; and
    what the inputs were."""
    spec = ctx.spec
    model = ctx.float_model()
    if ctx.options.calib_inputs is not None:
        feeds = ctx.calib_feeds()
        source = f"{len(next(iter(ctx.options.calib_inputs.values())))} calibration input(s)"
    else:
        feeds = synthetic_feeds(model, CALIBRATION_SAMPLES, seed=0)
        source = f"{sum(len(f[0]) for f in feeds)} seeded synthetic input(s)"
    by_id = {str(e["id"]): e for e in layers}
    hists: dict[tuple[int, int, int], np.ndarray] = {}
    for feed in feeds:
        _, trace = model.run(feed, "float", trace=True)
        for lid, x, _y in trace:
            lay = by_id[lid]
            if not any(not spec.adc_lossless(int(t["nrows"])) for t in lay["tiles"]):
                continue
            x = np.asarray(x)
            if lay["op"] != "conv2d" and lay.get("operand") == "left" and x.ndim >= 2:
                x = np.swapaxes(x, -1, -2)
            per_column = GRANULARITY == "column"
            for t, k, p, hs in compile_layer(lay, cells, spec).read_histograms(x, max_rows=CALIBRATION_ROWS,
                                                                                per_column=per_column):
                for col, h in (enumerate(hs) if per_column else [(None, hs)]):
                    key = (int(t["id"]), k, p) if col is None else (int(t["id"]), k, p, col)
                    old = hists.get(key)
                    if old is None:
                        hists[key] = h
                    else:
                        big, small = (old, h) if old.size >= h.size else (h, old)
                        big = big.copy()
                        big[:small.size] += small
                        hists[key] = big
    out: list[dict[int, list]] = []
    for lay in layers:
        per_tile: dict[int, list] = {}
        for t in lay["tiles"]:
            nr = int(t["nrows"])
            if spec.adc_lossless(nr):
                continue
            peak = nr * ((1 << spec.dac_bits) - 1) * ((1 << spec.cell_bits) - 1)
            def fs(*key):
                return float(np.float32(calibrated_full_scale(hists.get((int(t["id"]),) + key, np.zeros(0)),
                                                              spec.adc_bits, peak)))
            per_tile[int(t["id"])] = [[fs(k, p) if GRANULARITY != "column" else
                                       [fs(k, p, c) for c in range(int(t["ncols"]))]
                                       for p in range(spec.polarities)] for k in range(int(t["slices"]))]
        out.append(per_tile)
    return out, source


def stage_adc_calibration(ctx) -> None:
    """Calibrated ADC full scales (``spec.adc_range == "calibrated"``, a lossy ADC; fills ``adc_full_scales``)
    and the simulator-vs-golden check of the spec's ADC (fills ``adc``; warns when it is far from golden)."""
    spec = ctx.spec
    layers = ctx.manifest_layers()
    if spec.adc_bits is None or not lossy_tiles(spec, layers):
        return
    t0 = time.perf_counter()
    cells = crossbar_cells(ctx.result)
    section: dict[str, Any] = {"adc_bits": spec.adc_bits, "range": spec.adc_range}
    if spec.adc_range == "calibrated":
        ctx.adc_full_scales, source = calibrate(ctx, layers, cells)
        layers = ctx.manifest_layers()
        fs = [v for per in ctx.adc_full_scales for f in per.values() for row in f for v in row]
        fs = [w for v in fs for w in np.atleast_1d(v)]
        section.update({"calibration_inputs": source, "crossbar_reads_calibrated": len(fs),
                        "full_scale_fraction_of_worst": _fractions(spec, layers)})
        ctx.say(f"ADC ranges calibrated on {source}: {len(fs)} crossbar full scales")
    probe = ctx.probe()
    feeds = probe.feeds_list[:max(1, -(-CHECK_SAMPLES // max(1, len(probe.feeds_list[0][0]))))]
    model = quantised_model(ctx, layers, cells)
    golden, sim = [], []
    for feed in feeds:
        golden.extend(model.run(feed, "golden"))
        sim.extend(model.run(feed, "sim"))
    m = F.output_metrics(golden, sim)
    section.update({"check_inputs": f"{sum(len(f[0]) for f in feeds)} of the fidelity guard's inputs",
                    "sim_vs_golden": m, "min_sqnr_db": ADC_MIN_SQNR_DB,
                    "meets_threshold": bool(m["sqnr_db"] >= ADC_MIN_SQNR_DB)})
    ctx.adc = section
    ctx.timing["adc_seconds"] = time.perf_counter() - t0
    ctx.say(f"ADC ({spec.adc_bits} bits, {spec.adc_range} full scale): simulator vs golden output SQNR "
            f"{m['sqnr_db']:.1f} dB" + (f", top-1 agreement {m['top1_agreement']:.3f}" if "top1_agreement" in m else ""))
    if not section["meets_threshold"]:
        extra = f", top-1 agreement {m['top1_agreement']:.3f}" if "top1_agreement" in m else ""
        hint = ("use more --target-pim-psq-adc-bits" if spec.adc_range == "calibrated" else
                "use --target-pim-psq-adc-range calibrated or more --target-pim-psq-adc-bits")
        ctx.warn(f"warning: the {spec.adc_bits}-bit ADC ({spec.adc_range} full scale) makes the simulated model far "
                 f"from golden on {section['check_inputs']}: output SQNR {m['sqnr_db']:.1f} dB{extra} < "
                 f"{ADC_MIN_SQNR_DB:g} dB; {hint}; check with `tvmc run --verify` on real inputs")


def _fractions(spec, layers: list[dict]) -> dict[str, float]:
    """Quantiles of calibrated full scale / worst-case full scale over every calibrated crossbar read."""
    r = []
    for lay in layers:
        for t in lay["tiles"]:
            if "adc_full_scale" in t:
                peak = int(t["nrows"]) * ((1 << spec.dac_bits) - 1) * ((1 << spec.cell_bits) - 1)
                r.extend((np.asarray(t["adc_full_scale"], np.float64) / peak).ravel().tolist())
    if not r:
        return {}
    q = np.quantile(np.asarray(r), [0.0, 0.5, 1.0])
    return {"min": float(q[0]), "median": float(q[1]), "max": float(q[2])}
