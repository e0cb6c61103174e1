"""Package integrity: members checked against the manifest before they are read (bounded memory), the
whole-package digest and --expect-digest, reproducible bytes, and that only `tvmc run` loads native code."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import onnx
import pytest

pytest.importorskip("tvm")

from psq_tvm.cli import EXIT_DIGEST, main  # noqa: E402
from psq_tvm.runtime.package import PackageError, load  # noqa: E402

from test_onnx_models import small_cnn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_ARGS = ["--psq-budget", "avg-bits=4", "--target-pim-psq-rows", "32", "--target-pim-psq-cols", "32", "-q"]


def tvmc(*args, env=None):
    """Run `python -m psq_tvm.cli` in a child process; returns (exit code, stdout, stderr)."""
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    p = subprocess.Popen([sys.executable, "-m", "psq_tvm.cli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=e, text=True)
    out, err = p.communicate(timeout=600)
    return p.returncode, out, err


def peak_rss_kb(*args) -> int:
    """Peak resident memory (kB) of one `tvmc` child process, from wait4's rusage of exactly that child."""
    e = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "psq_tvm.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=e)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_maxrss


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    onnx.save(small_cnn(), d / "m.onnx")
    return d / "m.onnx"


@pytest.fixture(scope="module")
def package(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "m.tar"
    assert main(["compile", str(model), "-o", str(out), *COMPILE_ARGS]) == 0
    return out


def members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


def tar_bytes(items) -> bytes:
    """A USTAR tar of (name, bytes) in the given order, written by tarfile (not by psq_tvm)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path, items, tail=b""):
    """:func:`tar_bytes` of ``items`` written to ``path``, plus raw tail bytes."""
    path.write_bytes(tar_bytes(items) + tail)
    return path


def edited(src, dst, edit_manifest=None, replace=None, extra=()):
    """Copy a package: manifest passed through edit_manifest(dict), members replaced by replace[name],
    extra (name, bytes) members appended at the end (after the end blocks are rewritten)."""
    items = []
    for m, data in members(src):
        if m.name == "manifest.json" and edit_manifest is not None:
            man = json.loads(data)
            edit_manifest(man)
            data = json.dumps(man).encode()
        items.append((m.name, (replace or {}).get(m.name, data)))
    return write_tar(dst, items + list(extra))


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------------------------ reproducible
def test_two_compiles_in_separate_processes_give_identical_bytes(model, tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    rc_a, out_a, err_a = tvmc("compile", model, "-o", a, *COMPILE_ARGS)
    rc_b, out_b, err_b = tvmc("compile", model, "-o", b, *COMPILE_ARGS)
    assert rc_a == rc_b == 0, err_a + err_b
    assert a.read_bytes() == b.read_bytes()
    ma = members(a)
    assert "timing.json" not in [m.name for m, _ in ma]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m, _ in ma} == {(0, 0, 0, "", "", 0o644)}
    # the host library is part of that: built twice by TVM + gcc, byte-identical
    libs = [dict((m.name, d) for m, d in members(p))["host_library.so"] for p in (a, b)]
    assert libs[0] == libs[1] and libs[0][:4] == b"\x7fELF"
    # compile prints the digest: the sha256 of the file's bytes (sha256sum's value)
    assert out_a.split() == ["sha256", sha(a), str(a)]


def test_source_date_epoch_sets_member_times(model, tmp_path):
    out = tmp_path / "e.tar"
    rc, _, err = tvmc("compile", model, "-o", out, *COMPILE_ARGS, env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert rc == 0, err
    assert {m.mtime for m, _ in members(out)} == {1700000000}
    rc, _, err = tvmc("compile", model, "-o", tmp_path / "x.tar", *COMPILE_ARGS, env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert rc == 1 and "SOURCE_DATE_EPOCH" in err and not (tmp_path / "x.tar").exists()


# ----------------------------------------------------------------------------------- expect-digest
def test_expect_digest_accepts_the_package_and_refuses_modified_ones(package, tmp_path, capsys):
    good = sha(package)
    assert main(["report", str(package), "--expect-digest", good.upper()]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {good}" in out
    assert main(["report", str(package), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["package_sha256"] == good

    def double_scale(man):
        t = man["layers"][0]["tiles"][0]
        t["scale"] = [2 * s for s in t["scale"]] if isinstance(t["scale"], list) else 2 * t["scale"]

    scaled = edited(package, tmp_path / "scaled.tar", double_scale)
    data = package.read_bytes()
    man = dict((m.name, d) for m, d in members(package))["manifest.json"]
    appended = tmp_path / "appended.tar"
    appended.write_bytes(data)
    with tarfile.open(appended, "a") as t:                   # a second manifest.json appended to the tar
        info = tarfile.TarInfo("manifest.json")
        info.size = len(man)
        t.addfile(info, io.BytesIO(man))
    fake_lib = b"\x7fELF" + b"\0" * 1000

    def new_lib(m):
        m["host_library"].update(sha256=hashlib.sha256(fake_lib).hexdigest(), size=len(fake_lib))
    swapped = edited(package, tmp_path / "swapped.tar", new_lib, replace={"host_library.so": fake_lib})
    for bad in (scaled, appended, swapped):
        for cmd in ("report", "run"):
            rc = main([cmd, str(bad), "--expect-digest", good, "-q"] if cmd == "run" else
                      [cmd, str(bad), "--expect-digest", good])
            err = capsys.readouterr().err
            assert rc == EXIT_DIGEST == 5, (bad, cmd, err)
            assert err.count("\n") == 1 and err.startswith("tvmc: error:") and good in err and sha(bad) in err
    # without --expect-digest the scaled one loads (the manifest carries no checksum of itself): that is
    # exactly the case the digest is for; the other two are refused by the reader itself
    assert load(scaled).manifest["layers"][0]["tiles"][0]["scale"] != load(package).manifest["layers"][0]["tiles"][0]["scale"]
    with pytest.raises(PackageError, match="appears twice"):
        load(appended)
    # a malformed digest is a command-line error
    with pytest.raises(SystemExit) as e:
        main(["report", str(package), "--expect-digest", "abc"])
    assert e.value.code == 2
    assert "sha256" in capsys.readouterr().err


# ---------------------------------------------------------------------------- members before reading
def test_unlisted_duplicate_oversized_and_odd_members_are_refused(package, tmp_path):
    items = [(m.name, d) for m, d in members(package)]
    names = [n for n, _ in items]
    cases = {
        "unlisted": (items + [("notes.txt", b"hello")], "not listed"),
        "duplicate blob": (items + [("bias_0.bin", dict(items)["bias_0.bin"])], "appears twice"),
        "oversized blob": ([(n, d + b"\0" * 4 if n == "crossbars.bin" else d) for n, d in items], "crossbars.bin"),
        "missing blob": ([(n, d) for n, d in items if n != "weight_0.bin"], "missing"),
        "path member": (items + [("../evil.bin", b"x")], "not listed"),
    }
    for case, (its, needle) in cases.items():
        p = write_tar(tmp_path / f"{case}.tar", its)
        with pytest.raises(PackageError, match=needle):
            load(p)
    # a symlink member, and bytes appended after the end of the archive
    link = tmp_path / "link.tar"
    shutil.copy(package, link)
    with tarfile.open(link, "a", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("weight_9.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    with pytest.raises(PackageError, match="regular files only"):
        load(link)
    tail = tmp_path / "tail.tar"
    tail.write_bytes(package.read_bytes() + b"MZ" * 100)
    with pytest.raises(PackageError, match="after the end of the archive"):
        load(tail)
    # the manifest says how big the host library is: a larger one is refused before it is read
    lib = dict(items)["host_library.so"]
    p = write_tar(tmp_path / "biglib.tar", [(n, lib + b"\0" * 512 if n == "host_library.so" else d)
                                             for n, d in items])
    with pytest.raises(PackageError, match="host_library.so"):
        load(p)
    assert names == sorted(names)


def _sparse_package(src, dst, size):
    """src with an unlisted member of `size` bytes (a hole: nothing on disk) before the end blocks."""
    data = src.read_bytes()
    end = len(data)
    while data[end - 512:end] == bytes(512):                 # strip the end-of-archive blocks and padding
        end -= 512
    info = tarfile.TarInfo("zz_junk.bin")
    info.size = size
    with open(dst, "wb") as f:
        f.write(data[:end])
        f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        f.seek(size, os.SEEK_CUR)
        f.write(bytes(1024))
    return dst


def test_report_on_a_package_with_a_sparse_1gib_member_stays_small(package, tmp_path):
    sparse = _sparse_package(package, tmp_path / "sparse.tar", 1 << 30)
    assert os.stat(sparse).st_blocks * 512 < 64 << 20         # really sparse on disk
    normal = peak_rss_kb("report", package)
    rc, _, err = tvmc("report", sparse)
    assert rc == 1 and "zz_junk.bin" in err and "not listed" in err and err.count("\n") == 1
    big = peak_rss_kb("report", sparse)
    assert big < normal + 100_000, (normal, big)              # reading it would add ~1 GB


# ------------------------------------------------------------------------------------- native code
LIB_C = textwrap.dedent("""
    #include <stdio.h>
    #include <stdlib.h>
    __attribute__((constructor)) static void mark(void) {
        const char *p = getenv("PSQ_TEST_MARKER");
        if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("loaded", f); fclose(f); } }
    }
""")


def test_report_and_decoding_never_load_the_host_library_run_does(package, tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "lib.c").write_text(LIB_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", tmp_path / "lib.so", tmp_path / "lib.c"], check=True)
    lib = (tmp_path / "lib.so").read_bytes()

    def new_lib(m):
        m["host_library"].update(sha256=hashlib.sha256(lib).hexdigest(), size=len(lib))
    evil = edited(package, tmp_path / "evil.tar", new_lib, replace={"host_library.so": lib})
    marker = tmp_path / "marker"
    env = {"PSQ_TEST_MARKER": str(marker)}
    for args in (["report", evil], ["report", evil, "--json"], ["run", evil, "--expect-digest", sha(package)]):
        rc, _, err = tvmc(*args, env=env)
        assert not marker.exists(), args
    assert rc == EXIT_DIGEST
    decode = textwrap.dedent(f"""
        import psq_tvm
        from psq_tvm.core.report import format_table
        from psq_tvm.runtime.session import dequantized_weight
        pkg = psq_tvm.load({str(evil)!r})
        for lay in pkg.layers:
            dequantized_weight(lay, pkg.blob('crossbars'), pkg.spec)
        format_table(pkg.report)
        print("decoded", len(pkg.layers))
    """)
    r = subprocess.run([sys.executable, "-c", decode], env=dict(os.environ, PYTHONPATH=ROOT, **env),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "decoded" in r.stdout, r.stderr
    assert not marker.exists()
    # the check can see a load: `tvmc run` dlopens it, and its constructor runs
    tvmc("run", evil, "-q", env=env)
    assert marker.read_text() == "loaded"
