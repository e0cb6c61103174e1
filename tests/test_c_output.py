"""C output (--emit-c-header): declarations in the header, one definition in the .c file, values read back by a C
program equal to the package's, cells in the source or in a blob."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

pytest.importorskip("tvm")

import psq_tvm  # noqa: E402
from psq_tvm.core.crossbar import preset  # noqa: E402
from psq_tvm.targets import c_header  # noqa: E402

from test_onnx_models import small_cnn  # noqa: E402

GCC = shutil.which("gcc")
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"]

MAIN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include "tables.h"
unsigned long cell_sum(const uint8_t *cells);
const char *layer_name(unsigned i);
int main(int argc, char **argv) {
  const uint8_t *cells;
  unsigned t, i;
#if PIM_PSQ_CELLS_IN_SOURCE
  cells = pim_psq_cells;
  (void)argc; (void)argv;
#else
  static uint8_t buf[PIM_PSQ_N_CELLS];
  FILE *f = fopen(argc > 1 ? argv[1] : PIM_PSQ_CELLS_BLOB, "rb");
  if (!f || fread(buf, 1, PIM_PSQ_N_CELLS, f) != PIM_PSQ_N_CELLS) return 2;
  fclose(f);
  cells = buf;
#endif
  printf("version %d model %s sha %s\n", PIM_PSQ_C_FORMAT_VERSION, PIM_PSQ_MODEL_NAME, PIM_PSQ_MANIFEST_SHA256);
  printf("counts %u %u %u %u %u %u %u\n", PIM_PSQ_N_LAYERS, PIM_PSQ_N_TILES, PIM_PSQ_N_CROSSBARS, PIM_PSQ_N_CELLS,
         PIM_PSQ_N_BIASES, PIM_PSQ_N_BIAS_CORRECTIONS, PIM_PSQ_N_ADC_FULL_SCALES);
  printf("cellsum %lu\n", cell_sum(cells));
  for (i = 0; i < PIM_PSQ_N_LAYERS; i++) {
    const pim_psq_layer_t *l = &pim_psq_layers[i];
    printf("layer %u %s %u %u %u", i, layer_name(i), l->n_out, l->first_tile, l->n_tiles);
    printf(" in %u", pim_psq_dims[l->shapes[2] + l->shapes[3] - 1]);
    printf(" bias %a", l->first_bias == PIM_PSQ_NONE ? 0.0 : (double)pim_psq_biases[l->first_bias + l->n_out - 1]);
    printf(" corr %a\n", l->first_bias_correction == PIM_PSQ_NONE ? 0.0
           : (double)pim_psq_bias_corrections[l->first_bias_correction + l->n_out - 1]);
  }
  for (t = 0; t < PIM_PSQ_N_TILES; t++) {
    const pim_psq_tile_t *p = &pim_psq_tiles[t];
    unsigned last = p->first_placement + p->slices * PIM_PSQ_POLARITIES - 1;
    unsigned xb = pim_psq_placement[last];
    unsigned long at = ((unsigned long)xb * PIM_PSQ_ROWS + p->row_off + p->nrows - 1) * PIM_PSQ_COLS
                       + p->col_off + p->ncols - 1;
    printf("tile %u %u %u %a %u %u", t, p->layer, p->bits, (double)pim_psq_scales[p->first_scale + p->n_scales - 1],
           xb, cells[at]);
    if (p->first_adc_full_scale != PIM_PSQ_NONE)
      printf(" fs %a", (double)pim_psq_adc_full_scales[p->first_adc_full_scale + p->slices * PIM_PSQ_POLARITIES - 1]);
    printf("\n");
  }
  return 0;
}
"""

OTHER_C = r"""
#include "tables.h"
unsigned long cell_sum(const uint8_t *cells) {
  unsigned long s = 0, i;
  for (i = 0; i < PIM_PSQ_N_CELLS; i++) s += cells[i];
  return s;
}
const char *layer_name(unsigned i) { return pim_psq_layers[i].name; }
"""


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A lossy-ADC package (prime cells, 6-bit ADC: calibrated full scales) with bias corrections."""
    spec = preset("prime", rows=32, cols=32)
    pkg = psq_tvm.compile(small_cnn(), spec=spec, budget="avg-bits=4", bias_correction="synthetic")
    path = pkg.save(tmp_path_factory.mktemp("c") / "m.tar")
    return pkg, path


def _build_and_run(d, files: dict, *args) -> list[str]:
    for name, data in files.items():
        (d / name.replace(name.split("_cells")[0].split(".")[0], "tables", 1)).write_bytes(data)
    (d / "main.c").write_text(MAIN_C)
    (d / "other.c").write_text(OTHER_C)
    for src in ("tables.c", "main.c", "other.c"):
        subprocess.run([GCC, *CFLAGS, "-c", src, "-o", src[:-2] + ".o"], cwd=d, check=True, capture_output=True,
                       text=True)
    # both translation units that include the header must only refer to the tables, never define them
    for obj in ("main.o", "other.o"):
        nm = subprocess.run(["nm", obj], cwd=d, check=True, capture_output=True, text=True).stdout
        defined = [ln for ln in nm.splitlines() if "pim_psq_" in ln and " U " not in f" {ln.split()[-2]} "]
        assert not defined, f"{obj} defines tables: {defined}"
    subprocess.run([GCC, "main.o", "other.o", "tables.o", "-o", "prog"], cwd=d, check=True, capture_output=True,
                   text=True)
    return subprocess.run(["./prog", *args], cwd=d, check=True, capture_output=True, text=True).stdout.splitlines()


def _expected(pkg, path) -> dict:
    with tarfile.open(path) as tf:
        man_bytes = tf.extractfile("manifest.json").read()
        cells = np.frombuffer(tf.extractfile("crossbars.bin").read(), np.uint8)
    man = json.loads(man_bytes)
    cells = cells.reshape(man["blobs"]["crossbars"]["shape"])
    return {"sha": hashlib.sha256(man_bytes).hexdigest(), "man": man, "cells": cells}


@pytest.mark.skipif(GCC is None, reason="needs gcc")
@pytest.mark.parametrize("in_source", [True, False])
def test_c_output_compiles_links_and_reads_back(package, tmp_path, monkeypatch, in_source):
    pkg, path = package
    if not in_source:
        monkeypatch.setattr(c_header, "CELLS_IN_SOURCE_MAX", 0)
    loaded = psq_tvm.load(path)
    files = c_header.package_c_sources(loaded, "tables")
    assert set(files) == {"tables.h", "tables.c"} | (set() if in_source else {"tables_cells.bin"})
    exp = _expected(pkg, path)
    man, cells = exp["man"], exp["cells"]
    if not in_source:
        assert files["tables_cells.bin"] == cells.tobytes()
        assert b"pim_psq_cells[" not in files["tables.c"]
    out = _build_and_run(tmp_path, files, "tables_cells.bin")
    head = out[0].split()
    assert head[1] == str(c_header.C_FORMAT_VERSION) and head[3] == man["model"] and head[5] == exp["sha"]
    layers = man["layers"]
    tiles = [t for lay in layers for t in lay["tiles"]]
    n_bias = sum(int(np.prod(man["blobs"][lay["bias"]]["shape"])) for lay in layers if lay["bias"])
    n_corr = sum(int(np.prod(man["blobs"][lay["bias_correction"]]["shape"])) for lay in layers
                 if lay["bias_correction"])
    n_fs = sum(np.size(t["adc_full_scale"]) for t in tiles if "adc_full_scale" in t)
    assert n_corr > 0 and n_fs > 0                     # the case covers every array
    assert out[1].split()[1:] == [str(v) for v in (len(layers), len(tiles), cells.shape[0], cells.size, n_bias,
                                                   n_corr, n_fs)]
    assert out[2] == f"cellsum {int(cells.sum(dtype=np.int64))}"
    for i, lay in enumerate(layers):
        f = out[3 + i].split()
        n_out = lay["matrix_shape"][1] * lay["groups"]
        assert f[2] == lay["name"] and int(f[3]) == n_out and int(f[5]) == len(lay["tiles"])
        assert int(f[7]) == lay["input_shape"][-1]
        bias = loaded.blob(lay["bias"])[-1] if lay["bias"] else 0.0
        corr = loaded.blob(lay["bias_correction"])[-1] if lay["bias_correction"] else 0.0
        assert float.fromhex(f[9]) == float(np.float32(bias)) and float.fromhex(f[11]) == float(np.float32(corr))
    for k, t in enumerate(tiles):
        f = out[3 + len(layers) + k].split()
        xb = t["crossbars"][-1][-1]
        assert int(f[3]) == t["bits"] and int(f[5]) == xb
        assert float.fromhex(f[4]) == float(np.float32(np.atleast_1d(t["scale"])[-1]))
        assert int(f[6]) == cells[xb, t["row_off"] + t["nrows"] - 1, t["col_off"] + t["ncols"] - 1]
        if "adc_full_scale" in t:
            assert float.fromhex(f[8]) == float(np.float32(t["adc_full_scale"][-1][-1]))
        else:
            assert len(f) == 7


def test_c_output_is_deterministic_and_names_are_checked(package, tmp_path):
    pkg, path = package
    a = c_header.package_c_sources(psq_tvm.load(path), "x")
    b = c_header.package_c_sources(psq_tvm.load(path), "x")
    assert a == b
    with pytest.raises(c_header.CHeaderError, match=r"must end in \.h"):
        c_header.write_c_output(pkg, str(tmp_path / "tables.c"))
    written = c_header.write_c_output(psq_tvm.load(path), str(tmp_path / "drv.h"))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["drv.c", "drv.h"]
    assert (tmp_path / "drv.c").read_bytes() == c_header.package_c_sources(psq_tvm.load(path), "drv")["drv.c"]
