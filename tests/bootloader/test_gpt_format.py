"""bootloader.gpt: the on-disk format, checked against the real sgdisk and cgpt."""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from bootdisks import DISK_SIZE, make_disk, need_gpt_tools, obelisk_specs, sha

from bootloader import gpt, slots
from obelisk.tools import run

# Deadline for each test here (the slow ones name their own below).
pytestmark = pytest.mark.timeout(30)

ENTRY_CRC_AT, HEADER_CRC_AT = 88, 16


def sgdisk_verify(path: Path) -> str:
    return run(["sgdisk", "-v", path]).stdout


def test_create_is_deterministic_and_clean_for_sgdisk_and_cgpt(tmp_path: Path) -> None:
    need_gpt_tools()
    a, b = make_disk(tmp_path / "a.raw"), make_disk(tmp_path / "b.raw")
    assert sha(a) == sha(b)
    assert os.stat(a).st_blocks * 512 < DISK_SIZE  # sparse
    assert "No problems found" in sgdisk_verify(a)
    show = run(["cgpt", "show", a]).stdout
    assert 'Label: "USR-A"' in show and "7130C94A-213A-4E5A-8E26-6CCE9662F132" in show
    assert "Pri GPT table" in show and "Sec GPT header" in show
    assert run(["cgpt", "show", "-i", "3", "-A", a]).stdout.strip() == "0x101"
    assert run(["cgpt", "show", "-i", "9", "-l", a]).stdout.strip() == "ROOT"
    assert run(["sgdisk", "-i", "9", a]).stdout.count("3884DD41-8582-4404-B9A8-E9B84F2DF50E") == 1


def test_create_round_trips_through_read(disk: Path) -> None:
    table = gpt.read_table(disk)
    assert table.disk_guid == uuid.UUID(int=1) and table.sector_size == 512
    assert not table.needs_repair and table.problems == []
    assert [(p.index, p.name, p.first_lba, p.size_lba) for p in table.partitions] == [
        (s.index, s.name, s.first_lba, s.size_lba) for s in obelisk_specs()
    ]
    assert table.backup_lba == DISK_SIZE // 512 - 1


@pytest.mark.timeout(60)
def test_reads_tables_made_by_sgdisk_and_by_cgpt_and_rewrites_them_byte_for_byte(tmp_path: Path) -> None:
    need_gpt_tools()
    sg = tmp_path / "sg.raw"
    sg.write_bytes(b"")
    os.truncate(sg, DISK_SIZE)
    run(["sgdisk", "-U", "11111111-2222-3333-4444-555555555555",
         "-n", "1:2048:+2M", "-t", "1:EF00", "-c", "1:EFI-SYSTEM",
         "-n", "3:0:+2M", "-t", f"3:{slots.USR_TYPE}", "-c", "3:USR-A", "-u", f"3:{slots.USR_A_UUID}",
         "-n", "4:0:+2M", "-t", f"4:{slots.USR_TYPE}", "-c", "4:USR-B",
         "-A", "3:set:48", "-A", "3:set:56", "-A", "4:set:2", "-A", "4:set:60", sg])
    cg = tmp_path / "cg.raw"
    cg.write_bytes(b"")
    os.truncate(cg, DISK_SIZE)
    run(["cgpt", "create", cg])
    run(["cgpt", "add", "-i", "3", "-b", "2048", "-s", "4096", "-t", str(slots.USR_TYPE), "-l", "USR-A",
         "-u", str(slots.USR_A_UUID), "-P", "2", "-T", "5", "-S", "0", cg])
    run(["cgpt", "add", "-i", "4", "-b", "6144", "-s", "4096", "-t", str(slots.USR_TYPE), "-l", "USR-B",
         "-P", "1", "-S", "1", "-B", "1", cg])
    run(["cgpt", "boot", "-p", cg])  # cgpt create writes no protective MBR; a boot disk has one
    for path in (sg, cg):
        table = gpt.read_table(path)
        assert not table.needs_repair, table.problems
        before = path.read_bytes()
        gpt.write_table(path, table)  # nothing changed: every byte must survive, PMBR included
        assert path.read_bytes() == before, f"{path.name}: rewrite changed bytes"
    sg_table, cg_table = gpt.read_table(sg), gpt.read_table(cg)
    assert sg_table.disk_guid == uuid.UUID("11111111-2222-3333-4444-555555555555")
    assert sg_table.partition(3).attributes == (1 << 48) | (1 << 56)
    assert sg_table.partition(4).attributes == (1 << 2) | (1 << 60)
    assert sg_table.partition(3).part_guid == slots.USR_A_UUID
    assert slots.decode(cg_table.partition(3).attributes) == (2, 5, False)
    assert slots.decode(cg_table.partition(4).attributes) == (1, 0, True)
    assert cg_table.partition(4).attributes & 0b100  # cgpt -B 1: legacy BIOS bootable bit 2


def test_change_keeps_unowned_bits_and_other_entries(disk: Path) -> None:
    """Junk in name padding, reserved attribute bits and an empty entry's bytes all survive."""
    raw = bytearray(disk.read_bytes())
    table = gpt.read_table(disk)
    rnd = random.Random(7)
    junk_attrs = rnd.getrandbits(64)
    parts = [replace(p, attributes=junk_attrs) if p.index == 6 else p for p in table.partitions]
    gpt.write_table(disk, replace(table, partitions=parts))
    # bytes after the name's NUL terminator in entry 9 (index 8) and in unused entry 100
    for copy_lba in (2, table.backup_entries_lba):
        base = copy_lba * 512
        raw_now = bytearray(disk.read_bytes())
        raw_now[base + 8 * 128 + 120 : base + 8 * 128 + 128] = b"\xaa" * 8
        raw_now[base + 99 * 128 + 100 : base + 99 * 128 + 104] = b"\x55" * 4
        disk.write_bytes(bytes(raw_now))
    # re-seal both copies' CRCs by hand, as another tool would have written them
    for hdr_lba in (1, table.backup_lba):
        _reseal(disk, hdr_lba)
    assert gpt.read_table(disk).partition(9).name == "ROOT"
    slots.set_attrs(disk, 4, priority=3, tries=2)
    after = gpt.read_table(disk)
    assert after.partition(6).attributes == junk_attrs
    assert slots.decode(after.partition(4).attributes) == (3, 2, False)
    data = disk.read_bytes()
    for copy_lba in (2, table.backup_entries_lba):
        base = copy_lba * 512
        assert data[base + 8 * 128 + 120 : base + 8 * 128 + 128] == b"\xaa" * 8
        assert data[base + 99 * 128 + 100 : base + 99 * 128 + 104] == b"\x55" * 4
    assert data[:512] == raw[:512]  # PMBR untouched by table writes


def _reseal(path: Path, hdr_lba: int) -> None:
    import struct
    import zlib

    with open(path, "r+b") as f:
        f.seek(hdr_lba * 512)
        hdr = bytearray(f.read(92))
        ent_lba, n, size = struct.unpack_from("<QII", hdr, 72)
        f.seek(ent_lba * 512)
        struct.pack_into("<I", hdr, ENTRY_CRC_AT, zlib.crc32(f.read(n * size)))
        struct.pack_into("<I", hdr, HEADER_CRC_AT, 0)
        struct.pack_into("<I", hdr, HEADER_CRC_AT, zlib.crc32(bytes(hdr)))
        f.seek(hdr_lba * 512)
        f.write(hdr)


def test_larger_entries_keep_their_extra_bytes(tmp_path: Path) -> None:
    """Entries of 256 bytes (allowed by UEFI): bytes 128..255 are nobody's business but kept."""
    path = make_disk(tmp_path / "d.raw")
    t = gpt.read_table(path)
    raws = [r + bytes([i % 251]) * 128 for i, r in enumerate(t.raw_entries)]
    big = replace(t, entry_size=256, raw_entries=raws, first_usable_lba=2 + 64, primary_entries_lba=2,
                  backup_entries_lba=t.backup_lba - 64, last_usable_lba=t.backup_lba - 65,
                  partitions=[replace(p, raw=raws[p.index - 1]) for p in t.partitions])
    gpt.write_table(path, big)
    slots.set_attrs(path, 3, priority=9)
    again = gpt.read_table(path)
    assert again.entry_size == 256 and not again.needs_repair
    assert again.raw_entries[2][128:] == bytes([2]) * 128 and again.raw_entries[50][128:] == bytes([50]) * 128
    assert slots.decode(again.partition(3).attributes)[0] == 9


@pytest.mark.parametrize("where", ["primary header", "primary entries", "backup header", "backup entries"])
def test_damaged_copy_is_read_from_the_other_and_repaired_only_on_request(disk: Path, where: str) -> None:
    need_gpt_tools()
    t = gpt.read_table(disk)
    offset = {"primary header": 512 + 40, "primary entries": 2 * 512 + 2 * 128 + 20,
              "backup header": t.backup_lba * 512 + 40, "backup entries": t.backup_entries_lba * 512 + 5}[where]
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad")
    damaged = sha(disk)
    table = gpt.read_table(disk)
    assert table.primary_ok == where.startswith("backup") and table.backup_ok == where.startswith("primary")
    assert len(table.problems) == 1 and where.split()[0] in table.problems[0]
    assert slots.read_slots(disk)[0].priority == 1
    assert sha(disk) == damaged  # reading never writes
    assert gpt.repair(disk) == table.problems
    assert not gpt.read_table(disk).needs_repair
    assert "No problems found" in sgdisk_verify(disk)
    assert gpt.repair(disk) == []


def test_write_repairs_a_damaged_primary(disk: Path) -> None:
    with open(disk, "r+b") as f:
        f.seek(512)
        f.write(b"\0" * 512)
    slots.set_attrs(disk, 4, priority=2)
    table = gpt.read_table(disk)
    assert not table.needs_repair and slots.decode(table.partition(4).attributes)[0] == 2


def test_backup_that_differs_is_reported_and_primary_wins(disk: Path) -> None:
    t = gpt.read_table(disk)
    changed = gpt.with_attributes(t, {3: 0})
    # write only the backup copy, as an interrupted write would leave it
    calls: list[int] = []
    real = gpt._pwrite

    class Stop(Exception):
        pass

    def first_two(fd: int, data: bytes, offset: int) -> None:
        calls.append(offset)
        if len(calls) > 2:
            raise Stop
        real(fd, data, offset)

    gpt._pwrite = first_two
    try:
        with pytest.raises(Stop):
            gpt.write_table(disk, changed)
    finally:
        gpt._pwrite = real
    table = gpt.read_table(disk)
    assert table.primary_ok and not table.backup_ok and "differs" in table.problems[0]
    assert table.partition(3).attributes == t.partition(3).attributes


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GPT disk"),
        (b"hello\n" * 50, "not a GPT disk"),
        (bytes(1024 * 1024), "not a GPT disk"),
    ],
)
def test_not_a_gpt(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(content)
    with pytest.raises(gpt.GptError, match=message):
        gpt.read_table(path)


def test_truncated_image(disk: Path) -> None:
    os.truncate(disk, DISK_SIZE // 2)
    with pytest.raises(gpt.GptError, match="truncated"):
        gpt.read_table(disk)


def test_both_copies_corrupt(disk: Path) -> None:
    t = gpt.read_table(disk)
    with open(disk, "r+b") as f:
        for off in (512 + 30, t.backup_lba * 512 + 30):
            f.seek(off)
            f.write(b"\xff")
    with pytest.raises(gpt.GptError, match="both GPT headers are unusable.*entries at sectors 2 and 32735 still look"):
        gpt.read_table(disk)
    with open(disk, "r+b") as f:  # the entry arrays too: nothing left to point at
        for lba in (2, t.backup_entries_lba):
            f.seek(lba * 512)
            f.write(b"\xff" * 512)
    with pytest.raises(gpt.GptError, match="both GPT copies are unusable"):
        gpt.read_table(disk)


def test_write_refuses_bad_tables(disk: Path) -> None:
    t = gpt.read_table(disk)
    before = sha(disk)
    overlap = [replace(p, first_lba=6000) if p.index == 3 else p for p in t.partitions]
    outside = [replace(p, last_lba=t.last_usable_lba + 1) if p.index == 9 else p for p in t.partitions]
    long_name = [replace(p, name="x" * 37) if p.index == 9 else p for p in t.partitions]
    for parts, msg in ((overlap, "overlap"), (outside, "outside the usable"), (long_name, "longer than 36")):
        with pytest.raises(gpt.GptError, match=msg):
            gpt.write_table(disk, replace(t, partitions=parts))
    assert sha(disk) == before


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(gpt.GptError, match="no such file"):
        gpt.read_table(tmp_path / "nope.raw")


def test_grown_disk_keeps_working_and_backup_moves_to_the_end_on_request(disk: Path) -> None:
    need_gpt_tools()
    os.truncate(disk, DISK_SIZE * 2)
    table = gpt.read_table(disk)
    assert not table.needs_repair and table.backup_lba == DISK_SIZE // 512 - 1
    slots.set_attrs(disk, 4, priority=2)  # writes in place; the backup stays where it was
    assert gpt.read_table(disk).backup_lba == DISK_SIZE // 512 - 1
    assert gpt.repair(disk) == []
    fixed = gpt.repair(disk, move_backup=True)
    assert len(fixed) == 1 and "moved" in fixed[0]
    moved = gpt.read_table(disk)
    assert moved.backup_lba == 2 * DISK_SIZE // 512 - 1 and moved.last_usable_lba == moved.backup_lba - 33
    assert "No problems found" in sgdisk_verify(disk)
    assert slots.decode(moved.partition(4).attributes)[0] == 2


@pytest.mark.timeout(60)
def test_random_damage_gives_a_table_or_one_gpt_error(tmp_path: Path) -> None:
    """Seeded fuzz (300 cases): random bytes over the headers and entry arrays of both copies.
    read_table either returns a table (from an intact copy) or raises GptError — no other
    exception — and the write that follows, when it is allowed, leaves a clean table."""
    path = make_disk(tmp_path / "fuzz.raw")
    pristine = path.read_bytes()
    t = gpt.read_table(path)
    areas = [(512, 34 * 512), (t.backup_entries_lba * 512, DISK_SIZE)]
    rnd = random.Random(99)
    outcomes = {"read": 0, "error": 0}
    for _ in range(300):
        with open(path, "r+b") as f:
            for lo, hi in areas:  # put the table areas back, then damage them
                f.seek(lo)
                f.write(pristine[lo:hi])
            for _ in range(rnd.randint(1, 6)):
                lo, hi = rnd.choice(areas)
                at = rnd.randrange(lo, hi)
                f.seek(at)
                f.write(rnd.randbytes(min(rnd.randint(1, 64), hi - at)))
        try:
            table = gpt.read_table(path)
        except gpt.GptError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
            continue
        outcomes["read"] += 1
        if table.needs_repair:
            gpt.write_table(path, table)
            assert not gpt.read_table(path).needs_repair
    assert outcomes["read"] and outcomes["error"], outcomes
