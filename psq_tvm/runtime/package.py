"""The compiled package: manifest + blobs + host library in one tar (format in docs/package_format.md).

Writing is atomic (temporary file in the target directory, then ``os.replace``) and
reproducible (sorted members, mtime 0 or ``SOURCE_DATE_EPOCH``, uid/gid 0, mode 0644, JSON with
sorted keys, no measured times): two compiles of the same model give the same bytes.  Loading
checks every member against the manifest before reading it (bounded memory, see ``ustar``), the
format name, version and the sha256 of every blob and of the host library, and refuses anything
else with a :class:`PackageError` naming the file and the problem.  :attr:`Package.digest` is the
sha256 of the whole .tar (``sha256sum``), the value ``tvmc run/report --expect-digest`` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np

from . import ustar
from .files import OutputPathError, check_output_path, write_with

FORMAT = "psq-tvm-package"
VERSION = 1
MANIFEST = "manifest.json"
HOST_LIBRARY = "host_library.so"
REPORT = "report.json"
TIMING = "timing.json"
C_HEADER = "pim_psq_tables.h"
MTIME = 0  # member timestamp (1970-01-01) for reproducible tars, unless SOURCE_DATE_EPOCH is set
FIXED_MEMBERS = (MANIFEST, REPORT, TIMING)
MAX_MANIFEST = 256 << 20        # bytes; per-column scales of VGG-19 take ~25 MB
MAX_TIMING = 1 << 16            # timing.json of packages written before it left the package
MAX_UNDECLARED = 4 << 30        # a host library or extra whose size the manifest does not declare (older packages)


class PackageError(ValueError):
    """A package that cannot be written or read (damaged, foreign, wrong version)."""


class DigestMismatch(PackageError):
    """The package's digest (sha256 of the whole .tar) is not the one the caller expected."""


def source_date_epoch() -> int:
    """Member timestamp: ``SOURCE_DATE_EPOCH`` when set (reproducible-builds.org), else 0."""
    v = os.environ.get("SOURCE_DATE_EPOCH")
    if v is None or v == "":
        return MTIME
    if not (v.isascii() and v.isdigit()) or int(v) >= 8 ** 11:
        raise PackageError(f"SOURCE_DATE_EPOCH={v!r} is not a whole number of seconds since 1970 (below 8**11); "
                           "set it to e.g. the last commit's time, `git log -1 --format=%ct`, or unset it")
    return int(v)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def blob_bytes(a: np.ndarray) -> memoryview:
    """The little-endian bytes of ``a`` as a read-only buffer (no copy when ``a`` already is one)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a.reshape(-1).view(np.uint8)).toreadonly()


class _BufferReader:
    """File-like ``read`` over a bytes-like object, for tarfile, without copying it whole."""

    def __init__(self, data) -> None:
        self._mv = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> memoryview:
        end = len(self._mv) if n is None or n < 0 else min(len(self._mv), self._pos + n)
        out = self._mv[self._pos:end]
        self._pos = end
        return out


class Package:
    """A compiled pim-psq (or llvm) package in memory: manifest, blobs, host library, extras."""

    def __init__(self, manifest: dict, blobs: Mapping[str, np.ndarray], host_library: bytes | None,
                 extras: Mapping[str, bytes] | None = None, timing: Mapping[str, float] | None = None,
                 path: str | None = None):
        self.manifest = manifest
        self._blobs = dict(blobs)
        self.host_library = host_library
        self.extras = dict(extras or {})
        self.timing = dict(timing or {})
        self.path = path
        self.digest: str | None = None   # sha256 (hex) of the .tar it was loaded from or saved to
        self._vm = None
        self._tmpdir = None

    # ---------------------------------------------------------------- access
    def blob(self, name: str) -> np.ndarray:
        try:
            return self._blobs[name]
        except KeyError:
            raise PackageError(f"package has no blob {name!r}; it has {sorted(self._blobs)}") from None

    @property
    def blobs(self) -> dict[str, np.ndarray]:
        return dict(self._blobs)

    @property
    def spec(self):
        from ..core.crossbar import CrossbarSpec
        return CrossbarSpec.from_dict(self.manifest["spec"])

    @property
    def layers(self) -> list[dict]:
        return self.manifest["layers"]

    @property
    def report(self) -> dict:
        """The compile report, with the measured search time merged in when known (a package just compiled;
        a loaded one has ``search_seconds`` None: times are not stored, so that packages are reproducible)."""
        rep = dict(self.manifest.get("report", {}))
        rep["search_seconds"] = self.timing.get("search_seconds")
        return rep

    # ------------------------------------------------------------------ write
    def members(self) -> dict[str, bytes | memoryview]:
        """File name -> bytes (or a read-only buffer, for blobs) of every tar member (manifest blob table filled in)."""
        files: dict[str, bytes] = {}
        blob_table = {}
        names = sorted(self._blobs)
        datas = [blob_bytes(self._blobs[n]) for n in names]
        # hashlib releases the GIL on large buffers: hash the blobs on two threads
        with ThreadPoolExecutor(max_workers=2) as pool:
            digests = list(pool.map(sha256, datas))
        for name, data, digest in zip(names, datas, digests):
            a = self._blobs[name]
            fname = f"{name}.bin"
            blob_table[name] = {"file": fname, "dtype": str(np.dtype(a.dtype).newbyteorder("=").name),
                                "shape": [int(d) for d in a.shape], "byte_order": "little", "sha256": digest}
            files[fname] = data
        man = dict(self.manifest)
        man["blobs"] = blob_table
        if self.host_library is not None:
            files[HOST_LIBRARY] = self.host_library
            man["host_library"] = {"file": HOST_LIBRARY, "sha256": sha256(self.host_library),
                                   "size": len(self.host_library)}
        else:
            man["host_library"] = None
        extras_table = {}
        for name, data in sorted(self.extras.items()):
            files[name] = data
            extras_table[name] = {"sha256": sha256(data), "size": len(data)}
        man["extras"] = extras_table
        files[REPORT] = dumps(man.get("report", {}))
        files[MANIFEST] = dumps(man)
        self.manifest = man
        return files

    def save(self, path: str | os.PathLike) -> str:
        """Write the package as a tar, atomically (no partial file is ever left at ``path``; see
        :mod:`psq_tvm.runtime.files`); sets :attr:`digest`."""
        path = os.fspath(path)
        files = self.members()
        mtime = source_date_epoch()
        try:
            check_output_path(path, "package")
        except OutputPathError as e:
            raise PackageError(str(e)) from None

        def write_tar(f) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                tar.copybufsize = 1 << 22
                for name in sorted(files):
                    data = files[name]
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = mtime
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, _BufferReader(data))

        write_with(path, write_tar, suffix=".tar.tmp", what="package")
        self.digest = ustar.file_sha256(path)
        self.path = path
        return path

    # -------------------------------------------------------------------- run
    def _vm_instance(self):
        if self._vm is None:
            import tvm
            from tvm import relax

            from . import session  # noqa: F401  (registers pim_psq.layer)

            if self.host_library is None:
                raise PackageError("package has no host library to run")
            self._tmpdir = tempfile.TemporaryDirectory(prefix="psq-run-")
            lib_path = os.path.join(self._tmpdir.name, HOST_LIBRARY)
            with open(lib_path, "wb") as f:
                f.write(self.host_library)
            lib = tvm.runtime.load_module(lib_path)
            self._vm = relax.VirtualMachine(lib, tvm.cpu())
        return self._vm

    def input_arrays(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Inputs in the model's order, checked against the manifest's names/shapes/dtypes."""
        info = self.manifest.get("inputs", [])
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            missing = [i["name"] for i in info if i["name"] not in inputs]
            if missing and len(info) == 1 and len(inputs) == 1:
                arrs = [np.asarray(next(iter(inputs.values())))]
            elif missing:
                raise PackageError(f"inputs lack {missing}; the model takes {[i['name'] for i in info]}")
            else:
                arrs = [np.asarray(inputs[i["name"]]) for i in info]
        else:
            arrs = [np.asarray(a) for a in inputs]
            if len(arrs) != len(info):
                raise PackageError(f"model takes {len(info)} input(s) {[i['name'] for i in info]}, got {len(arrs)}")
        out = []
        for a, i in zip(arrs, info):
            a = cast_input(a, i["dtype"], i["name"])[0]
            if a.ndim != len(i["shape"]):
                raise PackageError(f"input {i['name']!r} has shape {list(a.shape)} (rank {a.ndim}); the package was "
                                   f"compiled for {i['shape']} (rank {len(i['shape'])}): give arrays of that rank"
                                   + (" (add the batch dim, e.g. x[None])" if a.ndim + 1 == len(i["shape"]) else ""))
            if list(a.shape) != list(i["shape"]):
                raise PackageError(f"input {i['name']!r} has shape {list(a.shape)}, the package was compiled for "
                                   f"{i['shape']} (if the model takes that size, recompile with --input-shapes "
                                   f"\"{i['name']}:[{','.join(map(str, a.shape))}]\")")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                bad = int(a.size - np.count_nonzero(np.isfinite(a)))
                raise PackageError(f"input {i['name']!r} has {bad} NaN/Inf value(s); the PIM activation range is "
                                   "taken from the input, so it must be finite")
            out.append(np.ascontiguousarray(a))
        return out

    def run(self, inputs, mode: str = "fake-quant", sim_options: Any = None, trace: bool = False,
            weights: Mapping[str, Sequence[np.ndarray]] | None = None,
            biases: Mapping[str, np.ndarray | None] | None = None):
        """Run the package on one set of inputs; returns a list of output arrays (and the layer trace).

        ``weights``/``biases`` (mode ``float``): per layer id, unrolled float64 matrices and biases used
        instead of the stored ones (see :class:`~psq_tvm.runtime.session.Session`)."""
        import tvm

        from .session import Session

        vm = self._vm_instance()
        arrs = [tvm.runtime.tensor(a) if hasattr(tvm.runtime, "tensor") else tvm.nd.array(a)
                for a in self.input_arrays(inputs)]
        with Session(self, mode, sim_options, weights=weights, biases=biases) as sess:
            if trace:
                sess.trace = []
            res = vm["main"](*arrs)
        outs = _flatten(res)
        return (outs, sess.trace) if trace else outs

    def run_batched(self, inputs: np.ndarray, mode: str = "fake-quant", sim_options: Any = None) -> np.ndarray:
        """Run a single-input model over a dataset whose first dim is larger than the compiled batch."""
        info = self.manifest["inputs"][0]
        b = int(info["shape"][0])
        outs = []
        for k in range(0, len(inputs), b):
            chunk = inputs[k:k + b]
            if len(chunk) < b:
                pad = np.zeros((b - len(chunk),) + chunk.shape[1:], dtype=chunk.dtype)
                y = self.run([np.concatenate([chunk, pad])], mode, sim_options)[0][:len(chunk)]
            else:
                y = self.run([chunk], mode, sim_options)[0]
            outs.append(y)
        return np.concatenate(outs)


def cast_input(a: np.ndarray, dtype: str, name: str) -> tuple[np.ndarray, str | None]:
    """``a`` as the compiled input dtype, and a note saying so when a cast was needed.

    Casts that keep the values are done: any real number to float, integers to an integer dtype that
    holds them, floats with integral values (e.g. token ids saved as float) to an integer dtype.  Anything
    else (bool, complex, strings; fractions or out-of-range values for an integer input) is a
    :class:`PackageError` saying what the model takes.
    """
    a = np.asarray(a)
    want = np.dtype(dtype)
    if a.dtype == want:
        return a, None
    note = f"input {name!r} is {a.dtype}, the package takes {want}: cast"
    if a.dtype.kind not in "iuf":
        raise PackageError(f"input {name!r} has dtype {a.dtype}; the package takes {want} (give numbers)")
    if want.kind == "f":
        return a.astype(want), note
    if want.kind in "iu":
        lim = np.iinfo(want)
        if a.dtype.kind == "f" and a.size and not np.all(np.isfinite(a) & (a == np.round(a))):
            raise PackageError(f"input {name!r} is {a.dtype} with non-integer values; the package takes {want} "
                               "(e.g. token ids)")
        if a.size and (a.min() < lim.min or a.max() > lim.max):
            raise PackageError(f"input {name!r} has values in [{a.min()}, {a.max()}], outside {want}'s range "
                               f"[{lim.min}, {lim.max}]")
        return a.astype(want), note
    raise PackageError(f"input {name!r}: the package takes dtype {want}, which tvmc cannot feed")


def _flatten(res) -> list[np.ndarray]:
    if hasattr(res, "numpy"):
        return [res.numpy()]
    out = []
    for r in res:
        out.extend(_flatten(r))
    return out


def _size(shape, dtype: np.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _tables(path: str, man: dict) -> dict[str, int | None]:
    """Every member the manifest lists -> its exact size in bytes (None: not declared, in older packages).

    Checks the types of the blob, host-library and extras tables on the way, so that a damaged manifest
    is refused here with its field named rather than failing later."""
    def bad(what: str) -> PackageError:
        return PackageError(f"{path!r}: {MANIFEST}: {what}; the file is damaged")

    def digest_ok(v) -> bool:
        return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)

    def member_name(v, where: str) -> str:
        if not isinstance(v, str) or not v or "/" in v or "\\" in v or v.startswith(".") or v in FIXED_MEMBERS:
            raise bad(f"{where} names member {v!r}, which is not a plain file name of its own")
        return v

    sizes: dict[str, int | None] = {}

    def add(name: str, size: int | None, where: str) -> None:
        if name in sizes:
            raise bad(f"{where} names member {name!r}, which another entry names too")
        sizes[name] = size

    blobs = man.get("blobs", {})
    if not isinstance(blobs, dict):
        raise bad("'blobs' is not a table")
    for name, b in blobs.items():
        if not isinstance(b, dict) or not digest_ok(b.get("sha256")):
            raise bad(f"blob {name!r} has no table with a sha256")
        try:
            dt = np.dtype(b.get("dtype"))
        except (TypeError, ValueError):   # ValueError: e.g. "i4,(-1)i4"
            dt = None
        if dt is None or not isinstance(b.get("dtype"), str) or dt.kind not in "biuf":
            raise bad(f"blob {name!r} has dtype {b.get('dtype')!r}, not a numeric dtype")
        shape = b.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"blob {name!r} has shape {shape!r}, not a list of non-negative integers")
        if b.get("byte_order", "little") != "little":
            raise bad(f"blob {name!r} has unsupported byte order {b.get('byte_order')!r}")
        add(member_name(b.get("file"), f"blob {name!r}"), _size(shape, dt), f"blob {name!r}")
    host = man.get("host_library")
    if host is not None:
        if not isinstance(host, dict) or not digest_ok(host.get("sha256")):
            raise bad("'host_library' has no table with a sha256")
        size = host.get("size")
        if size is not None and not (type(size) is int and size >= 0):
            raise bad(f"'host_library' has size {size!r}")
        add(member_name(host.get("file"), "'host_library'"), size, "'host_library'")
    extras = man.get("extras", {})
    if not isinstance(extras, dict):
        raise bad("'extras' is not a table")
    for name, e in extras.items():
        if not isinstance(e, dict) or not digest_ok(e.get("sha256")):
            raise bad(f"extra {name!r} has no table with a sha256")
        size = e.get("size")
        if size is not None and not (type(size) is int and size >= 0):
            raise bad(f"extra {name!r} has size {size!r}")
        add(member_name(name, f"extra {name!r}"), size, f"extra {name!r}")
    return sizes


def _check_digest(path: str, digest: str, expect: str | None) -> None:
    if expect is not None and digest != expect.lower():
        raise DigestMismatch(f"{path!r} has digest sha256 {digest}, not the expected {expect.lower()}: the package "
                             "was modified or is another one; do not run it")


def load(path: str | os.PathLike, expect_digest: str | None = None) -> Package:
    """Read and validate a package tar; raises :class:`PackageError` with the reason if it is not sound.

    Nothing in the package is executed (the host library is loaded only by :meth:`Package.run`).
    Every member is checked against the manifest before its data is read: a member the manifest does
    not list, a name that appears twice, a member larger than the manifest declares, or anything that
    is not a regular file is refused, so memory stays bounded by what the manifest declares.
    ``expect_digest`` (hex sha256 of the whole .tar, see :attr:`Package.digest`): refuse with
    :class:`DigestMismatch` before reading anything else when the file's digest differs."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PackageError(f"package {path!r} does not exist")
    if expect_digest is not None:
        _check_digest(path, ustar.file_sha256(path), expect_digest)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            members = ustar.scan(f, size)
            seen: dict[str, ustar.Member] = {}
            for m in members:
                if m.name in seen:
                    raise PackageError(f"{path!r}: member {m.name!r} appears twice in the tar (a second copy was "
                                       "appended?); refusing it")
                seen[m.name] = m
            if MANIFEST not in seen:
                raise PackageError(f"{path!r} is not a psq-tvm package: no {MANIFEST} inside")
            if seen[MANIFEST].size > MAX_MANIFEST:
                raise PackageError(f"{path!r}: {MANIFEST} has {seen[MANIFEST].size} bytes, more than the "
                                   f"{MAX_MANIFEST} this reader accepts; the file is damaged")
            f.seek(seen[MANIFEST].offset)
            man_bytes = f.read(seen[MANIFEST].size)
            man = _manifest(path, man_bytes)
            listed = _tables(path, man)
            limits = {n: (MAX_UNDECLARED, False) if v is None else (v, True) for n, v in listed.items()}
            limits.update({MANIFEST: (len(man_bytes), True), REPORT: (len(man_bytes), False),
                           TIMING: (MAX_TIMING, False)})
            for m in members:
                if m.name not in limits:
                    raise PackageError(f"{path!r}: member {m.name!r} is not listed in {MANIFEST}; refusing the "
                                       "package (it was modified or is damaged)")
                cap, exact = limits[m.name]
                if m.size > cap or (exact and m.size != cap):
                    raise PackageError(f"{path!r}: member {m.name!r} has {m.size} bytes, "
                                       f"{'' if exact else 'at most '}{cap} expected from {MANIFEST}; the file is damaged")
            missing = sorted(n for n in listed if n not in seen)
            if missing:
                raise PackageError(f"{path!r}: member {missing[0]!r} listed in {MANIFEST} is missing from the tar; "
                                   "the file is damaged")
            files, digest = ustar.read_members(f, size, members, [m.name for m in members])
    except ustar.ArchiveError as e:
        raise PackageError(f"{path!r} is not a readable psq-tvm package: {e}") from None
    except OSError as e:
        raise PackageError(f"cannot read package {path!r}: {e.strerror or e}") from None
    _check_digest(path, digest, expect_digest)
    if bytes(files[MANIFEST]) != man_bytes:
        raise PackageError(f"{path!r}: the file changed while it was read")
    blobs = {}
    for name, b in sorted(man.get("blobs", {}).items()):
        data = files[b["file"]]
        if sha256(data) != b["sha256"]:
            raise PackageError(f"{path!r}: checksum mismatch for blob {name!r} ({b['file']}); the file is damaged")
        dt = np.dtype(b["dtype"]).newbyteorder("<")
        blobs[name] = np.frombuffer(data, dtype=dt).reshape(b["shape"]).astype(np.dtype(b["dtype"]), copy=False)
    host = None
    if man.get("host_library"):
        host = bytes(files[man["host_library"]["file"]])
        if sha256(host) != man["host_library"]["sha256"]:
            raise PackageError(f"{path!r}: checksum mismatch for the host library; the file is damaged")
    extras = {}
    for name, e in man.get("extras", {}).items():
        if sha256(files[name]) != e["sha256"]:
            raise PackageError(f"{path!r}: checksum mismatch for extra member {name!r}; the file is damaged")
        extras[name] = bytes(files[name])
    timing = {}
    if TIMING in files:                      # packages written before timing left the package
        try:
            timing = json.loads(bytes(files[TIMING]))
        except ValueError:
            timing = {}
        if not isinstance(timing, dict):
            timing = {}
    pkg = Package(man, blobs, host, extras, timing, path=path)
    pkg.digest = digest
    return pkg


def _manifest(path: str, data: bytes) -> dict:
    try:
        man = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise PackageError(f"{path!r}: {MANIFEST} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise PackageError(f"{path!r} is not a psq-tvm package (format {man.get('format') if isinstance(man, dict) else None!r}, "
                           f"expected {FORMAT!r})")
    if man.get("version") != VERSION:
        raise PackageError(f"{path!r} has package format version {man.get('version')!r}; this psq-tvm reads "
                           f"version {VERSION} only (recompile the model with this psq-tvm)")
    return man
