"""Fast unit tests of ``psq_tvm/cli.py`` (no TVM compile; the whole file runs in seconds).

What the CLI passes on to the API and the loaders is checked with recorders monkeypatched in their
place (``psq_tvm.api.compile``, ``psq_tvm.runtime.package.load``, ``verify_package``, the report's
``format_table``/``plot``/``cost_from_manifest``, ``write_c_output``), and the exit codes and messages
it makes of what they return or raise.  Expected values are written out by hand.  The end-to-end CLI
tests (real compiles) are tests/test_cli.py, tests/test_cli_options.py and tests/test_reliability.py;
this file is what ``make mutation`` runs against cli.py (scripts/mutation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("tvm")

import psq_tvm
import psq_tvm.api
from psq_tvm import cli
from psq_tvm.cli import CLIError, main
from psq_tvm.runtime import package as package_mod
from psq_tvm.runtime.package import DigestMismatch
from psq_tvm.runtime.simulator import SimOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGEST = "0123456789abcdef" * 4
SPEC_FIELDS = ("rows", "cols", "cell_bits", "encoding", "dac_bits", "act_bits", "adc_bits", "weight_bits",
               "baseline_bits", "adc_range")


def parse(*argv):
    return cli._parser().parse_args([str(x) for x in argv])


def run_main(capsys, *argv):
    rc = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def clock(monkeypatch):
    """A stopped clock for the progress lines: every ``[  0.00s]``."""
    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=lambda: 0.0))


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch):
    monkeypatch.delenv("PSQ_TVM_TRACEBACK", raising=False)


# ------------------------------------------------------------------ the parser
SUBCOMMANDS = ("compile", "run", "report")

#: (subcommand, dest) -> (option strings, default, type, choices, metavar); "digest" = cli._digest_arg
SURFACE = {
    ("", "debug"): (["--debug"], False, None, None, None),
    ("compile", "debug"): (["--debug"], argparse.SUPPRESS, None, None, None),
    ("compile", "FILE"): ([], None, None, None, None),
    ("compile", "output"): (["-o", "--output"], "module.tar", None, None, None),
    ("compile", "target"): (["--target"], "pim-psq", None, ["pim-psq", "llvm"], None),
    ("compile", "input_shapes"): (["--input-shapes"], None, None, None, "SHAPES"),
    ("compile", "target_pim_psq_preset"): (["--target-pim-psq-preset"], "isaac", None,
                                           ["isaac", "mnsim", "neurosim", "prime", "puma"], None),
    ("compile", "spec_rows"): (["--target-pim-psq-rows"], None, None, None, "VALUE"),
    ("compile", "spec_cols"): (["--target-pim-psq-cols"], None, None, None, "VALUE"),
    ("compile", "spec_cell_bits"): (["--target-pim-psq-cell-bits"], None, None, None, "VALUE"),
    ("compile", "spec_encoding"): (["--target-pim-psq-encoding"], None, None, None, "VALUE"),
    ("compile", "spec_dac_bits"): (["--target-pim-psq-dac-bits"], None, None, None, "VALUE"),
    ("compile", "spec_act_bits"): (["--target-pim-psq-act-bits"], None, None, None, "VALUE"),
    ("compile", "spec_adc_bits"): (["--target-pim-psq-adc-bits"], None, None, None, "VALUE"),
    ("compile", "spec_weight_bits"): (["--target-pim-psq-weight-bits"], None, None, None, "VALUE"),
    ("compile", "spec_baseline_bits"): (["--target-pim-psq-baseline-bits"], None, None, None, "VALUE"),
    ("compile", "spec_adc_range"): (["--target-pim-psq-adc-range"], None, None, None, "VALUE"),
    ("compile", "target_pim_psq_cost"): (["--target-pim-psq-cost"], None, None, None, "FILE.json"),
    ("compile", "psq_objective"): (["--psq-objective"], "mse", None, ["mse", "cdf-kl"], None),
    ("compile", "psq_granularity"): (["--psq-granularity"], "column", None, ["tile", "column"], None),
    ("compile", "psq_rounding"): (["--psq-rounding"], "balanced", None, ["nearest", "balanced"], None),
    ("compile", "psq_sensitivity"): (["--psq-sensitivity"], "none", None,
                                     ["none", "synthetic", "bn", "bn+synthetic", "calib"], None),
    ("compile", "psq_bias_correction"): (["--psq-bias-correction"], "bn+synthetic", None,
                                         ["none", "synthetic", "bn", "bn+synthetic", "calib"], None),
    ("compile", "psq_budget"): (["--psq-budget"], None, None, None, "KIND=VALUE"),
    ("compile", "psq_tolerance"): (["--psq-tolerance"], None, float, None, "T"),
    ("compile", "psq_min_fidelity"): (["--psq-min-fidelity"], None, None, None, "F"),
    ("compile", "calib_inputs"): (["--calib-inputs"], None, None, None, "IN.npz"),
    ("compile", "psq_bits"): (["--psq-bits"], None, None, None, "BITS"),
    ("compile", "emit_c_header"): (["--emit-c-header"], False, None, None, "PATH.h"),
    ("compile", "no_float_weights"): (["--no-float-weights"], False, None, None, None),
    ("compile", "no_fold_batchnorm"): (["--no-fold-batchnorm"], False, None, None, None),
    ("compile", "quiet"): (["-q", "--quiet"], False, None, None, None),
    ("run", "debug"): (["--debug"], argparse.SUPPRESS, None, None, None),
    ("run", "PACKAGE"): ([], None, None, None, None),
    ("run", "expect_digest"): (["--expect-digest"], None, "digest", None, "HEX"),
    ("run", "inputs"): (["--inputs"], None, None, None, "IN.npz"),
    ("run", "outputs"): (["--outputs"], None, None, None, "OUT.npz"),
    ("run", "print_top"): (["--print-top"], None, int, None, "N"),
    ("run", "mode"): (["--mode"], None, None, ["sim", "golden", "fake-quant", "float"], None),
    ("run", "verify"): (["--verify"], False, None, None, None),
    ("run", "max_loss"): (["--max-loss"], None, None, None, "KIND=VALUE"),
    ("run", "sim_act_bits"): (["--sim-act-bits"], None, int, None, "N"),
    ("run", "sim_adc_full_scale"): (["--sim-adc-full-scale"], None, float, None, "V"),
    ("run", "sim_force_bitserial"): (["--sim-force-bitserial"], False, None, None, None),
    ("run", "sim_conductance_sigma"): (["--sim-conductance-sigma"], None, float, None, "S"),
    ("run", "sim_stuck_at_min"): (["--sim-stuck-at-min"], None, float, None, "RATE"),
    ("run", "sim_stuck_at_max"): (["--sim-stuck-at-max"], None, float, None, "RATE"),
    ("run", "sim_adc_offset"): (["--sim-adc-offset"], None, float, None, "LSB"),
    ("run", "sim_seed"): (["--sim-seed"], None, int, None, "N"),
    ("run", "quiet"): (["-q", "--quiet"], False, None, None, None),
    ("report", "debug"): (["--debug"], argparse.SUPPRESS, None, None, None),
    ("report", "PACKAGE"): ([], None, None, None, None),
    ("report", "expect_digest"): (["--expect-digest"], None, "digest", None, "HEX"),
    ("report", "json"): (["--json"], False, None, None, None),
    ("report", "plot"): (["--plot"], None, None, None, "FILE.png"),
    ("report", "cost"): (["--cost"], None, None, None, "FILE.json"),
}

#: (subcommand, dest) -> help text.  The help is the CLI's documentation: a change here is deliberate.
HELP = {
    # tvmc
    ('', 'debug'): "on an error, show the Python traceback (and TVM's own message) instead of the one-line error",
    # compile
    ('compile', 'debug'): argparse.SUPPRESS,
    ('compile', 'FILE'): 'ONNX model file',
    ('compile', 'output'): 'output package path (default: module.tar)',
    ('compile', 'target'): 'pim-psq: PIM layers on crossbars, rest on llvm (default); llvm: plain host build',
    ('compile', 'input_shapes'):
        ('input shapes, e.g. "input:[1,3,224,224]" (several separated by spaces); needed for symbolic dims '
         'other than a leading batch dim (which defaults to 1)'),
    ('compile', 'target_pim_psq_preset'): 'crossbar preset the options below override (default: isaac)',
    ('compile', 'spec_rows'): 'crossbar option: wordlines (inputs) per crossbar (default: from the preset)',
    ('compile', 'spec_cols'): 'crossbar option: bitlines (outputs) per crossbar (default: from the preset)',
    ('compile', 'spec_cell_bits'): 'crossbar option: bits stored per cell (default: from the preset)',
    ('compile', 'spec_encoding'):
        ('crossbar option: signed-weight encoding: offset (ISAAC) or differential (+/- arrays) (default: from '
         'the preset)'),
    ('compile', 'spec_dac_bits'):
        ('crossbar option: input bits applied per cycle (bit-serial inputs) (default: from the preset)'),
    ('compile', 'spec_act_bits'): 'crossbar option: activation precision in bits (default: from the preset)',
    ('compile', 'spec_adc_bits'):
        ("crossbar option: ADC resolution in bits, or 'none' for lossless (default: from the preset)"),
    ('compile', 'spec_weight_bits'):
        ("crossbar option: candidate weight bitwidths the search may choose, e.g. '2-8' or '2,4,8' (default: "
         'from the preset)'),
    ('compile', 'spec_baseline_bits'):
        ("crossbar option: uniform bitwidth of the design's own baseline (default: from the preset)"),
    ('compile', 'spec_adc_range'):
        ('crossbar option: full scale of a lossy ADC: calibrated (per crossbar, from the bitline sums on '
         'data-free inputs; the default) or worst (the worst-case sum, never clips) (default: from the preset)'),
    ('compile', 'target_pim_psq_cost'):
        ("override the preset's hardware cost numbers (energy, latency, area; fields of "
         'psq_tvm.core.cost.CostParams, e.g. {"adc_pj": {"8": 1.5}}); stored in the package'),
    ('compile', 'psq_objective'):
        ("per-tile distortion the search minimises (default: mse; why: README, 'Defaults')"),
    ('compile', 'psq_granularity'):
        ('tile: one scale per crossbar tile; column: one scale per tile column (bitline), applied in the '
         'digital stage after the ADC at no crossbar cost (default: column)'),
    ('compile', 'psq_rounding'):
        ('how the integer levels are formed: nearest = round to nearest; balanced = then round the fewest '
         "weights of each crossbar column the other way so that the column's rounding errors sum to at most "
         'half a level (SQuant-style; each weight moves by at most one level) (default: balanced; why: README,'
         " 'Defaults')"),
    ('compile', 'psq_sensitivity'):
        ('how tile distortions are weighted in the whole-model budget: none = relative error per layer; '
         "synthetic = weighted by each layer's input energy per row, estimated data-free from a float run on "
         "seeded synthetic inputs; bn = the same energy from the BatchNorm before each layer (the model's own "
         'statistics, propagated through ReLU/Clip/Add; layers without one get weight 1); calib = measured on '
         '--calib-inputs (default: none)'),
    ('compile', 'psq_bias_correction'):
        ("data-free bias correction (DFQ): add -E[x]^T (W_q - W) to each PIM layer's bias, so the quantisation"
         ' error does not shift the expected output; input means E[x] from: synthetic = a float run on seeded '
         'synthetic inputs; bn = the BatchNorm before each layer (layers without one are not corrected); calib'
         ' = measured on --calib-inputs. Stored as a separate bias_correction blob, applied in the sim, golden'
         ' and fake-quant modes (default: bn+synthetic: a no-op for models without BatchNorm; why: README, '
         "'Defaults')"),
    ('compile', 'psq_budget'):
        ('whole-model budget: auto = the fewest crossbars whose fidelity (output SQNR against float on '
         'data-free inputs, or --calib-inputs) meets --psq-min-fidelity; avg-bits=4.5, crossbars=N or '
         'reduction=3.5 (x fewer crossbars than uniform 16-bit); hardware cost: energy=UJ, latency=US, '
         'area=MM2 per inference, or energy-reduction=3 etc. (x less than uniform 16-bit on the same cost '
         'numbers) (default: auto)'),
    ('compile', 'psq_tolerance'):
        ('instead of a budget: each tile takes the smallest bitwidth whose distortion is below T'),
    ('compile', 'psq_min_fidelity'):
        ('fidelity (output SQNR against float) the auto budget must meet, and below which compile warns: an '
         'SQNR in dB, rtn8 (the output SQNR of per-output-channel 8-bit round-to-nearest on the same inputs), '
         'rtn8-D / rtn8+D (D dB below / above it), or several of these comma separated: the lowest counts '
         "(default: 23,rtn8-2; why: README, 'Defaults')"),
    ('compile', 'calib_inputs'):
        ('a few real, unlabelled inputs (one array [n, ...] per model input name, or a single array): the '
         'fidelity guard and the auto budget measure on them instead of synthetic inputs; they feed the search'
         ' only with --psq-sensitivity/--psq-bias-correction calib'),
    ('compile', 'psq_bits'): "candidate bitwidths for the search, e.g. '2-8' (default: the spec's weight_bits)",
    ('compile', 'emit_c_header'):
        ('write the tables for a C driver next to the package: PATH.h (declarations), PATH.c (the tables) and,'
         " for large models, PATH_cells.bin (the cell levels); default PATH: the package's path without .tar "
         "(docs/package_format.md, 'C output')"),
    ('compile', 'no_float_weights'):
        ('do not store the original float weights (then `tvmc run --mode float` is unavailable)'),
    ('compile', 'no_fold_batchnorm'):
        ("keep BatchNormalization on the host instead of folding it into the preceding conv's weights and bias"
         ' before quantisation (default: fold)'),
    ('compile', 'quiet'): 'no progress messages on stderr (warnings still)',
    # run
    ('run', 'debug'): argparse.SUPPRESS,
    ('run', 'PACKAGE'):
        ('package .tar from `tvmc compile`. It contains native code (host_library.so) that run loads: run only'
         ' packages from a trusted source (see --expect-digest)'),
    ('run', 'expect_digest'):
        ('refuse the package (exit code 5) unless the sha256 of the whole .tar is HEX, the digest `tvmc '
         'compile` printed (= `sha256sum PACKAGE`); checked before anything else is read'),
    ('run', 'inputs'):
        ('inputs, one array per model input name (a single-input model takes any one array; extra leading '
         "samples are run in compiled-batch chunks; an array named 'labels' gives accuracy). Without it, "
         'seeded random inputs are used.'),
    ('run', 'outputs'): 'write outputs here (output_0, output_1, ...)',
    ('run', 'print_top'): 'print the top-N classes of the first output',
    ('run', 'mode'):
        ('sim: functional crossbar simulator; fake-quant: weights decoded from the crossbar cells, float '
         "activations; golden: fake-quantised weights and activations in float64 (the simulator's reference); "
         'float: the original float weights (default: sim when the simulator is available, else fake-quant)'),
    ('run', 'verify'):
        ('run the inputs three ways (float, golden fake-quantised float64, simulator), print sim vs golden and'
         ' vs float errors, cosine similarity and top-1 agreement, and per-layer errors; exit code 3 if sim '
         'does not match golden within what the spec implies (exact up to float32 rounding for a lossless ADC '
         'without non-idealities)'),
    ('run', 'max_loss'):
        ('with --verify: exit code 4 when the simulated model is further from float than VALUE on these '
         'inputs: top1=0.01 (at most 1 %% of items change their top-1 class), cosine=0.001 (1 - cosine of all '
         'outputs), accuracy=0.005 (accuracy drop; needs labels)'),
    ('run', 'sim_act_bits'): "activation bits (default: the spec's act_bits)",
    ('run', 'sim_adc_full_scale'):
        ("one ADC full scale for every read, in bitline-sum units (default: each crossbar's calibrated full "
         'scale stored in the package, else the worst-case peak)'),
    ('run', 'sim_force_bitserial'):
        ('always run the bit-serial per-cycle path (default: exact matmul path when the ADC is lossless)'),
    ('run', 'sim_conductance_sigma'): 'programmed-conductance variation, relative sigma per cell',
    ('run', 'sim_stuck_at_min'): 'stuck-at-min (level 0) cell rate',
    ('run', 'sim_stuck_at_max'): 'stuck-at-max cell rate',
    ('run', 'sim_adc_offset'): 'ADC offset in LSBs',
    ('run', 'sim_seed'): 'seed of the non-idealities (default 0)',
    ('run', 'quiet'): 'no progress messages on stderr',
    # report
    ('report', 'debug'): argparse.SUPPRESS,
    ('report', 'PACKAGE'): 'package .tar from `tvmc compile` (report never loads its host library)',
    ('report', 'expect_digest'):
        ('refuse the package (exit code 5) unless the sha256 of the whole .tar is HEX, the digest `tvmc '
         'compile` printed (= `sha256sum PACKAGE`); checked before anything else is read'),
    ('report', 'json'): 'print the report as JSON',
    ('report', 'plot'): 'draw bitwidths per layer/tile and crossbars per layer',
    ('report', 'cost'):
        ('recompute energy/latency/area from the package with these cost numbers over the stored ones (fields '
         'of psq_tvm.core.cost.CostParams)'),
}


def _subparsers(p):
    (sp,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return sp


def _options(p):
    return {a.dest: a for a in p._actions if a.dest not in ("help", "version", "command")}


def test_every_option_default_type_choices_metavar_and_help():
    p = cli._parser()
    sp = _subparsers(p)
    assert list(sp.choices) == list(SUBCOMMANDS)
    seen = {}
    for sub, parser in [("", p)] + [(n, sp.choices[n]) for n in SUBCOMMANDS]:
        for dest, a in _options(parser).items():
            typ = "digest" if a.type is cli._digest_arg else a.type
            seen[sub, dest] = (list(a.option_strings), a.default, typ,
                               None if a.choices is None else list(a.choices), a.metavar)
            assert a.help == HELP[sub, dest], (sub, dest)
    assert seen == SURFACE
    assert set(HELP) == set(SURFACE)
    # --emit-c-header takes an optional PATH.h: alone it means "next to the package"
    c = _options(sp.choices["compile"])["emit_c_header"]
    assert (c.nargs, c.const) == ("?", True)


def test_program_descriptions_and_exit_codes_in_the_help():
    p = cli._parser()
    assert p.prog == "tvmc"
    assert p.description == (
        "Compile ONNX models for crossbar processing-in-memory (target pim-psq: PSQ per-tile scale and "
        "bitwidth, crossbar programming tables) or for the host (llvm); run and inspect the resulting packages.")
    assert p.epilog == (
        "exit codes: 0 success; 1 error (one line 'tvmc: error: ...'); 2 bad command line; 3 run --verify: the "
        "simulator does not match golden where the spec makes it exact; 4 run --verify --max-loss: the compiled "
        "model is further from float than allowed; 5 run/report --expect-digest: the package's digest differs; "
        "130 interrupted (Ctrl-C, SIGINT); 141 stdout closed early (e.g. `tvmc report pkg | head`); 143 "
        "terminated (SIGTERM)")
    sp = _subparsers(p)
    assert sp.metavar == "{compile,run,report}"
    assert {a.dest: a.help for a in sp._choices_actions} == {
        "compile": "compile an ONNX model into a package (.tar)",
        "run": "run a compiled package on inputs from an .npz file",
        "report": "per-layer tiles, bitwidths and crossbars vs. baselines of a package"}
    assert sp.choices["compile"].description == (
        "Compile an ONNX model into a package: host library, manifest.json, crossbar level blobs and the report "
        "(format: docs/package_format.md).")
    assert sp.choices["run"].description == (
        "Run a package. PIM layers execute in the chosen mode; host layers in the package's llvm library.")
    assert sp.choices["report"].description is None
    assert [sp.choices[n].prog for n in SUBCOMMANDS] == ["tvmc compile", "tvmc run", "tvmc report"]
    # the simulator flags are shown in their own group of `tvmc run --help`
    groups = {g.title: [a.dest for a in g._group_actions] for g in sp.choices["run"]._action_groups}
    assert groups["simulator options (mode sim; device non-idealities are off by default, seeded)"] == [
        "sim_act_bits", "sim_adc_full_scale", "sim_force_bitserial", "sim_conductance_sigma", "sim_stuck_at_min",
        "sim_stuck_at_max", "sim_adc_offset", "sim_seed"]
    text = sp.choices["run"].format_help()
    assert "simulator options (mode sim;" in text and "--debug" not in text   # --debug: only in `tvmc --help`


def test_a_new_crossbar_field_gets_an_option(monkeypatch):
    """Every CrossbarSpec field is a --target-pim-psq-<field> option; one without a help text of its own is
    described by its name."""
    from psq_tvm.targets import pim_psq

    monkeypatch.setattr(pim_psq, "SPEC_OPTIONS", (*SPEC_FIELDS, "read_noise"))
    c = _options(_subparsers(cli._parser()).choices["compile"])["spec_read_noise"]
    assert c.option_strings == ["--target-pim-psq-read-noise"] and c.metavar == "VALUE"
    assert c.help == "crossbar option: read_noise (default: from the preset)"


COMPILE_DEFAULTS = {
    "command": "compile", "debug": False, "FILE": "m.onnx", "output": "module.tar", "target": "pim-psq",
    "input_shapes": None, "target_pim_psq_preset": "isaac", "spec_rows": None, "spec_cols": None,
    "spec_cell_bits": None, "spec_encoding": None, "spec_dac_bits": None, "spec_act_bits": None,
    "spec_adc_bits": None, "spec_weight_bits": None, "spec_baseline_bits": None, "spec_adc_range": None,
    "target_pim_psq_cost": None, "psq_objective": "mse", "psq_granularity": "column", "psq_rounding": "balanced",
    "psq_sensitivity": "none", "psq_bias_correction": "bn+synthetic", "psq_budget": None, "psq_tolerance": None,
    "psq_min_fidelity": None, "calib_inputs": None, "psq_bits": None, "emit_c_header": False,
    "no_float_weights": False, "no_fold_batchnorm": False, "quiet": False}
RUN_DEFAULTS = {
    "command": "run", "debug": False, "PACKAGE": "p.tar", "expect_digest": None, "inputs": None, "outputs": None,
    "print_top": None, "mode": None, "verify": False, "max_loss": None, "sim_act_bits": None,
    "sim_adc_full_scale": None, "sim_force_bitserial": False, "sim_conductance_sigma": None,
    "sim_stuck_at_min": None, "sim_stuck_at_max": None, "sim_adc_offset": None, "sim_seed": None, "quiet": False}
REPORT_DEFAULTS = {
    "command": "report", "debug": False, "PACKAGE": "p.tar", "expect_digest": None, "json": False, "plot": None,
    "cost": None}


@pytest.mark.parametrize("argv,want", [
    (["compile", "m.onnx"], COMPILE_DEFAULTS),
    (["compile", "m.onnx", "-o", "x.tar", "--target", "llvm", "--input-shapes", "x:[1,3]",
      "--target-pim-psq-preset", "prime", "--target-pim-psq-rows", "64", "--target-pim-psq-cols", "32",
      "--target-pim-psq-cell-bits", "1", "--target-pim-psq-encoding", "offset", "--target-pim-psq-dac-bits", "2",
      "--target-pim-psq-act-bits", "6", "--target-pim-psq-adc-bits", "none", "--target-pim-psq-weight-bits", "2-6",
      "--target-pim-psq-baseline-bits", "8", "--target-pim-psq-adc-range", "worst", "--target-pim-psq-cost",
      "c.json", "--psq-objective", "cdf-kl", "--psq-granularity", "tile", "--psq-rounding", "nearest",
      "--psq-sensitivity", "bn", "--psq-bias-correction", "calib", "--psq-budget", "avg-bits=4.5",
      "--psq-tolerance", "0.25", "--psq-min-fidelity", "rtn8-2", "--calib-inputs", "c.npz", "--psq-bits", "2-6",
      "--no-float-weights", "--no-fold-batchnorm", "--quiet", "--debug", "--emit-c-header"],
     dict(COMPILE_DEFAULTS, debug=True, output="x.tar", target="llvm", input_shapes="x:[1,3]",
          target_pim_psq_preset="prime", spec_rows="64", spec_cols="32", spec_cell_bits="1", spec_encoding="offset",
          spec_dac_bits="2", spec_act_bits="6", spec_adc_bits="none", spec_weight_bits="2-6",
          spec_baseline_bits="8", spec_adc_range="worst", target_pim_psq_cost="c.json", psq_objective="cdf-kl",
          psq_granularity="tile", psq_rounding="nearest", psq_sensitivity="bn", psq_bias_correction="calib",
          psq_budget="avg-bits=4.5", psq_tolerance=0.25, psq_min_fidelity="rtn8-2", calib_inputs="c.npz",
          psq_bits="2-6", no_float_weights=True, no_fold_batchnorm=True, quiet=True, emit_c_header=True)),
    (["compile", "m.onnx", "--emit-c-header", "t.h", "-q"], dict(COMPILE_DEFAULTS, emit_c_header="t.h", quiet=True)),
    (["--debug", "compile", "m.onnx"], dict(COMPILE_DEFAULTS, debug=True)),
    (["run", "p.tar"], RUN_DEFAULTS),
    (["run", "p.tar", "--expect-digest", DIGEST.upper(), "--inputs", "i.npz", "--outputs", "o.npz", "--print-top",
      "3", "--mode", "golden", "--verify", "--max-loss", "top1=0.01", "--sim-act-bits", "4", "--sim-adc-full-scale",
      "12.5", "--sim-force-bitserial", "--sim-conductance-sigma", "0.05", "--sim-stuck-at-min", "0.01",
      "--sim-stuck-at-max", "0.02", "--sim-adc-offset", "-0.5", "--sim-seed", "7", "-q", "--debug"],
     dict(RUN_DEFAULTS, debug=True, expect_digest=DIGEST, inputs="i.npz", outputs="o.npz", print_top=3,
          mode="golden", verify=True, max_loss="top1=0.01", sim_act_bits=4, sim_adc_full_scale=12.5,
          sim_force_bitserial=True, sim_conductance_sigma=0.05, sim_stuck_at_min=0.01, sim_stuck_at_max=0.02,
          sim_adc_offset=-0.5, sim_seed=7, quiet=True)),
    (["report", "p.tar"], REPORT_DEFAULTS),
    (["--debug", "report", "p.tar", "--expect-digest", DIGEST, "--json", "--plot", "r.png", "--cost", "c.json"],
     dict(REPORT_DEFAULTS, debug=True, expect_digest=DIGEST, json=True, plot="r.png", cost="c.json")),
])
def test_parsed_command_lines(argv, want):
    a = parse(*argv)
    assert vars(a) == want
    for k in ("psq_tolerance", "print_top", "sim_act_bits", "sim_seed", "sim_adc_full_scale"):
        if getattr(a, k, None) is not None:
            assert type(getattr(a, k)) is type(want[k]), k


@pytest.mark.parametrize("argv,message", [
    (["compile"], "the following arguments are required: FILE (see `tvmc compile --help`)"),
    (["run"], "the following arguments are required: PACKAGE (see `tvmc run --help`)"),
    (["report"], "the following arguments are required: PACKAGE (see `tvmc report --help`)"),
    (["compile", "m.onnx", "--psq-tolerance", "abc"],
     "argument --psq-tolerance: invalid float value: 'abc' (see `tvmc compile --help`)"),
    (["run", "p.tar", "--print-top", "2.5"], "argument --print-top: invalid int value: '2.5' (see `tvmc run --help`)"),
    (["run", "p.tar", "--sim-seed", "x"], "argument --sim-seed: invalid int value: 'x' (see `tvmc run --help`)"),
    (["run", "p.tar", "--expect-digest", "abc"],
     ("argument --expect-digest: 'abc' is not a sha256 digest (64 hex digits, as compile prints it) "
      "(see `tvmc run --help`)")),
    (["report", "p.tar", "--nope"], "unrecognized arguments: --nope (see `tvmc --help`)"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"tvmc: error: {message}\n"


@pytest.mark.parametrize("argv,option,sub", [
    (["compile", "m.onnx", "--target", "cuda"], "--target", "compile"),
    (["compile", "m.onnx", "--target-pim-psq-preset", "x"], "--target-pim-psq-preset", "compile"),
    (["compile", "m.onnx", "--psq-objective", "l1"], "--psq-objective", "compile"),
    (["compile", "m.onnx", "--psq-granularity", "row"], "--psq-granularity", "compile"),
    (["compile", "m.onnx", "--psq-rounding", "up"], "--psq-rounding", "compile"),
    (["compile", "m.onnx", "--psq-sensitivity", "all"], "--psq-sensitivity", "compile"),
    (["compile", "m.onnx", "--psq-bias-correction", "all"], "--psq-bias-correction", "compile"),
    (["run", "p.tar", "--mode", "fast"], "--mode", "run"),
])
def test_bad_choices_exit_2_with_one_line(capsys, argv, option, sub):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tvmc: error: argument {option}: invalid choice: ")
    assert err.endswith(f" (see `tvmc {sub} --help`)\n") and err.count("\n") == 1


def test_no_command_prints_the_help_to_stderr_exit_2(capsys):
    rc, out, err = run_main(capsys)
    assert rc == 2 and out == ""
    assert err.startswith("usage: tvmc [-h] [--version] [--debug] {compile,run,report} ...\n")
    assert "exit codes: 0 success;" in err


def test_version_option(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_version", lambda: "tvmc (psq-tvm) 9.9, apache-tvm 1.0, python 3.0")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == "tvmc (psq-tvm) 9.9, apache-tvm 1.0, python 3.0\n"


def test_version_string(monkeypatch):
    from importlib import metadata

    asked = []

    def version(name):
        asked.append(name)
        return "0.27.1"
    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(psq_tvm, "__version__", "1.2.3")
    monkeypatch.setattr(sys, "version", "3.99.1 (main, Jan 1 2030) [GCC 99]")
    assert cli._version() == "tvmc (psq-tvm) 1.2.3, apache-tvm 0.27.1, python 3.99.1"
    assert asked == ["apache-tvm"]

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", missing)
    assert cli._version() == "tvmc (psq-tvm) 1.2.3, apache-tvm not installed, python 3.99.1"


# ------------------------------------------------------------------ small helpers
def test_digest_arg():
    assert cli._digest_arg("ab" * 32) == "ab" * 32
    assert cli._digest_arg("0123456789ABCDEF" * 4) == "0123456789abcdef" * 4
    for bad in ("ab" * 31 + "a", "ab" * 32 + "a", "", "g" * 64, "X" * 64, "x" * 64, " " + "a" * 63):
        with pytest.raises(argparse.ArgumentTypeError) as e:
            cli._digest_arg(bad)
        assert str(e.value) == f"{bad!r} is not a sha256 digest (64 hex digits, as compile prints it)"


def test_progress_lines(capsys, monkeypatch):
    ticks = iter([100.0, 101.5, 223.456])
    monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    say = cli._progress(False)
    say("loading")
    say("done")
    out, err = capsys.readouterr()
    assert out == "" and err == "tvmc: [  1.50s] loading\ntvmc: [123.46s] done\n"
    ticks = iter([0.0, 5.0])
    quiet = cli._progress(True)
    quiet("loading")
    assert capsys.readouterr() == ("", "")


class _FlushLog:
    """A stderr that records its writes and flushes."""

    def __init__(self):
        self.events = []

    def write(self, s):
        self.events.append(("write", s))
        return len(s)

    def flush(self):
        self.events.append(("flush",))


def _flushed_lines(log):
    """The lines each followed by a flush before anything else is written."""
    text, lines = "", []
    for e in log.events:
        if e[0] == "write":
            text += e[1]
        elif text:
            lines.append(text)
            text = ""
    return lines, text


def test_progress_warnings_and_notes_are_flushed_at_once(fake_compile, fake_run, tmp_path, monkeypatch):
    """Progress, compile warnings and input notes reach a redirected stderr line by line, before TVM's
    own (unbuffered, C-level) output that may follow them."""
    log = _FlushLog()
    monkeypatch.setattr(sys, "stderr", log)
    cli._progress(False)("loading")
    assert main(["compile", str(fake_compile.model), "-o", str(tmp_path / "o.tar"), "-q"]) == 0
    fake_compile.calls[0][1]["warn"]("low fidelity")
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((1, 2), np.float32)])
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3), np.float64))
    assert main(["run", "p.tar", "--inputs", str(tmp_path / "in.npz"), "--print-top", "1"]) == 0
    lines, rest = _flushed_lines(log)
    assert lines == ["tvmc: [  0.00s] loading\n", "tvmc: low fidelity\n",
                     "tvmc: note: input 'x' is float64, the package takes float32: cast\n",
                     "tvmc: [  0.00s] running p.tar in mode sim\n"] and rest == ""


def test_default_mode(monkeypatch):
    assert cli._default_mode() == "sim"
    from psq_tvm import runtime
    monkeypatch.delattr(runtime, "simulator", raising=False)
    monkeypatch.setitem(sys.modules, "psq_tvm.runtime.simulator", None)      # import fails
    assert cli._default_mode() == "fake-quant"


def test_read_npz(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "a.npz", x=x, labels=np.array([1, 0]))
    data, labels = cli._read_npz(str(tmp_path / "a.npz"), "inputs")
    assert list(data) == ["x"] and np.array_equal(data["x"], x) and labels.tolist() == [1, 0]
    np.savez(tmp_path / "b.npz", x=x, y=x + 1)
    data, labels = cli._read_npz(str(tmp_path / "b.npz"), "--calib-inputs")
    assert sorted(data) == ["x", "y"] and labels is None and np.array_equal(data["y"], x + 1)
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(CLIError) as e:
        cli._read_npz(missing, "--calib-inputs")
    assert str(e.value) == f"--calib-inputs file {missing!r} does not exist"
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(CLIError) as e:
        cli._read_npz(str(tmp_path / "junk.npz"), "inputs")
    assert str(e.value).startswith(f"cannot read inputs {str(tmp_path / 'junk.npz')!r} as .npz: ")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def _fake_inputs_pkg(*inputs):
    return SimpleNamespace(manifest={"inputs": list(inputs)})


X_INFO = {"name": "x", "shape": [2, 3], "dtype": "float32"}


def test_load_inputs_from_a_file(tmp_path):
    x = np.ones((2, 3), np.float32)
    ids = np.arange(4).reshape(1, 4)
    two = _fake_inputs_pkg(X_INFO, {"name": "ids", "shape": [1, 4], "dtype": "int64"})
    np.savez(tmp_path / "all.npz", x=x, ids=ids, extra=x, labels=np.array([3, 4]))
    got, labels = cli._load_inputs(two, str(tmp_path / "all.npz"))
    assert list(got) == ["x", "ids"] and np.array_equal(got["ids"], ids) and labels.tolist() == [3, 4]
    # a single-input model takes the one array whatever its name (labels apart)
    np.savez(tmp_path / "one.npz", whatever=x, labels=np.array([5, 6]))
    got, labels = cli._load_inputs(_fake_inputs_pkg(X_INFO), str(tmp_path / "one.npz"))
    assert list(got) == ["x"] and np.array_equal(got["x"], x) and labels.tolist() == [5, 6]
    # ... but not one of several, and a two-input model does not take a single array
    np.savez(tmp_path / "ab.npz", b=x, a=x)
    with pytest.raises(CLIError) as e:
        cli._load_inputs(_fake_inputs_pkg(X_INFO), str(tmp_path / "ab.npz"))
    assert str(e.value) == f"inputs {str(tmp_path / 'ab.npz')!r} has arrays ['a', 'b']; the model takes ['x']"
    with pytest.raises(CLIError) as e:
        cli._load_inputs(two, str(tmp_path / "one.npz"))
    assert str(e.value) == f"inputs {str(tmp_path / 'one.npz')!r} has arrays ['whatever']; the model takes ['x', 'ids']"
    with pytest.raises(CLIError) as e:
        cli._load_inputs(two, str(tmp_path / "missing.npz"))
    assert str(e.value) == f"inputs file {str(tmp_path / 'missing.npz')!r} does not exist"


def test_load_inputs_synthetic_when_no_file(monkeypatch):
    from psq_tvm.frontend import input_ranges

    info = [X_INFO, {"name": "ids", "shape": [1, 5], "dtype": "int64", "index_range": 7},
            {"name": "mask", "shape": [1, 5], "dtype": "int64", "index_range": 0}]
    got, labels = cli._load_inputs(_fake_inputs_pkg(*info), None)
    assert labels is None and list(got) == ["x", "ids", "mask"]
    rng = np.random.default_rng(0)          # seed 0, inputs in manifest order
    np.testing.assert_array_equal(got["x"], rng.standard_normal((2, 3)).astype(np.float32))
    np.testing.assert_array_equal(got["ids"], rng.integers(0, 7, size=(1, 5)))
    np.testing.assert_array_equal(got["mask"], np.ones((1, 5), np.int64))
    seen = []
    monkeypatch.setattr(input_ranges, "synthetic_inputs",
                        lambda inputs, ranges, rng: seen.append((inputs, ranges)) or ["A", "B", "C"])
    got, _ = cli._load_inputs(_fake_inputs_pkg(*info), None)
    assert got == {"x": "A", "ids": "B", "mask": "C"} and seen == [(info, {"ids": 7})]
    assert cli._load_inputs(_fake_inputs_pkg(), None) == ({}, None)          # a model without inputs


def test_load_inputs_without_manifest_inputs():
    """A manifest with no "inputs" entry at all: nothing to synthesise."""
    assert cli._load_inputs(SimpleNamespace(manifest={}), None) == ({}, None)


@pytest.mark.parametrize("flag,value,field,want", [
    ("--sim-act-bits", "4", "act_bits", 4),
    ("--sim-adc-full-scale", "12.5", "adc_full_scale", 12.5),
    ("--sim-conductance-sigma", "0.05", "conductance_sigma", 0.05),
    ("--sim-stuck-at-min", "0.01", "stuck_at_min", 0.01),
    ("--sim-stuck-at-max", "0.02", "stuck_at_max", 0.02),
    ("--sim-adc-offset", "-0.5", "adc_offset", -0.5),
    ("--sim-seed", "7", "seed", 7),
    ("--sim-force-bitserial", None, "force_bitserial", True),
])
def test_sim_options_each_flag(flag, value, field, want):
    a = parse("run", "p.tar", flag, *([value] if value is not None else []))
    got = cli._sim_options(a)
    assert isinstance(got, SimOptions) and got == SimOptions(**{field: want})
    assert getattr(got, field) == want


def test_sim_options_none_and_all():
    assert cli._sim_options(parse("run", "p.tar")) is None
    a = parse("run", "p.tar", "--sim-act-bits", "3", "--sim-seed", "0", "--sim-adc-offset", "0",
              "--sim-force-bitserial")
    assert cli._sim_options(a) == SimOptions(act_bits=3, seed=0, adc_offset=0.0, force_bitserial=True)
    assert cli._sim_options(parse("run", "p.tar", "--sim-seed", "0")) == SimOptions(seed=0)   # 0 is given


def test_error_line():
    assert cli._error_line(ValueError("bad  value\n   for  x")) == "bad value for x"
    assert cli._error_line(ValueError("")) == "ValueError"
    assert cli._error_line(KeyError("k")) == "'k'"
    noise = "# Metadata omitted. Use show_meta=True in script() method to show it."
    assert cli._error_line(RuntimeError(f"shape mismatch in\n{noise}\n  conv2d")) == "shape mismatch in conv2d"
    assert cli._error_line(RuntimeError(noise)) == "RuntimeError"
    tvm_style = ("InternalError: Check failed: (a == b) is false: shapes differ\n"
                 "Stack trace:\n"
                 "  File \"/x/relax/transform.py\", line 12, in f\n"
                 "  [bt] (0) /usr/lib/libtvm.so(+0x1234)\n"
                 "  0: tvm::relax::Normalize\n"
                 "  12: TVMFuncCall\n"
                 "Traceback (most recent call last):\n")
    assert cli._error_line(RuntimeError(tvm_style)) == ("InternalError: Check failed: (a == b) is false: shapes differ "
                                                        "(run with --debug for the full message)")
    assert cli._error_line(RuntimeError("Traceback (most recent call last):\n  1: f\n  0: g\nTVMError: oops\n")) \
        == "TVMError: oops (run with --debug for the full message)"
    assert cli._error_line(RuntimeError("oops\nStack trace:\n  0: g")) == "oops (run with --debug for the full message)"
    assert cli._error_line(RuntimeError("Stack trace:\n  0: g\n  File \"a.py\"")) == \
        "RuntimeError (run with --debug for the full message)"
    # stack-frame lines start with their number: dropped, even when nothing else is left
    assert cli._error_line(OSError("Traceback\n7 files failed")) == "OSError (run with --debug for the full message)"


# ------------------------------------------------------------------ compile
class CompiledPkg:
    """What cmd_compile uses of a Package: save(), report, digest."""

    def __init__(self, report=None):
        self.report = report if report is not None else {}
        self.digest = DIGEST
        self.saved = []

    def save(self, path):
        self.saved.append(path)


@pytest.fixture
def fake_compile(monkeypatch, tmp_path, clock):
    from psq_tvm.targets import pipeline

    rec = SimpleNamespace(calls=[], pkg=CompiledPkg(), model=tmp_path / "m.onnx", cc=[])
    rec.model.write_bytes(b"")

    def compile_(*args, **kwargs):
        rec.calls.append((args, kwargs))
        return rec.pkg
    monkeypatch.setattr(psq_tvm.api, "compile", compile_)
    monkeypatch.setattr(pipeline, "require_c_compiler", lambda: rec.cc.append(len(rec.calls)) or "cc")
    return rec


#: the API options of `tvmc compile MODEL` (progress and warn apart)
API_DEFAULTS = {
    "input_shapes": None, "preset": "isaac", "objective": "mse", "granularity": "column", "rounding": "balanced",
    "sensitivity": "none", "bias_correction": "bn+synthetic", "budget": None, "tolerance": None, "bits": None,
    "min_fidelity": None, "calib_inputs": None, "float_weights": True, "fold_batchnorm": True, "cost": None}


def _api_options(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("progress", "warn")}


def test_compile_defaults_reach_the_api(fake_compile, tmp_path, capsys):
    out = tmp_path / "m.tar"
    rc, stdout, err = run_main(capsys, "compile", fake_compile.model, "-o", out)
    assert rc == 0
    ((args, kwargs),) = fake_compile.calls
    assert args == (str(fake_compile.model), "pim-psq")
    assert _api_options(kwargs) == API_DEFAULTS
    assert fake_compile.cc == [0]                                   # the C compiler is checked first
    assert fake_compile.pkg.saved == [str(out)]
    assert stdout == f"sha256 {DIGEST}  {out}\n"
    assert err == f"tvmc: [  0.00s] wrote {out}\n"
    # the progress and warning callbacks the compile reports through
    kwargs["progress"]("searching")
    kwargs["warn"]("fidelity below the threshold")
    assert capsys.readouterr() == ("", "tvmc: [  0.00s] searching\ntvmc: fidelity below the threshold\n")


def test_compile_default_output_is_module_tar(fake_compile, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, stdout, _ = run_main(capsys, "compile", fake_compile.model, "-q")
    assert rc == 0 and fake_compile.pkg.saved == ["module.tar"] and stdout == f"sha256 {DIGEST}  module.tar\n"


def test_every_compile_option_reaches_the_api(fake_compile, tmp_path, capsys):
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.savez(tmp_path / "calib.npz", x=x, labels=np.array([0, 1]))
    out = tmp_path / "o.tar"
    rc, stdout, err = run_main(
        capsys, "compile", fake_compile.model, "-o", out, "-q", "--input-shapes", "x:[1,6]",
        "--target-pim-psq-preset", "prime", "--target-pim-psq-rows", "64", "--target-pim-psq-cols", "32",
        "--target-pim-psq-cell-bits", "1", "--target-pim-psq-encoding", "offset", "--target-pim-psq-dac-bits", "2",
        "--target-pim-psq-act-bits", "6", "--target-pim-psq-adc-bits", "none", "--target-pim-psq-weight-bits", "2-6",
        "--target-pim-psq-baseline-bits", "8", "--target-pim-psq-adc-range", "worst",
        "--target-pim-psq-cost", "cost.json", "--psq-objective", "cdf-kl", "--psq-granularity", "tile",
        "--psq-rounding", "nearest", "--psq-sensitivity", "calib", "--psq-bias-correction", "synthetic",
        "--psq-budget", "avg-bits=4.5", "--psq-tolerance", "0.25", "--psq-min-fidelity", "rtn8-2",
        "--calib-inputs", tmp_path / "calib.npz", "--psq-bits", "2-5", "--no-float-weights", "--no-fold-batchnorm")
    assert rc == 0, err
    ((args, kwargs),) = fake_compile.calls
    assert args == (str(fake_compile.model), "pim-psq")
    calib = kwargs.pop("calib_inputs")
    assert list(calib) == ["x"] and np.array_equal(calib["x"], x)          # labels are not an input
    assert _api_options(kwargs) == {
        "input_shapes": "x:[1,6]", "preset": "prime", "objective": "cdf-kl", "granularity": "tile",
        "rounding": "nearest", "sensitivity": "calib", "bias_correction": "synthetic", "budget": "avg-bits=4.5",
        "tolerance": 0.25, "bits": "2-5", "min_fidelity": "rtn8-2", "float_weights": False, "fold_batchnorm": False,
        "cost": "cost.json", "rows": "64", "cols": "32", "cell_bits": "1", "encoding": "offset", "dac_bits": "2",
        "act_bits": "6", "adc_bits": "none", "weight_bits": "2-6", "baseline_bits": "8", "adc_range": "worst"}
    assert stdout == f"sha256 {DIGEST}  {out}\n" and err == ""         # -q: no progress
    kwargs["progress"]("searching")
    kwargs["warn"]("low fidelity")                                      # warnings even with -q
    assert capsys.readouterr() == ("", "tvmc: low fidelity\n")


@pytest.mark.parametrize("opts,noted", [
    ([], False),
    (["--psq-budget", "avg-bits=4"], True),
    (["--psq-tolerance", "0"], True),
    (["--psq-bits", "2-4"], True),
    (["--target-pim-psq-rows", "64"], True),
    (["--target-pim-psq-preset", "prime", "--psq-objective", "cdf-kl"], False),
])
def test_target_llvm_notes_ignored_pim_options(fake_compile, tmp_path, capsys, opts, noted):
    out = tmp_path / "l.tar"
    rc, _, err = run_main(capsys, "compile", "--target", "llvm", fake_compile.model, "-o", out, *opts)
    assert rc == 0
    note = "tvmc: [  0.00s] note: --target llvm ignores the crossbar and PSQ options\n"
    assert err == (note if noted else "") + f"tvmc: [  0.00s] wrote {out}\n"
    assert fake_compile.calls[0][0] == (str(fake_compile.model), "llvm")
    # the same options with pim-psq: no note
    rc, _, err = run_main(capsys, "compile", fake_compile.model, "-o", out, *opts)
    assert rc == 0 and err == f"tvmc: [  0.00s] wrote {out}\n"


REPORT = {"reduction_vs_uniform16": 4.0, "reduction_vs_uniform8": 2.125, "avg_bits": 4.256, "n_pim_layers": 3,
          "n_host_layers": 1, "crossbars": {"psq": 10, "uniform16": 40, "uniform8": 21}}


def test_compile_summary_line(fake_compile, tmp_path, capsys):
    fake_compile.pkg.report = dict(REPORT)
    out = tmp_path / "o.tar"
    rc, _, err = run_main(capsys, "compile", fake_compile.model, "-o", out)
    assert rc == 0
    assert err == ("tvmc: [  0.00s] 3 PIM layers, 1 host; crossbars PSQ 10 vs uniform16 40 (4.00x), uniform8 21 "
                   f"(2.12x); avg bits 4.26\ntvmc: [  0.00s] wrote {out}\n")
    # none for llvm, none without a reduction
    rc, _, err = run_main(capsys, "compile", "--target", "llvm", fake_compile.model, "-o", out)
    assert rc == 0 and err == f"tvmc: [  0.00s] wrote {out}\n"
    fake_compile.pkg.report = dict(REPORT, reduction_vs_uniform16=None)
    rc, _, err = run_main(capsys, "compile", fake_compile.model, "-o", out)
    assert err == f"tvmc: [  0.00s] wrote {out}\n"


@pytest.mark.parametrize("output,header,want", [
    ("m.tar", None, "m.h"),
    ("pkg", None, "pkg.h"),
    ("m.tar", "drv/tables.h", "drv/tables.h"),
])
def test_emit_c_header_paths(fake_compile, tmp_path, capsys, monkeypatch, output, header, want):
    from psq_tvm.targets import c_header

    monkeypatch.chdir(tmp_path)
    (tmp_path / "drv").mkdir()
    seen = []
    monkeypatch.setattr(c_header, "write_c_output", lambda pkg, path: seen.append((pkg, path)) or [path, "x.c"])
    rc, stdout, err = run_main(capsys, "compile", fake_compile.model, "-o", output, "--emit-c-header",
                               *([header] if header else []))
    assert rc == 0, err
    assert seen == [(fake_compile.pkg, want)]
    assert err == f"tvmc: [  0.00s] wrote {want}\ntvmc: [  0.00s] wrote x.c\ntvmc: [  0.00s] wrote {output}\n"
    assert stdout == f"sha256 {DIGEST}  {output}\n"


def test_no_c_header_unless_asked(fake_compile, tmp_path, capsys, monkeypatch):
    from psq_tvm.targets import c_header

    monkeypatch.setattr(c_header, "write_c_output", lambda *a: pytest.fail("C output not asked for"))
    assert run_main(capsys, "compile", fake_compile.model, "-o", tmp_path / "m.tar", "-q")[0] == 0


@pytest.mark.parametrize("case", ["empty", "missing dir", "directory", "header name", "header dir", "model",
                                  "calib"])
def test_compile_refuses_before_compiling(fake_compile, tmp_path, capsys, case):
    model, out = str(fake_compile.model), str(tmp_path / "o.tar")
    extra = []
    if case == "empty":
        out, want = "", "-o/--output must name the package file"
    elif case == "missing dir":
        out = str(tmp_path / "nodir" / "o.tar")
        want = (f"cannot write -o/--output {out!r}: directory {str(tmp_path / 'nodir')!r} does not exist "
                "(create it first)")
    elif case == "directory":
        out, want = str(tmp_path), f"-o/--output {str(tmp_path)!r} is a directory; name a file in it"
    elif case == "header name":
        extra = ["--emit-c-header", "tables.c"]
        want = ("--emit-c-header tables.c: name the header, PATH.h (PATH.c and, for large models, PATH_cells.bin "
                "are written next to it)")
    elif case == "header dir":
        h = str(tmp_path / "nodir" / "t.h")
        extra = ["--emit-c-header", h]
        want = (f"cannot write --emit-c-header {h!r}: directory {str(tmp_path / 'nodir')!r} does not exist "
                "(create it first)")
    elif case == "model":
        model = str(tmp_path / "nope.onnx")
        want = f"model file {model!r} does not exist"
    else:
        extra = ["--calib-inputs", str(tmp_path / "nope.npz")]
        want = f"--calib-inputs file {str(tmp_path / 'nope.npz')!r} does not exist"
    rc, stdout, err = run_main(capsys, "compile", model, "-o", out, *extra)
    assert (rc, stdout, err) == (1, "", f"tvmc: error: {want}\n")
    assert fake_compile.calls == [] and fake_compile.pkg.saved == []
    assert fake_compile.cc == ([0] if case == "calib" else [])       # the cheap checks come before the compiler's


def test_compile_error_and_no_c_compiler(fake_compile, monkeypatch, capsys, tmp_path):
    from psq_tvm.targets import pipeline

    def no_cc():
        raise RuntimeError("no C compiler (no g++ on PATH)")
    monkeypatch.setattr(pipeline, "require_c_compiler", no_cc)
    rc, _, err = run_main(capsys, "compile", fake_compile.model, "-o", tmp_path / "o.tar", "-q")
    assert (rc, err) == (1, "tvmc: error: no C compiler (no g++ on PATH)\n") and fake_compile.calls == []


# ---------------------------------------------------------------------- run
class RunPkg:
    """What cmd_run uses of a Package: manifest["inputs"], run(), run_batched()."""

    def __init__(self, info, outs):
        self.manifest = {"inputs": info}
        self.outs = outs
        self.calls = []

    def run(self, inputs, mode, sim_options):
        self.calls.append(("run", dict(inputs), mode, sim_options))
        return list(self.outs)

    def run_batched(self, x, mode, sim_options):
        self.calls.append(("run_batched", x, mode, sim_options))
        return self.outs[0]


@pytest.fixture
def fake_run(monkeypatch, clock):
    rec = SimpleNamespace(loads=[], verify=[], pkg=None)

    def load(path, expect_digest=None):
        rec.loads.append((path, expect_digest))
        return rec.pkg
    monkeypatch.setattr(package_mod, "load", load)
    from psq_tvm.runtime import verify

    def verify_package(pkg, inputs, batched, sim_options, max_loss, labels):
        rec.verify.append((pkg, inputs, batched, sim_options, max_loss, labels))
        return rec.verify_code, ["verify: line one", "verify: line two"]
    rec.verify_code = 3
    monkeypatch.setattr(verify, "verify_package", verify_package)
    return rec


def test_run_passes_package_digest_mode_and_inputs(fake_run, tmp_path, capsys):
    y = np.array([[0.5, -2.0, 1.0]], np.float32)
    fake_run.pkg = RunPkg([X_INFO], [y])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "in.npz", x=x)
    rc, out, err = run_main(capsys, "run", "p.tar", "--expect-digest", DIGEST.upper(), "--inputs",
                            tmp_path / "in.npz", "--mode", "golden")
    assert rc == 0
    assert fake_run.loads == [("p.tar", DIGEST)]
    ((kind, inputs, mode, sim),) = fake_run.pkg.calls
    assert (kind, mode, sim) == ("run", "golden", None) and list(inputs) == ["x"]
    np.testing.assert_array_equal(inputs["x"], x)
    assert err == "tvmc: [  0.00s] running p.tar in mode golden\n"
    assert out == "output_0: shape [1, 3] dtype float32 mean -0.166667 max|.| 2\n"
    assert fake_run.verify == []


def test_run_default_mode_and_synthetic_inputs(fake_run, capsys):
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((2, 4), np.float32), np.arange(3, dtype=np.int32)])
    rc, out, err = run_main(capsys, "run", "p.tar", "-q")
    assert rc == 0 and err == ""
    assert fake_run.loads == [("p.tar", None)]
    ((kind, inputs, mode, sim),) = fake_run.pkg.calls
    assert (kind, mode, sim) == ("run", "sim", None)
    np.testing.assert_array_equal(inputs["x"], np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32))
    assert out == ("output_0: shape [2, 4] dtype float32 mean 0 max|.| 0\n"
                   "output_1: shape [3] dtype int32 mean 1 max|.| 2\n")


def test_run_casts_inputs_and_says_so(fake_run, tmp_path, capsys):
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((2, 2), np.float32)])
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3), np.float64))
    rc, _, err = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "--mode", "float")
    assert rc == 0
    assert err == ("tvmc: note: input 'x' is float64, the package takes float32: cast\n"
                   "tvmc: [  0.00s] running p.tar in mode float\n")
    assert fake_run.pkg.calls[0][1]["x"].dtype == np.float32
    rc, _, err = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "-q")
    assert rc == 0 and err == ""


@pytest.mark.parametrize("shape,batched", [((2, 3), False), ((5, 3), True), ((1, 3), True), ((5, 4), False),
                                           ((6,), False), ((5, 3, 1), False)])
def test_run_batches_extra_leading_samples(fake_run, tmp_path, capsys, shape, batched):
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((2, 2), np.float32)])
    x = np.ones(shape, np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    rc, _, _ = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "--mode", "float", "-q",
                        "--sim-seed", "4")
    assert rc == 0
    ((kind, arg, mode, sim),) = fake_run.pkg.calls
    assert (kind, mode, sim) == ("run_batched" if batched else "run", "float", SimOptions(seed=4))
    np.testing.assert_array_equal(arg if batched else arg["x"], x)


def test_run_two_inputs_are_never_batched(fake_run, tmp_path, capsys):
    info = [X_INFO, {"name": "y", "shape": [2, 3], "dtype": "float32"}]
    fake_run.pkg = RunPkg(info, [np.zeros((2, 2), np.float32)])
    np.savez(tmp_path / "in.npz", x=np.ones((5, 3), np.float32), y=np.ones((5, 3), np.float32))
    assert run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "-q")[0] == 0
    assert fake_run.pkg.calls[0][0] == "run" and sorted(fake_run.pkg.calls[0][1]) == ["x", "y"]


def test_run_writes_outputs(fake_run, tmp_path, capsys):
    a, b = np.array([[1.0, 2.0]], np.float32), np.array([7], np.int64)
    fake_run.pkg = RunPkg([X_INFO], [a, b])
    out = tmp_path / "o.npz"
    rc, stdout, err = run_main(capsys, "run", "p.tar", "--outputs", out)
    assert rc == 0 and stdout == ""
    assert err == f"tvmc: [  0.00s] running p.tar in mode sim\ntvmc: [  0.00s] wrote {out}\n"
    with np.load(out) as z:
        assert sorted(z.files) == ["output_0", "output_1"]
        np.testing.assert_array_equal(z["output_0"], a)
        np.testing.assert_array_equal(z["output_1"], b)
    assert sorted(os.listdir(tmp_path)) == ["o.npz"]            # no temporary left


def test_run_refuses_bad_outputs_path_before_loading(fake_run, tmp_path, capsys):
    bad = tmp_path / "nodir" / "o.npz"
    rc, out, err = run_main(capsys, "run", "p.tar", "--outputs", bad)
    assert (rc, out) == (1, "") and fake_run.loads == []
    assert err == (f"tvmc: error: cannot write --outputs {str(bad)!r}: directory {str(tmp_path / 'nodir')!r} "
                   "does not exist (create it first)\n")


def test_run_output_directory_removed_during_the_run(fake_run, tmp_path, capsys):
    d = tmp_path / "out"
    d.mkdir()
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((1, 2), np.float32)])
    fake_run.pkg.run = lambda inputs, mode, sim: d.rmdir() or [np.zeros((1, 2), np.float32)]
    rc, out, err = run_main(capsys, "run", "p.tar", "--outputs", d / "o.npz", "-q")
    assert (rc, out) == (1, "")
    assert err == (f"tvmc: error: cannot write --outputs {str(d / 'o.npz')!r}: directory {str(d)!r} does not exist "
                   "(create it first)\n")


def test_run_warns_of_nan_outputs(fake_run, capsys):
    y = np.array([[np.nan, 1.0, np.inf]], np.float32)
    fake_run.pkg = RunPkg([X_INFO], [np.ones((1, 2), np.float32), y, np.array([5], np.int32)])
    rc, _, err = run_main(capsys, "run", "p.tar", "-q")
    assert rc == 0
    assert err == ("tvmc: warning: output_1 has 2 NaN/Inf value(s): the weights or inputs exceed the float32 "
                   "range in some layer; check the model's weights and the inputs' scale\n")


def test_run_print_top_and_accuracy(fake_run, tmp_path, capsys):
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [0.7, 0.2, 0.3, 0.1]], np.float32)
    fake_run.pkg = RunPkg([X_INFO], [scores])
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3), np.float32), labels=np.array([3, 0]))
    rc, out, _ = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "--print-top", "3", "-q")
    assert rc == 0
    assert out == ("sample 0: class 1: 0.9000  class 3: 0.9000  class 2: 0.5000\n"
                   "sample 1: class 0: 0.7000  class 2: 0.3000  class 1: 0.2000\n"
                   "accuracy (sim): 0.5000 on 2 samples\n")
    # labels alone: the accuracy, no summary lines
    rc, out, _ = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "--mode", "fake-quant", "-q")
    assert out == "accuracy (fake-quant): 0.5000 on 2 samples\n"


def test_run_print_top_shapes(fake_run, capsys):
    fake_run.pkg = RunPkg([X_INFO], [np.array([0.25, 0.75, 0.5], np.float32)])       # 1-d: one sample
    rc, out, _ = run_main(capsys, "run", "p.tar", "--print-top", "2", "-q")
    assert (rc, out) == (0, "sample 0: class 1: 0.7500  class 2: 0.5000\n")
    many = np.tile(np.array([[0.0, 1.0]], np.float32), (7, 1)).reshape(7, 1, 2)     # 7 samples: the first 5
    fake_run.pkg = RunPkg([X_INFO], [many])
    rc, out, _ = run_main(capsys, "run", "p.tar", "--print-top", "1", "-q")
    assert rc == 0 and out == "".join(f"sample {s}: class 1: 1.0000\n" for s in range(5))


def test_run_no_accuracy_when_labels_do_not_fit(fake_run, tmp_path, capsys):
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((2, 4), np.float32)])
    np.savez(tmp_path / "in.npz", x=np.ones((2, 3), np.float32), labels=np.array([1, 2, 3]))
    rc, out, _ = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "-q")
    assert rc == 0 and out == ""
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((2, 4, 1), np.float32)])
    np.savez(tmp_path / "in2.npz", x=np.ones((2, 3), np.float32), labels=np.array([1, 2]))
    rc, out, _ = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in2.npz", "-q")
    assert rc == 0 and out == ""


@pytest.mark.parametrize("opts,max_loss", [(["--verify"], None), (["--max-loss", "cosine=0.1"], "cosine=0.1"),
                                           (["--verify", "--max-loss", "top1=0"], "top1=0")])
def test_run_verify_plumbing(fake_run, tmp_path, capsys, opts, max_loss):
    fake_run.pkg = RunPkg([X_INFO], [np.zeros((5, 2), np.float32)])
    x = np.ones((5, 3), np.float32)
    np.savez(tmp_path / "in.npz", x=x, labels=np.arange(5))
    rc, out, _ = run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "-q", "--sim-seed", "2", *opts)
    assert rc == 3
    assert out.endswith("verify: line one\nverify: line two\n")
    ((pkg, inputs, batched, sim, loss, labels),) = fake_run.verify
    assert pkg is fake_run.pkg and batched is True and sim == SimOptions(seed=2) and loss == max_loss
    assert list(inputs) == ["x"] and np.array_equal(inputs["x"], x) and labels.tolist() == [0, 1, 2, 3, 4]
    fake_run.verify_code = 0
    assert run_main(capsys, "run", "p.tar", "--inputs", tmp_path / "in.npz", "-q", *opts)[0] == 0


def test_verify_function_prints_the_lines(fake_run, capsys):
    assert cli.verify("PKG", {"x": 1}, False) == 3
    assert fake_run.verify == [("PKG", {"x": 1}, False, None, None, None)]
    assert capsys.readouterr().out == "verify: line one\nverify: line two\n"


# ------------------------------------------------------------------- report
class ReportPkg:
    def __init__(self, layers=("conv1",)):
        self.report = {"crossbars": {"psq": 3}, "avg_bits": 4.5}
        self.layers = list(layers)
        self.manifest = {"model": "m.onnx", "target": "pim-psq", "spec": {"name": "prime"}}
        self.spec = SimpleNamespace(name="prime", rows=256, cols=128, cell_bits=4, encoding="differential")
        self.digest = DIGEST


@pytest.fixture
def fake_report(monkeypatch):
    from psq_tvm.core import cost, report

    rec = SimpleNamespace(loads=[], tables=[], plots=[], costs=[], temporaries=[], pkg=ReportPkg())

    def load(path, expect_digest=None):
        rec.loads.append((path, expect_digest))
        return rec.pkg

    def plot(rep, f, fmt):
        rec.plots.append((dict(rep), fmt))
        proc = f"/proc/self/fd/{f.fileno()}"           # the temporary's name, where /proc tells it
        rec.temporaries.append(os.path.basename(os.readlink(proc)) if os.path.exists(proc) else None)
        f.write(b"PLOT")
    monkeypatch.setattr(package_mod, "load", load)
    monkeypatch.setattr(report, "format_table", lambda rep: rec.tables.append(dict(rep)) or "TABLE\nROWS")
    monkeypatch.setattr(report, "plot", plot)
    monkeypatch.setattr(cost, "cost_from_manifest", lambda m, path: rec.costs.append((m, path)) or {"energy": 1.5})
    return rec


def test_report_text(fake_report, capsys):
    rc, out, err = run_main(capsys, "report", "p.tar", "--expect-digest", DIGEST)
    assert (rc, err) == (0, "")
    assert fake_report.loads == [("p.tar", DIGEST)]
    assert out == ("package p.tar: model m.onnx, target pim-psq, spec prime (256x128, 4-bit cells, differential)\n"
                   f"digest: sha256 {DIGEST} (of the whole .tar; check with --expect-digest)\n"
                   "TABLE\nROWS\n")
    assert fake_report.tables == [{"crossbars": {"psq": 3}, "avg_bits": 4.5}]
    assert fake_report.costs == [] and fake_report.plots == []


def test_report_json_and_cost(fake_report, capsys):
    rc, out, _ = run_main(capsys, "report", "p.tar", "--json", "--cost", "c.json")
    assert rc == 0 and fake_report.loads == [("p.tar", None)]
    assert fake_report.costs == [(fake_report.pkg.manifest, "c.json")]
    assert out == ('{\n "avg_bits": 4.5,\n "cost": {\n  "energy": 1.5\n },\n "crossbars": {\n  "psq": 3\n },\n'
                   f' "package_sha256": "{DIGEST}"\n}}\n')
    assert fake_report.tables == []
    # a package without PIM layers has no cost to recompute
    fake_report.pkg = ReportPkg(layers=())
    rc, out, _ = run_main(capsys, "report", "p.tar", "--json", "--cost", "c.json")
    assert rc == 0 and len(fake_report.costs) == 1 and json.loads(out) == {
        "avg_bits": 4.5, "crossbars": {"psq": 3}, "package_sha256": DIGEST}


@pytest.mark.parametrize("name,fmt", [("r.png", "png"), ("r.SVG", "svg"), ("plot", "png")])
def test_report_plot(fake_report, tmp_path, capsys, name, fmt):
    path = tmp_path / name
    rc, out, err = run_main(capsys, "report", "p.tar", "--plot", path)
    assert rc == 0 and err == f"wrote {path}\n" and out.endswith("TABLE\nROWS\n")
    assert fake_report.plots == [({"crossbars": {"psq": 3}, "avg_bits": 4.5}, fmt)]
    assert path.read_bytes() == b"PLOT" and sorted(os.listdir(tmp_path)) == [name]
    # the temporary names its type (docs/reliability.md: a killed writer's `.psq-<pid>-*.png.tmp` stays)
    (tmp,) = fake_report.temporaries
    assert tmp is None or re.fullmatch(rf"\.psq-{os.getpid()}-\w+\.{fmt}\.tmp", tmp), tmp


def test_report_plot_directory_removed_during_the_report(fake_report, tmp_path, capsys, monkeypatch):
    d = tmp_path / "plots"
    d.mkdir()
    monkeypatch.setattr(package_mod, "load", lambda path, expect=None: d.rmdir() or fake_report.pkg)
    rc, _, err = run_main(capsys, "report", "p.tar", "--plot", d / "r.png")
    assert rc == 1 and err == (f"tvmc: error: cannot write --plot {str(d / 'r.png')!r}: directory {str(d)!r} does "
                               "not exist (create it first)\n")


def test_report_refuses_bad_plot_path_before_loading(fake_report, tmp_path, capsys):
    rc, out, err = run_main(capsys, "report", "p.tar", "--plot", tmp_path)
    assert (rc, out) == (1, "") and fake_report.loads == []
    assert err == f"tvmc: error: --plot {str(tmp_path)!r} is a directory; name a file in it\n"


# ---------------------------------------------------------------------- main
def _raising(exc):
    def cmd(a):
        raise exc
    return cmd


@pytest.mark.parametrize("exc,rc,line", [
    (CLIError("inputs 'x.npz' has arrays ['a']"), 1, "tvmc: error: inputs 'x.npz' has arrays ['a']\n"),
    (ValueError("bad\n  budget"), 1, "tvmc: error: bad budget\n"),
    (RuntimeError(""), 1, "tvmc: error: RuntimeError\n"),
    (DigestMismatch("'p.tar' has digest sha256 00, not the expected 11"), 5,
     "tvmc: error: 'p.tar' has digest sha256 00, not the expected 11\n"),
    (KeyboardInterrupt(), 130, "tvmc: error: interrupted; nothing was written\n"),
])
def test_main_exit_codes(monkeypatch, capsys, exc, rc, line):
    for name in ("cmd_compile", "cmd_run", "cmd_report"):
        monkeypatch.setattr(cli, name, _raising(exc))
    for argv in (["compile", "m.onnx"], ["run", "p.tar"], ["report", "p.tar"]):
        assert run_main(capsys, *argv) == (rc, "", line)


def test_main_dispatches_and_returns_the_command_code(monkeypatch, capsys):
    seen = []
    for name, code in (("cmd_compile", 0), ("cmd_run", 4), ("cmd_report", 3)):
        monkeypatch.setattr(cli, name, lambda a, name=name, code=code: seen.append((name, a.command)) or code)
    assert [main(["compile", "m.onnx"]), main(["run", "p.tar"]), main(["report", "p.tar"])] == [0, 4, 3]
    assert seen == [("cmd_compile", "compile"), ("cmd_run", "run"), ("cmd_report", "report")]


@pytest.mark.parametrize("argv", [["--debug", "report", "p.tar"], ["report", "p.tar", "--debug"], "env"])
@pytest.mark.parametrize("exc", [ValueError("boom"), DigestMismatch("other digest")])
def test_debug_reraises(monkeypatch, capsys, argv, exc):
    monkeypatch.setattr(cli, "cmd_report", _raising(exc))
    if argv == "env":
        monkeypatch.setenv("PSQ_TVM_TRACEBACK", "1")
        argv = ["report", "p.tar"]
    with pytest.raises(type(exc)) as e:
        main(argv)
    assert e.value is exc
    assert capsys.readouterr().err == ""


def test_interrupted_inside_tvm_counts_as_interrupted(monkeypatch, capsys):
    """TVM re-raises a KeyboardInterrupt from our signal handler as its own error: the signal decides."""
    def cmd(a):
        cli._signals.append(signal.SIGTERM)
        raise RuntimeError("TVMError: KeyboardInterrupt")
    monkeypatch.setattr(cli, "cmd_report", cmd)
    assert run_main(capsys, "report", "p.tar") == (143, "", "tvmc: error: interrupted (SIGTERM); nothing was written\n")
    monkeypatch.setattr(cli, "cmd_report", _raising(RuntimeError("no signal")))
    cli._signals.append(signal.SIGINT)                 # left over from an earlier call: cleared by main
    assert run_main(capsys, "report", "p.tar") == (1, "", "tvmc: error: no signal\n")
    cli._signals.clear()


def test_interrupted_exit_codes(capsys):
    cases = [([], 130), ([signal.SIGINT], 130), ([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGTERM], 130),
             ([signal.SIGTERM, signal.SIGINT], 143)]
    try:
        for sigs, code in cases:
            cli._signals[:] = sigs
            assert cli._interrupted_exit() == code
            out, err = capsys.readouterr()
            assert out == "" and err == ("tvmc: error: interrupted (SIGTERM); nothing was written\n" if code == 143
                                         else "tvmc: error: interrupted; nothing was written\n")
    finally:
        cli._signals.clear()


def test_on_signal_raises_once_then_records():
    cli._signals.clear()
    try:
        with pytest.raises(cli._Signalled) as e:
            cli._on_signal(signal.SIGTERM, None)
        assert e.value.args == (signal.SIGTERM,) and isinstance(e.value, KeyboardInterrupt)
        assert cli._on_signal(signal.SIGINT, None) is None          # a second signal must not break the cleanup
        assert cli._signals == [signal.SIGTERM, signal.SIGINT]
    finally:
        cli._signals.clear()


@pytest.fixture
def handlers():
    """Python's own SIGINT/SIGTERM handlers for the test (a background job starts with SIGINT ignored,
    which main keeps ignored), restored after it."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig,code,line", [
    (signal.SIGTERM, 143, "tvmc: error: interrupted (SIGTERM); nothing was written\n"),
    (signal.SIGINT, 130, "tvmc: error: interrupted; nothing was written\n")])
def test_signals_during_a_command(monkeypatch, capsys, handlers, sig, code, line):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    during = {}

    def cmd(a):
        during.update({s: signal.getsignal(s) for s in before})
        if during[sig] is not cli._on_signal:
            raise AssertionError("the handler is not installed")     # never send the signal unhandled
        signal.raise_signal(sig)
        raise AssertionError("the signal did not interrupt")
    monkeypatch.setattr(cli, "cmd_run", cmd)
    assert run_main(capsys, "run", "p.tar") == (code, "", line)
    assert during == {signal.SIGINT: cli._on_signal, signal.SIGTERM: cli._on_signal}
    assert {s: signal.getsignal(s) for s in before} == before          # restored


@pytest.mark.parametrize("ignored", [signal.SIGINT, signal.SIGTERM])
def test_ignored_signals_stay_ignored(monkeypatch, handlers, ignored):
    """A background job of a script starts with SIGINT ignored: it stays ignored, SIGTERM is still handled."""
    other = signal.SIGTERM if ignored == signal.SIGINT else signal.SIGINT
    before = signal.getsignal(other)
    signal.signal(ignored, signal.SIG_IGN)
    during = []
    monkeypatch.setattr(cli, "cmd_run", lambda a: during.append((signal.getsignal(ignored), signal.getsignal(other)))
                        or 0)
    assert main(["run", "p.tar"]) == 0
    assert during == [(signal.SIG_IGN, cli._on_signal)]
    assert signal.getsignal(ignored) is signal.SIG_IGN and signal.getsignal(other) is before


def test_main_outside_the_main_thread_leaves_the_handlers(monkeypatch, handlers):
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    monkeypatch.setattr(cli, "cmd_report", lambda a: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    result = []
    t = threading.Thread(target=lambda: result.append(main(["report", "p.tar"])))
    t.start()
    t.join(30)
    assert result == [0] and seen == [before] and signal.getsignal(signal.SIGTERM) is before


class _PipeStdout:
    """A stdout whose reader went away: writes go to a file, flush raises BrokenPipeError."""

    def __init__(self, path):
        self.f = open(path, "w")          # noqa: SIM115 (closed by the test)

    def write(self, s):
        return self.f.write(s)

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        return self.f.fileno()


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("where", ["command", "final flush"])
def test_broken_pipe_exits_141_quietly(monkeypatch, tmp_path, capsys, where):
    out = _PipeStdout(tmp_path / "stdout.txt")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(cli, "cmd_report", _raising(BrokenPipeError(32, "Broken pipe")) if where == "command"
                        else lambda a: 0)
    fds = _open_fds()
    assert main(["report", "p.tar"]) == 141
    assert _open_fds() == fds                                        # the /dev/null descriptor was closed
    os.write(out.fileno(), b"late output")                          # stdout now goes to /dev/null
    out.f.close()
    assert (tmp_path / "stdout.txt").read_text() == ""
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- README
def _readme_options():
    path = os.path.join(ROOT, "README.md")
    if not os.path.exists(path):
        pytest.skip("README.md is not in this copy (mutation run)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index("Options (all in `tvmc compile --help`)")
    return " ".join(text[start:text.index("`tvmc run` modes", start)].split())


def test_readme_option_list_matches_compile_help():
    """Every option README's option list names is one of `tvmc compile --help`, with its choices and default."""
    text = _readme_options()
    compile_parser = _subparsers(cli._parser()).choices["compile"]
    acts = {o: a for a in compile_parser._actions for o in a.option_strings}
    help_text = " ".join(compile_parser.format_help().split())
    named = set(re.findall(r"(--[a-z][a-z0-9-]*)", text)) - {"--target-pim-psq-"}
    assert len(named) >= 15
    for opt in sorted(named):
        assert opt in acts and opt in help_text, opt
    fields = re.search(r"`--target-pim-psq-<field>` for every crossbar field \((.*?)`--psq-objective", text).group(1)
    for f in SPEC_FIELDS:
        assert f.replace("_", "-") in fields and f"--target-pim-psq-{f.replace('_', '-')}" in acts, f
    listed = re.findall(r"`(--[a-z-]+) ([a-z0-9+|=.N-]+)`\s*(?:\(default ([a-z0-9+]+))?", text)
    assert len(listed) >= 7
    for opt, values, default in listed:
        a = acts[opt]
        if a.choices is not None and "|" in values:          # a list of the choices, not one example
            assert sorted(values.split("|")) == sorted(a.choices), opt
        if default:
            assert default == (a.default if a.default is not None else "auto"), opt
            assert f"(default: {default}" in " ".join(a.help.split()), opt
