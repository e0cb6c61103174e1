"""``tvmc``: compile ONNX models for crossbar PIM (pim-psq) or llvm, run and inspect the packages.

Follows the conventions of TVM's former tvmc (removed from TVM's PyPI wheels):
``tvmc compile --target pim-psq MODEL.onnx -o OUT.tar``, ``tvmc run OUT.tar --inputs IN.npz``,
``tvmc report OUT.tar``.  Progress goes to stderr; any failure prints one line
``tvmc: error: ...`` and exits non-zero (codes in :data:`EXIT_CODES`); ``--debug`` shows the traceback.
SIGINT and SIGTERM end the command cleanly: temporaries are removed, exit 130 / 143.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Sequence

import numpy as np

from .core.crossbar import DEFAULT_PRESET, PRESETS
from .core.quant import DEFAULT_ROUNDING, ROUNDINGS
from .core.search import DEFAULT_GRANULARITY, DEFAULT_OBJECTIVE, GRANULARITIES, OBJECTIVES
from .core.sensitivity import DEFAULT_BIAS_CORRECTION
from .targets.fidelity import DEFAULT_MIN_FIDELITY
from .targets.pipeline import STAT_SOURCES

_SPEC_HELP = {
    "rows": "wordlines (inputs) per crossbar",
    "cols": "bitlines (outputs) per crossbar",
    "cell_bits": "bits stored per cell",
    "encoding": "signed-weight encoding: offset (ISAAC) or differential (+/- arrays)",
    "dac_bits": "input bits applied per cycle (bit-serial inputs)",
    "act_bits": "activation precision in bits",
    "adc_bits": "ADC resolution in bits, or 'none' for lossless",
    "adc_range": "full scale of a lossy ADC: calibrated (per crossbar, from the bitline sums on data-free inputs; "
                 "the default) or worst (the worst-case sum, never clips)",
    "weight_bits": "candidate weight bitwidths the search may choose, e.g. '2-8' or '2,4,8'",
    "baseline_bits": "uniform bitwidth of the design's own baseline",
}


#: exit codes of tvmc (also in `tvmc --help` and the README)
EXIT_CODES = {0: "success", 1: "error (one line 'tvmc: error: ...')", 2: "bad command line",
              3: "run --verify: the simulator does not match golden where the spec makes it exact",
              4: "run --verify --max-loss: the compiled model is further from float than allowed",
              5: "run/report --expect-digest: the package's digest differs",
              130: "interrupted (Ctrl-C, SIGINT)", 141: "stdout closed early (e.g. `tvmc report pkg | head`)",
              143: "terminated (SIGTERM)"}


class CLIError(Exception):
    pass


EXIT_DIGEST = 5     # --expect-digest: the package is not the one expected


def _digest_arg(v: str) -> str:
    if len(v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v):
        raise argparse.ArgumentTypeError(f"{v!r} is not a sha256 digest (64 hex digits, as compile prints it)")
    return v.lower()


def _add_expect_digest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expect-digest", type=_digest_arg, metavar="HEX",
                   help="refuse the package (exit code 5) unless the sha256 of the whole .tar is HEX, the digest "
                   "`tvmc compile` printed (= `sha256sum PACKAGE`); checked before anything else is read")


class _Parser(argparse.ArgumentParser):
    """argparse with tvmc's one-line error convention (``tvmc: error: ...``, exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"tvmc: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib import metadata

    from . import __version__

    try:
        tvm = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        tvm = "not installed"
    return f"tvmc (psq-tvm) {__version__}, apache-tvm {tvm}, python {sys.version.split()[0]}"


def _progress(quiet: bool):
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if not quiet:
            print(f"tvmc: [{time.perf_counter() - t0:6.2f}s] {msg}", file=sys.stderr, flush=True)
    return say


def _parser() -> argparse.ArgumentParser:
    from .targets.pim_psq import SPEC_OPTIONS, TARGETS

    p = _Parser(
        prog="tvmc", description="Compile ONNX models for crossbar processing-in-memory (target pim-psq: PSQ "
        "per-tile scale and bitwidth, crossbar programming tables) or for the host (llvm); run and inspect "
        "the resulting packages.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback (and TVM's own "
                   "message) instead of the one-line error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="{compile,run,report}")

    c = sub.add_parser("compile", parents=[common], help="compile an ONNX model into a package (.tar)",
                       description="Compile an ONNX model into a package: host library, manifest.json, "
                       "crossbar level blobs and the report (format: docs/package_format.md).")
    c.add_argument("FILE", help="ONNX model file")
    c.add_argument("-o", "--output", default="module.tar", help="output package path (default: module.tar)")
    c.add_argument("--target", default="pim-psq", choices=TARGETS,
                   help="pim-psq: PIM layers on crossbars, rest on llvm (default); llvm: plain host build")
    c.add_argument("--input-shapes", metavar="SHAPES",
                   help="input shapes, e.g. \"input:[1,3,224,224]\" (several separated by spaces); needed for "
                   "symbolic dims other than a leading batch dim (which defaults to 1)")
    c.add_argument("--target-pim-psq-preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"crossbar preset the options below override (default: {DEFAULT_PRESET})")
    for f in SPEC_OPTIONS:
        c.add_argument(f"--target-pim-psq-{f.replace('_', '-')}", dest=f"spec_{f}", metavar="VALUE",
                       help=f"crossbar option: {_SPEC_HELP.get(f, f)} (default: from the preset)")
    c.add_argument("--target-pim-psq-cost", metavar="FILE.json",
                   help="override the preset's hardware cost numbers (energy, latency, area; fields of "
                   "psq_tvm.core.cost.CostParams, e.g. {\"adc_pj\": {\"8\": 1.5}}); stored in the package")
    c.add_argument("--psq-objective", default=DEFAULT_OBJECTIVE, choices=list(OBJECTIVES),
                   help=f"per-tile distortion the search minimises (default: {DEFAULT_OBJECTIVE}; "
                   "why: README, 'Defaults')")
    c.add_argument("--psq-granularity", default=DEFAULT_GRANULARITY, choices=list(GRANULARITIES),
                   help="tile: one scale per crossbar tile; column: one scale per tile column (bitline), applied "
                   f"in the digital stage after the ADC at no crossbar cost (default: {DEFAULT_GRANULARITY})")
    c.add_argument("--psq-rounding", default=DEFAULT_ROUNDING, choices=list(ROUNDINGS),
                   help="how the integer levels are formed: nearest = round to nearest; balanced = then round the "
                   "fewest weights of each crossbar column the other way so that the column's rounding errors sum "
                   f"to at most half a level (SQuant-style; each weight moves by at most one level) "
                   f"(default: {DEFAULT_ROUNDING}; why: README, 'Defaults')")
    c.add_argument("--psq-sensitivity", default="none", choices=list(STAT_SOURCES),
                   help="how tile distortions are weighted in the whole-model budget: none = relative error per "
                   "layer; synthetic = weighted by each layer's input energy per row, estimated data-free from a "
                   "float run on seeded synthetic inputs; bn = the same energy from the BatchNorm before each layer "
                   "(the model's own statistics, propagated through ReLU/Clip/Add; layers without one get "
                   "weight 1); calib = measured on --calib-inputs (default: none)")
    c.add_argument("--psq-bias-correction", default=DEFAULT_BIAS_CORRECTION, choices=list(STAT_SOURCES),
                   help="data-free bias correction (DFQ): add -E[x]^T (W_q - W) to each PIM layer's bias, so the "
                   "quantisation error does not shift the expected output; input means E[x] from: synthetic = a "
                   "float run on seeded synthetic inputs; bn = the BatchNorm before each layer (layers without one "
                   "are not corrected); calib = measured on --calib-inputs. Stored as a separate bias_correction "
                   f"blob, applied in the sim, golden and fake-quant modes (default: {DEFAULT_BIAS_CORRECTION}: a "
                   "no-op for models without BatchNorm; why: README, 'Defaults')")
    c.add_argument("--psq-budget", metavar="KIND=VALUE",
                   help="whole-model budget: auto = the fewest crossbars whose fidelity (output SQNR against "
                   "float on data-free inputs, or --calib-inputs) meets --psq-min-fidelity; avg-bits=4.5, "
                   "crossbars=N or reduction=3.5 (x fewer crossbars than uniform 16-bit); hardware cost: "
                   "energy=UJ, latency=US, area=MM2 per inference, or energy-reduction=3 etc. (x less than "
                   "uniform 16-bit on the same cost numbers) (default: auto)")
    c.add_argument("--psq-tolerance", type=float, metavar="T",
                   help="instead of a budget: each tile takes the smallest bitwidth whose distortion is below T")
    c.add_argument("--psq-min-fidelity", metavar="F",
                   help="fidelity (output SQNR against float) the auto budget must meet, and below which compile "
                   "warns: an SQNR in dB, rtn8 (the output SQNR of per-output-channel 8-bit round-to-nearest on the "
                   "same inputs), rtn8-D / rtn8+D (D dB below / above it), or several of these comma separated: the "
                   f"lowest counts (default: {DEFAULT_MIN_FIDELITY}; why: README, 'Defaults')")
    c.add_argument("--calib-inputs", metavar="IN.npz",
                   help="a few real, unlabelled inputs (one array [n, ...] per model input name, or a single array): "
                   "the fidelity guard and the auto budget measure on them instead of synthetic inputs; they feed "
                   "the search only with --psq-sensitivity/--psq-bias-correction calib")
    c.add_argument("--psq-bits", metavar="BITS", help="candidate bitwidths for the search, e.g. '2-8' (default: "
                   "the spec's weight_bits)")
    c.add_argument("--emit-c-header", nargs="?", const=True, default=False, metavar="PATH.h",
                   help="write the tables for a C driver next to the package: PATH.h (declarations), PATH.c "
                   "(the tables) and, for large models, PATH_cells.bin (the cell levels); default PATH: the "
                   "package's path without .tar (docs/package_format.md, 'C output')")
    c.add_argument("--no-float-weights", action="store_true",
                   help="do not store the original float weights (then `tvmc run --mode float` is unavailable)")
    c.add_argument("--no-fold-batchnorm", action="store_true",
                   help="keep BatchNormalization on the host instead of folding it into the preceding conv's "
                   "weights and bias before quantisation (default: fold)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr (warnings still)")

    r = sub.add_parser("run", parents=[common], help="run a compiled package on inputs from an .npz file",
                       description="Run a package. PIM layers execute in the chosen mode; host layers in the "
                       "package's llvm library.")
    r.add_argument("PACKAGE", help="package .tar from `tvmc compile`. It contains native code (host_library.so) "
                   "that run loads: run only packages from a trusted source (see --expect-digest)")
    _add_expect_digest(r)
    r.add_argument("--inputs", metavar="IN.npz", help="inputs, one array per model input name (a single-input "
                   "model takes any one array; extra leading samples are run in compiled-batch chunks; an array "
                   "named 'labels' gives accuracy). Without it, seeded random inputs are used.")
    r.add_argument("--outputs", metavar="OUT.npz", help="write outputs here (output_0, output_1, ...)")
    r.add_argument("--print-top", type=int, metavar="N", help="print the top-N classes of the first output")
    r.add_argument("--mode", default=None, choices=["sim", "golden", "fake-quant", "float"],
                   help="sim: functional crossbar simulator; fake-quant: weights decoded from the crossbar cells, "
                   "float activations; golden: fake-quantised weights and activations in float64 (the simulator's "
                   "reference); float: the original float weights (default: sim when the simulator is "
                   "available, else fake-quant)")
    r.add_argument("--verify", action="store_true",
                   help="run the inputs three ways (float, golden fake-quantised float64, simulator), print "
                   "sim vs golden and vs float errors, cosine similarity and top-1 agreement, and per-layer "
                   "errors; exit code 3 if sim does not match golden within what the spec implies (exact up "
                   "to float32 rounding for a lossless ADC without non-idealities)")
    r.add_argument("--max-loss", metavar="KIND=VALUE",
                   help="with --verify: exit code 4 when the simulated model is further from float than VALUE on "
                   "these inputs: top1=0.01 (at most 1 %% of items change their top-1 class), cosine=0.001 "
                   "(1 - cosine of all outputs), accuracy=0.005 (accuracy drop; needs labels)")
    sim = r.add_argument_group("simulator options (mode sim; device non-idealities are off by default, seeded)")
    sim.add_argument("--sim-act-bits", type=int, metavar="N", help="activation bits (default: the spec's act_bits)")
    sim.add_argument("--sim-adc-full-scale", type=float, metavar="V",
                     help="one ADC full scale for every read, in bitline-sum units (default: each crossbar's calibrated "
                     "full scale stored in the package, else the worst-case peak)")
    sim.add_argument("--sim-force-bitserial", action="store_true",
                     help="always run the bit-serial per-cycle path (default: exact matmul path when the ADC is lossless)")
    sim.add_argument("--sim-conductance-sigma", type=float, metavar="S",
                     help="programmed-conductance variation, relative sigma per cell")
    sim.add_argument("--sim-stuck-at-min", type=float, metavar="RATE", help="stuck-at-min (level 0) cell rate")
    sim.add_argument("--sim-stuck-at-max", type=float, metavar="RATE", help="stuck-at-max cell rate")
    sim.add_argument("--sim-adc-offset", type=float, metavar="LSB", help="ADC offset in LSBs")
    sim.add_argument("--sim-seed", type=int, metavar="N", help="seed of the non-idealities (default 0)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")

    rp = sub.add_parser("report", parents=[common],
                        help="per-layer tiles, bitwidths and crossbars vs. baselines of a package")
    rp.add_argument("PACKAGE", help="package .tar from `tvmc compile` (report never loads its host library)")
    _add_expect_digest(rp)
    rp.add_argument("--json", action="store_true", help="print the report as JSON")
    rp.add_argument("--plot", metavar="FILE.png", help="draw bitwidths per layer/tile and crossbars per layer")
    rp.add_argument("--cost", metavar="FILE.json", help="recompute energy/latency/area from the package with these "
                    "cost numbers over the stored ones (fields of psq_tvm.core.cost.CostParams)")
    return p


# ------------------------------------------------------------------ compile
def cmd_compile(a) -> int:
    from .api import compile as psq_compile
    from .runtime.files import check_output_path
    from .targets.pim_psq import SPEC_OPTIONS
    from .targets.pipeline import require_c_compiler

    say = _progress(a.quiet)
    overrides = {f: getattr(a, f"spec_{f}") for f in SPEC_OPTIONS if getattr(a, f"spec_{f}") is not None}
    if a.target == "llvm" and (overrides or a.psq_budget or a.psq_tolerance is not None or a.psq_bits):
        say("note: --target llvm ignores the crossbar and PSQ options")
    if not a.output:
        raise CLIError("-o/--output must name the package file")
    check_output_path(a.output, "-o/--output")        # before the compile, not after it
    if isinstance(a.emit_c_header, str) and not a.emit_c_header.endswith(".h"):
        raise CLIError(f"--emit-c-header {a.emit_c_header}: name the header, PATH.h (PATH.c and, for large models, "
                       "PATH_cells.bin are written next to it)")
    if isinstance(a.emit_c_header, str):
        check_output_path(a.emit_c_header, "--emit-c-header")
    if not os.path.exists(a.FILE):
        raise CLIError(f"model file {a.FILE!r} does not exist")
    require_c_compiler()
    calib = _read_npz(a.calib_inputs, "--calib-inputs")[0] if a.calib_inputs else None
    pkg = psq_compile(a.FILE, a.target, input_shapes=a.input_shapes, preset=a.target_pim_psq_preset,
                      objective=a.psq_objective, granularity=a.psq_granularity, rounding=a.psq_rounding,
                      sensitivity=a.psq_sensitivity,
                      bias_correction=a.psq_bias_correction, budget=a.psq_budget, tolerance=a.psq_tolerance,
                      bits=a.psq_bits, min_fidelity=a.psq_min_fidelity, calib_inputs=calib,
                      float_weights=not a.no_float_weights,
                      fold_batchnorm=not a.no_fold_batchnorm, cost=a.target_pim_psq_cost, progress=say,
                      warn=lambda msg: print(f"tvmc: {msg}", file=sys.stderr, flush=True), **overrides)
    pkg.save(a.output)
    if a.emit_c_header:
        from .targets.c_header import write_c_output
        base = a.output[:-4] if a.output.endswith(".tar") else a.output
        for p in write_c_output(pkg, a.emit_c_header if isinstance(a.emit_c_header, str) else base + ".h"):
            say(f"wrote {p}")
    rep = pkg.report
    if a.target == "pim-psq" and rep.get("reduction_vs_uniform16") is not None:
        c = rep["crossbars"]
        say(f"{rep['n_pim_layers']} PIM layers, {rep['n_host_layers']} host; crossbars PSQ {c['psq']} vs uniform16 "
            f"{c['uniform16']} ({rep['reduction_vs_uniform16']:.2f}x), uniform8 {c['uniform8']} "
            f"({rep['reduction_vs_uniform8']:.2f}x); avg bits {rep['avg_bits']:.2f}")
    say(f"wrote {a.output}")
    print(f"sha256 {pkg.digest}  {a.output}")
    return 0


# ---------------------------------------------------------------------- run
def _default_mode() -> str:
    try:
        from .runtime import simulator  # noqa: F401
        return "sim"
    except ImportError:
        return "fake-quant"


def _read_npz(path: str, what: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Arrays of an .npz file (``labels`` split off), with clear errors."""
    if not os.path.exists(path):
        raise CLIError(f"{what} file {path!r} does not exist")
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise CLIError(f"cannot read {what} {path!r} as .npz: {e}") from None
    return data, data.pop("labels", None)


def _load_inputs(pkg, path: str | None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    info = pkg.manifest.get("inputs", [])
    if path is None:
        from .frontend.input_ranges import synthetic_inputs
        ranges = {i["name"]: int(i["index_range"]) for i in info if i.get("index_range")}
        arrs = synthetic_inputs(info, ranges, np.random.default_rng(0))
        return {i["name"]: a for i, a in zip(info, arrs)}, None
    data, labels = _read_npz(path, "inputs")
    names = [i["name"] for i in info]
    if all(n in data for n in names):
        return {n: data[n] for n in names}, labels
    if len(names) == 1 and len(data) == 1:
        return {names[0]: next(iter(data.values()))}, labels
    raise CLIError(f"inputs {path!r} has arrays {sorted(data)}; the model takes {names}")


def cmd_run(a) -> int:
    from .runtime.files import check_output_path, write_with
    from .runtime.package import cast_input, load

    say = _progress(a.quiet)
    if a.outputs:
        check_output_path(a.outputs, "--outputs")
    pkg = load(a.PACKAGE, a.expect_digest)
    mode = a.mode or _default_mode()
    inputs, labels = _load_inputs(pkg, a.inputs)
    info = pkg.manifest["inputs"]
    for i in info:                  # a cast that keeps the values is done and said; any other is an error
        inputs[i["name"]], note = cast_input(inputs[i["name"]], i["dtype"], i["name"])
        if note and not a.quiet:
            print(f"tvmc: note: {note}", file=sys.stderr, flush=True)
    say(f"running {a.PACKAGE} in mode {mode}")
    batched = (len(info) == 1 and inputs[info[0]["name"]].ndim == len(info[0]["shape"])
               and list(inputs[info[0]["name"]].shape[1:]) == list(info[0]["shape"][1:])
               and inputs[info[0]["name"]].shape[0] != info[0]["shape"][0])
    sim_options = _sim_options(a)
    if batched:
        outs = [pkg.run_batched(inputs[info[0]["name"]], mode, sim_options)]
    else:
        outs = pkg.run(inputs, mode, sim_options)
    if a.outputs:
        write_with(a.outputs, lambda f: np.savez(f, **{f"output_{k}": o for k, o in enumerate(outs)}),
                   suffix=".npz.tmp", what="--outputs")
        say(f"wrote {a.outputs}")
    for k, o in enumerate(outs):
        bad = int(o.size - np.count_nonzero(np.isfinite(o))) if o.dtype.kind == "f" else 0
        if bad:
            print(f"tvmc: warning: output_{k} has {bad} NaN/Inf value(s): the weights or inputs exceed the float32 "
                  "range in some layer; check the model's weights and the inputs' scale", file=sys.stderr)
    first = outs[0]
    if a.print_top:
        scores = first.reshape(first.shape[0], -1) if first.ndim > 1 else first[None]
        for s, row in enumerate(scores[:5]):
            top = np.argsort(-row, kind="stable")[:a.print_top]
            print(f"sample {s}: " + "  ".join(f"class {int(k)}: {row[k]:.4f}" for k in top))
    if labels is not None and first.ndim == 2 and len(labels) == len(first):
        acc = float((first.argmax(1) == np.asarray(labels)).mean())
        print(f"accuracy ({mode}): {acc:.4f} on {len(labels)} samples")
    if not a.print_top and not a.outputs and labels is None:
        for k, o in enumerate(outs):
            print(f"output_{k}: shape {list(o.shape)} dtype {o.dtype} mean {float(o.mean()):.6g} "
                  f"max|.| {float(np.abs(o).max()):.6g}")
    if a.verify or a.max_loss:
        return verify(pkg, inputs, batched, sim_options, a.max_loss, labels)
    return 0


def _sim_options(a):
    """SimOptions from the --sim-* flags (None when none is given)."""
    fields = ("act_bits", "adc_full_scale", "conductance_sigma", "stuck_at_min", "stuck_at_max", "adc_offset", "seed")
    given = {f: getattr(a, f"sim_{f}") for f in fields if getattr(a, f"sim_{f}") is not None}
    if a.sim_force_bitserial:
        given["force_bitserial"] = True
    if not given:
        return None
    from .runtime.simulator import SimOptions
    return SimOptions(**given)


def verify(pkg, inputs: dict, batched: bool, sim_options=None, max_loss: str | None = None, labels=None) -> int:
    """--verify: float, golden (fake-quantised, float64) and simulator; exit code 3 when sim does not match
    golden where it must, 4 when --max-loss is exceeded."""
    from .runtime.verify import verify_package

    code, lines = verify_package(pkg, inputs, batched, sim_options, max_loss, labels)
    print("\n".join(lines))
    return code


# ------------------------------------------------------------------- report
def cmd_report(a) -> int:
    from .runtime.package import load
    from .core.report import format_table, plot
    from .runtime.files import check_output_path, write_with

    if a.plot:
        check_output_path(a.plot, "--plot")
    pkg = load(a.PACKAGE, a.expect_digest)
    rep = pkg.report
    if a.cost and pkg.layers:
        from .core.cost import cost_from_manifest

        rep["cost"] = cost_from_manifest(pkg.manifest, a.cost)
    if a.json:
        print(json.dumps(dict(rep, package_sha256=pkg.digest), indent=1, sort_keys=True))
    else:
        print(f"package {a.PACKAGE}: model {pkg.manifest.get('model')}, target {pkg.manifest.get('target')}, "
              f"spec {pkg.spec.name} ({pkg.spec.rows}x{pkg.spec.cols}, {pkg.spec.cell_bits}-bit cells, "
              f"{pkg.spec.encoding})")
        print(f"digest: sha256 {pkg.digest} (of the whole .tar; check with --expect-digest)")
        print(format_table(rep))
    if a.plot:
        fmt = os.path.splitext(a.plot)[1][1:].lower() or "png"
        write_with(a.plot, lambda f: plot(rep, f, fmt), suffix=f".{fmt}.tmp", what="--plot")
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


class _Signalled(KeyboardInterrupt):
    """Raised by the SIGINT/SIGTERM handler, so cleanup (``finally``, temporaries) runs as for Ctrl-C."""


_signals: list[int] = []


def _on_signal(signum, frame) -> None:
    _signals.append(signum)
    if len(_signals) == 1:          # later signals only record: they must not interrupt the cleanup
        raise _Signalled(signum)


def _interrupted_exit() -> int:
    if _signals and _signals[0] == signal.SIGTERM:
        print("tvmc: error: interrupted (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    print("tvmc: error: interrupted; nothing was written", file=sys.stderr)
    return 130


#: TVM's advice inside printed IR, meaningless to a tvmc user
_TVM_NOISE = "# Metadata omitted. Use show_meta=True in script() method to show it."


def _error_line(e: BaseException) -> str:
    """One line saying what went wrong; TVM's C++ stack traces only with --debug."""
    text = str(e).replace(_TVM_NOISE, "")
    if "Stack trace" in text or "Traceback" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        body = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "Stack trace", "[bt]"))
                and not ln[:1].isdigit()]
        return f"{body[-1] if body else type(e).__name__} (run with --debug for the full message)"
    return " ".join(text.split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from .runtime.package import DigestMismatch

    parser = _parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(a, "debug", False) or os.environ.get("PSQ_TVM_TRACEBACK"))
    _signals.clear()
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is signal.SIG_IGN:     # e.g. a background job of a script: keep it ignored
            continue
        try:
            old[sig] = signal.signal(sig, _on_signal)
        except ValueError:          # not the main thread: leave the handlers alone
            pass
    try:
        rc = {"compile": cmd_compile, "run": cmd_run, "report": cmd_report}[a.command](a)
        sys.stdout.flush()          # a closed pipe shows here, not at interpreter exit
        return rc
    except KeyboardInterrupt:
        return _interrupted_exit()
    except BrokenPipeError:         # `tvmc report pkg | head`: the reader left; end quietly, as unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except DigestMismatch as e:
        if debug:
            raise
        print(f"tvmc: error: {_error_line(e)}", file=sys.stderr)
        return EXIT_DIGEST
    except Exception as e:
        if _signals:                # interrupted inside TVM: it re-raised the KeyboardInterrupt as its own error
            return _interrupted_exit()
        if debug:
            raise
        print(f"tvmc: error: {_error_line(e)}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
