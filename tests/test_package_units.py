"""Fast unit tests of psq_tvm/runtime/package.py on hand-made manifests and packages (no compile):
manifest table validation (_tables, _manifest), sizes, digests, SOURCE_DATE_EPOCH, blob bytes, the
buffer reader, input casting and checking, members/save/load of small packages, run_batched's
sim_options.  Expected values are written by hand (byte strings, sizes, full error messages)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import numpy as np
import pytest

from psq_tvm.runtime import package as P
from psq_tvm.runtime.package import (
    DigestMismatch,
    Package,
    PackageError,
    cast_input,
    load,
)

H = "0123456789abcdef" * 4                  # a well-formed sha256 (64 lower-case hex digits)
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ABC_SHA = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def exact(text: str) -> str:
    """A pattern matching exactly ``text`` (so a message with text added before or after does not match)."""
    return "^" + re.escape(text) + "$"


def damaged(what: str) -> str:
    return exact(f"'p.tar': manifest.json: {what}; the file is damaged")


def blob(**kw) -> dict:
    b = {"file": "w.bin", "dtype": "float32", "shape": [2, 3], "byte_order": "little", "sha256": H}
    b.update(kw)
    return {k: v for k, v in b.items() if v is not _DROP}


_DROP = object()


def tables(man: dict):
    return P._tables("p.tar", man)


# ------------------------------------------------------------------------------------ small helpers
def test_sha256_dumps_and_size():
    assert P.sha256(b"") == EMPTY_SHA and P.sha256(b"abc") == ABC_SHA
    assert P.dumps({"b": 1, "a": [1, 2]}) == b'{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    assert P.dumps({}) == b"{}\n"
    assert P._size([2, 3], np.dtype("float32")) == 24
    assert P._size([5], np.dtype("uint16")) == 10
    assert P._size([], np.dtype("int64")) == 8
    assert P._size([0, 3], np.dtype("float64")) == 0
    assert P._size([7], np.dtype("bool")) == 7


def test_constants():
    assert (P.FORMAT, P.VERSION, P.MANIFEST, P.HOST_LIBRARY) == ("psq-tvm-package", 1, "manifest.json", "host_library.so")
    assert P.FIXED_MEMBERS == ("manifest.json", "report.json", "timing.json") and P.MTIME == 0
    assert (P.MAX_MANIFEST, P.MAX_TIMING, P.MAX_UNDECLARED) == (256 << 20, 65536, 4 << 30)


def test_blob_bytes_little_endian_read_only_no_copy():
    for dt in ("<u2", ">u2", "=u2"):
        mv = P.blob_bytes(np.array([1, 258], dtype=dt))
        assert bytes(mv) == b"\x01\x00\x02\x01" and mv.readonly and mv.format == "B" and len(mv) == 4
    assert bytes(P.blob_bytes(np.array([[1.0], [-2.0]], dtype=">f4"))) == b"\x00\x00\x80?\x00\x00\x00\xc0"
    assert bytes(P.blob_bytes(np.array(5, dtype="<i2"))) == b"\x05\x00"               # 0-d
    assert bytes(P.blob_bytes(np.array([True, False]))) == b"\x01\x00"
    assert bytes(P.blob_bytes(np.arange(6, dtype=np.uint8)[::2])) == b"\x00\x02\x04"  # non-contiguous
    assert bytes(P.blob_bytes(np.zeros((0, 3), np.float32))) == b""
    a = np.arange(3, dtype="<i4")
    mv = P.blob_bytes(a)
    a[0] = 7                                      # a view of the array's memory, not a copy
    assert bytes(mv)[:4] == b"\x07\x00\x00\x00"
    n = np.arange(3, dtype="=i4")
    mv = P.blob_bytes(n)
    n[1] = 9
    assert bytes(mv)[4:8] == b"\x09\x00\x00\x00"   # native little-endian: no copy either
    with pytest.raises(TypeError):
        mv[0] = 1


def test_buffer_reader():
    r = P._BufferReader(b"abcdefg")
    assert bytes(r.read(2)) == b"ab" and bytes(r.read(3)) == b"cde"
    assert bytes(r.read(10)) == b"fg" and bytes(r.read(1)) == b"" and bytes(r.read()) == b""
    assert bytes(P._BufferReader(bytearray(b"xyz")).read()) == b"xyz"
    r = P._BufferReader(b"xyz")
    assert bytes(r.read(0)) == b"" and bytes(r.read(None)) == b"xyz" and bytes(r.read(-1)) == b""
    r = P._BufferReader(b"xyz")
    r.read(1)
    assert bytes(r.read(-1)) == b"yz"
    r = P._BufferReader(np.array([1, 2], dtype="<u2"))     # any buffer, read as bytes
    assert isinstance(r.read(1), memoryview) and bytes(r.read()) == b"\x00\x02\x00"


def test_flatten():
    class T:
        def __init__(self, v):
            self.v = v

        def numpy(self):
            return np.array(self.v)

    out = P._flatten(T(1))
    assert len(out) == 1 and out[0].tolist() == 1
    assert [a.tolist() for a in P._flatten([T(1), [T(2), (T(3),)], T(4)])] == [1, 2, 3, 4]
    assert P._flatten([]) == []


# --------------------------------------------------------------------------------- SOURCE_DATE_EPOCH
@pytest.mark.parametrize("value, want", [(None, 0), ("", 0), ("0", 0), ("1700000000", 1700000000),
                                         ("007", 7), (str(8 ** 11 - 1), 8 ** 11 - 1)])
def test_source_date_epoch_accepted(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    else:
        monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    assert P.source_date_epoch() == want


@pytest.mark.parametrize("value", ["-1", "yesterday", "1.5", " 5", "5 ", "1e9", str(8 ** 11), str(10 ** 20),
                                   "\u00b2", "\u0661\u0662"])
def test_source_date_epoch_refused(monkeypatch, value):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(PackageError, match=exact(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds since 1970 (below 8**11); "
            "set it to e.g. the last commit's time, `git log -1 --format=%ct`, or unset it")):
        P.source_date_epoch()


# ------------------------------------------------------------------------------------- _check_digest
def test_check_digest():
    P._check_digest("p.tar", ABC_SHA, None)
    P._check_digest("p.tar", ABC_SHA, ABC_SHA)
    P._check_digest("p.tar", ABC_SHA, ABC_SHA.upper())
    with pytest.raises(DigestMismatch, match=exact(
            f"'p.tar' has digest sha256 {ABC_SHA}, not the expected {EMPTY_SHA}: the package was modified "
            "or is another one; do not run it")):
        P._check_digest("p.tar", ABC_SHA, EMPTY_SHA.upper())
    assert issubclass(DigestMismatch, PackageError) and issubclass(PackageError, ValueError)


# ------------------------------------------------------------------------------------------ _manifest
def test_manifest_parse():
    good = {"format": "psq-tvm-package", "version": 1, "x": [1]}
    assert P._manifest("p.tar", json.dumps(good).encode()) == good
    with pytest.raises(PackageError, match=r"^'p\.tar': manifest\.json is not valid JSON \(Expecting value: "
                                           r"line 1 column 1 \(char 0\)\); the file is damaged$"):
        P._manifest("p.tar", b"nope")
    with pytest.raises(PackageError, match=r"^'p\.tar': manifest\.json is not valid JSON \(.*\); the file is damaged$"):
        P._manifest("p.tar", b"[" * 200000 + b"]" * 200000)        # too deep: RecursionError
    with pytest.raises(PackageError, match=r"^'p\.tar': manifest\.json is not valid JSON"):
        P._manifest("p.tar", b"\xff\xfe{")
    for data, fmt in ((b"[1]", "None"), (b'"psq-tvm-package"', "None"), (b"{}", "None"),
                      (b'{"format": "other", "version": 1}', "'other'"), (b'{"format": 1}', "1")):
        with pytest.raises(PackageError, match=exact(
                f"'p.tar' is not a psq-tvm package (format {fmt}, expected 'psq-tvm-package')")):
            P._manifest("p.tar", data)
    for v, shown in (('2', "2"), ('"1"', "'1'"), ("null", "None"), ("1.5", "1.5")):
        with pytest.raises(PackageError, match=exact(
                f"'p.tar' has package format version {shown}; this psq-tvm reads version 1 only "
                "(recompile the model with this psq-tvm)")):
            P._manifest("p.tar", b'{"format": "psq-tvm-package", "version": ' + v.encode() + b"}")
    with pytest.raises(PackageError, match=r"version None; "):
        P._manifest("p.tar", b'{"format": "psq-tvm-package"}')


# -------------------------------------------------------------------------------------------- _tables
def test_tables_good_manifest_sizes():
    man = {"blobs": {"w": blob(), "c": blob(file="c.bin", dtype="uint8", shape=[4, 2, 2])},
           "host_library": {"file": "host_library.so", "sha256": H, "size": 10},
           "extras": {"notes.txt": {"sha256": H, "size": 5}, "a.b": {"sha256": H}}}
    assert tables(man) == {"w.bin": 24, "c.bin": 16, "host_library.so": 10, "notes.txt": 5, "a.b": None}
    assert tables({}) == {}
    assert tables({"blobs": {}, "host_library": None, "extras": {}}) == {}
    assert tables({"host_library": {"file": "lib.so", "sha256": H}}) == {"lib.so": None}
    assert tables({"host_library": {"file": "lib.so", "sha256": H, "size": 0}}) == {"lib.so": 0}
    assert tables({"extras": {"e": {"sha256": H, "size": 0}}}) == {"e": 0}
    assert tables({"blobs": {"w": blob(byte_order=_DROP)}}) == {"w.bin": 24}   # byte order defaults to little


@pytest.mark.parametrize("dtype, shape, size", [
    ("bool", [3], 3), ("int8", [3], 3), ("uint8", [2, 2], 4), ("int16", [3], 6), ("uint16", [2], 4),
    ("int32", [2], 8), ("uint32", [1], 4), ("int64", [2], 16), ("uint64", [1], 8), ("float16", [3], 6),
    ("float32", [2, 3], 24), ("float64", [], 8), ("int64", [0, 3], 0), ("float32", [3, 0], 0), ("uint8", [0], 0),
])
def test_tables_numeric_dtypes_and_shapes_accepted(dtype, shape, size):
    assert tables({"blobs": {"w": blob(dtype=dtype, shape=shape)}}) == {"w.bin": size}


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "object", "O", "U3", "S4", "V8", "M8", "m8",
                                   "datetime64", "i4,i4", "i4,(-1)i4", "nonsense", "", 5, 1.5, None, ["f4"],
                                   {"a": 1}, _DROP])
def test_tables_non_numeric_dtypes_refused(dtype):
    shown = repr(None if dtype is _DROP else dtype)
    with pytest.raises(PackageError, match=damaged(f"blob 'w' has dtype {shown}, not a numeric dtype")):
        tables({"blobs": {"w": blob(dtype=dtype)}})


@pytest.mark.parametrize("shape", [[-1], [2, -1], [-1, 2], [True], [2, False], [2.0], [2, 3.0], [None], ["2"],
                                   "23", (2, 3), None, 6, {"0": 2}, _DROP])
def test_tables_bad_shapes_refused(shape):
    shown = repr(None if shape is _DROP else shape)
    with pytest.raises(PackageError, match=damaged(f"blob 'w' has shape {shown}, not a list of non-negative integers")):
        tables({"blobs": {"w": blob(shape=shape)}})


@pytest.mark.parametrize("order", ["big", "LITTLE", None, "", "native"])
def test_tables_byte_order_refused(order):
    with pytest.raises(PackageError, match=damaged(f"blob 'w' has unsupported byte order {order!r}")):
        tables({"blobs": {"w": blob(byte_order=order)}})


BAD_DIGESTS = [_DROP, None, 5, H[:-1], H + "0", H.upper(), "A" * 64, "g" * 64, "X" * 64, " " + H[1:], "", ["0" * 64]]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_tables_bad_digests_refused(digest):
    with pytest.raises(PackageError, match=damaged("blob 'w' has no table with a sha256")):
        tables({"blobs": {"w": blob(sha256=digest)}})
    host = {"file": "lib.so", "sha256": digest}
    if digest is _DROP:
        del host["sha256"]
    with pytest.raises(PackageError, match=damaged("'host_library' has no table with a sha256")):
        tables({"host_library": host})
    extra = {"sha256": digest, "size": 1}
    if digest is _DROP:
        del extra["sha256"]
    with pytest.raises(PackageError, match=damaged("extra 'e' has no table with a sha256")):
        tables({"extras": {"e": extra}})


def test_tables_digest_boundaries_accepted():
    for d in ("0" * 64, "f" * 64, "9a" * 32):
        assert tables({"blobs": {"w": blob(sha256=d)}}) == {"w.bin": 24}


@pytest.mark.parametrize("entry", ["x", None, [], 5, [H]])
def test_tables_entries_that_are_not_tables(entry):
    with pytest.raises(PackageError, match=damaged("blob 'w' has no table with a sha256")):
        tables({"blobs": {"w": entry}})
    with pytest.raises(PackageError, match=damaged("extra 'e' has no table with a sha256")):
        tables({"extras": {"e": entry}})
    if entry is not None:                         # None: no host library
        with pytest.raises(PackageError, match=damaged("'host_library' has no table with a sha256")):
            tables({"host_library": entry})


@pytest.mark.parametrize("value", [[], None, "x", 3, [["w", {}]]])
def test_tables_non_dict_blob_and_extras_tables(value):
    with pytest.raises(PackageError, match=damaged("'blobs' is not a table")):
        tables({"blobs": value})
    with pytest.raises(PackageError, match=damaged("'extras' is not a table")):
        tables({"extras": value})


BAD_NAMES = ["a/b.bin", "../w.bin", "/etc/passwd", "a\\b", "\\w.bin", ".hidden", ".", "..", "", None, 5,
             ["w.bin"], "manifest.json", "report.json", "timing.json"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_tables_member_names_refused(name):
    tail = f"names member {name!r}, which is not a plain file name of its own"
    with pytest.raises(PackageError, match=damaged(f"blob 'w' {tail}")):
        tables({"blobs": {"w": blob(file=name)}})
    with pytest.raises(PackageError, match=damaged(f"'host_library' {tail}")):
        tables({"host_library": {"file": name, "sha256": H}})
    if isinstance(name, str):                     # JSON object keys are strings
        with pytest.raises(PackageError, match=damaged(f"extra {name!r} {tail}")):
            tables({"extras": {name: {"sha256": H, "size": 1}}})


def test_tables_member_names_accepted():
    for name in ("a.b", "w.bin.", "x", "host_library.so", "manifest.json.bak", "report", "a b"):
        assert tables({"blobs": {"w": blob(file=name)}}) == {name: 24}
        assert tables({"extras": {name: {"sha256": H, "size": 1}}}) == {name: 1}


def test_tables_missing_host_file_refused():
    with pytest.raises(PackageError, match=damaged("'host_library' names member None, which is not a plain file "
                                                   "name of its own")):
        tables({"host_library": {"sha256": H, "size": 1}})


def test_tables_duplicate_members_refused():
    two = {"blobs": {"w": blob(), "v": blob()}}
    with pytest.raises(PackageError, match=damaged("blob 'v' names member 'w.bin', which another entry names too")):
        tables(two)
    with pytest.raises(PackageError, match=damaged("'host_library' names member 'w.bin', which another entry "
                                                   "names too")):
        tables({"blobs": {"w": blob()}, "host_library": {"file": "w.bin", "sha256": H}})
    with pytest.raises(PackageError, match=damaged("extra 'w.bin' names member 'w.bin', which another entry names too")):
        tables({"blobs": {"w": blob()}, "extras": {"w.bin": {"sha256": H}}})
    with pytest.raises(PackageError, match=damaged("extra 'lib.so' names member 'lib.so', which another entry "
                                                   "names too")):
        tables({"host_library": {"file": "lib.so", "sha256": H}, "extras": {"lib.so": {"sha256": H}}})


@pytest.mark.parametrize("size", [-1, True, False, 1.0, "10", [1]])
def test_tables_bad_sizes_refused(size):
    with pytest.raises(PackageError, match=damaged(f"'host_library' has size {size!r}")):
        tables({"host_library": {"file": "lib.so", "sha256": H, "size": size}})
    with pytest.raises(PackageError, match=damaged(f"extra 'e' has size {size!r}")):
        tables({"extras": {"e": {"sha256": H, "size": size}}})


def test_tables_message_names_the_path():
    with pytest.raises(PackageError, match=exact("'/x/y z.tar': manifest.json: 'blobs' is not a table; the file is "
                                                 "damaged")):
        P._tables("/x/y z.tar", {"blobs": []})


# -------------------------------------------------------------------------------------- cast_input
@pytest.mark.parametrize("src, want, out", [
    (np.array([1.5, -2.0]), "float32", [1.5, -2.0]),
    (np.array([1, 2], np.int32), "float32", [1.0, 2.0]),
    (np.array([3], np.uint8), "float64", [3.0]),
    (np.array([0.5], np.float32), "float16", [0.5]),
    (np.array([1, 2], np.uint8), "int64", [1, 2]),
    (np.array([1.0, -2.0]), "int32", [1, -2]),
    (np.array([2 ** 31 - 1, -2 ** 31], np.int64), "int32", [2 ** 31 - 1, -2 ** 31]),
    (np.array([127, -128], np.int64), "int8", [127, -128]),
    (np.array([0, 255], np.int64), "uint8", [0, 255]),
    (np.array([255.0]), "uint8", [255]),
    (np.zeros(0, np.int64), "int32", []),
    (np.zeros(0, np.float64), "int32", []),
])
def test_cast_input_accepted(src, want, out):
    a, note = cast_input(src, want, "x")
    assert a.dtype == np.dtype(want) and a.tolist() == out
    assert note == f"input 'x' is {src.dtype}, the package takes {np.dtype(want)}: cast"


def test_cast_input_same_dtype_is_untouched():
    a = np.array([1.0, 2.0], np.float32)
    b, note = cast_input(a, "float32", "x")
    assert b is a and note is None
    b, note = cast_input([1, 2], "int64", "x")            # a list: made an array
    assert b.dtype == np.int64 and b.tolist() == [1, 2] and note is None


@pytest.mark.parametrize("src, want, msg", [
    (np.array([True]), "float32", "input 'x' has dtype bool; the package takes float32 (give numbers)"),
    (np.array([True]), "int64", "input 'x' has dtype bool; the package takes int64 (give numbers)"),
    (np.array([1 + 2j]), "float32", "input 'x' has dtype complex128; the package takes float32 (give numbers)"),
    (np.array(["a"]), "float32", "input 'x' has dtype <U1; the package takes float32 (give numbers)"),
    (np.array([None], object), "int64", "input 'x' has dtype object; the package takes int64 (give numbers)"),
    (np.array([0.0, 2.5]), "int64", ("input 'x' is float64 with non-integer values; the package takes int64 "
                                    "(e.g. token ids)")),
    (np.array([np.nan]), "int32", ("input 'x' is float64 with non-integer values; the package takes int32 "
                                  "(e.g. token ids)")),
    (np.array([np.inf], np.float32), "int64", ("input 'x' is float32 with non-integer values; the package takes "
                                              "int64 (e.g. token ids)")),
    (np.array([2 ** 31], np.int64), "int32", ("input 'x' has values in [2147483648, 2147483648], outside int32's "
                                             "range [-2147483648, 2147483647]")),
    (np.array([0, -2 ** 31 - 1], np.int64), "int32", ("input 'x' has values in [-2147483649, 0], outside int32's "
                                                     "range [-2147483648, 2147483647]")),
    (np.array([-1, 3], np.int64), "uint8", "input 'x' has values in [-1, 3], outside uint8's range [0, 255]"),
    (np.array([128], np.int64), "int8", "input 'x' has values in [128, 128], outside int8's range [-128, 127]"),
    (np.array([256.0]), "uint8", "input 'x' has values in [256.0, 256.0], outside uint8's range [0, 255]"),
    (np.array([1.0]), "bool", "input 'x': the package takes dtype bool, which tvmc cannot feed"),
    (np.array([1], np.int64), "complex64", "input 'x': the package takes dtype complex64, which tvmc cannot feed"),
])
def test_cast_input_refused(src, want, msg):
    with pytest.raises(PackageError, match=exact(msg)):
        cast_input(src, want, "x")


# --------------------------------------------------------------------------------------- input_arrays
def pkg_with_inputs(*inputs) -> Package:
    man = {"format": "psq-tvm-package", "version": 1,
           "inputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in inputs]}
    return Package(man, {}, None)


def test_input_arrays_forms():
    pkg = pkg_with_inputs(("x", [2, 3], "float32"))
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    for given in (x, [x], (x,), {"x": x}, {"other": x}):       # one input: any single name will do
        out = pkg.input_arrays(given)
        assert len(out) == 1 and out[0].dtype == np.float32 and out[0].tolist() == x.tolist()
    f = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    out = pkg.input_arrays([f])[0]
    assert out.flags.c_contiguous and out.tolist() == f.tolist()
    two = pkg_with_inputs(("x", [2], "float32"), ("ids", [2], "int64"))
    out = two.input_arrays({"ids": np.array([1.0, 2.0]), "x": np.array([0.5, 1.5])})
    assert [a.dtype for a in out] == [np.float32, np.int64] and [a.tolist() for a in out] == [[0.5, 1.5], [1, 2]]
    assert pkg_with_inputs().input_arrays([]) == []
    assert Package({}, {}, None).input_arrays([]) == []


def test_input_arrays_refusals():
    pkg = pkg_with_inputs(("x", [2, 3], "float32"))
    two = pkg_with_inputs(("x", [2], "float32"), ("y", [2], "float32"))
    z = np.zeros(2, np.float32)
    with pytest.raises(PackageError, match=exact("inputs lack ['y']; the model takes ['x', 'y']")):
        two.input_arrays({"x": z})
    with pytest.raises(PackageError, match=exact("inputs lack ['x', 'y']; the model takes ['x', 'y']")):
        two.input_arrays({"a": z, "b": z})
    with pytest.raises(PackageError, match=exact("inputs lack ['x']; the model takes ['x']")):
        pkg.input_arrays({"a": z, "b": z})
    with pytest.raises(PackageError, match=exact("model takes 2 input(s) ['x', 'y'], got 1")):
        two.input_arrays([z])
    with pytest.raises(PackageError, match=exact("model takes 1 input(s) ['x'], got 2")):
        pkg.input_arrays([z, z])
    with pytest.raises(PackageError, match=exact(
            "input 'x' has shape [3] (rank 1); the package was compiled for [2, 3] (rank 2): give arrays of that "
            "rank (add the batch dim, e.g. x[None])")):
        pkg.input_arrays(np.zeros(3, np.float32))
    with pytest.raises(PackageError, match=exact(
            "input 'x' has shape [1, 2, 3] (rank 3); the package was compiled for [2, 3] (rank 2): give arrays of "
            "that rank")):
        pkg.input_arrays(np.zeros((1, 2, 3), np.float32))
    with pytest.raises(PackageError, match=exact(
            "input 'x' has shape [2, 4], the package was compiled for [2, 3] (if the model takes that size, "
            "recompile with --input-shapes \"x:[2,4]\")")):
        pkg.input_arrays(np.zeros((2, 4), np.float32))
    bad = np.zeros((2, 3), np.float32)
    bad[0, 1], bad[1, 2] = np.nan, -np.inf
    with pytest.raises(PackageError, match=exact(
            "input 'x' has 2 NaN/Inf value(s); the PIM activation range is taken from the input, so it must be "
            "finite")):
        pkg.input_arrays(bad)
    with pytest.raises(PackageError, match="has dtype bool"):
        pkg.input_arrays(np.zeros((2, 3), bool))


# ----------------------------------------------------------------------------- Package access, report
def test_blob_blobs_layers_report():
    a = np.arange(3, dtype=np.float32)
    man = {"layers": [{"id": 0}], "report": {"crossbars": 3}}
    pkg = Package(man, {"b": a, "a": a[:1]}, None, timing={"search_seconds": 2.5})
    assert pkg.blob("b") is a
    with pytest.raises(PackageError, match=exact("package has no blob 'c'; it has ['a', 'b']")):
        pkg.blob("c")
    bl = pkg.blobs
    bl.pop("a")
    assert sorted(pkg.blobs) == ["a", "b"]                      # a copy
    assert pkg.layers == [{"id": 0}]
    assert pkg.report == {"crossbars": 3, "search_seconds": 2.5}
    assert man["report"] == {"crossbars": 3}                     # not modified
    assert Package({}, {}, None).report == {"search_seconds": None}
    assert Package({}, {}, None).extras == {} and Package({}, {}, None).timing == {}
    assert pkg.digest is None and pkg.path is None


def test_run_without_host_library_is_refused():
    pkg = pkg_with_inputs(("x", [1], "float32"))
    with pytest.raises(PackageError, match=exact("package has no host library to run")):
        pkg.run([np.zeros(1, np.float32)])


# ------------------------------------------------------------------------------------------ members
def test_members_tables_and_bytes():
    man = {"format": "psq-tvm-package", "version": 1, "report": {"x": 1}}
    pkg = Package(man, {"b": np.array([1, 258], ">u2"), "a": np.zeros((0, 3), np.float32)}, b"abc",
                  extras={"notes.txt": b"hello", "e": b""})
    files = pkg.members()
    assert sorted(files) == ["a.bin", "b.bin", "e", "host_library.so", "manifest.json", "notes.txt", "report.json"]
    assert bytes(files["b.bin"]) == b"\x01\x00\x02\x01" and bytes(files["a.bin"]) == b""
    assert files["host_library.so"] == b"abc" and files["notes.txt"] == b"hello" and files["e"] == b""
    assert files["report.json"] == b'{\n "x": 1\n}\n'
    m = pkg.manifest
    assert m["blobs"] == {
        "a": {"file": "a.bin", "dtype": "float32", "shape": [0, 3], "byte_order": "little", "sha256": EMPTY_SHA},
        "b": {"file": "b.bin", "dtype": "uint16", "shape": [2], "byte_order": "little",
              "sha256": hashlib.sha256(b"\x01\x00\x02\x01").hexdigest()}}
    assert m["host_library"] == {"file": "host_library.so", "sha256": ABC_SHA, "size": 3}
    assert m["extras"] == {"notes.txt": {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5},
                           "e": {"sha256": EMPTY_SHA, "size": 0}}
    assert files["manifest.json"] == P.dumps(m) and json.loads(files["manifest.json"]) == m
    assert "blobs" not in man                                     # the caller's dict is left alone
    assert P._tables("p", m) == {"a.bin": 0, "b.bin": 4, "host_library.so": 3, "notes.txt": 5, "e": 0}
    bare = Package({"format": "psq-tvm-package"}, {}, None)
    files = bare.members()
    assert sorted(files) == ["manifest.json", "report.json"] and files["report.json"] == b"{}\n"
    assert bare.manifest == {"format": "psq-tvm-package", "blobs": {}, "host_library": None, "extras": {}}


# ------------------------------------------------------------------------------------- save and load
def small_package() -> Package:
    man = {"format": "psq-tvm-package", "version": 1, "inputs": [], "layers": [], "report": {"r": 2}}
    return Package(man, {"w": np.array([[1.5, -2.0]], np.float32), "z": np.zeros((0, 3), np.int64)},
                   b"\x7fELF-lib", extras={"notes.txt": b"hello"})


def test_save_tar_layout_and_load_back(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    pkg = small_package()
    out = pkg.save(tmp_path / "s.tar")
    assert out == str(tmp_path / "s.tar") and isinstance(out, str) and pkg.path == out
    data = (tmp_path / "s.tar").read_bytes()
    assert pkg.digest == hashlib.sha256(data).hexdigest()
    assert data[257:265] == b"ustar\x0000"                        # USTAR headers
    with tarfile.open(out) as t:
        infos = t.getmembers()
        names = [m.name for m in infos]
        assert names == sorted(names) == ["host_library.so", "manifest.json", "notes.txt", "report.json",
                                          "w.bin", "z.bin"]
        assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname, m.type) for m in infos} == \
            {(0, 0o644, 0, 0, "", "", tarfile.REGTYPE)}
        assert t.extractfile("w.bin").read() == b"\x00\x00\xc0?\x00\x00\x00\xc0"
        assert t.extractfile("notes.txt").read() == b"hello"
    back = load(out)
    assert back.path == out and back.digest == pkg.digest
    assert back.blob("w").dtype == np.float32 and back.blob("w").tolist() == [[1.5, -2.0]]
    assert back.blob("z").shape == (0, 3) and back.blob("z").dtype == np.int64
    assert back.host_library == b"\x7fELF-lib" and back.extras == {"notes.txt": b"hello"}
    assert back.manifest == pkg.manifest and back.timing == {}
    assert load(tmp_path / "s.tar", expect_digest=pkg.digest.upper()).digest == pkg.digest
    with pytest.raises(DigestMismatch, match="not the expected " + EMPTY_SHA):
        load(out, expect_digest=EMPTY_SHA)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    with tarfile.open(small_package().save(tmp_path / "e.tar")) as t:
        assert {m.mtime for m in t.getmembers()} == {1234}


def test_save_refusals_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    with pytest.raises(PackageError, match="SOURCE_DATE_EPOCH='soon'"):
        small_package().save(tmp_path / "a.tar")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    with pytest.raises(PackageError, match="directory .* does not exist"):
        small_package().save(tmp_path / "nodir" / "a.tar")
    with pytest.raises(PackageError, match="is a directory"):
        small_package().save(tmp_path)


def write_tar(path, items):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(bytes(data)))
    return path


def test_load_refusals_on_hand_made_packages(tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    pkg = small_package()
    files = {k: bytes(v) for k, v in pkg.members().items()}
    missing = tmp_path / "nope.tar"
    with pytest.raises(PackageError, match=exact(f"package {str(missing)!r} does not exist")):
        load(missing)
    # an extra whose bytes changed (same size)
    p = write_tar(tmp_path / "x.tar", {**files, "notes.txt": b"jello"}.items())
    with pytest.raises(PackageError, match=exact(f"{str(p)!r}: checksum mismatch for extra member 'notes.txt'; "
                                                 "the file is damaged")):
        load(p)
    # report.json may be at most the manifest's size; timing.json at most 64 KiB
    big = b" " * (len(files["manifest.json"]) + 1)
    p = write_tar(tmp_path / "r.tar", {**files, "report.json": big}.items())
    with pytest.raises(PackageError, match=exact(
            f"{str(p)!r}: member 'report.json' has {len(big)} bytes, at most {len(files['manifest.json'])} "
            "expected from manifest.json; the file is damaged")):
        load(p)
    p = write_tar(tmp_path / "ok.tar", {**files, "report.json": big[:-1]}.items())
    assert load(p).manifest["report"] == {"r": 2}
    p = write_tar(tmp_path / "t.tar", {**files, "timing.json": b" " * 65537}.items())
    with pytest.raises(PackageError, match="member 'timing.json' has 65537 bytes, at most 65536 expected"):
        load(p)
    # a blob of the wrong size, exactly
    p = write_tar(tmp_path / "w.tar", {**files, "w.bin": files["w.bin"] + b"\0" * 4}.items())
    with pytest.raises(PackageError, match=exact(f"{str(p)!r}: member 'w.bin' has 12 bytes, 8 expected from "
                                                 "manifest.json; the file is damaged")):
        load(p)
    p = write_tar(tmp_path / "s.tar", {**files, "w.bin": files["w.bin"][:4]}.items())
    with pytest.raises(PackageError, match="member 'w.bin' has 4 bytes, 8 expected"):
        load(p)
    # no manifest; an oversized manifest
    p = write_tar(tmp_path / "n.tar", [("w.bin", files["w.bin"])])
    with pytest.raises(PackageError, match=exact(f"{str(p)!r} is not a psq-tvm package: no manifest.json inside")):
        load(p)
    p = write_tar(tmp_path / "m.tar", files.items())
    n = len(files["manifest.json"])
    monkeypatch.setattr(P, "MAX_MANIFEST", n - 1)
    with pytest.raises(PackageError, match=exact(f"{str(p)!r}: manifest.json has {n} bytes, more than the {n - 1} "
                                                 "this reader accepts; the file is damaged")):
        load(p)
    monkeypatch.setattr(P, "MAX_MANIFEST", n)
    assert load(p).extras == {"notes.txt": b"hello"}


@pytest.mark.parametrize("timing, want", [(b'{"search_seconds": 1.5}', {"search_seconds": 1.5}),
                                          (b"not json", {}), (b"[1, 2]", {}), (b"", {})])
def test_load_reads_old_timing_json(tmp_path, timing, want):
    files = {k: bytes(v) for k, v in small_package().members().items()}
    back = load(write_tar(tmp_path / "t.tar", {**files, "timing.json": timing}.items()))
    assert back.timing == want and back.report["search_seconds"] == want.get("search_seconds")


def test_load_without_host_library(tmp_path):
    pkg = Package({"format": "psq-tvm-package", "version": 1}, {"w": np.ones(2, np.uint8)}, None)
    back = load(pkg.save(tmp_path / "n.tar"))
    assert back.host_library is None and back.manifest["host_library"] is None and back.blob("w").tolist() == [1, 1]


# ------------------------------------------------------------------------------------- run_batched
class _Recorder:
    """Stands in for Package.run: records its arguments; the output depends on sim_options and mode."""

    def __init__(self):
        self.calls = []

    def __call__(self, pkg, inputs, mode="fake-quant", sim_options=None, *args, **kw):
        (x,) = inputs
        self.calls.append((x.copy(), mode, sim_options, args, kw))
        gain = 1.0 if sim_options is None else sim_options["gain"]
        return [x.sum(axis=1, keepdims=True) * gain + (100.0 if mode == "sim" else 0.0)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_run_batched_passes_mode_and_sim_options_to_every_batch(monkeypatch, n):
    rec = _Recorder()
    monkeypatch.setattr(Package, "run", lambda self, *a, **k: rec(self, *a, **k))
    pkg = pkg_with_inputs(("x", [2, 3], "float32"))
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 1
    opts = {"gain": 3.0}
    y = pkg.run_batched(x, "sim", opts)
    assert y.shape == (n, 1) and y.ravel().tolist() == (x.sum(axis=1) * 3.0 + 100.0).tolist()
    assert len(rec.calls) == (n + 1) // 2
    for k, (chunk, mode, so, args, kw) in enumerate(rec.calls):
        assert chunk.shape == (2, 3) and chunk.dtype == np.float32 and mode == "sim" and so is opts
        want = np.zeros((2, 3), np.float32)
        part = x[2 * k:2 * k + 2]
        want[:len(part)] = part                                    # the last batch padded with zeros after the data
        assert chunk.tolist() == want.tolist()
    rec.calls.clear()
    y = pkg.run_batched(x)                                         # defaults: fake-quant, no options
    assert y.ravel().tolist() == x.sum(axis=1).tolist()
    assert {(c[1], c[2]) for c in rec.calls} == {("fake-quant", None)}


def test_expect_digest_message_names_the_file_and_is_checked_again_after_reading(tmp_path, monkeypatch):
    """The digest is checked before anything is read (the message names the file) and again on the bytes
    actually read: a file that changes after the first check (simulated by a first check that reads
    another file's digest) is still refused."""
    out = small_package().save(tmp_path / "s.tar")
    real = hashlib.sha256((tmp_path / "s.tar").read_bytes()).hexdigest()
    with pytest.raises(DigestMismatch, match=exact(
            f"{out!r} has digest sha256 {real}, not the expected {EMPTY_SHA}: the package was modified or is "
            "another one; do not run it")):
        load(out, expect_digest=EMPTY_SHA)
    monkeypatch.setattr(P.ustar, "file_sha256", lambda path: EMPTY_SHA)     # the first check passes...
    with pytest.raises(DigestMismatch, match=exact(
            f"{out!r} has digest sha256 {real}, not the expected {EMPTY_SHA}: the package was modified or is "
            "another one; do not run it")):
        load(out, expect_digest=EMPTY_SHA)                                  # ...the second one does not


def test_oversized_manifest_message(tmp_path):
    """A manifest member over MAX_MANIFEST bytes: refused before it is read, with the documented text."""
    path = tmp_path / "big.tar"
    write_tar(path, [("manifest.json", b" " * (P.MAX_MANIFEST + 1))])
    with pytest.raises(P.PackageError, match=exact(
            f"{str(path)!r}: manifest.json has {P.MAX_MANIFEST + 1} bytes, more than the {P.MAX_MANIFEST} this "
            "reader accepts; the file is damaged")):
        load(path)
