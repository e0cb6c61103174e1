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

from ..crossbar import DEFAULT_PRESET, CrossbarSpec, SpecError, parse_bits, preset
from ..search import DEFAULT_GRANULARITY, DEFAULT_OBJECTIVE
from ..sensitivity import BIAS_CORRECTIONS, DEFAULT_BIAS_CORRECTION

TAG = "pim-psq"
TARGETS = ("pim-psq", "llvm")
#: crossbar options settable with --target-pim-psq-<option> (CLI spelling uses '-')
SPEC_OPTIONS = tuple(f.name for f in dataclasses.fields(CrossbarSpec) if f.name != "name")


def register_tag() -> None:
    """Register the ``pim-psq`` target tag (idempotent)."""
    import tvm
    from tvm.target import tag

    try:
        tvm.target.Target(TAG)
        return
    except Exception:
        pass
    tag.register_tag(TAG, {"kind": "llvm", "keys": ["pim_psq", "cpu"]})


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


#: where the data-free input statistics come from: seeded N(0,1) inputs run through the float model, or
#: the model's BatchNorm parameters propagated analytically (psq_tvm.bn_stats)
SENSITIVITIES = ("none", "synthetic", "bn")
#: synthetic samples for the data-free input statistics (seeded standard normal in the input space)
SYNTHETIC_SAMPLES = 32


def synthetic_feeds(pkg, samples: int, seed: int) -> list[list[np.ndarray]] | None:
    """Seeded N(0, 1) feeds for the package's inputs, enough batches for ``samples`` items (no data).

    None when an input is not float (token ids cannot be synthesised this way).
    """
    info = pkg.manifest["inputs"]
    if any(not str(i["dtype"]).startswith("float") for i in info):
        return None
    rng = np.random.default_rng(seed)
    batch = max(1, int(info[0]["shape"][0]) if info[0]["shape"] else 1)
    return [[rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in info]
            for _ in range(max(1, -(-samples // batch)))]


def conv_row_means(x: np.ndarray, layer: Mapping[str, Any]) -> np.ndarray:
    """Mean of every im2col row of a conv layer's input ``x`` [N, C, H, W] over batch and output
    positions, padding zeros included: ``[C * kh * kw]`` in the unrolled matrices' row order."""
    kh, kw = (int(v) for v in layer["weight_shape"][2:])
    sh, sw = (int(v) for v in layer["strides"])
    dh, dw = (int(v) for v in layer["dilation"])
    top, left, bottom, right = (int(v) for v in layer["padding"])
    ho, wo = (int(v) for v in layer["output_shape"][2:])
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out = np.empty((x.shape[1], kh, kw), dtype=np.float64)
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, :, a * dh:a * dh + sh * (ho - 1) + 1:sh, b * dw:b * dw + sw * (wo - 1) + 1:sw]
            out[:, a, b] = patch.mean(axis=(0, 2, 3), dtype=np.float64)
    return out.reshape(-1)


def traced_layer_inputs(pkg, feeds_list) -> Iterator[tuple[str, dict, np.ndarray]]:
    """``(layer id, manifest layer, input as float64)`` of every PIM layer call in float runs of the
    package on ``feeds_list``; a constant-left matmul's input is given with its inputs last (``[..., K]``)."""
    by_id = {str(l["id"]): l for l in pkg.manifest["layers"]}
    for feeds in feeds_list:
        _, trace = pkg.run(feeds, "float", trace=True)
        for lid, x, _y in trace:
            lay = by_id[lid]
            x = np.asarray(x, dtype=np.float64)
            if lay["op"] != "conv2d" and lay.get("operand") == "left" and x.ndim >= 2:
                x = np.swapaxes(x, -1, -2)
            yield lid, lay, x


def float_input_stats(pkg, feeds_list) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Input statistics of every PIM layer from float runs of the package on ``feeds_list``:
    ``(E[x] per unrolled row, E[x^2] per input channel)``, ``None`` for a layer never reached.

    Rows: a dense layer's inputs; for a conv the im2col rows (:func:`conv_row_means`, padding zeros
    counted, so a bias correction from these means is exact on these inputs).
    """
    layers = pkg.manifest["layers"]
    sums: dict[str, list] = {}
    for lid, lay, x in traced_layer_inputs(pkg, feeds_list):
        if lay["op"] == "conv2d":
            flat = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
            row_mean = conv_row_means(x, lay)
        else:
            flat = x.reshape(-1, x.shape[-1])
            row_mean = flat.mean(axis=0)
        acc = sums.setdefault(lid, [0.0, 0.0, 0])
        acc[0] = acc[0] + row_mean
        acc[1] = acc[1] + np.einsum("ij,ij->j", flat, flat) / flat.shape[0]
        acc[2] += 1
    out = []
    for l in layers:
        acc = sums.get(str(l["id"]))
        out.append(None if acc is None else (acc[0] / acc[2], acc[1] / acc[2]))
    return out


def synthetic_input_stats(pkg, samples: int = SYNTHETIC_SAMPLES, seed: int = 0
                          ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """:func:`float_input_stats` on seeded N(0, 1) inputs (no data).  Only float model inputs can be
    synthesised; a model with integer inputs (token ids) gets ``None`` for every layer."""
    feeds_list = synthetic_feeds(pkg, samples, seed)
    if feeds_list is None:
        return [None] * len(pkg.manifest["layers"])
    return float_input_stats(pkg, feeds_list)


def batchnorm_layer_stats(layers: list[dict], bn_stats: Mapping[str, tuple[np.ndarray, np.ndarray]]
                          ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """:func:`psq_tvm.bn_stats.batchnorm_input_stats` per PIM layer (matched by ONNX node name), as
    ``(E[x] per unrolled row, E[x^2] per input channel)`` like :func:`synthetic_input_stats`.

    Conv row means count the conv's zero padding (:func:`conv_row_means` of the constant-mean image).
    ``None`` for layers without BatchNorm statistics or whose channel count does not match.
    """
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for lay in layers:
        st = bn_stats.get(lay["name"])
        if lay["op"] == "conv2d":
            cin = int(lay["weight_shape"][1]) * int(lay["groups"])
        else:
            cin = int(lay["matrix_shape"][0])
        if st is None or st[0].size != cin or lay.get("operand") == "left":
            out.append(None)
            continue
        mean, ms = (np.asarray(v, np.float64) for v in st)
        if lay["op"] == "conv2d":
            shape = [int(v) for v in lay["input_shape"]]
            img = np.broadcast_to(mean.reshape(1, -1, 1, 1), [1, cin] + shape[2:])
            row_mean = conv_row_means(img, lay)
        else:
            row_mean = mean
        out.append((row_mean, ms))
    return out


def layer_input_stats(pkg, kind: str, bn_stats: Mapping[str, Any] | None = None
                      ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Data-free input statistics of every PIM layer, from ``kind`` = 'synthetic' or 'bn'."""
    if kind == "synthetic":
        return synthetic_input_stats(pkg)
    if kind == "bn":
        return batchnorm_layer_stats(pkg.manifest["layers"], bn_stats or {})
    raise ValueError(f"unknown input statistics {kind!r}; choose 'synthetic' or 'bn'")


def synthetic_input_moments(pkg, samples: int = SYNTHETIC_SAMPLES, seed: int = 0) -> list[np.ndarray | None]:
    """``E[x^2]`` per input channel of every PIM layer (:func:`synthetic_input_stats`), for the sensitivity."""
    return [None if st is None else st[1] for st in synthetic_input_stats(pkg, samples, seed)]


def bias_corrections(result, stats: list[tuple[np.ndarray, np.ndarray] | None]) -> list[np.ndarray | None]:
    """Per PIM layer, the term to add to its bias cancelling the expected output shift ``E[x]^T dW``
    of the quantised weights in ``result`` (DFQ bias correction), ``E[x]`` from ``stats``
    (:func:`layer_input_stats`); ``None`` for a layer whose input statistics are unknown."""
    from ..sensitivity import bias_correction

    return [None if st is None else bias_correction(result, li, st[0]) for li, st in enumerate(stats)]


def output_sensitivity(pkg, result, samples: int = 8, seed: int = 0) -> np.ndarray | None:
    """Per-layer output sensitivity from seeded synthetic inputs (no data): ``[n_layers]`` or None.

    For every PIM layer ``l``, the float model is run with only that layer's weight replaced by its
    quantised version in ``result`` (a probe allocation); the factor is the relative output error
    ``||y_l - y||^2 / ||y||^2`` divided by the layer's relative weight error ``||dW||^2 / ||W||^2``,
    i.e. how much of a layer's weight error reaches the network output.  Normalised to geometric
    mean 1.  None for models with integer inputs (nothing to synthesise).
    """
    from ..tiling import unroll

    layers = pkg.manifest["layers"]
    feeds_list = synthetic_feeds(pkg, samples, seed)
    if feeds_list is None:
        return None

    def outputs() -> np.ndarray:
        return np.concatenate([np.concatenate([np.asarray(o, np.float64).ravel() for o in pkg.run(f, "float")])
                               for f in feeds_list])

    y0 = outputs()
    e0 = max(float(y0 @ y0), 1e-300)
    cache = pkg.__dict__.setdefault("_runtime_cache", {})
    factor = np.ones(len(layers))
    for li, lay in enumerate(layers):
        w = np.asarray(result.tiles.layers[li].weight, np.float64)
        wq = result.dequantized(li).astype(np.float64)
        rel_w = float(((wq - w) ** 2).sum() / max((w ** 2).sum(), 1e-300))
        if rel_w <= 0:
            continue
        key = ("float", str(lay["id"]))
        saved = cache.pop(key, None)
        kind = "conv2d" if lay["op"] == "conv2d" else "dense"
        cache[key] = [np.ascontiguousarray(m, dtype=np.float64) for m in unroll(wq, kind, int(lay["groups"]))]
        try:
            d = outputs() - y0
        finally:
            cache.pop(key, None)
            if saved is not None:
                cache[key] = saved
        factor[li] = max(float(d @ d) / e0, 1e-30) / rel_w
    return factor / np.exp(np.log(factor).mean())


def build(model_or_path: Any, target: str = TAG, *, input_shapes: Mapping[str, Any] | str | None = None,
          preset_name: str | None = None, spec: CrossbarSpec | None = None, objective: str = DEFAULT_OBJECTIVE,
          budget: str | None = None, tolerance: float | None = None, bits: Any = None, granularity: str = DEFAULT_GRANULARITY,
          sensitivity: str = "none", bias_correction: str = DEFAULT_BIAS_CORRECTION,
          emit_c_header: bool = False, float_weights: bool = True, fold_batchnorm: bool = True,
          progress: Callable[[str], None] | None = None, **spec_overrides: Any):
    """Compile an ONNX model for ``pim-psq`` (or a plain ``llvm`` host build); returns a Package."""
    import tvm

    from .. import __version__
    from ..importer import import_onnx
    from ..package import FORMAT, VERSION, Package
    from ..passes import AnnotatePSQ, LowerToPIM, PartitionForPIM
    from ..report import build_report

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
            from ..tables import crossbar_cells
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
        from ..search import SearchConfig, psq_search
        from ..sensitivity import input_weighted_importance
        from ..tables import crossbar_cells
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
