"""The ``pim-psq`` target: tag, options (preset + overrides), and the build that writes a package.

``tvm.target.Target("pim-psq")`` is an ``llvm`` target with keys ``pim_psq, cpu`` (TVM 0.27
cannot add target kinds from Python; tags it can).  The crossbar options are not part
of the target string: they come from a preset plus ``--target-pim-psq-<option>``
overrides (old tvmc style), see :func:`spec_from_options`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..core.crossbar import DEFAULT_PRESET, CrossbarSpec, SpecError, parse_bits, preset
from ..core.search import DEFAULT_GRANULARITY, DEFAULT_OBJECTIVE
from ..core.sensitivity import BIAS_CORRECTIONS, DEFAULT_BIAS_CORRECTION
from .input_stats import SENSITIVITIES, bias_corrections, layer_input_stats
from .tag import TAG, register_tag

TARGETS = ("pim-psq", "llvm")
#: crossbar options settable with --target-pim-psq-<option> (CLI spelling uses '-')
SPEC_OPTIONS = tuple(f.name for f in dataclasses.fields(CrossbarSpec) if f.name != "name")


def _convert(field: str, value: Any) -> Any:
    if field == "weight_bits":
        return parse_bits(value) if isinstance(value, str) else tuple(int(b) for b in value)
    if field == "adc_bits":
        if value is None or str(value).lower() in ("none", "lossless", "0"):
            return None
    if field == "encoding":
        return str(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpecError(f"--target-pim-psq-{field.replace('_', '-')} expects an integer, got {value!r}") from None


def spec_from_options(preset_name: str | None = None, **overrides: Any) -> CrossbarSpec:
    """A crossbar spec from a preset name plus option overrides (strings accepted, as from the CLI)."""
    clean = {k: _convert(k, v) for k, v in overrides.items() if v is not None}
    unknown = set(clean) - set(SPEC_OPTIONS)
    if unknown:
        raise SpecError(f"unknown crossbar option(s) {sorted(unknown)}; known: {list(SPEC_OPTIONS)}")
    return preset(preset_name or DEFAULT_PRESET, **clean)


def _export(ex) -> bytes:
    with tempfile.TemporaryDirectory(prefix="psq-build-") as d:
        p = os.path.join(d, "host_library.so")
        ex.export_library(p)
        with open(p, "rb") as f:
            return f.read()


def _io_info(mod) -> list[dict[str, Any]]:
    from tvm import relax

    from ..passes.patterns import _shape

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


def build(model_or_path: Any, target: str = TAG, *, input_shapes: Mapping[str, Any] | str | None = None,
          preset_name: str | None = None, spec: CrossbarSpec | None = None, objective: str = DEFAULT_OBJECTIVE,
          budget: str | None = None, tolerance: float | None = None, bits: Any = None, granularity: str = DEFAULT_GRANULARITY,
          sensitivity: str = "none", bias_correction: str = DEFAULT_BIAS_CORRECTION,
          emit_c_header: bool = False, float_weights: bool = True, fold_batchnorm: bool = True,
          progress: Callable[[str], None] | None = None, **spec_overrides: Any):
    """Compile an ONNX model for ``pim-psq`` (or a plain ``llvm`` host build); returns a Package."""
    import tvm

    from .. import __version__
    from ..frontend.onnx_import import import_onnx
    from ..runtime.package import FORMAT, VERSION, Package
    from ..passes import AnnotatePSQ, LowerToPIM, PartitionForPIM
    from ..core.report import build_report

    say = progress or (lambda msg: None)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    t0 = time.perf_counter()
    spec = spec.replace(**{k: _convert(k, v) for k, v in spec_overrides.items() if v is not None}) if spec \
        else spec_from_options(preset_name, **spec_overrides)
    if isinstance(bits, str):
        bits = parse_bits(bits)
    if budget is not None and tolerance is not None:
        raise ValueError("give either --psq-budget or --psq-tolerance, not both")
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"unknown sensitivity {sensitivity!r}; choose one of {SENSITIVITIES}")
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(f"unknown bias correction {bias_correction!r}; choose one of {BIAS_CORRECTIONS}")
    register_tag()
    say("importing ONNX model")
    mod, info = import_onnx(model_or_path, input_shapes, batchnorm=fold_batchnorm)
    model_name = os.path.basename(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else "model"
    layers: list[dict] = []
    blobs: dict[str, np.ndarray] = {}
    host: list[dict] = []
    result = None
    if target == TAG:
        say("partitioning (pim_psq patterns)")
        part = PartitionForPIM(spec, info["names"])
        mod = part(mod)
        say("PSQ search over all PIM layers")
        ann = AnnotatePSQ(spec, objective=objective, budget=budget, tolerance=tolerance, bits=bits,
                          granularity=granularity)
        mod = ann(mod)
        a = ann.annotation
        result, host = a.result, a.host_layers
        say(f"lowering {len(a.layers)} PIM layer(s) to runtime calls; {len(host)} weight layer(s) on host")
        mod = LowerToPIM()(mod)
        if result is not None:
            from ..core.tables import crossbar_cells
            blobs["crossbars"] = crossbar_cells(result)
        else:
            blobs["crossbars"] = np.zeros((0, spec.rows, spec.cols), dtype=np.uint8)
        for li, rec in enumerate(a.layers):
            entry = {k: v for k, v in rec.items() if k not in ("weight", "bias_array")}
            if rec["bias_array"] is not None:
                entry["bias"] = f"bias_{rec['id']}"
                blobs[entry["bias"]] = rec["bias_array"].astype(np.float32)
            else:
                entry["bias"] = None
            # float weights are needed for the synthetic float run of sensitivity / bias correction;
            # dropped at the end when not wanted
            entry["float_weight"] = f"weight_{rec['id']}"
            blobs[entry["float_weight"]] = np.ascontiguousarray(rec["weight"], dtype=np.float32)
            entry["bias_correction"] = None
            entry["tiles"] = tile_entries(result, li)
            layers.append(entry)
        tvm_target = tvm.target.Target(TAG)
    else:
        blobs["crossbars"] = np.zeros((0, spec.rows, spec.cols), dtype=np.uint8)
        tvm_target = tvm.target.Target("llvm")
    say(f"building host module ({'pim-psq' if target == TAG else 'llvm'})")
    ex = tvm.compile(mod, target=tvm_target)
    lib = _export(ex)
    report = build_report(result, host, spec, layers)
    manifest = {
        "format": FORMAT, "version": VERSION, "target": target, "model": model_name,
        "producer": {"psq_tvm": __version__, "tvm": tvm.__version__},
        "spec": spec.to_dict(), "inputs": info["inputs"], "outputs": _io_info(mod),
        "layers": layers, "host_layers": host, "report": report,
        "fold_batchnorm": bool(fold_batchnorm),
        "search": {"objective": objective, "budget": budget, "tolerance": tolerance, "granularity": granularity,
                   "sensitivity": sensitivity, "bias_correction": bias_correction,
                   "bits": list(bits) if bits else None, "note": result.note if result is not None else ""},
        "runtime": {"function": "pim_psq.layer", "modes": ["sim", "fake-quant", "float"]},
    }
    timing = {"search_seconds": float(result.search_seconds) if result is not None else 0.0,
              "compile_seconds": time.perf_counter() - t0}
    pkg = Package(manifest, blobs, lib, timing=timing)
    stats_of: dict[str, list] = {}      # input statistics per kind (a float run, for 'synthetic'): once

    def input_stats(kind: str) -> list:
        if kind not in stats_of:
            stats_of[kind] = layer_input_stats(pkg, kind, info["bn_stats"])
        return stats_of[kind]

    if sensitivity != "none" and result is not None:
        say(f"data-free sensitivity ({sensitivity} input statistics), then the search again")
        from ..core.search import SearchConfig, psq_search
        from ..core.sensitivity import input_weighted_importance
        from ..core.tables import crossbar_cells
        imp = input_weighted_importance(result.tiles, [None if st is None else st[1] for st in input_stats(sensitivity)])
        result = psq_search(result.tiles.layers, spec, tiles=result.tiles, budget=budget, tolerance=tolerance,
                            bits=bits, config=SearchConfig(objective=objective, granularity=granularity),
                            tile_importance=imp)
        blobs["crossbars"] = crossbar_cells(result)
        for li, entry in enumerate(layers):
            entry["tiles"] = tile_entries(result, li)
        manifest["report"] = build_report(result, host, spec, layers)
        manifest["search"]["note"] = result.note
        timing["search_seconds"] += float(result.search_seconds)
        timing["compile_seconds"] = time.perf_counter() - t0
        pkg = Package(manifest, blobs, lib, timing=timing)
    if bias_correction != "none" and result is not None:
        stats = input_stats(bias_correction)
        say(f"data-free bias correction ({bias_correction} input means): "
            f"{sum(st is not None for st in stats)} of {len(stats)} PIM layers have statistics")
        for entry, corr in zip(layers, bias_corrections(result, stats)):
            if corr is not None:
                entry["bias_correction"] = f"bias_correction_{entry['id']}"
                blobs[entry["bias_correction"]] = corr.astype(np.float32)
    if target == TAG and not float_weights:
        for entry in layers:
            blobs.pop(entry["float_weight"])
            entry["float_weight"] = None
    if bias_correction != "none" or not float_weights:
        timing["compile_seconds"] = time.perf_counter() - t0
        pkg = Package(manifest, blobs, lib, timing=timing)
    pkg.quant_result = result          # in memory only (not stored): the search result behind the tables
    pkg.bn_stats = info["bn_stats"]    # in memory only: BatchNorm input statistics of the ONNX model
    if emit_c_header:
        from .c_header import c_header
        pkg.members()  # fill in the blob table first
        pkg.extras["pim_psq_tables.h"] = c_header(pkg.manifest, blobs["crossbars"]).encode()
    say(f"done in {timing['compile_seconds']:.2f} s")
    return pkg
