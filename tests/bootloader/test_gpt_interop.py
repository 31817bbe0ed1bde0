"""obelisk and the real cgpt / sgdisk read and write the same attribute bits and prioritize alike."""

from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from bootdisks import make_disk, need_gpt_tools, obelisk, obelisk_inproc, state

from bootloader import gpt, slots
from obelisk.tools import run

# Deadline for each test here (the slow ones name their own below).
pytestmark = pytest.mark.timeout(30)

OTHER_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")  # Linux data: never a candidate


def cgpt_pts(path: Path, index: int) -> tuple[int, int, bool]:
    vals = [int(run(["cgpt", "show", "-i", str(index), flag, path]).stdout.strip()) for flag in ("-P", "-T", "-S")]
    return vals[0], vals[1], bool(vals[2])


def sgdisk_bits(path: Path, index: int) -> int:
    out = run(["sgdisk", "-A", f"{index}:show", path]).stdout
    return sum(1 << int(b) for b in re.findall(rf"^\s*{index}:(\d+):1", out, re.M))


@pytest.mark.timeout(60)
def test_attributes_written_by_cgpt_read_identically_by_obelisk_status(disk: Path) -> None:
    need_gpt_tools()
    rnd = random.Random(2)
    for case in range(3):
        want = {i: (rnd.randint(0, 15), rnd.randint(0, 15), rnd.random() < 0.5) for i in (3, 4)}
        for i, (p, t, s) in want.items():
            run(["cgpt", "add", "-i", str(i), "-P", str(p), "-T", str(t), "-S", str(int(s)), disk])
        r = (obelisk if case == 0 else obelisk_inproc)("boot", "status", "--json", "--disk", disk)
        assert r.code == 0, r.err
        doc = json.loads(r.out)
        assert set(doc) == {"slots", "next", "running", "fallback"}
        got = {s["index"]: (s["priority"], s["tries"], s["successful"]) for s in doc["slots"]}
        assert got == want
        assert [set(s) for s in doc["slots"]] == [{"index", "label", "uuid", "priority", "tries", "successful"}] * 2
        assert [(s["label"], s["uuid"]) for s in doc["slots"]] == [
            ("USR-A", str(slots.USR_A_UUID)), ("USR-B", str(slots.USR_B_UUID))]
        assert doc["next"] == slots.next_index(slots.read_slots(disk))
    # many more in-process: every value of every field
    for p in range(16):
        t, s = (p * 7) % 16, p % 2 == 0
        run(["cgpt", "add", "-i", "4", "-P", str(p), "-T", str(t), "-S", str(int(s)), disk])
        assert state(disk)[4] == (p, t, s)


@pytest.mark.timeout(60)
def test_attributes_written_by_obelisk_read_identically_by_cgpt_and_sgdisk(disk: Path) -> None:
    need_gpt_tools()
    rnd = random.Random(3)
    for case in range(3):
        p, t, s = rnd.randint(0, 15), rnd.randint(0, 15), case % 2
        cli = obelisk if case == 0 else obelisk_inproc
        r = cli("boot", "set", "B", "--priority", str(p), "--tries", str(t), "--successful", str(s), "--disk", disk)
        assert r.code == 0, r.err
        assert cgpt_pts(disk, 4) == (p, t, bool(s))
        assert sgdisk_bits(disk, 4) == gpt.read_table(disk).partition(4).attributes
        assert sgdisk_bits(disk, 4) == (p << 48) | (t << 52) | (s << 56)
        assert "No problems found" in run(["sgdisk", "-v", disk]).stdout
    for p in range(16):
        t, s = 15 - p, p % 3 == 0
        slots.set_attrs(disk, 3, priority=p, tries=t, successful=s)
        assert cgpt_pts(disk, 3) == (p, t, s)
    # bits obelisk does not own, set by sgdisk, survive obelisk's writes and are seen by cgpt -A
    run(["sgdisk", "-A", "3:set:60", "-A", "3:set:2", "-A", "3:set:63", disk])
    slots.set_attrs(disk, 3, priority=5, tries=1, successful=False)
    assert sgdisk_bits(disk, 3) == (1 << 63) | (1 << 60) | (5 << 48) | (1 << 52) | (1 << 2)
    assert run(["cgpt", "show", "-i", "3", "-A", disk]).stdout.strip() == hex((1 << 15) | (1 << 12) | 0x15)


N_PARTS = 12


def _twin_tables(tmp: Path) -> tuple[Path, Path]:
    """Two disks with the same geometry: one for obelisk (USR type), one for cgpt (kernel type)."""
    specs = [gpt.PartitionSpec(i, f"P{i}", OTHER_TYPE, uuid.UUID(int=i), 2048 + (i - 1) * 64, 64)
             for i in range(1, N_PARTS + 1)]
    ours, theirs = tmp / "usr.raw", tmp / "kernel.raw"
    for path in (ours, theirs):
        gpt.create_table(path, 4 * 1024 * 1024, specs, uuid.UUID(int=7))
    return ours, theirs


def _apply(path: Path, table: gpt.GptTable, cand_type: uuid.UUID, candidates: set[int], attrs: dict[int, int]) -> None:
    parts = [replace(p, type_guid=cand_type if p.index in candidates else OTHER_TYPE, attributes=attrs[p.index])
             for p in table.partitions]
    gpt.write_table(path, replace(table, partitions=parts))


@pytest.mark.timeout(120)
def test_prioritize_matches_cgpt_on_random_tables(fast_tmp: Path) -> None:
    """Seeded random tables (300 cases): after `cgpt prioritize` on the kernel-typed twin and
    obelisk's prioritize on the USR-typed disk, every entry's whole 64-bit attribute field agrees.
    A few cases go through the `obelisk boot prioritize` CLI (two in a real process)."""
    need_gpt_tools()
    ours, theirs = _twin_tables(fast_tmp)
    t_ours, t_theirs = gpt.read_table(ours), gpt.read_table(theirs)
    rnd = random.Random(20261126)
    cli_cases = {5: obelisk, 77: obelisk_inproc, 150: obelisk, 299: obelisk_inproc}
    for case in range(300):
        candidates = set(rnd.sample(range(1, N_PARTS + 1), rnd.randint(1, N_PARTS)))
        spread = rnd.choice([2, 4, 16])  # small spreads make ties and friends likely
        attrs = {}
        for i in range(1, N_PARTS + 1):
            junk = rnd.getrandbits(64) & ~(slots.PRIORITY_MASK) if rnd.random() < 0.3 else 0
            attrs[i] = slots.encode(junk, priority=rnd.randrange(spread), tries=rnd.randint(0, 15),
                                    successful=rnd.random() < 0.5)
        index = rnd.choice(sorted(candidates))
        top = rnd.choice([None, None, rnd.randint(1, 15)])
        friends = rnd.random() < 0.4
        _apply(ours, t_ours, slots.USR_TYPE, candidates, attrs)
        _apply(theirs, t_theirs, slots.CHROMEOS_KERNEL_TYPE, candidates, attrs)
        opts = [*(["-P", str(top)] if top else []), *(["-f"] if friends else [])]
        argv = ["cgpt", "prioritize", "-i", str(index), *opts]
        run([*argv, theirs])
        if case in cli_cases:
            r = cli_cases[case]("boot", "prioritize", str(index), *(["--max", str(top)] if top else []),
                        *(["--friends"] if friends else []), "--disk", ours)
            assert r.code == 0, r.err
        else:
            slots.prioritize(ours, index, max_priority=top, friends=friends)
        got = {p.index: p.attributes for p in gpt.read_table(ours).partitions}
        theirs_table = gpt.read_table(theirs)
        assert not theirs_table.needs_repair
        want = {p.index: p.attributes for p in theirs_table.partitions}
        assert got == want, f"case {case}: {argv} prios before " + str(
            {i: slots.decode(attrs[i])[0] for i in sorted(candidates)})


def test_prioritize_without_index_matches_cgpt(fast_tmp: Path) -> None:
    """The pure function also covers cgpt's plain renumbering (no -i), used by nobody yet."""
    need_gpt_tools()
    _, theirs = _twin_tables(fast_tmp)
    t = gpt.read_table(theirs)
    rnd = random.Random(5)
    for _ in range(60):
        candidates = set(rnd.sample(range(1, N_PARTS + 1), rnd.randint(1, N_PARTS)))
        prios = {i: rnd.randrange(16) for i in range(1, N_PARTS + 1)}
        top = rnd.choice([None, rnd.randint(1, 15)])
        _apply(theirs, t, slots.CHROMEOS_KERNEL_TYPE, candidates, {i: slots.encode(0, priority=p)
                                                                    for i, p in prios.items()})
        run(["cgpt", "prioritize", *(["-P", str(top)] if top else []), theirs])
        want = {p.index: slots.decode(p.attributes)[0] for p in gpt.read_table(theirs).partitions}
        new = slots.prioritized({i: prios[i] for i in candidates}, None, max_priority=top)
        assert {i: new.get(i, prios[i]) for i in prios} == want


def test_cgpt_reads_a_disk_obelisk_repaired(tmp_path: Path) -> None:
    need_gpt_tools()
    disk = make_disk(tmp_path / "d.raw")
    with open(disk, "r+b") as f:
        f.seek(512 + 20)
        f.write(b"\x01\x02")
    r = obelisk("boot", "repair", "--disk", disk)
    assert r.code == 0 and "repaired: primary GPT is corrupt" in r.out
    assert "No problems found" in run(["sgdisk", "-v", disk]).stdout
    assert "INVALID" not in run(["cgpt", "show", disk]).stdout
    assert cgpt_pts(disk, 3) == (1, 0, True)
