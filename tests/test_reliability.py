"""Faults of inputs, options and the process (issue 14, docs/reliability.md): every one ends in one
`tvmc: error:` line with a documented exit code, and nothing half-written is left behind."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

from test_onnx_models import small_cnn

from psq_tvm.cli import main
from psq_tvm.runtime import files
from psq_tvm.runtime.package import PackageError, cast_input, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capfd, *args):
    rc = main(list(map(str, args)))
    out, err = capfd.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles, code=1):
    assert rc == code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvmc: error: "), err
    assert "Traceback" not in err and "BlockBuilder" not in err and "show_meta" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def temporaries(d) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.startswith(".psq-") or f.endswith(".tmp"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    onnx.save(small_cnn(), d / "m.onnx")
    return d / "m.onnx"


@pytest.fixture(scope="module")
def compiled(model):
    out = model.parent / "m.tar"
    assert main(["compile", str(model), "-o", str(out), "-q", "--psq-budget", "avg-bits=5",
                 "--target-pim-psq-adc-bits", "none"]) == 0
    return out


# --------------------------------------------------------------------------------- process faults
#: a tvmc that stops at a chosen point (prints MARK to stderr, then sleeps) so a signal lands there
_STOPPING_TVMC = textwrap.dedent("""
    import sys, time
    import psq_tvm.cli as cli
    where = sys.argv.pop(1)

    def stop(real):
        def f(*a, **k):
            print("MARK", file=sys.stderr, flush=True)
            time.sleep(60)
            return real(*a, **k)
        return f

    if where == "import":        # a Python callback TVM's FuseOpsByPattern calls from C++
        import psq_tvm.passes.patterns as p
        p.conv_reason = stop(p.conv_reason)
    elif where == "search":      # the per-tile candidate search (numpy)
        import psq_tvm.targets.pipeline as p
        p.evaluate_candidates = stop(p.evaluate_candidates)
    elif where == "write":       # half-way through writing the package tar
        import psq_tvm.runtime.package as p
        real_read = p._BufferReader.read
        seen = []
        def read(self, n=-1):
            seen.append(1)
            if len(seen) == 3:
                print("MARK", file=sys.stderr, flush=True)
                time.sleep(60)
            return real_read(self, n)
        p._BufferReader.read = read
    sys.exit(cli.main(sys.argv[1:]))
""")


def _stop_and_signal(tmp_path, model, where: str, sig: int, out_dir):
    script = tmp_path / "stopping_tvmc.py"
    script.write_text(_STOPPING_TVMC)
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, str(script), where, "compile", str(model), "-o", str(out_dir / "m.tar"),
                          "-q"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stderr:
            if "MARK" in line:
                break
        else:
            pytest.fail(f"{where}: never reached (rc {p.wait()})")
        p.send_signal(sig)
        err = p.stderr.read()
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return rc, err


@pytest.mark.parametrize("where,sig,code", [("import", signal.SIGINT, 130), ("search", signal.SIGINT, 130),
                                            ("write", signal.SIGTERM, 143)])
def test_interrupt_exits_cleanly_and_leaves_nothing(tmp_path, model, where, sig, code):
    """Ctrl-C during the import (inside a TVM callback: it used to be `tvmc: error: RuntimeError`, exit 1)
    and during the search exits 130; SIGTERM while the package is written exits 143 and, like SIGINT,
    removes the temporary (it used to stay: hundreds of MB on big models)."""
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _stop_and_signal(tmp_path, model, where, sig, out)
    assert rc == code, err
    sigterm = " (SIGTERM)" if code == 143 else ""
    assert err.strip().splitlines() == [f"tvmc: error: interrupted{sigterm}; nothing was written"], err
    assert os.listdir(out) == []


def test_sigkill_temporary_is_removed_by_the_next_write(tmp_path, model, compiled):
    """SIGKILL cannot be caught: its temporary stays, and the next package written into the directory
    removes it (its writer's pid is dead and nobody holds its lock)."""
    out = tmp_path / "out"
    out.mkdir()
    _stop_and_signal(tmp_path, model, "write", signal.SIGKILL, out)
    left = temporaries(out)
    assert len(left) == 1 and re.fullmatch(r"\.psq-\d+-\w+\.tar\.tmp", left[0]), left
    load(compiled).save(out / "next.tar")
    assert os.listdir(out) == ["next.tar"]


def test_stale_temporaries_only_of_dead_unlocked_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    live_pid = tmp_path / f".psq-{os.getpid()}-abc.tar.tmp"          # ours: a live writer
    locked = tmp_path / f".psq-{dead}-locked.tmp"                   # dead pid, but its lock is held
    stale = tmp_path / f".psq-{dead}-stale.npz.tmp"
    other = tmp_path / f".other-{dead}-x.tmp"                       # not ours
    victim = tmp_path / "victim"
    link = tmp_path / f".psq-{dead}-link.tmp"                       # a symlink with our name pattern
    for p in (live_pid, locked, stale, other, victim):
        p.write_bytes(b"x")
    link.symlink_to(victim)
    with open(locked, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        removed = files.remove_stale_temporaries(str(tmp_path))
    assert removed == [stale.name]
    assert live_pid.exists() and locked.exists() and other.exists() and victim.read_bytes() == b"x"
    assert files.remove_stale_temporaries(str(tmp_path)) == [locked.name]      # lock released


def test_symlinks_planted_at_the_old_temporary_names_are_not_followed(tmp_path, model, compiled, capfd):
    """`--outputs X` wrote `X.tmp.npz` and `--emit-c-header P` wrote `P.tmp`: predictable names, so a
    symlink planted there had its target overwritten.  Now the temporaries are mkstemp'd."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    (tmp_path / "y.npz.tmp.npz").symlink_to(victim)
    (tmp_path / "y.npz.tmp").symlink_to(victim)
    (tmp_path / "t.h.tmp").symlink_to(victim)
    rc, _, err = run_cli(capfd, "run", compiled, "--inputs", tmp_path / "in.npz", "--mode", "float",
                         "--outputs", tmp_path / "y.npz", "-q")
    assert rc == 0, err
    rc, _, err = run_cli(capfd, "compile", model, "-o", tmp_path / "t.tar", "-q", "--emit-c-header",
                         tmp_path / "t.h", "--psq-budget", "avg-bits=5")
    assert rc == 0, err
    assert victim.read_bytes() == b"precious"
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["output_0"], load(compiled).run([x], "float")[0])
    assert (tmp_path / "t.h").read_text().startswith("/* generated by psq-tvm")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".psq-")]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_take_the_umask_mode(tmp_path, compiled, capfd, umask, mode):
    old = os.umask(umask)
    try:
        load(compiled).save(tmp_path / "p.tar")
        rc, _, err = run_cli(capfd, "run", compiled, "--mode", "float", "--outputs", tmp_path / "o.npz", "-q")
        assert rc == 0, err
    finally:
        os.umask(old)
    for f in ("p.tar", "o.npz"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == mode, (f, oct(os.stat(tmp_path / f).st_mode))


def test_closed_stdout_ends_quietly(compiled):
    """`tvmc report pkg | head`: the reader leaves early; no "Broken pipe", exit 141 as for SIGPIPE."""
    p = subprocess.Popen([sys.executable, "-m", "psq_tvm.cli", "report", str(compiled), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
    p.stdout.close()                     # before tvmc has written anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


# --------------------------------------------------------------------------------- environment
def test_no_c_compiler_says_what_to_install(tmp_path, model, capfd, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    rc, _, err = run_cli(capfd, "compile", model, "-o", tmp_path / "o.tar")
    one_line_error(rc, err, "no C compiler", "install", "gcc")
    assert not (tmp_path / "o.tar").exists()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    rc, _, err = run_cli(capfd, "compile", model, "-o", tmp_path / "o.tar")
    one_line_error(rc, err, "no C compiler", "no-such-cc")


def test_output_into_missing_directory_fails_before_the_compile(tmp_path, model, capfd):
    for args, needle in ((["-o", tmp_path / "nodir" / "m.tar"], "does not exist"),
                         (["-o", tmp_path], "is a directory"),
                         (["-o", tmp_path / "m.tar", "--emit-c-header", tmp_path / "nodir" / "m.h"], "does not exist")):
        rc, _, err = run_cli(capfd, "compile", model, *args)      # progress on: nothing may have started
        one_line_error(rc, err, needle)
    assert os.listdir(tmp_path) == []
    rc, _, err = run_cli(capfd, "run", tmp_path / "whatever.tar", "--outputs", tmp_path / "nodir" / "y.npz")
    one_line_error(rc, err, "--outputs", "does not exist")


# --------------------------------------------------------------------------------- options and inputs
def test_adc_bits_zero_is_an_error_none_is_lossless(tmp_path, model, capfd):
    rc, _, err = run_cli(capfd, "compile", model, "-o", tmp_path / "o.tar", "--target-pim-psq-adc-bits", "0")
    one_line_error(rc, err, "--target-pim-psq-adc-bits 0", "'none'")
    assert not (tmp_path / "o.tar").exists()


@pytest.mark.parametrize("shapes,needle", [("x:[1,3,-12,12]", "positive"), ("x:[1,3,0,12]", "positive"),
                                           ("x:[0,3,12,12]", "positive")])
def test_bad_input_shapes_are_one_clear_line(tmp_path, model, capfd, shapes, needle):
    rc, _, err = run_cli(capfd, "compile", model, "-o", tmp_path / "o.tar", "--input-shapes", shapes, "-q")
    one_line_error(rc, err, needle, shapes)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dim", [0, 2])
def test_model_input_declared_with_dim_zero(tmp_path, capfd, dim):
    m = small_cnn()
    m.graph.input[0].type.tensor_type.shape.dim[dim].dim_value = 0
    onnx.save(m, tmp_path / "z.onnx")
    rc, _, err = run_cli(capfd, "compile", tmp_path / "z.onnx", "-o", tmp_path / "o.tar", "-q")
    one_line_error(rc, err, f"dim {dim} as 0", "--input-shapes")
    assert "symbolic" not in err


def test_tvm_importer_failure_is_one_line(tmp_path, model, capfd):
    """A shape the model cannot take (the Gemm after the flatten): TVM's importer prints its own
    "Error converting operator", IR with show_meta advice, and its C++ logger "BlockBuilder destroyed with
    remaining blocks!" when the failed import is freed; tvmc gives one line naming the operator."""
    rc, out, err = run_cli(capfd, "compile", model, "-o", tmp_path / "o.tar", "--input-shapes", "x:[1,3,13,12]", "-q")
    one_line_error(rc, err, "at operator Gemm")
    assert out == ""


def test_input_casts_keep_values_and_are_announced(compiled, tmp_path, capfd):
    pkg = load(compiled)
    r = np.random.default_rng(3)
    ref32 = r.integers(-3, 4, (1, 3, 12, 12)).astype(np.float32)
    expect = pkg.run([ref32], "float")[0]
    for dt in (np.int64, np.float16, np.float64, np.uint8 if ref32.min() >= 0 else np.int8):
        np.savez(tmp_path / "x.npz", x=ref32.astype(dt))
        rc, _, err = run_cli(capfd, "run", compiled, "--inputs", tmp_path / "x.npz", "--mode", "float",
                             "--outputs", tmp_path / "y.npz")
        assert rc == 0, err
        assert f"tvmc: note: input 'x' is {np.dtype(dt)}, the package takes float32: cast" in err
        np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["output_0"], expect)
    for bad in (ref32.astype(np.complex64), ref32 > 0):
        np.savez(tmp_path / "x.npz", x=bad)
        rc, _, err = run_cli(capfd, "run", compiled, "--inputs", tmp_path / "x.npz", "--mode", "float")
        one_line_error(rc, err, "dtype", "float32")


def test_cast_to_integer_inputs_refuses_changed_values():
    ids = np.array([[0, 5, 2**31 - 1]], np.int64)
    np.testing.assert_array_equal(cast_input(ids, "int32", "ids")[0], ids)
    assert cast_input(ids.astype(np.float64), "int64", "ids")[1] is not None
    with pytest.raises(PackageError, match="non-integer"):
        cast_input(np.array([0.0, 2.5]), "int64", "ids")
    with pytest.raises(PackageError, match="outside int32"):
        cast_input(np.array([2**31], np.int64), "int32", "ids")
    with pytest.raises(PackageError, match="non-integer"):
        cast_input(np.array([np.nan]), "int64", "ids")
    same, note = cast_input(ids, "int64", "ids")
    assert same is ids and note is None


def test_wrong_rank_at_run_says_what_to_give(compiled, tmp_path, capfd, model):
    """It suggested a rank-3 --input-shapes that compile then rejected; now a rank error says to add the
    batch dim, and a same-rank size suggestion is one that compile's own option checks accept."""
    from psq_tvm.frontend.onnx_import import parse_input_shapes, set_input_shapes

    x = np.zeros((3, 12, 12), np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    rc, _, err = run_cli(capfd, "run", compiled, "--inputs", tmp_path / "x.npz", "-q")
    one_line_error(rc, err, "rank 3", "rank 4", "x[None]")
    assert "--input-shapes" not in err
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 3, 16, 16), np.float32))
    rc, _, err = run_cli(capfd, "run", compiled, "--inputs", tmp_path / "x.npz", "-q")
    one_line_error(rc, err, "--input-shapes")
    suggested = re.search(r'--input-shapes "([^"]+)"', err).group(1)
    shapes = parse_input_shapes(suggested)
    assert shapes == {"x": [1, 3, 16, 16]}
    set_input_shapes(onnx.load(model), shapes)          # compile's rank/name checks accept it


# --------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("bad", ["nan", "inf", "empty"])
def test_relax_pass_path_refuses_bad_weights(bad):
    """ONNX imports refuse NaN/Inf/empty weights (tests/test_import.py); a Relax module given straight to
    PartitionForPIM used to keep such a layer on the host silently."""
    from tvm import relax

    from psq_tvm.frontend import ModelImportError
    from psq_tvm.passes import PartitionForPIM

    w = np.ones((4, 0 if bad == "empty" else 3), np.float32)
    if bad != "empty":
        w[1, 2] = np.nan if bad == "nan" else np.inf
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 4], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(x, relax.const(w))))
        bb.emit_func_output(y)
    what = {"empty": r"is empty \(shape \[4, 0\]", "nan": r"has 1 NaN value\(s\) out of 12",
            "inf": r"has 1 Inf value\(s\) out of 12"}[bad]
    with pytest.raises((ModelImportError, RuntimeError), match="model <module>: .*" + what):
        PartitionForPIM()(bb.get())             # TVM's pass machinery re-raises it as RuntimeError


# --------------------------------------------------------------------------------- the command itself
def test_version(capfd):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capfd.readouterr().out
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    assert out.startswith(f"tvmc (psq-tvm) {version}, apache-tvm {metadata.version('apache-tvm')}"), out


def test_debug_shows_the_traceback(tmp_path, capfd):
    rc, _, err = run_cli(capfd, "report", tmp_path / "nope.tar")
    one_line_error(rc, err, "does not exist")
    for argv in (["--debug", "report", str(tmp_path / "nope.tar")], ["report", "--debug", str(tmp_path / "nope.tar")]):
        with pytest.raises(Exception, match="does not exist"):
            main(argv)


def test_plot_written_atomically_not_through_a_symlink(compiled, tmp_path, capfd):
    """--plot was written by matplotlib straight to the path, following a symlink planted there."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "r.png").symlink_to(victim)
    rc, _, err = run_cli(capfd, "report", compiled, "--plot", tmp_path / "r.png")
    assert rc == 0, err
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "r.png").is_symlink() and (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, _, err = run_cli(capfd, "report", compiled, "--plot", tmp_path / "nodir" / "r.png")
    one_line_error(rc, err, "--plot", "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["r.png", "victim"]


def test_api_output_directory_checked_before_compiling(tmp_path, model, monkeypatch):
    import psq_tvm
    import psq_tvm.targets.pim_psq as pim_psq

    def no_compile(*a, **k):
        raise AssertionError("compiled before checking the output directory")

    monkeypatch.setattr(pim_psq, "build", no_compile)
    with pytest.raises(PackageError, match="does not exist"):
        psq_tvm.compile(str(model), output=tmp_path / "nodir" / "m.tar")
