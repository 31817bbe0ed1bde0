"""Crash safety: an interrupted table write leaves a valid GPT with the old or the new slot state."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bootdisks import make_disk, state

from bootloader import gpt, slots

# Deadline for each test here (the slow ones name their own below).
pytestmark = pytest.mark.timeout(60)

OLD = {3: (2, 0, True), 4: (1, 0, True)}
NEW = {3: (1, 0, True), 4: (2, 0, True)}  # after prioritize(4): both entries change


class Interrupted(Exception):
    pass


def _prepare(path: Path) -> Path:
    make_disk(path)
    slots.set_attrs(path, 3, priority=2)
    slots.set_attrs(path, 4, priority=1, successful=True)
    assert state(path) == OLD
    return path


def _count_writes(tmp_path: Path) -> int:
    path = _prepare(tmp_path / "count.raw")
    calls = []
    real = gpt._pwrite

    def counting(fd: int, data: bytes, offset: int) -> None:
        calls.append(offset)
        real(fd, data, offset)

    gpt._pwrite = counting
    try:
        slots.prioritize(path, 4)
    finally:
        gpt._pwrite = real
    assert state(path) == NEW
    return len(calls)


def test_failing_the_nth_write_leaves_old_or_new_never_a_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For every write N of the operation and several tear points (nothing written, mid-header,
    half, all but the last sector), the disk reads as a valid GPT in the old or the new state,
    and the next operation repairs it."""
    total = _count_writes(tmp_path)
    assert total == 4  # backup entries, backup header, primary entries, primary header
    seen = set()
    real = gpt._pwrite
    for n in range(1, total + 1):
        for tear in ("none", "46", "half", "most"):
            path = _prepare(tmp_path / f"d{n}{tear}.raw")
            calls = [0]

            def failing(fd: int, data: bytes, offset: int, n: int = n, tear: str = tear,
                        calls: list[int] = calls) -> None:
                calls[0] += 1
                if calls[0] == n:
                    keep = {"none": 0, "46": 46, "half": len(data) // 2, "most": max(len(data) - 512, 1)}[tear]
                    real(fd, data[:keep], offset)
                    raise Interrupted(f"write {n} torn after {keep} bytes")
                real(fd, data, offset)

            monkeypatch.setattr(gpt, "_pwrite", failing)
            with pytest.raises(Interrupted):
                slots.prioritize(path, 4)
            monkeypatch.setattr(gpt, "_pwrite", real)
            table = gpt.read_table(path)  # never raises: one copy is always whole
            after = state(path)
            assert after in (OLD, NEW), f"write {n} tear {tear}: mixed state {after}"
            seen.add("old" if after == OLD else "new")
            # the next write repairs whatever the interruption left
            slots.prioritize(path, 4)
            assert state(path) == NEW and not gpt.read_table(path).needs_repair
            if table.needs_repair:
                seen.add("damaged")
    assert seen == {"old", "new", "damaged"}


CHILD = r"""
import os, random, sys, time
sys.path.insert(0, sys.argv[2])
from bootloader import gpt
real = gpt._pwrite
rnd = random.Random(int(sys.argv[3]))
def slow(fd, data, offset):
    # Write sector by sector with short pauses: widens the window so kills land mid-write.
    for i in range(0, len(data), 512):
        real(fd, data[i:i + 512], offset + i)
        time.sleep(rnd.random() * 0.0005)
gpt._pwrite = slow
disk = sys.argv[1]
table = gpt.read_table(disk)
a = {3: table.partition(3).attributes, 4: table.partition(4).attributes}
b = {3: a[4], 4: a[3]}  # swap the two slots' attributes: every write changes both entries
print("ready", flush=True)
while True:
    for change in (b, a):
        gpt.write_table(disk, gpt.with_attributes(table, change))
"""


@pytest.mark.timeout(120)
def test_sigkill_at_random_points_leaves_old_or_new(tmp_path: Path) -> None:
    """A real process rewrites the table in a loop (swapping A's and B's attributes); we SIGKILL
    it at random moments. Each time the disk reads as a valid GPT holding one of the two states.
    (A kill loses no page-cache writes, so this is process death, not power loss; the write order
    and fsyncs that cover power loss are what the Nth-write test above checks.)"""
    path = _prepare(tmp_path / "kill.raw")
    swapped = {3: OLD[4], 4: OLD[3]}
    repo = Path(__file__).resolve().parents[2]
    rnd = random.Random(11)
    outcomes = {"old": 0, "new": 0, "damaged": 0}
    for round_ in range(20):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(repo), str(round_)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rnd.uniform(0.0, 0.08))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
        table = gpt.read_table(path)
        after = state(path)
        assert after in (OLD, swapped), f"round {round_}: mixed state {after}"
        outcomes["old" if after == OLD else "new"] += 1
        outcomes["damaged"] += table.needs_repair
        gpt.repair(path)
        slots.set_attrs(path, 3, priority=2, tries=0, successful=True)
        slots.set_attrs(path, 4, priority=1, tries=0, successful=True)
    # kills landed inside writes (a copy was left damaged) and between them
    print("kill outcomes:", outcomes)
    assert outcomes["damaged"] > 0 and outcomes["old"] > 0, outcomes


BURNER = r"""
import sys
sys.path.insert(0, sys.argv[2])
from bootloader import slots
for _ in range(5):
    slots.boot_next(sys.argv[1])
"""


@pytest.mark.timeout(150)
def test_concurrent_writers_lose_no_update(tmp_path: Path) -> None:
    """Three processes burn five tries each at the same time: the slot lock makes each
    read-modify-write whole, so exactly 15 tries are gone (a lost update would leave some)."""
    path = make_disk(tmp_path / "busy.raw")
    slots.set_attrs(path, 4, priority=2, tries=15, successful=False)
    repo = str(Path(__file__).resolve().parents[2])
    procs = [subprocess.Popen([sys.executable, "-c", BURNER, str(path), repo]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert state(path)[4] == (2, 0, False)
