"""The zip layout of a torch file, checked so that Python's :mod:`zipfile` (the guard) and torch's miniz reader
(``torch.load``) can only see the same records.

The two readers disagree on files a writer would never produce: Python's reader tolerates bytes before the
archive (it adds their length to every offset) while miniz reads offsets as absolute; Python's reader keeps the
last of two records of one name; each reader finds the end records its own way.  So :func:`check_zip_layout`
accepts only the layout ``torch.save`` writes and refuses anything else by name:

* the file starts with a local header (torch's own test of the zip format) and ends with the end-of-central-
  directory record, without a comment; a zip64 end record and locator, if present, sit right before it and
  agree with it;
* the central directory ends exactly where the end records start, so no prefix offset exists;
* its declared entry count is read from the end record and bounded *before* any record is parsed, and exactly
  that many central entries fill the central directory;
* the local records, in offset order, start at byte 0 and follow one another with no gap up to the central
  directory (a data descriptor, if flagged, is the only thing allowed after a record's data), each with the
  name its central entry gives; no name occurs twice.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from .safe_pickle import Limits, LimitExceeded, UnsafePickleError, summary

LOCAL, CENTRAL, EOCD, EOCD64, LOCATOR64, DESCRIPTOR = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06",
                                                       b"PK\x06\x07", b"PK\x07\x08")


def _bad(path: Path, what: str) -> UnsafePickleError:
    return UnsafePickleError(f"{path}: zip layout torch.save does not write ({what}); Python's zip reader and "
                             "torch's could read different records")


def end_records(f, path: Path, size: int, limits: Limits) -> tuple[int, int, int]:
    """``(entries, central directory offset, its size)`` from the end records, the entry count bounded."""
    if size < 22:
        raise _bad(path, "shorter than an end record")
    f.seek(size - 22)
    sig, disk, cd_disk, n_disk, n, cd_size, cd_off, comment = struct.unpack("<4s4H2LH", f.read(22))
    if sig != EOCD or comment or disk or cd_disk or n_disk != n:
        raise _bad(path, "the file does not end with a single-disk end-of-central-directory record and no comment")
    end = size - 22
    if size >= 22 + 20 + 56:
        f.seek(size - 22 - 20)
        lsig, ldisk, rec_off, ndisks = struct.unpack("<4sLQL", f.read(20))
        if lsig == LOCATOR64:
            f.seek(size - 22 - 20 - 56)
            rsig, rsize, _, _, rdisk, rcd_disk, rn_disk, rn, rcd_size, rcd_off = struct.unpack("<4sQ2H2L4Q", f.read(56))
            end = size - 22 - 20 - 56
            if (rsig != EOCD64 or rsize != 44 or rec_off != end or ldisk or ndisks != 1 or rdisk or rcd_disk
                    or rn_disk != rn or any(short not in (long, mask) for short, long, mask in [
                        (n, rn, 0xFFFF), (cd_size, rcd_size, 0xFFFFFFFF), (cd_off, rcd_off, 0xFFFFFFFF)])):
                raise _bad(path, "a zip64 end record that is not right before its locator or disagrees with the "
                                 "end record")
            n, cd_size, cd_off = rn, rcd_size, rcd_off
    if n > limits.max_zip_entries:
        raise LimitExceeded(f"{path}: {n} zip records (Limits.max_zip_entries = {limits.max_zip_entries})")
    if cd_off + cd_size != end:
        raise _bad(path, f"the central directory at {cd_off} of {cd_size} bytes does not end at the end records "
                         f"({end}): bytes before or inside the archive")
    return n, cd_off, cd_size


def check_zip_layout(f, path: Path, limits: Limits) -> zipfile.ZipFile:
    """The file's :class:`zipfile.ZipFile` after the checks of the module docstring."""
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    if f.read(4) != LOCAL:
        raise _bad(path, "it does not start with a local file header")
    n, cd_off, cd_size = end_records(f, path, size, limits)
    _scan_central(f, path, n, cd_off, cd_size)
    f.seek(0)
    zf = zipfile.ZipFile(f)
    try:
        _check_records(f, zf, path, n, cd_off)
    except BaseException:
        zf.close()
        raise
    return zf


def _scan_central(f, path: Path, n: int, cd_off: int, cd_size: int) -> None:
    """The declared ``n`` central entries fill the central directory exactly (so the reader that loops over the
    bytes and the one that counts entries see the same ones, and no more than the bound are ever parsed)."""
    pos, end = cd_off, cd_off + cd_size
    for _ in range(n):
        f.seek(pos)
        head = f.read(46)
        if len(head) != 46 or head[:4] != CENTRAL:
            raise _bad(path, f"no central entry at {pos}")
        pos += 46 + sum(struct.unpack("<3H", head[28:34]))
        if pos > end:
            raise _bad(path, "central entries run past the central directory")
    if pos != end:
        raise _bad(path, f"{end - pos} bytes in the central directory after its {n} declared entries")


def _check_records(f, zf: zipfile.ZipFile, path: Path, n: int, cd_off: int) -> None:
    infos = zf.infolist()
    if len(infos) != n or getattr(zf, "start_dir", cd_off) != cd_off:
        raise _bad(path, f"{len(infos)} central entries read, the end record declares {n}")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        dup = next(x for x in names if names.count(x) > 1)
        raise _bad(path, f"two records named {summary(dup)}")
    pos = 0
    for i in sorted(infos, key=lambda i: i.header_offset):
        if i.header_offset != pos:
            raise _bad(path, f"record {summary(i.filename)} at {i.header_offset}, the previous one ends at {pos}")
        f.seek(pos)
        head = f.read(30)
        if len(head) != 30 or head[:4] != LOCAL:
            raise _bad(path, f"no local header for {summary(i.filename)}")
        flags, nlen, elen = struct.unpack("<H", head[6:8])[0], *struct.unpack("<2H", head[26:30])
        if f.read(nlen) != i.orig_filename.encode("utf-8" if flags & 0x800 else "cp437"):
            raise _bad(path, f"the local name of {summary(i.filename)} differs from its central name")
        pos += 30 + nlen + elen + i.compress_size
        if flags & 8:
            f.seek(pos)
            pos += _descriptor(f.read(24), i, path)
        if pos > cd_off:
            raise _bad(path, f"record {summary(i.filename)} runs into the central directory")
    if pos != cd_off:
        raise _bad(path, f"{cd_off - pos} bytes between the last record and the central directory")


def _descriptor(raw: bytes, info: zipfile.ZipInfo, path: Path) -> int:
    """The length of the data descriptor at the start of ``raw`` (with or without signature, 32- or 64-bit sizes),
    which must repeat the central entry's crc and sizes."""
    want = (info.CRC, info.compress_size, info.file_size)
    for sig, fmt in ((True, "<L2Q"), (True, "<3L"), (False, "<L2Q"), (False, "<3L")):
        start = 4 if sig else 0
        k = start + struct.calcsize(fmt)
        if (not sig or raw[:4] == DESCRIPTOR) and len(raw) >= k and struct.unpack(fmt, raw[start:k]) == want:
            return k
    raise _bad(path, f"the data descriptor of {summary(info.filename)} does not repeat its crc and sizes")
