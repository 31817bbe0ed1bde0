"""GPT recovery has no dead ends: every damaged disk `obelisk boot status` reads either reads fine,
or says "run repair" and `obelisk boot repair` then fixes it (the real sgdisk -v and cgpt show
find nothing wrong and every partition is as it was), or says in one line that the disk cannot be
recovered and why. Never a traceback, never "run repair" followed by a refusal.

The disks are made by the real sgdisk (obelisk's layout), then damaged in Python with the CRCs
recomputed where a header or entry array must still look valid to a checker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bootdisks import Run, need_gpt_tools, obelisk, obelisk_inproc, sha

from bootloader import gpt, slots
from obelisk.tools import run

# Deadline for each test here (each damaged disk is a few CLI calls and sgdisk/cgpt runs).
pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
SIZE = 16 * MiB
U64, U32 = 2**64 - 1, 2**32 - 1
# header field -> (offset, struct format)
FIELDS = {"sig": (0, "8s"), "rev": (8, "I"), "hsize": (12, "I"), "hcrc": (16, "I"), "my": (24, "Q"), "alt": (32, "Q"),
          "first": (40, "Q"), "last": (48, "Q"), "guid": (56, "16s"), "ent": (72, "Q"), "n": (80, "I"),
          "esize": (84, "I"), "ecrc": (88, "I")}


def sgdisk_layout(path: Path) -> None:
    """The builder's layout (1 ESP, 3 USR-A P1 S1, 4 USR-B, 6 OEM, 9 ROOT), written by sgdisk."""
    run(["sgdisk", "-U", "00000000-0000-0000-0000-000000000001",
         "-n", "1:1M:+2M", "-t", f"1:{slots.ESP_TYPE}", "-c", "1:EFI-SYSTEM",
         "-n", "3:3M:+2M", "-t", f"3:{slots.USR_TYPE}", "-c", "3:USR-A", "-u", f"3:{slots.USR_A_UUID}",
         "-A", "3:set:48", "-A", "3:set:56",
         "-n", "4:5M:+2M", "-t", f"4:{slots.USR_TYPE}", "-c", "4:USR-B", "-u", f"4:{slots.USR_B_UUID}",
         "-n", "6:7M:+1M", "-t", "6:8300", "-c", "6:OEM",
         "-n", "9:8M:+7M", "-t", f"9:{slots.ROOT_TYPE}", "-c", "9:ROOT", path])


@dataclass(frozen=True)
class Geo:
    """Where sgdisk put things, in sectors of ``ss`` bytes."""

    ss: int
    lbas: int

    @property
    def end(self) -> int:
        return self.lbas - 1

    @property
    def ent_sectors(self) -> int:
        return 128 * 128 // self.ss

    @property
    def bent(self) -> int:  # backup entry array
        return self.end - self.ent_sectors

    @property
    def first(self) -> int:
        return 2 + self.ent_sectors

    @property
    def last(self) -> int:
        return self.bent - 1

    def root_lba(self) -> int:  # partition 9 starts at 8 MiB
        return 8 * MiB // self.ss


# ---------------------------------------------------------------- damage


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def edit(path: Path, g: Geo, lba: int, *, entries: bool = False, seal: bool = True, **fields: int | bytes) -> None:
    """Set header fields at ``lba``; with ``entries`` recompute the entry-array CRC over what the
    header now points at; then recompute the header CRC (unless ``seal`` is False)."""
    h = bytearray(read_at(path, lba * g.ss, g.ss))
    for name, value in fields.items():
        off, fmt = FIELDS[name]
        struct.pack_into("<" + fmt, h, off, value)
    if entries:
        ent, n, size = struct.unpack_from("<QII", h, 72)
        struct.pack_into("<I", h, 88, zlib.crc32(read_at(path, ent * g.ss, n * size)))
    if seal:
        hsize = min(struct.unpack_from("<I", h, 12)[0], g.ss)
        struct.pack_into("<I", h, 16, 0)
        struct.pack_into("<I", h, 16, zlib.crc32(bytes(h[:hsize])))
    write_at(path, lba * g.ss, bytes(h))


def edit_entry(path: Path, g: Geo, header_lba: int, index: int, **fields: int) -> None:
    """Change entry ``index`` (first/last/attrs) of the array ``header_lba`` points at, and reseal."""
    ent = struct.unpack_from("<Q", read_at(path, header_lba * g.ss + 72, 8))[0]
    off = ent * g.ss + (index - 1) * 128
    raw = bytearray(read_at(path, off, 128))
    for name, at in (("first", 32), ("last", 40), ("attrs", 48)):
        if name in fields:
            struct.pack_into("<Q", raw, at, fields[name])
    write_at(path, off, bytes(raw))
    edit(path, g, header_lba, entries=True)


def move_primary_entries(path: Path, g: Geo, to_lba: int) -> None:
    """Copy the primary entry array to ``to_lba`` and point the primary header there (sealed)."""
    write_at(path, to_lba * g.ss, read_at(path, 2 * g.ss, 128 * 128))
    edit(path, g, 1, ent=to_lba, entries=True)


def P(**fields: int | bytes) -> Callable[[Path, Geo], None]:
    return lambda p, g: edit(p, g, 1, **fields)


def B(**fields: int | bytes) -> Callable[[Path, Geo], None]:
    return lambda p, g: edit(p, g, g.end, **fields)


def garble(where: Callable[[Geo], int], size: int = 8) -> Callable[[Path, Geo], None]:
    return lambda p, g: write_at(p, where(g), b"\xa5" * size)


def both(*fns: Callable[[Path, Geo], None]) -> Callable[[Path, Geo], None]:
    def apply(p: Path, g: Geo) -> None:
        for fn in fns:
            fn(p, g)

    return apply


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path, Geo], None]
    expect: str  # "fine", "repair" or "refuse"
    says: str = ""  # a fragment of the warning (repair) or the error (refuse)


FINE, REPAIR, REFUSE = "fine", "repair", "refuse"

CASES = [
    Case("pristine", lambda p, g: None, FINE),
    # the primary's pointer to its backup
    Case("primary alternate LBA 2^64-1", P(alt=U64), REPAIR, "points to its backup at sector 18446744073709551615"),
    Case("primary alternate LBA = last usable + 1", lambda p, g: edit(p, g, 1, alt=g.last + 1), REPAIR,
         "but the backup is at sector"),
    Case("primary alternate LBA inside the backup entries", lambda p, g: edit(p, g, 1, alt=g.end - 1), REPAIR),
    Case("primary alternate LBA 0", P(alt=0), REPAIR),
    Case("primary alternate LBA 1 (itself)", P(alt=1), REPAIR),
    Case("primary alternate LBA = disk size", lambda p, g: edit(p, g, 1, alt=g.lbas), REPAIR),
    Case("primary alternate LBA inside partition 9", lambda p, g: edit(p, g, 1, alt=g.root_lba() + 5), REPAIR),
    Case("backup alternate LBA 5", B(alt=5), REPAIR, "backup GPT points to the primary at sector 5"),
    Case("backup alternate LBA 2^64-1", B(alt=U64), REPAIR),
    Case("primary alternate 2^64-1 and backup header zeroed",
         both(P(alt=U64), lambda p, g: write_at(p, g.end * g.ss, bytes(g.ss))), REPAIR, "backup GPT is corrupt"),
    # where a header puts its entry array
    Case("primary entries inside partition 9", lambda p, g: move_primary_entries(p, g, g.root_lba()), REPAIR,
         "where the partitions are"),
    Case("primary entries in the gap before partition 1", lambda p, g: move_primary_entries(p, g, g.first + 8),
         REPAIR, "lies in the usable area"),
    Case("primary entries over its own header", P(ent=1, entries=True), REPAIR, "covers a header"),
    Case("primary entries at LBA 0", P(ent=0, entries=True), REPAIR),
    Case("primary entries LBA 2^64-1", P(ent=U64), REPAIR, "runs past the disk's end"),
    Case("primary entries on the backup's", lambda p, g: edit(p, g, 1, ent=g.bent, entries=True), REPAIR,
         "share sectors"),
    Case("backup entries on the primary's", B(ent=2, entries=True), REPAIR, "share sectors"),
    Case("backup entries inside partition 9",
         lambda p, g: (write_at(p, g.root_lba() * g.ss, read_at(p, g.bent * g.ss, 128 * 128)),
                       edit(p, g, g.end, ent=g.root_lba(), entries=True)), REPAIR, "where the partitions are"),
    # header size, entry count and size
    Case("primary header size 2^32-1", P(hsize=U32), REPAIR, "header size"),
    Case("primary header size 0", P(hsize=0), REPAIR),
    Case("primary header size 91", P(hsize=91), REPAIR),
    Case("backup header size 2^32-1", B(hsize=U32), REPAIR),
    Case("primary header size 512 (sealed)", P(hsize=512), REPAIR, "differs"),
    Case("primary 0 entries", P(n=0), REPAIR, "entry array of 0 x 128"),
    Case("primary 2^32-1 entries", P(n=U32), REPAIR),
    Case("primary 64 entries (sealed)", P(n=64, entries=True), REPAIR, "standard shape"),
    Case("primary 256 entries (sealed, runs into the usable area)", P(n=256, entries=True), REPAIR),
    Case("backup 2^32-1 entries", B(n=U32), REPAIR),
    Case("primary entry size 0", P(esize=0), REPAIR),
    Case("primary entry size 127", P(esize=127), REPAIR),
    Case("primary entry size 136 (sealed)", P(esize=136, entries=True), REPAIR),
    Case("primary entry size 2^32-1", P(esize=U32), REPAIR),
    Case("primary entry size 256 x 64 entries (sealed)", P(esize=256, n=64, entries=True), REPAIR, "standard shape"),
    # self-pointers, usable area, revision, GUID
    Case("primary my LBA 2", P(my=2), REPAIR, "header says it is at LBA 2"),
    Case("backup my LBA 5", B(my=5), REPAIR),
    Case("primary first usable 0", P(first=0), REPAIR),
    Case("primary first usable > last usable + 1", lambda p, g: edit(p, g, 1, first=g.last + 10), REPAIR,
         "inverted"),
    Case("primary last usable past the disk's end", lambda p, g: edit(p, g, 1, last=g.lbas + 100), REPAIR),
    Case("primary last usable over the backup entries", lambda p, g: edit(p, g, 1, last=g.end - 1), REPAIR,
         "covers the other copy's"),
    Case("backup first usable 2", B(first=2), REPAIR, "covers the other copy's"),
    Case("primary revision 1.1", P(rev=0x00010001), REPAIR, "revision"),
    Case("primary disk GUID changed", P(guid=bytes(range(16))), REPAIR, "disk GUID"),
    # plain damage
    Case("primary signature zeroed", P(sig=bytes(8), seal=False), REPAIR, "primary GPT is corrupt"),
    Case("backup signature zeroed", B(sig=bytes(8), seal=False), REPAIR, "backup GPT is corrupt"),
    Case("primary header CRC", P(hcrc=0x12345678, seal=False), REPAIR, "header CRC mismatch"),
    Case("primary header bytes", garble(lambda g: g.ss + 40), REPAIR),
    Case("backup header bytes", garble(lambda g: g.end * g.ss + 56), REPAIR),
    Case("primary header sector zeroed", lambda p, g: write_at(p, g.ss, bytes(g.ss)), REPAIR),
    Case("backup header sector zeroed", lambda p, g: write_at(p, g.end * g.ss, bytes(g.ss)), REPAIR),
    Case("primary entry bytes", garble(lambda g: 2 * g.ss + 2 * 128 + 48), REPAIR, "entry array CRC"),
    Case("backup entry bytes", garble(lambda g: g.bent * g.ss + 8 * 128 + 40), REPAIR),
    Case("primary partitions 3 and 4 overlap (sealed)",
         lambda p, g: edit_entry(p, g, 1, 4, first=5 * MiB // g.ss - 10), REPAIR, "overlap"),
    Case("primary partition 9 past the usable area (sealed)",
         lambda p, g: edit_entry(p, g, 1, 9, last=g.last + 1), REPAIR, "outside the usable area"),
    Case("backup attributes differ (sealed)", lambda p, g: edit_entry(p, g, g.end, 3, attrs=0), REPAIR,
         "partition entry 3"),
    Case("protective MBR zeroed", lambda p, g: write_at(p, 0, bytes(512)), REPAIR, "protective MBR is missing"),
    Case("protective MBR signature zeroed", lambda p, g: write_at(p, 510, bytes(2)), REPAIR),
    Case("both GPT signatures zeroed (wipefs)", both(P(sig=bytes(8), seal=False), B(sig=bytes(8), seal=False)),
         REPAIR, "signatures are wiped"),
    Case("the real wipefs -a", lambda p, g: run(["wipefs", "--all", "--force", "--quiet", p]), REPAIR,
         "signatures are wiped"),
    # the disk's size
    Case("grown by 1 MiB", lambda p, g: os.truncate(p, g.lbas * g.ss + MiB), FINE),
    Case("truncated by 4 KiB", lambda p, g: os.truncate(p, g.lbas * g.ss - 4096), REFUSE, "truncated"),
    Case("truncated to half", lambda p, g: os.truncate(p, g.lbas * g.ss // 2), REFUSE, "truncated"),
    # nothing left to repair from
    Case("both header CRCs bad, entries intact", both(garble(lambda g: g.ss + 16), garble(lambda g: g.end * g.ss + 16)),
         REFUSE, "still look intact"),
    Case("both headers zeroed, entries intact",
         both(lambda p, g: write_at(p, g.ss, bytes(g.ss)), lambda p, g: write_at(p, g.end * g.ss, bytes(g.ss))),
         REFUSE, "still look intact"),
    Case("both entry arrays bad", both(garble(lambda g: 2 * g.ss + 48), garble(lambda g: g.bent * g.ss + 48)),
         REFUSE, "both GPT copies are unusable"),
    Case("both headers' entry sizes 0", both(P(esize=0), B(esize=0)), REFUSE, "both GPT headers are unusable"),
    Case("all zero", lambda p, g: write_at(p, 0, bytes(g.lbas * g.ss)), REFUSE, "not a GPT disk"),
]


# ---------------------------------------------------------------- judging


@contextlib.contextmanager
def loop(path: Path, ss: int) -> Iterator[Path]:
    """A loop device over ``path`` with ``ss``-byte sectors (the 4Kn cases; needs root)."""
    dev = run(["losetup", "--find", "--show", "--sector-size", str(ss), path]).stdout.strip()
    try:
        yield Path(dev)
    finally:
        run(["losetup", "--detach", dev], check=False)


def pristine(path: Path, ss: int) -> Geo:
    """A fresh sparse image holding sgdisk's table, written with ``ss``-byte sectors."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
    if ss == 512:
        sgdisk_layout(path)
    else:
        with loop(path, ss) as dev:
            sgdisk_layout(dev)
    return Geo(ss, SIZE // ss)


def sparse_copy(src: Path, dst: Path) -> Path:
    """``src`` where the tables live (first and last MiB); the partitions are empty anyway."""
    with open(src, "rb") as s, open(dst, "wb") as d:
        d.truncate(SIZE)
        for off in (0, SIZE - MiB):
            s.seek(off)
            d.seek(off)
            d.write(s.read(MiB))
    return dst


def parts(path: Path) -> list[tuple[object, ...]]:
    return [(p.index, p.type_guid, p.part_guid, p.first_lba, p.last_lba, p.attributes, p.name)
            for p in gpt.read_table(path).partitions]


def assert_clean_for_sgdisk_and_cgpt(dev: Path) -> None:
    out = run(["sgdisk", "-v", dev]).stdout
    assert "No problems found" in out, out
    for word in ("Warning", "Caution", "Problem", "corrupt", "Invalid"):
        assert word not in out, out
    show = subprocess.run(["cgpt", "show", str(dev)], capture_output=True, text=True, timeout=30)
    assert show.returncode == 0 and "INVALID" not in show.stdout and "WARNING" not in show.stderr, (
        show.stdout + show.stderr)


def _one_error_line(r: Run, what: str) -> str:
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and r.out == "", f"{what}: {r}"
    return lines[0]


def check(path: Path, case: Case, g: Geo, want: list[tuple[object, ...]], cli: Callable[..., Run],
          judge: Callable[[Path], contextlib.AbstractContextManager[Path]]) -> None:
    """status, then repair when status asked for it, then the real tools' verdict."""
    before = sha(path)
    st = cli("boot", "status", "--disk", path)
    assert "Traceback" not in st.err + st.out, st
    if case.expect == REFUSE:
        line = _one_error_line(st, f"{case.name}: status")
        assert case.says in line and "obelisk boot repair" not in line, line
        assert _one_error_line(cli("boot", "repair", "--disk", path), f"{case.name}: repair") == line
        assert sha(path) == before, "a refused repair wrote to the disk"
        return
    assert st.code == 0 and "next boot: slot A" in st.out, st
    if case.expect == FINE:
        assert st.err == "", st.err
        fixed = cli("boot", "repair", "--move-backup", "--disk", path)  # a grown disk: backup to the end
        assert fixed.code == 0, fixed
    else:
        warnings = st.err.strip().splitlines()
        assert warnings and all(w.startswith("warning: ") and w.endswith("run 'obelisk boot repair' (or any write) "
                                                                         "to fix it") for w in warnings), st.err
        assert case.says in st.err, st.err
        assert sha(path) == before, "status wrote to the disk"
        fixed = cli("boot", "repair", "--disk", path)
        assert fixed.code == 0 and fixed.err == "", fixed
        assert fixed.out and all(line.startswith("repaired: ") for line in fixed.out.splitlines()), fixed
        again = cli("boot", "status", "--disk", path)
        assert again.code == 0 and again.err == "", again
    table = gpt.read_table(path)
    assert not table.needs_repair and table.backup_lba == table.disk_lbas - 1, table.problems
    assert parts(path) == want
    with judge(path) as dev:
        assert_clean_for_sgdisk_and_cgpt(dev)


@contextlib.contextmanager
def as_file(path: Path) -> Iterator[Path]:
    yield path


@pytest.fixture(scope="module")
def image512(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Geo, list[tuple[object, ...]]]]:
    need_gpt_tools()
    path = tmp_path_factory.mktemp("gpt512") / "pristine.raw"
    g = pristine(path, 512)
    yield path, g, parts(path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_damaged_disk_reads_fine_or_repairs_or_refuses_clearly(
        image512: tuple[Path, Geo, list[tuple[object, ...]]], fast_tmp: Path, case: Case) -> None:
    src, g, want = image512
    path = sparse_copy(src, fast_tmp / "d.raw")
    case.damage(path, g)
    # a real process for every fifth case, the in-process runner for the rest
    cli = obelisk if CASES.index(case) % 5 == 0 else obelisk_inproc
    check(path, case, g, want, cli, as_file)


FOUR_K = ["pristine", "primary header CRC", "primary signature zeroed", "primary header sector zeroed",
          "primary alternate LBA 2^64-1", "primary entries inside partition 9", "backup header sector zeroed",
          "protective MBR zeroed", "both GPT signatures zeroed (wipefs)", "truncated by 4 KiB",
          "both header CRCs bad, entries intact"]


def _need_loop() -> None:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("4Kn images are made and judged on a loop device with 4096-byte sectors: needs root")


@pytest.fixture(scope="module")
def image4k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Geo, list[tuple[object, ...]]]]:
    need_gpt_tools()
    _need_loop()
    path = tmp_path_factory.mktemp("gpt4k") / "pristine.raw"
    g = pristine(path, 4096)
    assert gpt.read_table(path).sector_size == 4096
    yield path, g, parts(path)


@pytest.mark.parametrize("name", FOUR_K)
def test_4kn_image_file_with_damage_reads_like_its_loop_device(
        image4k: tuple[Path, Geo, list[tuple[object, ...]]], fast_tmp: Path, name: str) -> None:
    """An image copied from a 4Kn disk: with the primary damaged, the sector size comes from the
    backup at the file's end (it used to read as "not a GPT disk"). The file and a 4096-byte-sector
    loop device over it read the same; sgdisk and cgpt judge the repaired disk on the loop device."""
    src, g, want = image4k
    case = next(c for c in CASES if c.name == name)
    path = sparse_copy(src, fast_tmp / "d4k.raw")
    case.damage(path, g)
    if case.expect != REFUSE:
        with loop(path, 4096) as dev:
            on_dev = obelisk_inproc("boot", "status", "--json", "--disk", dev)
            on_file = obelisk_inproc("boot", "status", "--json", "--disk", path)
            assert on_dev.code == on_file.code == 0 and on_dev.out == on_file.out, (on_dev, on_file)
            assert on_dev.err.replace(str(dev), "DISK") == on_file.err.replace(str(path), "DISK")
    check(path, case, g, want, obelisk_inproc, lambda p: loop(p, 4096))
    if case.expect != REFUSE:
        assert gpt.read_table(path).sector_size == 4096


def test_the_table_covers_each_outcome() -> None:
    kinds = {c.expect for c in CASES}
    assert kinds == {FINE, REPAIR, REFUSE} and len(CASES) >= 60
    assert all(n in {c.name for c in CASES} for n in FOUR_K)
