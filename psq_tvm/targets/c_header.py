"""``--emit-c-header``: the crossbar programming tables for a C driver or firmware.

Two files (:func:`c_sources`): ``<name>.h`` holds only macros, types and ``extern const`` declarations, so any
number of translation units can include it; ``<name>.c`` holds the one definition of every table.  The cell
levels, by far the largest table, are in the ``.c`` file while they are at most :data:`CELLS_IN_SOURCE_MAX`
bytes; above that (ResNet-50: 51.5 MB; as a C initialiser gcc needs 4-9 s per MiB) they stay
a binary blob, ``<name>_cells.bin`` -- exactly the package's ``crossbars.bin``: raw ``uint8
[crossbars][rows][cols]`` -- that the driver loads, and the header gives its size and sha256.

The header carries ``PIM_PSQ_C_FORMAT_VERSION`` (this layout), the package format and version, the model
name, ``PIM_PSQ_MANIFEST_SHA256`` (the package digest: the sha256 of the package's ``manifest.json``, which
holds the sha256 of every blob and of the host library; hence the C files are written next to the package,
not into it), the spec, and a count macro for every array.  Tables: layers (kind, groups, shapes, strides,
padding, dilation, where its tiles, biases and bias corrections are), tiles (box, bits, slices, placement,
scales, calibrated ADC full scales), and the float arrays ``pim_psq_scales``, ``pim_psq_biases``,
``pim_psq_bias_corrections``, ``pim_psq_adc_full_scales`` -- float32 values written as C99 hexadecimal
floating constants, so the C ``float`` is bit-identical to the package's float32.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np

#: version of the C layout below (1: the former single ``static const`` header)
C_FORMAT_VERSION = 2
#: cell tables up to this many bytes go into the .c file; larger ones stay a binary blob (gcc -c took 4-9 s per MiB
#: of cells in the source on the loaded 2-core VM; scripts/bench_c_output.py)
CELLS_IN_SOURCE_MAX = 1 << 20
#: "none" in uint32 index fields (no bias, no bias correction, no calibrated ADC full scale)
NONE = 0xFFFFFFFF


class CHeaderError(ValueError):
    """A package the C output cannot describe (the message says what and what to do)."""


def _c_string(s: str) -> str:
    out = []
    for ch in str(s):
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= o < 127 and ch != "?":          # '?' escaped: no trigraphs
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode())
    return '"' + "".join(out) + '"'


def _floats(values: np.ndarray) -> list[str]:
    """float32 values as exact C99 hexadecimal float constants (``0x1.8p-3f``)."""
    v = np.asarray(values, dtype=np.float32).astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise CHeaderError("a scale, bias or ADC full scale is not finite; recompile the model")
    return [("-" if x < 0 else "") + (float.hex(abs(float(x))) if x != 0 else "0x0p+0") + "f" for x in v]


def _rows(items: list[str], per_line: int) -> list[str]:
    return ["  " + ", ".join(items[k:k + per_line]) + "," for k in range(0, len(items), per_line)] or ["  0"]


def _array(ctype: str, name: str, count_macro: str, items: list[str], per_line: int) -> list[str]:
    return [f"const {ctype} {name}[PIM_PSQ_ARRAY_SIZE({count_macro})] = {{"] + _rows(items, per_line) + ["};"]


def c_sources(manifest: Mapping[str, Any], manifest_bytes: bytes, blobs: Mapping[str, np.ndarray],
              name: str = "pim_psq_tables") -> dict[str, bytes]:
    """``{name.h, name.c[, name_cells.bin]}`` for a saved package: ``manifest`` with its blob table filled in,
    ``manifest_bytes`` the ``manifest.json`` as stored (its sha256 is the digest), ``blobs`` the arrays."""
    spec = manifest["spec"]
    cells = np.ascontiguousarray(blobs["crossbars"], dtype=np.uint8)
    guard = "PIM_PSQ_" + "".join(ch if ch.isalnum() else "_" for ch in name).upper() + "_H"
    P = 2 if spec["encoding"] == "differential" else 1
    layers, tiles, dims, scales, places, biases, corrs, fss = [], [], [], [], [], [], [], []
    for lay in manifest["layers"]:
        first_tile = len(tiles)
        shp = []
        for key in ("weight_shape", "input_shape", "output_shape"):
            v = [int(d) for d in (lay.get(key) or [])]
            shp += [len(dims), len(v)]
            dims.extend(v)
        fb = fc = NONE
        n_out = int(lay["matrix_shape"][1]) * int(lay["groups"])
        if lay.get("bias"):
            fb = len(biases)
            biases.extend(_floats(blobs[lay["bias"]].reshape(-1)))
        if lay.get("bias_correction"):
            fc = len(corrs)
            corrs.extend(_floats(blobs[lay["bias_correction"]].reshape(-1)))
        for t in lay["tiles"]:
            sc = np.atleast_1d(np.asarray(t["scale"], dtype=np.float32))
            ff = NONE
            if t.get("adc_full_scale") is not None:
                ff = len(fss)
                fss.extend(_floats(np.asarray(t["adc_full_scale"], dtype=np.float32).reshape(-1)))
            tiles.append(f"  {{{lay['id']}u, {t['group']}u, {t['row0']}u, {t['col0']}u, {t['nrows']}u, {t['ncols']}u, "
                         f"{t['bits']}u, {t['slices']}u, {len(scales)}u, {sc.size}u, {t['row_off']}u, {t['col_off']}u, "
                         f"{len(places)}u, {ff}u}},")
            scales.extend(_floats(sc))
            for s in t["crossbars"]:
                places.extend(str(int(x)) + "u" for x in s)
        pad = [int(v) for v in lay.get("padding") or [0, 0, 0, 0]]
        st = [int(v) for v in lay.get("strides") or [1, 1]]
        dl = [int(v) for v in lay.get("dilation") or [1, 1]]
        layers.append(
            f"  {{{_c_string(lay['name'])}, {1 if lay['op'] == 'conv2d' else 0}u, "
            f"{1 if lay.get('operand') == 'left' else 0}u, {int(lay['groups'])}u, "
            f"{int(lay['matrix_shape'][0])}u, {int(lay['matrix_shape'][1])}u, {n_out}u, "
            f"{{{st[0]}u, {st[1]}u}}, {{{', '.join(f'{p}u' for p in pad)}}}, {{{dl[0]}u, {dl[1]}u}}, "
            f"{{{', '.join(f'{v}u' for v in shp)}}}, {first_tile}u, {len(tiles) - first_tile}u, {fb}u, {fc}u}},")
    in_source = cells.nbytes <= CELLS_IN_SOURCE_MAX
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    cells_sha = hashlib.sha256(cells.tobytes()).hexdigest()
    counts = [("N_CROSSBARS", cells.shape[0], "physical crossbars"),
              ("N_LAYERS", len(layers), "PIM layers (pim_psq_layers)"),
              ("N_TILES", len(tiles), "tiles (pim_psq_tiles)"),
              ("N_SCALES", len(scales), "floats in pim_psq_scales"),
              ("N_PLACEMENT", len(places), "crossbar ids in pim_psq_placement"),
              ("N_DIMS", len(dims), "entries of pim_psq_dims"),
              ("N_BIASES", len(biases), "floats in pim_psq_biases"),
              ("N_BIAS_CORRECTIONS", len(corrs), "floats in pim_psq_bias_corrections"),
              ("N_ADC_FULL_SCALES", len(fss), "floats in pim_psq_adc_full_scales"),
              ("N_CELLS", int(cells.size), "bytes of cell levels (pim_psq_cells or the blob)")]
    adc = spec.get("adc_bits")
    h = [f"/* generated by psq-tvm from {manifest.get('model', 'model')}: crossbar programming tables. Do not edit.",
         "   Layout: docs/package_format.md, 'C output'. Tables defined once, in the matching .c file. */",
         f"#ifndef {guard}", f"#define {guard}", "#include <stdint.h>", "",
         f"#define PIM_PSQ_C_FORMAT_VERSION {C_FORMAT_VERSION}",
         f"#define PIM_PSQ_PACKAGE_FORMAT {_c_string(manifest['format'])}",
         f"#define PIM_PSQ_PACKAGE_VERSION {int(manifest['version'])}",
         f"#define PIM_PSQ_MODEL_NAME {_c_string(manifest.get('model', 'model'))}",
         "/* package digest: sha256 of the package's manifest.json (it holds the sha256 of every blob) */",
         f"#define PIM_PSQ_MANIFEST_SHA256 \"{digest}\"", "",
         f"#define PIM_PSQ_ROWS {spec['rows']}u", f"#define PIM_PSQ_COLS {spec['cols']}u",
         f"#define PIM_PSQ_CELL_BITS {spec['cell_bits']}u",
         f"#define PIM_PSQ_ENCODING_DIFFERENTIAL {1 if spec['encoding'] == 'differential' else 0}",
         f"#define PIM_PSQ_POLARITIES {P}u",
         f"#define PIM_PSQ_DAC_BITS {spec['dac_bits']}u", f"#define PIM_PSQ_ACT_BITS {spec['act_bits']}u",
         f"#define PIM_PSQ_ADC_BITS {adc if adc is not None else 0}u /* 0 = lossless */",
         f"#define PIM_PSQ_ADC_RANGE_CALIBRATED {1 if spec.get('adc_range', 'calibrated') == 'calibrated' else 0}",
         f"#define PIM_PSQ_NONE 0x{NONE:X}u /* an index field with no array behind it */", ""]
    h += [f"#define PIM_PSQ_{m} {v}u /* {what} */" for m, v, what in counts]
    h += ["/* arrays of count 0 are declared with one unused element (C has no empty arrays) */",
          "#define PIM_PSQ_ARRAY_SIZE(n) ((n) > 0u ? (n) : 1u)", "",
          f"#define PIM_PSQ_CELLS_IN_SOURCE {1 if in_source else 0} "
          "/* 1: pim_psq_cells below; 0: load the blob file */",
          f"#define PIM_PSQ_CELLS_BLOB {_c_string(name + '_cells.bin')} "
          "/* the package's crossbars.bin: raw uint8 [crossbars][rows][cols] */",
          f"#define PIM_PSQ_CELLS_SHA256 \"{cells_sha}\"", "",
          "typedef struct {",
          "  const char *name;     /* ONNX node name */",
          "  uint8_t is_conv;      /* 1: conv2d (im2col rows (ci, i, j)); 0: dense y = x @ W */",
          "  uint8_t left_operand; /* dense only: 1 = constant-left matmul, swap the input's last two axes */",
          "  uint32_t groups;",
          "  uint32_t matrix_k, matrix_n; /* unrolled matrix of ONE group: [K, N] */",
          "  uint32_t n_out;       /* output channels = groups * matrix_n (length of the bias arrays) */",
          "  uint32_t stride[2]; uint32_t padding[4]; /* top, left, bottom, right */ uint32_t dilation[2];",
          "  uint32_t shapes[6];   /* (first, ndim) in pim_psq_dims of weight_shape, input_shape, output_shape */",
          "  uint32_t first_tile, n_tiles;",
          "  uint32_t first_bias;  /* n_out floats in pim_psq_biases, or PIM_PSQ_NONE */",
          "  uint32_t first_bias_correction; /* n_out floats in pim_psq_bias_corrections (added to the bias), "
          "or PIM_PSQ_NONE */",
          "} pim_psq_layer_t;", "",
          "typedef struct {",
          "  uint32_t layer, group, row0, col0, nrows, ncols; /* box in the group's unrolled matrix */",
          "  uint32_t bits, slices;",
          "  uint32_t first_scale, n_scales; /* 1 scale (per tile) or ncols (per column): weight = scale * level */",
          "  uint32_t row_off, col_off;       /* where the tile sits on each of its crossbars */",
          "  uint32_t first_placement; /* slices * POLARITIES crossbar ids, slice-major, polarity-minor */",
          "  uint32_t first_adc_full_scale; /* slices * POLARITIES full scales (bitline-sum units), same order,",
          "                                    or PIM_PSQ_NONE (worst case / lossless) */",
          "} pim_psq_tile_t;", "",
          "extern const pim_psq_layer_t pim_psq_layers[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_LAYERS)];",
          "extern const pim_psq_tile_t pim_psq_tiles[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_TILES)];",
          "extern const uint32_t pim_psq_dims[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_DIMS)];",
          "extern const float pim_psq_scales[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_SCALES)];",
          "extern const uint32_t pim_psq_placement[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_PLACEMENT)];",
          "extern const float pim_psq_biases[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_BIASES)];",
          "extern const float pim_psq_bias_corrections[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_BIAS_CORRECTIONS)];",
          "extern const float pim_psq_adc_full_scales[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_ADC_FULL_SCALES)];",
          "#if PIM_PSQ_CELLS_IN_SOURCE",
          "extern const uint8_t pim_psq_cells[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_CELLS)]; /* [crossbar][row][col] */",
          "#endif", "", f"#endif /* {guard} */", ""]
    c = [f"/* generated by psq-tvm from {manifest.get('model', 'model')}: the tables {name}.h declares. */",
         f'#include "{name}.h"', ""]
    c += [f"const pim_psq_layer_t pim_psq_layers[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_LAYERS)] = {{"] + \
         (layers or ["  {0}"]) + ["};"]
    c += [f"const pim_psq_tile_t pim_psq_tiles[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_TILES)] = {{"] + \
         (tiles or ["  {0}"]) + ["};"]
    c += _array("uint32_t", "pim_psq_dims", "PIM_PSQ_N_DIMS", [f"{d}u" for d in dims], 16)
    c += _array("float", "pim_psq_scales", "PIM_PSQ_N_SCALES", scales, 6)
    c += _array("uint32_t", "pim_psq_placement", "PIM_PSQ_N_PLACEMENT", places, 16)
    c += _array("float", "pim_psq_biases", "PIM_PSQ_N_BIASES", biases, 6)
    c += _array("float", "pim_psq_bias_corrections", "PIM_PSQ_N_BIAS_CORRECTIONS", corrs, 6)
    c += _array("float", "pim_psq_adc_full_scales", "PIM_PSQ_N_ADC_FULL_SCALES", fss, 6)
    out = {f"{name}.h": "\n".join(h).encode()}
    if in_source:
        c += ["#if PIM_PSQ_CELLS_IN_SOURCE",
              "const uint8_t pim_psq_cells[PIM_PSQ_ARRAY_SIZE(PIM_PSQ_N_CELLS)] = {"]
        flat = cells.reshape(-1)
        text = np.array([str(i) for i in range(256)], dtype=object)[flat]
        c += ["  " + ",".join(text[j:j + 40]) + "," for j in range(0, len(text), 40)] or ["  0"]
        c += ["};", "#endif"]
    else:
        out[f"{name}_cells.bin"] = cells.tobytes()
    out[f"{name}.c"] = ("\n".join(c) + "\n").encode()
    return out



def package_c_sources(pkg, name: str = "pim_psq_tables") -> dict[str, bytes]:
    """:func:`c_sources` of a Package as it is saved (its ``manifest.json`` bytes give the digest)."""
    files = pkg.members()
    return c_sources(pkg.manifest, bytes(files["manifest.json"]), pkg.blobs, name)


def write_c_output(pkg, header_path: str) -> list[str]:
    """Write the C output of ``pkg`` next to each other: ``header_path`` (``NAME.h``), ``NAME.c`` and, for large
    models, ``NAME_cells.bin``; each written to a temporary file and renamed.  Returns the paths written."""
    import os

    from ..runtime.files import write_bytes

    base, ext = os.path.splitext(os.fspath(header_path))
    if ext != ".h":
        raise CHeaderError(f"--emit-c-header {header_path}: the header's file name must end in .h "
                           "(the .c file and the cells blob get the same stem)")
    name = os.path.basename(base)
    if not name or not (name[0].isalpha() or name[0] == "_") or not all(ch.isalnum() or ch in "_-." for ch in name):
        raise CHeaderError(f"--emit-c-header {header_path}: use a file name of letters, digits, '_', '-' or '.'")
    written = []
    for fname, data in package_c_sources(pkg, name).items():
        path = os.path.join(os.path.dirname(base), fname)
        write_bytes(path, data, "--emit-c-header")      # temporary in the same directory, renamed
        written.append(path)
    return written
