"""Package loading refuses every kind of damage with a clear message; byte order; batched runs."""

from __future__ import annotations

import json
import struct
import tarfile

import numpy as np
import pytest

pytest.importorskip("tvm")

from test_onnx_models import reference, small_cnn
from test_package import _rewrite

import psq_tvm
from psq_tvm.core.crossbar import preset
from psq_tvm.runtime.package import HOST_LIBRARY, MANIFEST, Package, PackageError, load


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """small_cnn compiled for batch 2 (so a dataset of 3 needs a padded last batch), saved."""
    d = tmp_path_factory.mktemp("integrity")
    pkg = psq_tvm.compile(small_cnn(), spec=preset("isaac", rows=32, cols=32), budget="avg-bits=4",
                          input_shapes={"x": [2, 3, 12, 12]})
    return pkg, pkg.save(d / "m.tar")


def _edit_manifest(src, dst, change):
    def edit(name, data):
        if name == MANIFEST:
            m = json.loads(data)
            change(m)
            data = json.dumps(m).encode()
        return data
    _rewrite(src, dst, edit)
    return dst


def _drop_member(src, dst, member):
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if m.name != member:
                tout.addfile(m, tin.extractfile(m))
    return dst


@pytest.mark.parametrize("version", [0, None, "1", 1.5, 2, "missing"])
def test_every_other_version_is_refused(saved, tmp_path, version):
    _, path = saved

    def change(m):
        if version == "missing":
            del m["version"]
        else:
            m["version"] = version
    bad = _edit_manifest(path, tmp_path / "v.tar", change)
    shown = repr(None if version == "missing" else version)
    with pytest.raises(PackageError, match=r"package format version " + __import__("re").escape(shown)
                       + r"; this psq-tvm reads version 1 only"):
        load(bad)


def test_version_1_loads(saved, tmp_path):
    _, path = saved
    ok = _edit_manifest(path, tmp_path / "v1.tar", lambda m: m.update(version=1))
    assert load(ok).manifest["version"] == 1


def test_missing_blob_and_host_library(saved, tmp_path):
    _, path = saved
    with pytest.raises(PackageError, match=r"member 'crossbars.bin' listed in manifest.json is missing from the tar"):
        load(_drop_member(path, tmp_path / "nob.tar", "crossbars.bin"))
    with pytest.raises(PackageError, match=r"member 'host_library.so' listed in manifest.json is missing from the tar"):
        load(_drop_member(path, tmp_path / "nohost.tar", HOST_LIBRARY))


def test_host_library_checksum_mismatch(saved, tmp_path):
    _, path = saved

    def flip(name, data):
        if name == HOST_LIBRARY:
            data = bytearray(data)
            data[len(data) // 3] ^= 0x40
            data = bytes(data)
        return data
    _rewrite(path, tmp_path / "host.tar", flip)
    with pytest.raises(PackageError, match="checksum mismatch for the host library"):
        load(tmp_path / "host.tar")


def test_blob_size_and_byte_order_mismatch(saved, tmp_path):
    _, path = saved

    def grow(m):
        m["blobs"]["crossbars"]["shape"][0] += 1
    with pytest.raises(PackageError, match=r"member 'crossbars.bin' has \d+ bytes, \d+ expected from manifest.json"):
        load(_edit_manifest(path, tmp_path / "size.tar", grow))

    def wider(m):
        m["blobs"]["crossbars"]["dtype"] = "uint16"
    with pytest.raises(PackageError, match=r"member 'crossbars.bin' has (\d+) bytes, (?!\1)\d+ expected"):
        load(_edit_manifest(path, tmp_path / "dtype.tar", wider))

    def big(m):
        m["blobs"]["crossbars"]["byte_order"] = "big"
    with pytest.raises(PackageError, match="unsupported byte order 'big'"):
        load(_edit_manifest(path, tmp_path / "order.tar", big))


def test_blobs_are_stored_little_endian_whatever_the_host_order(tmp_path):
    vals = [1.5, -2.25, 3.0e-3]
    man = {"format": "psq-tvm-package", "version": 1, "inputs": [], "layers": []}
    pkg = Package(man, {"be": np.array(vals, dtype=">f4"), "le": np.array(vals, dtype="<f4")}, None)
    path = pkg.save(tmp_path / "bo.tar")
    with tarfile.open(path) as t:
        for name in ("be.bin", "le.bin"):
            assert t.extractfile(name).read() == struct.pack("<3f", *vals)   # hand-packed little-endian
    back = load(path)
    for name in ("be", "le"):
        assert back.blob(name).tolist() == pytest.approx(vals) and back.manifest["blobs"][name]["dtype"] == "float32"


def test_run_batched_pads_after_the_data(saved):
    """3 samples through a batch-2 package: the last batch is padded; every output row must be its own
    sample's, as the ONNX reference evaluator computes it one sample at a time."""
    pkg, _ = saved
    x = np.random.default_rng(7).standard_normal((3, 3, 12, 12)).astype(np.float32)
    y = pkg.run_batched(x, mode="float")
    assert y.shape == (3, 10)
    m = small_cnn()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    for i in range(3):
        np.testing.assert_allclose(y[i], reference(m, {"x": x[i:i + 1]})[0], rtol=1e-4, atol=1e-5)


def test_batched_verify_covers_every_sample(saved):
    """3 samples through a batch-2 package: verify runs every sample (the last batch padded), passes
    (lossless ADC), and its sim-vs-float cosine is the one of the simulator against the ONNX reference."""
    from psq_tvm.runtime.verify import verify_package

    pkg, _ = saved
    assert pkg.spec.adc_lossless()
    x = np.random.default_rng(9).standard_normal((3, 3, 12, 12)).astype(np.float32)
    code, lines = verify_package(pkg, {"x": x}, batched=True)
    text = "\n".join(lines)
    assert code == 0 and "verify on 3 sample(s)" in text and "verify: PASS sim vs golden" in text, text
    m = small_cnn()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    ref = np.concatenate([reference(m, {"x": x[i:i + 1]}) for i in range(3)]).astype(np.float64).ravel()
    sim = pkg.run_batched(x, "sim").astype(np.float64).ravel()
    cos = sim @ ref / (np.linalg.norm(sim) * np.linalg.norm(ref))
    line = next(line for line in lines if "output_0 sim vs float" in line)
    assert f"cosine {cos:.6f}" in line, (line, cos)
