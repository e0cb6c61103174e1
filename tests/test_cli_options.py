"""`tvmc` options and exit codes checked against independent computations (brute force, ONNX reference)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

pytest.importorskip("tvm")

from test_onnx_models import matmul_model, reference, small_cnn

from psq_tvm.cli import main
from psq_tvm.core.candidates import SearchConfig
from psq_tvm.core.tables import decode_tile
from psq_tvm.runtime.package import load

# tolerances between the tiles' 4- and 5-bit errors (measured by _best_sse), so the bitwidths differ
TOL = {"tile": 0.012, "column": 0.0098}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *args):
    rc = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_options")
    onnx.save(small_cnn(), d / "m.onnx")
    return d


@pytest.fixture(scope="module")
def tolerance_packages(model_file):
    """small_cnn compiled in tolerance mode, once per granularity, without float weights."""
    out = {}
    for g in ("tile", "column"):
        p = model_file / f"tol_{g}.tar"
        rc = main(["compile", str(model_file / "m.onnx"), "-o", str(p), "-q", "--psq-tolerance", str(TOL[g]),
                   "--psq-granularity", g, "--no-float-weights"])
        assert rc == 0
        out[g] = p
    return out


def _float_matrices():
    """The unrolled float matrices of small_cnn's PIM layers, straight from the ONNX initializers."""
    w = {i.name: nh.to_array(i).astype(np.float64) for i in small_cnn().graph.initializer}
    return {"conv1": w["W1"].reshape(16, -1).T, "fc": w["W2"].T}     # im2col rows; Gemm transB=1: x @ W2^T


def _best_sse(w: np.ndarray, bits: int, per_column: bool) -> float:
    """Least sum of squared error over the search's clipping ratios at ``bits``, by brute force on the raw
    weights (one ratio for the tile, or one per column)."""
    L = 2 ** (bits - 1) - 1
    cols = [w[:, [c]] for c in range(w.shape[1])] if per_column else [w]
    total = 0.0
    for c in cols:
        m = np.abs(c).max()
        if m == 0:
            continue
        best = np.inf
        for r in SearchConfig().ratios:
            s = r * m / L
            best = min(best, float(((c - s * np.clip(np.rint(c / s), -L, L)) ** 2).sum()))
        total += best
    return total


@pytest.mark.parametrize("granularity", ["tile", "column"])
def test_tolerance_gives_each_tile_its_smallest_sufficient_bitwidth(tolerance_packages, granularity):
    """Per tile: the decoded weights are within the tolerance (relative MSE), and one bit less could not
    have been (brute force over every clipping ratio), unless the tile is already at the candidate limit."""
    pkg = load(tolerance_packages[granularity])
    tol = TOL[granularity]
    assert pkg.manifest["search"]["tolerance"] == tol and pkg.manifest["search"]["granularity"] == granularity
    cells, spec = pkg.blob("crossbars"), pkg.spec
    mats = _float_matrices()
    bits_seen = []
    for lay in pkg.layers:
        m = mats[lay["name"]]
        for t in lay["tiles"]:
            w = m[t["row0"]:t["row0"] + t["nrows"], t["col0"]:t["col0"] + t["ncols"]]
            ids = np.asarray(t["crossbars"])
            r, c = t["row_off"], t["col_off"]
            q = decode_tile(cells[ids.ravel(), r:r + t["nrows"], c:c + t["ncols"]]
                            .reshape(ids.shape + (t["nrows"], t["ncols"])), t["bits"], spec.encoding, spec.cell_bits)
            scale = np.asarray(t["scale"], dtype=np.float64)
            assert scale.shape == ((t["ncols"],) if granularity == "column" else ())
            energy = float((w ** 2).sum())
            nsr = float(((w - q * scale) ** 2).sum()) / energy
            b = t["bits"]
            bits_seen.append(b)
            if b < max(spec.weight_bits):
                assert nsr <= tol * 1.05, (lay["name"], t["id"], b, nsr)      # histogram resolution: a few %
            if b > min(spec.weight_bits):
                below = _best_sse(w, b - 1, granularity == "column") / energy
                assert below > tol * 0.95, (lay["name"], t["id"], b, below)
    assert len(set(bits_seen)) > 1          # the tolerance does differ between tiles here


def test_no_float_weights_then_mode_float_is_a_clear_error(tolerance_packages, capsys):
    rc, _, err = run_cli(capsys, "run", tolerance_packages["tile"], "--mode", "float", "-q")
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("tvmc: error:") and "no float weights" in err
    assert "--mode fake-quant" in err
    rc, _, err = run_cli(capsys, "run", tolerance_packages["tile"], "--verify", "--max-loss", "cosine=0.1", "-q")
    assert rc == 1 and "--no-float-weights" in err


def test_run_without_inputs_uses_seeded_synthetic_inputs(tolerance_packages, model_file, capsys):
    p = tolerance_packages["tile"]
    outs = []
    for k in range(2):
        rc, out, err = run_cli(capsys, "run", p, "--mode", "fake-quant", "--outputs", model_file / f"syn{k}.npz")
        assert rc == 0, err
        outs.append(np.load(model_file / f"syn{k}.npz")["output_0"])
    assert outs[0].shape == (1, 10) and np.all(np.isfinite(outs[0])) and np.abs(outs[0]).max() > 0
    assert outs[0].tobytes() == outs[1].tobytes()
    rc, out, _ = run_cli(capsys, "run", p, "--mode", "fake-quant")
    assert rc == 0 and out.startswith("output_0: shape [1, 10] dtype float32")


def test_exit_codes_are_exact(model_file, tmp_path, capsys, monkeypatch):
    # no command: the help on stderr, exit 2 (a bad command line)
    rc, out, err = run_cli(capsys)
    assert rc == 2 and "usage:" in err and "compile" in err and out == ""
    # bad command line (argparse): 2
    with pytest.raises(SystemExit) as e:
        main(["run"])
    assert e.value.code == 2
    capsys.readouterr()
    # an error while running: exactly 1, one line
    rc, _, err = run_cli(capsys, "compile", tmp_path / "nope.onnx", "-o", tmp_path / "x.tar", "-q")
    assert rc == 1 and err.count("\n") == 1
    rc, _, err = run_cli(capsys, "report", tmp_path / "nope.tar")
    assert rc == 1
    # interrupted: 130, one line, nothing written
    from psq_tvm import cli

    def interrupted(a):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_report", interrupted)
    rc, _, err = run_cli(capsys, "report", tmp_path / "nope.tar")
    assert rc == 130 and err.startswith("tvmc: error: interrupted") and err.count("\n") == 1


def test_verify_on_a_left_operand_matmul(tmp_path, capsys, monkeypatch):
    """Y = C @ X with the constant on the left: the layer check transposes in and out; it passes, and a
    simulator drifting on that layer is caught (exit 3)."""
    m = matmul_model(left=True)
    onnx.save(m, tmp_path / "left.onnx")
    rc, _, err = run_cli(capsys, "compile", tmp_path / "left.onnx", "-o", tmp_path / "left.tar", "-q",
                         "--psq-budget", "avg-bits=5", "--target-pim-psq-adc-bits", "none")
    assert rc == 0, err
    pkg = load(tmp_path / "left.tar")
    assert pkg.layers[0]["operand"] == "left"
    x = np.random.default_rng(3).standard_normal((24, 3)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    rc, out, _ = run_cli(capsys, "run", tmp_path / "left.tar", "--inputs", tmp_path / "x.npz", "--verify", "-q")
    assert rc == 0 and "verify: PASS sim vs golden" in out, out
    np.testing.assert_allclose(pkg.run({"x": x}, "float")[0], reference(m, {"x": x}), rtol=1e-5, atol=1e-5)
    from psq_tvm.runtime import simulator
    real = simulator.run_layer
    monkeypatch.setattr(simulator, "run_layer", lambda *a, **k: real(*a, **k) * np.float32(1.001))
    rc, out, _ = run_cli(capsys, "run", tmp_path / "left.tar", "--inputs", tmp_path / "x.npz", "--verify", "-q")
    assert rc == 3 and "verify: FAIL" in out


def _members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.name != "timing.json"}


def test_compile_is_byte_identical_across_processes_and_thread_counts(model_file, tmp_path):
    """Two fresh processes with different thread counts (TVM, OpenMP, BLAS) write the same package."""
    outs = []
    for threads in ("1", "2"):
        env = dict(os.environ, PYTHONPATH=ROOT, TVM_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
                   OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONHASHSEED=threads)
        out = tmp_path / f"t{threads}.tar"
        r = subprocess.run([sys.executable, "-m", "psq_tvm.cli", "compile", str(model_file / "m.onnx"), "-o", str(out),
                            "-q", "--psq-budget", "avg-bits=4"], env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr
        outs.append(_members(out))
    assert sorted(outs[0]) == sorted(outs[1])
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], name


def test_sensitivity_and_bias_correction_flags_reach_the_package(tmp_path, capsys):
    """--psq-sensitivity bn moves bits on this BatchNorm model (at avg-bits=3.3 the last tile keeps 2 bits
    instead of 3); --psq-bias-correction none stores no corrections, bn the ones of conv2/conv3 (conv1 reads
    the model input); each package is the one the Python API builds with the same options."""
    from test_bn_stats import _bn_model

    import psq_tvm
    from psq_tvm.core.crossbar import preset

    m, _ = _bn_model()
    onnx.save(m, tmp_path / "bn.onnx")
    common = ["-q", "--psq-budget", "avg-bits=3.3", "--target-pim-psq-rows", "32", "--target-pim-psq-cols", "32"]
    pk = {}
    for sens, bc in (("bn", "none"), ("none", "bn")):
        out = tmp_path / f"{sens}_{bc}.tar"
        rc, _, err = run_cli(capsys, "compile", tmp_path / "bn.onnx", "-o", out, *common,
                             "--psq-sensitivity", sens, "--psq-bias-correction", bc)
        assert rc == 0, err
        pk[sens, bc] = load(out)
        assert pk[sens, bc].manifest["search"]["sensitivity"] == sens
        assert pk[sens, bc].manifest["search"]["bias_correction"] == bc
    bits = {k: [t["bits"] for lay in p.layers for t in lay["tiles"]] for k, p in pk.items()}
    assert bits["bn", "none"] != bits["none", "bn"]
    assert all(lay["bias_correction"] is None for lay in pk["bn", "none"].layers)
    corrected = {lay["name"] for lay in pk["none", "bn"].layers if lay["bias_correction"]}
    assert corrected == {"conv2", "conv3"}
    api = psq_tvm.compile(m, spec=preset("isaac", rows=32, cols=32), budget="avg-bits=3.3", sensitivity="bn",
                          bias_correction="bn")
    assert [t["bits"] for lay in api.layers for t in lay["tiles"]] == bits["bn", "none"]
    # conv2 (1x1) reads Clip(BN1, 0, 6): its correction is x_mean @ (W - W_q), with x_mean sampled from
    # N(beta1, gamma1^2) clipped, W the float weight and W_q the one decoded from the cells
    from psq_tvm.runtime.session import dequantized_weight
    p = pk["none", "bn"]
    lay = next(lay for lay in p.layers if lay["name"] == "conv2")
    arr = {i.name: nh.to_array(i).astype(np.float64) for i in m.graph.initializer}
    xbar = np.clip(np.random.default_rng(1).normal(arr["b1"], np.abs(arr["g1"]), (400_000, 8)), 0, 6).mean(0)
    w = p.blob(lay["float_weight"]).astype(np.float64).reshape(8, -1).T
    wq = dequantized_weight(lay, p.blob("crossbars"), p.spec).astype(np.float64).reshape(8, -1).T
    want = xbar @ (w - wq)
    got = p.blob(lay["bias_correction"]).astype(np.float64).ravel()
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=0.02, atol=0.01 * np.abs(want).max())
