"""The compiled package: manifest + blobs + host library in one tar (format in docs/package_format.md).

Writing is atomic (temporary file in the target directory, then ``os.replace``) and
deterministic (sorted members, fixed mtime/uid/gid/mode, JSON with sorted keys);
the only member that differs between two compiles of the same model is
``timing.json`` (measured durations).  Loading checks the format name, version
and the sha256 of every blob and of the host library, and refuses anything else
with a :class:`PackageError` naming the file and the problem.
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

from .files import OutputPathError, check_output_path, write_with

FORMAT = "psq-tvm-package"
VERSION = 1
MANIFEST = "manifest.json"
HOST_LIBRARY = "host_library.so"
REPORT = "report.json"
TIMING = "timing.json"
C_HEADER = "pim_psq_tables.h"
MTIME = 0  # fixed member timestamp (1970-01-01) for reproducible tars


class PackageError(ValueError):
    """A package that cannot be written or read (damaged, foreign, wrong version)."""


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
        """The compile report, with the measured timings merged in."""
        rep = dict(self.manifest.get("report", {}))
        if "search_seconds" in self.timing:
            rep["search_seconds"] = self.timing["search_seconds"]
        rep.setdefault("search_seconds", 0.0)
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
            man["host_library"] = {"file": HOST_LIBRARY, "sha256": sha256(self.host_library)}
        else:
            man["host_library"] = None
        extras_table = {}
        for name, data in sorted(self.extras.items()):
            files[name] = data
            extras_table[name] = {"sha256": sha256(data)}
        man["extras"] = extras_table
        files[REPORT] = dumps(man.get("report", {}))
        files[MANIFEST] = dumps(man)
        files[TIMING] = dumps(self.timing)
        self.manifest = man
        return files

    def save(self, path: str | os.PathLike) -> str:
        """Write the package as a tar, atomically (no partial file is ever left at ``path``; see
        :mod:`psq_tvm.runtime.files`)."""
        path = os.fspath(path)
        files = self.members()
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
                    info.mtime = MTIME
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, _BufferReader(data))

        write_with(path, write_tar, suffix=".tar.tmp", what="package")
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


def load(path: str | os.PathLike) -> Package:
    """Read and validate a package tar; raises :class:`PackageError` with the reason if it is not sound."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PackageError(f"package {path!r} does not exist")
    try:
        with tarfile.open(path, "r:*") as tar:
            files = {}
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                f = tar.extractfile(m)
                files[m.name] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PackageError(f"{path!r} is not a readable psq-tvm package (not a tar, or truncated): {e}") from None
    if MANIFEST not in files:
        raise PackageError(f"{path!r} is not a psq-tvm package: no {MANIFEST} inside")
    try:
        man = json.loads(files[MANIFEST])
    except ValueError as e:
        raise PackageError(f"{path!r}: {MANIFEST} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise PackageError(f"{path!r} is not a psq-tvm package (format {man.get('format') if isinstance(man, dict) else None!r}, "
                           f"expected {FORMAT!r})")
    if man.get("version") != VERSION:
        raise PackageError(f"{path!r} has package format version {man.get('version')!r}; this psq-tvm reads "
                           f"version {VERSION} only (recompile the model with this psq-tvm)")
    blobs = {}
    for name, b in sorted(man.get("blobs", {}).items()):
        data = files.get(b["file"])
        if data is None:
            raise PackageError(f"{path!r}: blob {name!r} ({b['file']}) is missing from the tar; the file is damaged")
        if sha256(data) != b["sha256"]:
            raise PackageError(f"{path!r}: checksum mismatch for blob {name!r} ({b['file']}); the file is damaged")
        if b.get("byte_order", "little") != "little":
            raise PackageError(f"{path!r}: blob {name!r} has unsupported byte order {b.get('byte_order')!r}")
        dt = np.dtype(b["dtype"]).newbyteorder("<")
        try:
            blobs[name] = np.frombuffer(data, dtype=dt).reshape(b["shape"]).astype(np.dtype(b["dtype"]), copy=False)
        except ValueError:
            raise PackageError(f"{path!r}: blob {name!r} has {len(data)} bytes, not {b['shape']} x {b['dtype']}") from None
    host = None
    if man.get("host_library"):
        host = files.get(man["host_library"]["file"])
        if host is None:
            raise PackageError(f"{path!r}: host library is missing from the tar; the file is damaged")
        if sha256(host) != man["host_library"]["sha256"]:
            raise PackageError(f"{path!r}: checksum mismatch for the host library; the file is damaged")
    extras = {}
    for name, e in man.get("extras", {}).items():
        if name not in files or sha256(files[name]) != e["sha256"]:
            raise PackageError(f"{path!r}: extra member {name!r} is missing or damaged")
        extras[name] = files[name]
    timing = {}
    if TIMING in files:
        try:
            timing = json.loads(files[TIMING])
        except ValueError:
            timing = {}
    return Package(man, blobs, host, extras, timing, path=path)
