"""Writing output files atomically: every file tvmc writes (package, ``--outputs``, ``--emit-c-header``).

:func:`atomic_write` writes into a temporary file made in the destination directory and renames it over
the destination only when the whole content is written and synced, so a reader never sees half a file:

* the temporary is created with :func:`tempfile.mkstemp` (``O_CREAT | O_EXCL | O_NOFOLLOW``, a random
  name): a file or symlink planted in advance is never opened, let alone followed;
* its name is ``.psq-<pid>-<random><suffix>`` and the writer holds an exclusive ``flock`` on it while it
  writes; the rename replaces the destination itself (a symlink at the destination is replaced, not
  followed);
* on any exception (``KeyboardInterrupt`` included; ``tvmc`` turns SIGTERM into one) the temporary is
  removed; a writer killed outright (SIGKILL, power loss) leaves it behind, and the next write into the
  same directory removes the temporaries of dead writers (:func:`remove_stale_temporaries`: the pid in the
  name is not a live process *and* nobody holds the lock);
* the file gets the mode a plain ``open()`` would give (``0666 & ~umask``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import IO

#: prefix of every temporary this module makes (``.psq-<pid>-...``)
TEMP_PREFIX = ".psq-"
_TEMP_RE = re.compile(r"^\.psq-(\d+)-[A-Za-z0-9_]+\.[A-Za-z0-9_.]*tmp$")


class OutputPathError(ValueError):
    """An output path that cannot be written (missing directory, a directory, no permission)."""


def check_output_path(path: str | os.PathLike, what: str = "output") -> str:
    """Raise :class:`OutputPathError` unless a file can be written at ``path`` (checked before work starts)."""
    path = os.fspath(path)
    if not path:
        raise OutputPathError(f"{what} path is empty; name the file to write")
    if os.path.isdir(path):
        raise OutputPathError(f"{what} {path!r} is a directory; name a file in it")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise OutputPathError(f"cannot write {what} {path!r}: directory {d!r} does not exist (create it first)")
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {what} {path!r}: directory {d!r} is not writable")
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)              # fallback: set and restore (not thread-safe, only off Linux)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the temporaries that dead writers left in ``directory``; returns the names removed.

    A temporary is stale when its name is ours (``.psq-<pid>-*tmp``), it is a regular file owned by
    this user, the pid in its name is not a live process and no process holds its lock (the last
    check covers a writer in another pid namespace, whose pid means nothing here).
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        m = _TEMP_RE.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        p = os.path.join(directory, name)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) and st.st_uid == uid):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                # a live writer holds it
            try:
                if os.path.samestat(st, os.lstat(p)):
                    os.unlink(p)
                    removed.append(name)
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp", what: str = "output") -> Iterator[IO[bytes]]:
    """``with atomic_write(path) as f: f.write(...)``: the file appears at ``path`` whole, or not at all.

    See the module docstring for the guarantees.  ``what`` names the file in error messages.
    """
    path = check_output_path(path, what)
    d = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(d)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=suffix, dir=d)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            fd = -1
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "output") -> str:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`); returns the path."""
    with atomic_write(path, what=what) as f:
        f.write(data)
    return os.fspath(path)


def write_with(path: str | os.PathLike, writer: Callable[[IO[bytes]], None], suffix: str = ".tmp",
               what: str = "output") -> str:
    """Call ``writer(fileobj)`` on the temporary of ``path``, then rename it into place; returns the path."""
    with atomic_write(path, suffix, what) as f:
        writer(f)
    return os.fspath(path)


__all__ = [
    "TEMP_PREFIX",
    "OutputPathError",
    "atomic_write",
    "check_output_path",
    "current_umask",
    "remove_stale_temporaries",
    "write_bytes",
    "write_with",
]
