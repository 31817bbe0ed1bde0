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
    problems: list[str] = field(default_factory=list)
    # Every entry slot's bytes as read (empty ones too), so unowned bytes survive a rewrite.
    raw_entries: list[bytes] = field(default_factory=list, repr=False, compare=False)

    def partition(self, index: int) -> GptPartition | None:
        return next((p for p in self.partitions if p.index == index), None)

    @property
    def needs_repair(self) -> bool:
        return not (self.primary_ok and self.backup_ok)


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


class _Bad(Exception):
    """Why one copy is unusable (internal; becomes part of a GptError or a problem line)."""


# ---------------------------------------------------------------- low-level I/O


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    """The one place that writes table bytes (tests replace it to interrupt a write)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread(fd: int, size: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@contextlib.contextmanager
def _open(disk: Path, write: bool) -> Iterator[int]:
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


def _sector_size(fd: int) -> int:
    """512 for image files (what the builder and cgpt use), the device's logical size otherwise."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        buf = fcntl.ioctl(fd, BLKSSZGET, b"\0\0\0\0")
        return struct.unpack("<I", buf)[0]
    # An image copied from a 4Kn disk keeps its header at byte 4096.
    if _pread(fd, 8, 512) != SIGNATURE and _pread(fd, 8, 4096) == SIGNATURE:
        return 4096
    return 512


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


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


def _read_copy(fd: int, lba: int, sector: int, disk_lbas: int) -> _Copy:
    if lba < 1 or lba >= disk_lbas:
        raise _Bad(f"header LBA {lba} is outside the disk")
    raw = _pread(fd, sector, lba * sector)
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
    if my_lba != lba:
        raise _Bad(f"header says it is at LBA {my_lba}, found at {lba}")
    if ent_size < ENTRY_MIN or ent_size % 8 or n_ent < 1 or n_ent * ent_size > MAX_ENTRY_BYTES:
        raise _Bad(f"entry array of {n_ent} x {ent_size} bytes is invalid")
    ent_sectors = -(-n_ent * ent_size // sector)
    if not (first <= last + 1 and ent_lba >= 1 and ent_lba + ent_sectors <= disk_lbas):
        raise _Bad("header geometry is inconsistent")
    entries = _pread(fd, n_ent * ent_size, ent_lba * sector)
    if len(entries) != n_ent * ent_size or _crc(entries) != ent_crc:
        raise _Bad("entry array CRC mismatch")
    copy = _Copy(lba, rev, hsize, alt, first, last, uuid.UUID(bytes_le=guid_b), ent_lba, n_ent, ent_size,
                 raw[HEADER_SIZE:hsize], entries)
    _check_entries(copy)
    return copy


def _check_entries(copy: _Copy) -> None:
    spans = []
    for i in range(copy.num_entries):
        off = i * copy.entry_size
        if copy.entries[off : off + 16] == _ZERO16:
            continue
        first, last = struct.unpack_from("<QQ", copy.entries, off + 32)
        if not copy.first_usable_lba <= first <= last <= copy.last_usable_lba:
            raise _Bad(f"partition {i + 1} lies outside the usable area")
        spans.append((first, last, i + 1))
    spans.sort()
    for (_, last_a, ia), (first_b, _, ib) in zip(spans, spans[1:], strict=False):
        if first_b <= last_a:
            raise _Bad(f"partitions {ia} and {ib} overlap")


def _same_table(a: _Copy, b: _Copy) -> bool:
    keys = ("first_usable_lba", "last_usable_lba", "disk_guid", "num_entries", "entry_size", "entries")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def read_table(disk: Path) -> GptTable:
    """The disk's GPT, from the primary copy or, when that is bad, from the backup.

    ``primary_ok``/``backup_ok``/``problems`` say what is wrong; nothing is written here
    (repair with :func:`repair` or any :func:`write_table`).
    """
    disk = Path(disk)
    with _open(disk, write=False) as fd:
        size = _disk_bytes(fd)
        sector = _sector_size(fd)
        disk_lbas = size // sector
        if disk_lbas < 3:
            raise GptError(f"{disk}: not a GPT disk (only {size} bytes) — pass a GPT disk image; is it truncated?")
        try:
            primary: _Copy | None = _read_copy(fd, 1, sector, disk_lbas)
            p_err = ""
        except _Bad as exc:
            primary, p_err = None, str(exc)
        if primary is not None and primary.alternate_lba <= primary.last_usable_lba:
            primary, p_err = None, f"backup LBA {primary.alternate_lba} lies inside the usable area"
        if primary is not None and max(primary.alternate_lba, primary.last_usable_lba) >= disk_lbas:
            need = max(primary.alternate_lba, primary.last_usable_lba) + 1
            raise GptError(
                f"{disk}: the GPT describes a disk of {need} sectors but it has only {disk_lbas}: "
                "the image is truncated — re-create or re-download it"
            )
        backup_lba = primary.alternate_lba if primary is not None else disk_lbas - 1
        try:
            backup: _Copy | None = _read_copy(fd, backup_lba, sector, disk_lbas)
            b_err = ""
        except _Bad as exc:
            backup, b_err = None, str(exc)

    if primary is None and backup is None:
        if p_err == b_err == "no GPT signature":
            raise GptError(f"{disk}: not a GPT disk (no GPT header found) — pass a disk image or device with a GPT")
        raise GptError(
            f"{disk}: both GPT copies are unusable (primary: {p_err}; backup: {b_err}) — "
            "the disk may be truncated or overwritten; restore it from a known-good image"
        )
    problems: list[str] = []
    if primary is None:
        problems.append(f"primary GPT is corrupt ({p_err}); the backup is intact")
    if backup is None:
        problems.append(f"backup GPT is corrupt ({b_err}); the primary is intact")
    elif primary is not None and not _same_table(primary, backup):
        problems.append("backup GPT differs from the primary (an interrupted write?); using the primary")
    src = primary or backup
    assert src is not None
    ent_sectors = -(-src.num_entries * src.entry_size // sector)
    raw_entries = [src.entries[i * src.entry_size : (i + 1) * src.entry_size] for i in range(src.num_entries)]
    parts = [p for i, raw in enumerate(raw_entries) if (p := _parse_entry(i + 1, raw)) is not None]
    return GptTable(
        disk_guid=src.disk_guid,
        sector_size=sector,
        partitions=parts,
        disk_lbas=disk_lbas,
        first_usable_lba=src.first_usable_lba,
        last_usable_lba=src.last_usable_lba,
        num_entries=src.num_entries,
        entry_size=src.entry_size,
        primary_entries_lba=primary.entries_lba if primary else 2,
        backup_lba=backup_lba,
        backup_entries_lba=backup.entries_lba if backup else backup_lba - ent_sectors,
        revision=src.revision,
        header_extra=src.extra,
        primary_ok=primary is not None,
        backup_ok=backup is not None and (primary is None or _same_table(primary, backup)),
        problems=problems,
        raw_entries=raw_entries,
    )


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
    os.fsync(fd)
    _pwrite(fd, pad, table.primary_entries_lba * ss)
    _pwrite(fd, _header(table, 1, table.backup_lba, table.primary_entries_lba, ent_crc), ss)
    os.fsync(fd)


def write_table(disk: Path, table: GptTable) -> None:
    """Write both copies of ``table`` (backup first), which also repairs a damaged copy."""
    disk = Path(disk)
    with _open(disk, write=True) as fd:
        disk_lbas = _disk_bytes(fd) // table.sector_size
        if _sector_size(fd) != table.sector_size:
            raise GptError(f"{disk}: sector size changed since the table was read — read it again")
        _validate(disk, table, disk_lbas)
        _write_copies(fd, table)


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
