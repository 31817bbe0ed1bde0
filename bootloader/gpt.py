"""The GPT on disk: protective MBR, primary and backup headers, entry arrays and their CRC32s.

This module owns the byte format (UEFI 2.10 §5.3) and nothing about A/B slots. It reads a
table from either copy, keeps every byte of an entry it was not asked to change (attribute
bits, name padding, bytes past 128 in larger entries), and writes crash-safely: the backup
copy first (entries, then header, fsync), then the primary (entries, then header, fsync).
A header's CRC covers its entry array, so an interruption at any point leaves at least one
copy whose header and entries agree: either the old table or the new one, never a mix.

Every low-level write goes through :func:`_pwrite` so tests can make the Nth write fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from obelisk import diskio
from obelisk.errors import ObeliskError

SIGNATURE = b"EFI PART"
REVISION = 0x00010000
HEADER_SIZE = 92
# signature, revision, header size, header crc, reserved, my lba, alternate lba, first usable,
# last usable, disk guid, entries lba, number of entries, entry size, entries crc
HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# type guid, partition guid, first lba, last lba, attributes, name (36 UTF-16LE code units)
ENTRY = struct.Struct("<16s16sQQQ72s")
ENTRY_MIN = 128
NAME_UNITS = 36
DEFAULT_ENTRIES = 128
# An entry array larger than this is not a GPT anyone wrote on purpose (cgpt allows 1024 x 128).
MAX_ENTRY_BYTES = 1024 * 1024
# UEFI reserves at least this much for the entry array; sgdisk and cgpt read only 128-byte entries.
STANDARD_ARRAY_BYTES = DEFAULT_ENTRIES * ENTRY_MIN
SECTOR_SIZES = (512, 4096)  # what an image file's headers may have been written with
BLKSSZGET = 0x1268  # ioctl: logical sector size of a block device
ZERO_GUID = uuid.UUID(int=0)
_ZERO16 = bytes(16)


class GptError(ObeliskError, ValueError):
    """A disk that is not a usable GPT, or a table that cannot be written. One line for the user."""


@dataclass
class GptPartition:
    index: int  # 1-based entry number
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str
    # The entry's bytes as read, so a rewrite keeps what this module does not interpret.
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def size_lba(self) -> int:
        return self.last_lba - self.first_lba + 1


@dataclass
class PartitionSpec:
    index: int
    name: str
    type_guid: uuid.UUID
    part_guid: uuid.UUID
    first_lba: int
    size_lba: int
    attributes: int = 0


@dataclass
class GptTable:
    disk_guid: uuid.UUID
    sector_size: int
    partitions: list[GptPartition]  # non-empty entries, by index
    disk_lbas: int = 0  # size of the disk in sectors when read
    first_usable_lba: int = 34
    last_usable_lba: int = 0
    num_entries: int = DEFAULT_ENTRIES
    entry_size: int = ENTRY_MIN
    primary_entries_lba: int = 2
    backup_lba: int = 0  # LBA of the backup header (normally the disk's last sector)
    backup_entries_lba: int = 0
    revision: int = REVISION
    header_extra: bytes = field(default=b"", repr=False)  # header bytes past 92 (covered by its CRC)
    # Health of the copies as read; a write_table() fixes both.
    primary_ok: bool = True
    backup_ok: bool = True
    mbr_ok: bool = True  # LBA 0 holds a protective (or hybrid) MBR
    problems: list[str] = field(default_factory=list)
    # Every entry slot's bytes as read (empty ones too), so unowned bytes survive a rewrite.
    raw_entries: list[bytes] = field(default_factory=list, repr=False, compare=False)

    def partition(self, index: int) -> GptPartition | None:
        return next((p for p in self.partitions if p.index == index), None)

    @property
    def needs_repair(self) -> bool:
        return not (self.primary_ok and self.backup_ok and self.mbr_ok)


@dataclass
class _Copy:
    """One parsed, CRC-checked header with its entry array."""

    lba: int
    revision: int
    header_size: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: uuid.UUID
    entries_lba: int
    num_entries: int
    entry_size: int
    extra: bytes
    entries: bytes
    entry_sectors: int

    @property
    def entries_span(self) -> tuple[int, int]:
        return self.entries_lba, self.entries_lba + self.entry_sectors - 1

    @property
    def standard(self) -> bool:
        """The entry array's shape is one every tool reads (128-byte entries, at least 16 KiB)."""
        return self.entry_size == ENTRY_MIN and self.num_entries * self.entry_size >= STANDARD_ARRAY_BYTES


class _Bad(Exception):
    """Why one copy is unusable (internal; becomes part of a GptError or a problem line)."""


class _BadEntries(_Bad):
    """The header checks out but its entry array does not (so that array is not intact either)."""


class _Beyond(_Bad):
    """The copy describes a disk larger than this one (a truncated image, when no backup is found)."""


# ---------------------------------------------------------------- low-level I/O


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    """The one place that writes table bytes (tests replace it to interrupt a write)."""
    diskio.pwrite_all(fd, data, offset)


def _pread(fd: int, size: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _check_kind(disk: Path) -> None:
    """Refuse a FIFO, socket or character device before opening it: open() of a FIFO blocks forever."""
    try:
        mode = os.stat(disk).st_mode
    except OSError:
        return  # os.open below names the problem
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode)):
        raise GptError(f"{disk}: is neither a disk image file nor a block device — pass a GPT disk")


@contextlib.contextmanager
def _open(disk: Path, write: bool) -> Iterator[int]:
    _check_kind(disk)
    try:
        fd = os.open(disk, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GptError(f"{disk}: no such file or device — pass --disk with a GPT disk image or block device") from None
    except IsADirectoryError:
        raise GptError(f"{disk}: is a directory — pass --disk with a GPT disk image or block device") from None
    except PermissionError:
        what = "write" if write else "read"
        raise GptError(f"{disk}: permission denied to {what} it — run as root or fix its permissions") from None
    except OSError as exc:
        raise GptError(f"{disk}: cannot open: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise GptError(f"{disk}: is a directory — pass --disk with a GPT disk image or block device")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise GptError(f"{disk}: is neither a disk image file nor a block device — pass a GPT disk")
        yield fd
    except OSError as exc:  # EIO from a failing device and the like: one line, not a traceback
        what = "write" if write else "read"
        raise GptError(f"{disk}: {what} failed: {exc.strerror or exc} — check the device") from None
    finally:
        os.close(fd)


def _disk_bytes(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _sector_size(fd: int, size: int) -> int:
    """The device's logical sector size; for an image file, the one its GPT headers were written with.

    An image copied from a 4Kn disk keeps its primary header at byte 4096. When the primary is
    damaged, the backup in the file's last sector tells the size: its self-pointer times the
    sector size is its byte offset (also when wipefs zeroed its signature). Neither found: 512
    (what the builder and cgpt use).
    """
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        buf = fcntl.ioctl(fd, BLKSSZGET, b"\0\0\0\0")
        return struct.unpack("<I", buf)[0]
    for ss in SECTOR_SIZES:
        if _pread(fd, 8, ss) == SIGNATURE:
            return ss
    for magic in (SIGNATURE, bytes(8)):  # then a signature wipefs zeroed
        for ss in SECTOR_SIZES:
            if size % ss == 0 and size >= 3 * ss:
                raw = _pread(fd, 32, size - ss)
                if raw[:8] == magic and struct.unpack_from("<Q", raw, 24)[0] == size // ss - 1:
                    return ss
    return 512


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


# ---------------------------------------------------------------- parsing


def _decode_name(raw: bytes) -> str:
    return raw.decode("utf-16-le", errors="replace").split("\0", 1)[0]


def _encode_name(name: str) -> bytes:
    data = name.encode("utf-16-le")
    if len(data) > NAME_UNITS * 2:
        raise GptError(f"partition name {name!r} is longer than {NAME_UNITS} UTF-16 code units — shorten it")
    return data.ljust(NAME_UNITS * 2, b"\0")


def _parse_entry(index: int, raw: bytes) -> GptPartition | None:
    if raw[:16] == _ZERO16:  # most of the 128 entries are empty: skip them cheaply
        return None
    type_b, part_b, first, last, attrs, name_b = ENTRY.unpack_from(raw)
    type_guid = uuid.UUID(bytes_le=type_b)
    return GptPartition(index, type_guid, uuid.UUID(bytes_le=part_b), first, last, attrs, _decode_name(name_b), raw)


def _read_copy(fd: int, lba: int, sector: int, disk_lbas: int, *, wiped: bool = False) -> _Copy:
    """The header at ``lba`` with its entry array, or _Bad saying why that copy cannot be trusted.

    With ``wiped``, a signature of zeros is taken as "EFI PART": wipefs zeroes only the magic, and
    the header's CRC (which covers the signature) then tells whether that was the only change.
    """
    if lba < 1 or lba >= disk_lbas:
        raise _Bad(f"header LBA {lba} is outside the disk")
    raw = _pread(fd, sector, lba * sector)
    if wiped and raw[:8] == bytes(8):
        raw = SIGNATURE + raw[8:]
    if raw[:8] != SIGNATURE:
        raise _Bad("no GPT signature")
    (_, rev, hsize, hcrc, _, my_lba, alt, first, last, guid_b, ent_lba, n_ent, ent_size, ent_crc) = HEADER.unpack_from(
        raw
    )
    if not HEADER_SIZE <= hsize <= sector:
        raise _Bad(f"header size {hsize} is invalid")
    check = bytearray(raw[:hsize])
    check[16:20] = b"\0\0\0\0"
    if _crc(bytes(check)) != hcrc:
        raise _Bad("header CRC mismatch")
    if rev != REVISION:  # sgdisk and cgpt refuse any other revision: so do we, or a repair would keep it
        raise _Bad(f"unknown GPT revision {rev:#010x} (only 1.0 exists)")
    if my_lba != lba:
        raise _Bad(f"header says it is at LBA {my_lba}, found at {lba}")
    if ent_size < ENTRY_MIN or ent_size % 8 or n_ent < 1 or n_ent * ent_size > MAX_ENTRY_BYTES:
        raise _Bad(f"entry array of {n_ent} x {ent_size} bytes is invalid")
    copy = _Copy(lba, rev, hsize, alt, first, last, uuid.UUID(bytes_le=guid_b), ent_lba, n_ent, ent_size,
                 raw[HEADER_SIZE:hsize], b"", -(-n_ent * ent_size // sector))
    _check_geometry(copy, disk_lbas)
    copy.entries = _pread(fd, n_ent * ent_size, ent_lba * sector)
    if len(copy.entries) != n_ent * ent_size or _crc(copy.entries) != ent_crc:
        raise _BadEntries("entry array CRC mismatch")
    _check_entries(copy)
    return copy


def _check_geometry(copy: _Copy, disk_lbas: int) -> None:
    """A CRC-valid header can still place its parts where a write would destroy data: refuse it.

    Its entry array must lie on the disk, off the protective MBR, its own header and the usable
    area (a write of the entries would otherwise land inside a partition).
    """
    first, last = copy.first_usable_lba, copy.last_usable_lba
    e0, e1 = copy.entries_span
    if last >= disk_lbas:
        raise _Beyond(f"its usable area ends at sector {last}, past the disk's end ({disk_lbas} sectors)")
    if first > last + 1:
        raise _Bad(f"its usable area {first}..{last} is inverted")
    if e1 >= disk_lbas:
        raise _Bad(f"its entry array (sectors {e0}..{e1}) runs past the disk's end ({disk_lbas} sectors)")
    if e0 < 2 or e0 <= copy.lba <= e1:
        raise _Bad(f"its entry array (sectors {e0}..{e1}) covers a header or the protective MBR")
    if first <= last:
        if _overlap((first, last), (e0, e1)):
            raise _Bad(f"its entry array (sectors {e0}..{e1}) lies in the usable area {first}..{last}, "
                       "where the partitions are")
        if first <= copy.lba <= last or first == 0:
            raise _Bad(f"its usable area {first}..{last} covers its own header or the protective MBR")


def _check_entries(copy: _Copy) -> None:
    spans = []
    for i in range(copy.num_entries):
        off = i * copy.entry_size
        if copy.entries[off : off + 16] == _ZERO16:
            continue
        first, last = struct.unpack_from("<QQ", copy.entries, off + 32)
        if not copy.first_usable_lba <= first <= last <= copy.last_usable_lba:
            raise _BadEntries(f"partition {i + 1} lies outside the usable area")
        spans.append((first, last, i + 1))
    spans.sort()
    for (_, last_a, ia), (first_b, _, ib) in zip(spans, spans[1:], strict=False):
        if first_b <= last_a:
            raise _BadEntries(f"partitions {ia} and {ib} overlap")


def _try_copy(fd: int, lba: int, sector: int, disk_lbas: int, *, wiped: bool = False) -> tuple[_Copy | None,
                                                                                                   _Bad | None]:
    try:
        return _read_copy(fd, lba, sector, disk_lbas, wiped=wiped), None
    except _Bad as exc:
        return None, exc


def _find_backup(fd: int, primary: _Copy | None, sector: int, disk_lbas: int) -> tuple[_Copy | None, str,
                                                                                       _Bad | None]:
    """The backup where the primary says it is, else in the disk's last sector (where every tool
    puts it, so a damaged pointer or a lost primary does not hide an intact backup)."""
    end = disk_lbas - 1
    alt = primary.alternate_lba if primary is not None else end
    if alt == end:
        backup, err = _try_copy(fd, end, sector, disk_lbas)
        return backup, str(err or ""), err
    if primary is not None and primary.last_usable_lba < alt < end:
        backup, err = _try_copy(fd, alt, sector, disk_lbas)
        if backup is not None:
            return backup, "", None
        where = f"at sector {alt}, where the primary points: {err}"
    else:
        where = f"the primary points to sector {alt}, which cannot hold it"
    backup, err = _try_copy(fd, end, sector, disk_lbas)
    return backup, "" if backup is not None else f"{where}; at the disk's end: {err}", err


def _structures(copy: _Copy) -> list[tuple[tuple[int, int], str]]:
    return [((copy.lba, copy.lba), "header"), (copy.entries_span, "entry array")]


def _clash(primary: _Copy, backup: _Copy) -> tuple[str, str]:
    """(copy, why) when one copy's layout runs over the other's header or entries, else ("", "").

    A copy whose usable area covers the other's parts is the bad one (a write of a partition
    there would destroy it); when the two only share sectors, the one whose entry array is not
    where the standard puts it.
    """
    for copy, other, name in ((primary, backup, "primary"), (backup, primary, "backup")):
        first, last = copy.first_usable_lba, copy.last_usable_lba
        for span, what in _structures(other):
            if first <= last and _overlap((first, last), span):
                return name, f"its usable area {first}..{last} covers the other copy's {what} at {span[0]}..{span[1]}"
    for span, what in _structures(primary):
        for other_span, other_what in _structures(backup):
            if _overlap(span, other_span):
                blame = "backup" if primary.entries_lba == 2 else "primary"
                return blame, f"the primary's {what} and the backup's {other_what} share sectors"
    return "", ""


def _difference(a: _Copy, b: _Copy) -> str:
    """What differs between two valid copies, in a few words ("" when they hold the same table)."""
    if (a.num_entries, a.entry_size) != (b.num_entries, b.entry_size):
        return f"{a.num_entries} x {a.entry_size}-byte entries against {b.num_entries} x {b.entry_size}"
    if (a.first_usable_lba, a.last_usable_lba) != (b.first_usable_lba, b.last_usable_lba):
        return (f"usable area {a.first_usable_lba}..{a.last_usable_lba} against "
                f"{b.first_usable_lba}..{b.last_usable_lba}")
    if a.disk_guid != b.disk_guid:
        return "disk GUID"
    if (a.revision, a.header_size, a.extra) != (b.revision, b.header_size, b.extra):
        return "header size"
    if a.entries == b.entries:
        return ""
    size = a.entry_size
    changed = [str(i + 1) for i in range(a.num_entries)
               if a.entries[i * size : (i + 1) * size] != b.entries[i * size : (i + 1) * size]]
    if changed:
        return "partition entr" + ("y " if len(changed) == 1 else "ies ") + ", ".join(changed[:8]) + (
            ", ..." if len(changed) > 8 else "")
    return ""


def _pmbr_problem(fd: int) -> str:
    """"" unless LBA 0 is blank or garbage (no MBR signature, or four empty records): GRUB finds no
    GPT without the protective record. An MBR partition table is left alone: it is not ours to drop."""
    mbr = _pread(fd, 512, 0)
    if mbr[510:512] == b"\x55\xaa" and mbr[446:510] != bytes(64):
        return ""
    return "protective MBR is missing (GRUB needs it to find the partitions)"


@dataclass
class _Scan:
    """Both copies as found on the disk and what was wrong with each."""

    primary: _Copy | None
    backup: _Copy | None
    p_err: _Bad | None
    b_err: str
    mbr: str
    intact_arrays: list[int] = field(default_factory=list)
    wiped: bool = False  # the copies were found only with their zeroed signatures restored


def _scan(fd: int, sector: int, disk_lbas: int) -> _Scan:
    primary, p_err = _try_copy(fd, 1, sector, disk_lbas)
    backup, b_err, end_err = _find_backup(fd, primary, sector, disk_lbas)
    scan = _Scan(primary, backup, p_err, b_err, _pmbr_problem(fd))
    if primary is None and backup is None:
        scan.primary = _try_copy(fd, 1, sector, disk_lbas, wiped=True)[0]
        scan.backup = _try_copy(fd, disk_lbas - 1, sector, disk_lbas, wiped=True)[0]
        scan.wiped = scan.primary is not None or scan.backup is not None
        if not scan.wiped:  # an array whose header checked out but its CRC did not is not intact
            places = [lba for lba, err in ((2, p_err), (disk_lbas - 1 - STANDARD_ARRAY_BYTES // sector, end_err))
                      if not isinstance(err, _BadEntries)]
            scan.intact_arrays = _intact_arrays(fd, sector, disk_lbas, places)
    return scan


def _intact_arrays(fd: int, sector: int, disk_lbas: int, places: list[int]) -> list[int]:
    """Those of ``places`` where a standard entry array (128 x 128 bytes) still lists sane partitions."""
    found = []
    size = STANDARD_ARRAY_BYTES
    for lba in places:
        raw = _pread(fd, size, lba * sector)
        spans = [struct.unpack_from("<QQ", raw, off + 32) for off in range(0, len(raw), ENTRY_MIN)
                 if raw[off : off + 16] != _ZERO16]
        if spans and all(2 <= a <= b < disk_lbas for a, b in spans):
            found.append(lba)
    return found


def _resolve(scan: _Scan) -> tuple[_Copy, list[str], bool, bool]:
    """The copy to read from, the problems found, and whether the primary and backup can stay."""
    primary, backup = scan.primary, scan.backup
    if primary is not None and backup is not None:
        blame, why = _clash(primary, backup)
        if blame == "primary":
            primary, scan.p_err = None, _Bad(why)
        elif blame == "backup":
            backup, scan.b_err = None, why
    problems: list[str] = []
    if primary is None:
        problems.append(f"primary GPT is corrupt ({scan.p_err}); the backup is intact")
    if backup is None:
        problems.append(f"backup GPT is corrupt ({scan.b_err}); the primary is intact")
    p_ok, b_ok = primary is not None, backup is not None
    src = primary or backup
    assert src is not None
    if primary is not None and backup is not None:
        if primary.alternate_lba != backup.lba:
            problems.append(f"primary GPT points to its backup at sector {primary.alternate_lba}, "
                            f"but the backup is at sector {backup.lba}")
            p_ok = False
        if backup.alternate_lba != primary.lba:
            problems.append(f"backup GPT points to the primary at sector {backup.alternate_lba}, not 1")
            b_ok = False
        if what := _difference(primary, backup):
            # Copies that disagree on the entry array's shape cannot come from an interrupted write;
            # trust the one sgdisk and cgpt can read too. Otherwise the primary, as both tools do.
            if backup.standard and not primary.standard:
                src, p_ok = backup, False
                problems.append(f"primary GPT differs from the backup ({what}); using the backup, whose "
                                f"{backup.num_entries} x {backup.entry_size}-byte entry array is the standard shape")
            else:
                b_ok = False
                problems.append(f"backup GPT differs from the primary ({what}: an interrupted write?); "
                                "using the primary")
    if scan.wiped:  # nothing was readable without restoring a signature: both copies get rewritten
        problems.insert(0, "the GPT signatures are wiped (wipefs?), the headers are otherwise intact")
        p_ok = b_ok = False
    if scan.mbr:
        problems.append(scan.mbr)
    scan.primary, scan.backup = primary, backup
    return src, problems, p_ok, b_ok


def _unreadable(disk: Path, scan: _Scan, disk_lbas: int) -> GptError:
    """The error when neither copy can be used."""
    p_err, b_err = str(scan.p_err), scan.b_err
    if isinstance(scan.p_err, _Beyond):
        return GptError(f"{disk}: the GPT describes a disk larger than its {disk_lbas} sectors ({p_err}) and no "
                        "backup GPT is at its end: the image is truncated — re-create or re-download it")
    if scan.intact_arrays:
        where = ("sector " if len(scan.intact_arrays) == 1 else "sectors ") + " and ".join(map(str, scan.intact_arrays))
        return GptError(
            f"{disk}: both GPT headers are unusable (primary: {p_err}; backup: {b_err}); the partition entries "
            f"at {where} still look intact, but a header's geometry cannot be guessed safely — restore "
            "the disk from a known-good image, or re-create the same partitions with sgdisk"
        )
    if p_err == b_err == "no GPT signature":
        return GptError(f"{disk}: not a GPT disk (no GPT header found) — pass a disk image or device with a GPT")
    return GptError(
        f"{disk}: both GPT copies are unusable (primary: {p_err}; backup: {b_err}) — "
        "the disk may be truncated or overwritten; restore it from a known-good image"
    )


def read_table(disk: Path) -> GptTable:
    """The disk's GPT, from the primary copy or, when that is bad, from the backup.

    ``primary_ok``/``backup_ok``/``mbr_ok``/``problems`` say what is wrong; nothing is written
    here (repair with :func:`repair` or any :func:`write_table`). A damaged disk that a write
    could not repair raises GptError saying why, so no command ever suggests a repair that
    then refuses.
    """
    disk = Path(disk)
    with _open(disk, write=False) as fd:
        size = _disk_bytes(fd)
        sector = _sector_size(fd, size)
        disk_lbas = size // sector
        if disk_lbas < 3:
            raise GptError(f"{disk}: not a GPT disk (only {size} bytes) — pass a GPT disk image; is it truncated?")
        scan = _scan(fd, sector, disk_lbas)
    if scan.primary is None and scan.backup is None:
        raise _unreadable(disk, scan, disk_lbas)
    src, problems, p_ok, b_ok = _resolve(scan)
    table = _table_from(src, scan, sector, disk_lbas)
    table.problems, table.primary_ok, table.backup_ok, table.mbr_ok = problems, p_ok, b_ok, not scan.mbr
    if table.needs_repair:
        _check_repairable(disk, table, scan.backup is None)
    return table


def _table_from(src: _Copy, scan: _Scan, sector: int, disk_lbas: int) -> GptTable:
    """``src``'s table, laid out where a write puts both copies: where each valid copy is, else
    where the standard puts it (primary entries at LBA 2, backup at the primary's pointer when
    that can hold it, else the disk's last sector)."""
    primary, backup = scan.primary, scan.backup
    n = src.entry_sectors
    p_ent = 2
    if primary is not None and primary.entries_lba >= 2 and primary.entries_lba + n <= src.first_usable_lba:
        p_ent = primary.entries_lba
    if backup is not None:
        b_lba = backup.lba
    elif primary is not None and src.last_usable_lba + n < primary.alternate_lba < disk_lbas:
        b_lba = primary.alternate_lba
    else:
        b_lba = disk_lbas - 1
    b_ent = b_lba - n
    if backup is not None and src.last_usable_lba < backup.entries_lba and backup.entries_lba + n <= b_lba:
        b_ent = backup.entries_lba
    raw_entries = [src.entries[i * src.entry_size : (i + 1) * src.entry_size] for i in range(src.num_entries)]
    parts = [p for i, raw in enumerate(raw_entries) if (p := _parse_entry(i + 1, raw)) is not None]
    return GptTable(disk_guid=src.disk_guid, sector_size=sector, partitions=parts, disk_lbas=disk_lbas,
                    first_usable_lba=src.first_usable_lba, last_usable_lba=src.last_usable_lba,
                    num_entries=src.num_entries, entry_size=src.entry_size, primary_entries_lba=p_ent,
                    backup_lba=b_lba, backup_entries_lba=b_ent, revision=src.revision, header_extra=src.extra,
                    raw_entries=raw_entries)


def _check_repairable(disk: Path, table: GptTable, backup_lost: bool) -> None:
    """Raise the reason when writing ``table`` (what a repair does) would be refused."""
    try:
        _validate(disk, table, table.disk_lbas)
    except GptError as exc:
        if backup_lost and table.backup_entries_lba <= table.last_usable_lba:
            raise GptError(
                f"{disk}: the backup GPT is missing and the disk ({table.disk_lbas} sectors) has no room for one "
                f"after the usable area, which ends at sector {table.last_usable_lba}: the image is truncated — "
                "re-create or re-download it"
            ) from None
        reason = str(exc).removeprefix(f"{disk}: ")
        raise GptError(f"{disk}: the GPT is damaged ({'; '.join(table.problems)}) and cannot be rewritten "
                       f"({reason}) — restore the disk from a known-good image") from None


# ---------------------------------------------------------------- writing


def _encode_entry(part: GptPartition, base: bytes, entry_size: int) -> bytes:
    base = (base or b"").ljust(entry_size, b"\0")[:entry_size]
    name_b = base[56:128] if _decode_name(base[56:128]) == part.name else _encode_name(part.name)
    fixed = ENTRY.pack(part.type_guid.bytes_le, part.part_guid.bytes_le, part.first_lba, part.last_lba,
                       part.attributes & 0xFFFFFFFFFFFFFFFF, name_b)
    return fixed + base[ENTRY.size :]


def _entries_bytes(table: GptTable) -> bytes:
    slots = [(r or b"").ljust(table.entry_size, b"\0")[: table.entry_size] for r in table.raw_entries]
    slots += [b"\0" * table.entry_size] * (table.num_entries - len(slots))
    slots = slots[: table.num_entries]
    wanted = {p.index for p in table.partitions}
    for i, raw in enumerate(slots):
        # An entry that was in use and is no longer listed was deleted: clear it.
        if i + 1 not in wanted and raw[:16] != b"\0" * 16:
            slots[i] = b"\0" * table.entry_size
    for p in table.partitions:
        slots[p.index - 1] = _encode_entry(p, p.raw or slots[p.index - 1], table.entry_size)
    return b"".join(slots)


def _header(table: GptTable, my_lba: int, alt_lba: int, entries_lba: int, entries_crc: int) -> bytes:
    hsize = HEADER_SIZE + len(table.header_extra)
    fields = [SIGNATURE, table.revision, hsize, 0, 0, my_lba, alt_lba, table.first_usable_lba, table.last_usable_lba,
              table.disk_guid.bytes_le, entries_lba, table.num_entries, table.entry_size, entries_crc]
    body = HEADER.pack(*fields) + table.header_extra
    fields[3] = _crc(body)
    return (HEADER.pack(*fields) + table.header_extra).ljust(table.sector_size, b"\0")


def _validate(disk: Path, table: GptTable, disk_lbas: int) -> None:
    ss = table.sector_size
    ent_sectors = -(-table.num_entries * table.entry_size // ss)
    if table.entry_size < ENTRY_MIN or table.entry_size % 8 or table.num_entries * table.entry_size > MAX_ENTRY_BYTES:
        raise GptError(f"{disk}: entry array of {table.num_entries} x {table.entry_size} bytes is invalid")
    if not (table.primary_entries_lba >= 2 and table.primary_entries_lba + ent_sectors <= table.first_usable_lba
            and table.last_usable_lba < table.backup_entries_lba
            and table.backup_entries_lba + ent_sectors <= table.backup_lba < disk_lbas):
        raise GptError(f"{disk}: the table's layout does not fit a disk of {disk_lbas} sectors — re-create the table")
    spans = []
    for p in table.partitions:
        if not 1 <= p.index <= table.num_entries:
            raise GptError(f"{disk}: partition index {p.index} is outside 1..{table.num_entries}")
        if p.type_guid == ZERO_GUID:
            raise GptError(f"{disk}: partition {p.index} has the empty type GUID — give it a type")
        if not table.first_usable_lba <= p.first_lba <= p.last_lba <= table.last_usable_lba:
            raise GptError(
                f"{disk}: partition {p.index} ({p.first_lba}..{p.last_lba}) is outside the usable sectors "
                f"{table.first_usable_lba}..{table.last_usable_lba}"
            )
        _encode_name(p.name)
        spans.append((p.first_lba, p.last_lba, p.index))
    if len({s[2] for s in spans}) != len(spans):
        raise GptError(f"{disk}: two partitions share one index")
    spans.sort()
    for (_, last_a, ia), (first_b, _, ib) in zip(spans, spans[1:], strict=False):
        if first_b <= last_a:
            raise GptError(f"{disk}: partitions {ia} and {ib} overlap")


def _write_copies(fd: int, table: GptTable) -> None:
    """Backup first (entries, header, fsync), then primary: each header's CRC seals its entries."""
    ss = table.sector_size
    entries = _entries_bytes(table)
    ent_crc = _crc(entries)
    pad = entries.ljust(-(-len(entries) // ss) * ss, b"\0")
    _pwrite(fd, pad, table.backup_entries_lba * ss)
    _pwrite(fd, _header(table, table.backup_lba, 1, table.backup_entries_lba, ent_crc), table.backup_lba * ss)
    diskio.fsync(fd)
    _pwrite(fd, pad, table.primary_entries_lba * ss)
    _pwrite(fd, _header(table, 1, table.backup_lba, table.primary_entries_lba, ent_crc), ss)
    diskio.fsync(fd)


def write_table(disk: Path, table: GptTable) -> None:
    """Write both copies of ``table`` (backup first), which also repairs a damaged copy."""
    disk = Path(disk)
    with _open(disk, write=True) as fd:
        size = _disk_bytes(fd)
        disk_lbas = size // table.sector_size
        if _sector_size(fd, size) != table.sector_size:
            raise GptError(f"{disk}: sector size changed since the table was read — read it again")
        _validate(disk, table, disk_lbas)
        _write_copies(fd, table)
        if not table.mbr_ok:  # after both copies: the PMBR holds no table state
            _pwrite(fd, _pmbr_keeping_boot_code(fd, disk_lbas), 0)
            diskio.fsync(fd)


def moved_to_end(table: GptTable) -> GptTable:
    """``table`` with its backup at the end of the disk and the usable area grown to meet it
    (like ``sgdisk -e``), for an image written to a larger disk or a grown image file."""
    ent_sectors = -(-table.num_entries * table.entry_size // table.sector_size)
    end = table.disk_lbas - 1
    return replace(table, backup_lba=end, backup_entries_lba=end - ent_sectors,
                   last_usable_lba=max(table.last_usable_lba, end - ent_sectors - 1))


def repair(disk: Path, *, move_backup: bool = False) -> list[str]:
    """Rewrite both copies from the good one (like ``cgpt repair``); returns the problems fixed.

    With ``move_backup``, a backup that is not at the end of the disk is moved there. The new
    backup is written before the primary that points at it, so the old table stays readable
    until the new one is whole.
    """
    table = read_table(disk)
    problems = list(table.problems)
    if move_backup and table.backup_lba != table.disk_lbas - 1:
        problems.append(f"backup GPT moved from sector {table.backup_lba} to the disk's end ({table.disk_lbas - 1})")
        table = moved_to_end(table)
    elif not table.needs_repair:
        return []
    write_table(disk, table)
    return problems


# ---------------------------------------------------------------- creating


def protective_mbr(disk_lbas: int) -> bytes:
    """LBA 0: one 0xEE partition covering the disk (capped at 2^32-1 sectors), as UEFI asks."""
    size = min(disk_lbas - 1, 0xFFFFFFFF)
    # status, CHS start (0/0/2), type, CHS end (maxed: sgdisk writes the same), first LBA, size
    record = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size)
    return bytes(446) + record + bytes(48) + b"\x55\xaa"


def _pmbr_keeping_boot_code(fd: int, disk_lbas: int) -> bytes:
    """A protective MBR that keeps the 440 bytes of boot code LBA 0 had (a BIOS loader's, if any)."""
    return _pread(fd, 440, 0).ljust(440, b"\0") + protective_mbr(disk_lbas)[440:]


def create_table(disk: Path, size_bytes: int, parts: list[PartitionSpec], disk_guid: uuid.UUID) -> GptTable:
    """A new GPT (PMBR, primary, backup) on ``disk``: the same inputs give the same bytes.

    Makes ``disk`` as a sparse file of ``size_bytes`` when it does not exist (or is shorter);
    partition contents are not touched.
    """
    disk = Path(disk)
    ss = 512
    if size_bytes % ss or size_bytes < 68 * ss:
        raise GptError(f"{disk}: disk size {size_bytes} must be a multiple of {ss} and at least {68 * ss} bytes")
    disk_lbas = size_bytes // ss
    ent_sectors = DEFAULT_ENTRIES * ENTRY_MIN // ss
    table = GptTable(
        disk_guid=disk_guid,
        sector_size=ss,
        partitions=[],
        disk_lbas=disk_lbas,
        first_usable_lba=2 + ent_sectors,
        last_usable_lba=disk_lbas - 2 - ent_sectors,
        backup_lba=disk_lbas - 1,
        backup_entries_lba=disk_lbas - 1 - ent_sectors,
    )
    for s in sorted(parts, key=lambda s: s.index):
        if s.size_lba < 1:
            raise GptError(f"{disk}: partition {s.index} ({s.name}) has size {s.size_lba} sectors — give it a size")
        table.partitions.append(
            GptPartition(s.index, s.type_guid, s.part_guid, s.first_lba, s.first_lba + s.size_lba - 1, s.attributes,
                         s.name)
        )
    _validate(disk, table, disk_lbas)
    try:
        if disk.exists() and stat.S_ISBLK(disk.stat().st_mode):
            pass
        elif not disk.exists() or disk.stat().st_size < size_bytes:
            with open(disk, "ab") as f:
                f.truncate(size_bytes)
        elif disk.stat().st_size > size_bytes:
            raise GptError(f"{disk}: is {disk.stat().st_size} bytes, larger than the requested {size_bytes}")
    except OSError as exc:
        raise GptError(f"{disk}: cannot create: {exc.strerror}") from None
    with _open(disk, write=True) as fd:
        if _disk_bytes(fd) < size_bytes:
            raise GptError(f"{disk}: device is smaller than {size_bytes} bytes")
        _pwrite(fd, protective_mbr(disk_lbas), 0)
        _write_copies(fd, table)
    return read_table(disk)


def with_attributes(table: GptTable, changes: dict[int, int]) -> GptTable:
    """A copy of ``table`` whose entries ``index -> attributes`` are replaced (other bytes kept)."""
    parts = [replace(p, attributes=changes[p.index]) if p.index in changes else p for p in table.partitions]
    return replace(table, partitions=parts)
