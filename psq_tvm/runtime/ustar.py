"""Reading the USTAR archive a package is stored in, with bounded memory.

``tarfile`` reads a member only when asked, but it reads pax and GNU long-name headers whole and
keeps every header it meets; a damaged or hostile package could make it allocate without bound.
A psq-tvm package is plain USTAR with regular files only (``Package.save`` writes nothing else), so
this module parses the 512-byte headers itself: :func:`scan` walks the headers without reading any
member's data (a member is skipped by seeking), and :func:`read_members` reads the members the caller
has accepted, in file order, while hashing every byte of the file (headers, data, padding, the end
blocks) so the package digest is the sha256 of the ``.tar`` exactly as ``sha256sum`` computes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable

BLOCK = 512
MAX_MEMBERS = 100_000           # headers scanned before giving up (a package has 3 per layer at most)
MAX_TRAILER = 1 << 20           # zero bytes allowed after the two end-of-archive blocks (record padding)
REGULAR = (b"0", b"\0")


class ArchiveError(ValueError):
    """The file is not a plain USTAR archive of regular files (message without the file name)."""


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    offset: int       # where the data starts
    header: bytes     # the raw 512-byte header block


def _number(field: bytes, what: str, name: str) -> int:
    if field[:1] and field[0] & 0x80:                      # GNU base-256 encoding
        if field[0] & 0x40:
            raise ArchiveError(f"member {name!r} has a negative {what}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ArchiveError(f"member {name!r} has a malformed {what} field") from None


def _header(block: bytes, offset: int) -> tuple[str, int]:
    """(name, size) of a regular-file header block; ArchiveError for anything else."""
    try:
        stored = _number(block[148:156], "checksum", "?")
    except ArchiveError:
        stored = -1
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise ArchiveError(f"header at byte {offset} has a bad checksum (not a tar, or damaged)")
    if block[257:262] != b"ustar":
        raise ArchiveError(f"header at byte {offset} is not a USTAR header")
    raw = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    try:
        name = ((prefix + b"/" if prefix else b"") + raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(f"header at byte {offset} has a member name that is not UTF-8") from None
    kind = block[156:157]
    if kind not in REGULAR:
        raise ArchiveError(f"member {name!r} is of tar type {kind!r}; a package holds regular files only")
    return name, _number(block[124:136], "size", name)


def scan(f: BinaryIO, file_size: int) -> list[Member]:
    """Every member's header, in file order, without reading any member's data.

    Refuses (ArchiveError) non-regular members, bad checksums, members reaching past the end of the
    file, and anything but zero bytes (at most ``MAX_TRAILER``) after the end-of-archive blocks."""
    members: list[Member] = []
    pos = 0
    f.seek(0)
    while True:
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            raise ArchiveError("the archive ends without its end-of-archive blocks (truncated)")
        if block == bytes(BLOCK):
            break
        name, size = _header(block, pos)
        data = pos + BLOCK
        if data + size > file_size:
            raise ArchiveError(f"member {name!r} claims {size} bytes, past the end of the file (truncated)")
        members.append(Member(name, size, data, block))
        if len(members) > MAX_MEMBERS:
            raise ArchiveError(f"more than {MAX_MEMBERS} members")
        pos = data + -(-size // BLOCK) * BLOCK
        f.seek(pos)
    trailer = file_size - pos - BLOCK
    if trailer > MAX_TRAILER:
        raise ArchiveError(f"{trailer} bytes after the end of the archive (data appended to the package)")
    if f.read(trailer) != bytes(trailer):
        raise ArchiveError("non-zero bytes after the end of the archive (data appended to the package)")
    return members


def read_members(f: BinaryIO, file_size: int, members: list[Member], wanted: Iterable[str],
                 chunk: int = 1 << 22) -> tuple[dict[str, memoryview], str]:
    """The data (read-only buffers) of the ``wanted`` members and the sha256 (hex) of the whole file, read once, in order.

    Every header is compared with the one :func:`scan` saw, so the data and the digest come from the
    same bytes even if the file is replaced between the two passes."""
    want = set(wanted)
    h = hashlib.sha256()
    out: dict[str, memoryview] = {}
    f.seek(0)
    pos = 0

    def skip(n: int) -> None:
        nonlocal pos
        while n > 0:
            b = f.read(min(n, chunk))
            if not b:
                raise ArchiveError("the file changed while it was read")
            h.update(b)
            n -= len(b)
            pos += len(b)

    def take(n: int) -> memoryview:
        nonlocal pos
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = f.readinto(mv[got:got + chunk])
            if not k:
                raise ArchiveError("the file changed while it was read")
            h.update(mv[got:got + k])
            got += k
        pos += n
        return mv.toreadonly()

    for m in members:
        if pos != m.offset - BLOCK:
            raise ArchiveError("the file changed while it was read")
        hdr = f.read(BLOCK)
        if hdr != m.header:
            raise ArchiveError("the file changed while it was read")
        h.update(hdr)
        pos += BLOCK
        if m.name in want:
            out[m.name] = take(m.size)
        else:
            skip(m.size)
        skip(-(-m.size // BLOCK) * BLOCK - m.size)
    skip(file_size - pos)
    if f.read(1):
        raise ArchiveError("the file changed while it was read")
    return out, h.hexdigest()


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
