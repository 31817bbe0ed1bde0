"""Crash states, enumerated, across the boot-state operations of an update's life (issue 17).

One disk (GPT, FAT ESP with grub.cfg and grubenv, two verity-protected USR slots) goes through an
update's whole life, and every operation's writes are recorded through the one I/O seam
(``obelisk.diskio``): staging (the slot writer's pattern), postinstall, the trial boot's reconcile
after GRUB burned a try, mark-good, rollback, prioritize, the boot-time choice of a GPT-reading
loader (``boot next``), and GPT repair of each damaged copy and of a grown disk. ``crashkit``
builds every crash state of each (prefixes, reorders and drops inside a flush epoch, torn writes)
and judges it with the real parts: grub-emu, veritysetup, the GPT reader, ``obelisk boot status``.

Every state must boot something that verifies, and what boots must be the choice before or after
the operation. Set OBELISK_CRASH_REPORT=FILE to get every state's verdict as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import crashkit as ck
import pytest
from testlib import need_tools, say

from bootloader import gpt, slots
from bootloader.layout import USR_A, USR_B
from obelisk import diskio
from update_engine import postinstall

pytestmark = pytest.mark.timeout(900)


def _stage(usr: ck.Usr, index: int, piece: int = 64 * 1024) -> object:
    """Staging as the slot writer does it: the slot made unbootable, data in pieces, one flush."""
    def op(disk: Path) -> None:
        slots.mark_unbootable(disk, index)
        first = (ck.A_FIRST if index == USR_A else ck.B_FIRST) * ck.SECTOR
        fd = os.open(disk, os.O_RDWR)
        try:
            for off in range(0, len(usr.image), piece):
                diskio.pwrite_all(fd, usr.image[off:off + piece], first + off)
            diskio.fsync(fd)
        finally:
            os.close(fd)
    return op


def _postinstall(usr: ck.Usr, index: int) -> object:
    m = SimpleNamespace(verity_root_hash=usr.root_hash, hash_offset=usr.hash_offset, version=usr.version)
    return lambda disk: postinstall.postinstall(disk, index, m)  # type: ignore[arg-type]


def _damage(disk: Path, which: str) -> None:
    t = gpt.read_table(disk)
    with open(disk, "r+b") as f:
        if which == "primary-header":
            f.seek(t.sector_size + 16)
        elif which == "backup-header":
            f.seek(t.backup_lba * t.sector_size + 16)
        elif which == "primary-entries":
            f.seek(t.primary_entries_lba * t.sector_size + 200)
        else:
            f.seek(t.backup_entries_lba * t.sector_size + 200)
        f.write(b"\xde\xad\xbe\xef")


def _life(work: Path, usrs: dict[str, ck.Usr]) -> list[ck.Recorded]:
    """The operations of two updates (A -> B, then B -> A), each recorded against the disk."""
    disk = ck.make_disk(work, usrs["1"], None)
    recs: list[ck.Recorded] = []

    def rec(name: str, op) -> None:
        recs.append(ck.record(name, disk, work, op))

    rec("stage-B", _stage(usrs["2"], USR_B))
    rec("postinstall-B", _postinstall(usrs["2"], USR_B))
    trial = work / "trial-B.raw"
    shutil.copyfile(disk, trial)
    rec("boot-next-B", lambda d: slots.boot_next(d))  # a loader that reads the GPT burns the try itself
    shutil.copyfile(trial, disk)
    ck.grubenv_burn(disk, "B")  # GRUB booted the trial and burned its try
    rec("trial-reconcile-B", slots.read_slots)
    rec("mark-good-B", lambda d: slots.mark_good(d, USR_B))
    rec("rollback-to-A", slots.rollback)
    rec("prioritize-B", lambda d: slots.prioritize(d, USR_B))
    for which in ("primary-header", "backup-header", "primary-entries", "backup-entries"):
        _damage(disk, which)
        rec(f"repair-{which}", gpt.repair)
    with open(disk, "r+b") as f:  # the image written to a bigger disk
        f.truncate(ck.DISK_BYTES + (1 << 20))
    rec("repair-move-backup", lambda d: gpt.repair(d, move_backup=True))
    rec("stage-A", _stage(usrs["3"], USR_A))
    rec("postinstall-A-3-tries", lambda d: (_postinstall(usrs["3"], USR_A)(d), slots.stage_trial(d, USR_A, tries=3)))
    ck.grubenv_burn(disk, "A")
    rec("trial-reconcile-A", slots.read_slots)
    rec("mark-good-A", lambda d: slots.mark_good(d, USR_A))
    return recs


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, ck.Usr], list[ck.Recorded]]:
    need_tools("mksquashfs", "veritysetup", "mkfs.fat", "mcopy", "grub-emu")
    work = tmp_path_factory.mktemp("crash")
    usrs = {v: ck.make_usr(work, v, seed) for v, seed in (("1", 1), ("2", 2), ("3", 3))}
    return work, usrs, _life(work, usrs)


def test_every_operation_writes_through_the_seam(life) -> None:
    """The record is not empty: a change that bypassed obelisk.diskio would hide its crash states."""
    _, _, recs = life
    for r in recs:
        writes = [o for o in r.ops if isinstance(o, diskio.Write)]
        assert writes, f"{r.name}: no writes recorded"
        assert isinstance(r.ops[-1], diskio.Flush), f"{r.name}: its last write is never flushed"


def test_enumerated_crash_states_never_brick(life, pytestconfig: pytest.Config) -> None:
    work, usrs, recs = life
    judge = ck.Judge(work, list(usrs.values()))
    t0 = time.monotonic()
    verdicts: list[ck.Verdict] = []
    for r in recs:
        verdicts += judge.judge(r, ck.crash_states(r))
    seconds = time.monotonic() - t0
    kinds = collections.Counter(v.state.kind for v in verdicts)
    per_op = collections.Counter(v.state.op for v in verdicts)
    windows = sum(v.window for v in verdicts)
    bad = [v for v in verdicts if v.problems]
    say(pytestconfig, f"crash states: {len(verdicts)} distinct across {len(recs)} operations in {seconds:.1f} s "
                      f"({dict(kinds)}); bricked or wrong: {len(bad)}; first boot on the old grubenv while the GPT "
                      f"is new: {windows}; per operation: {dict(per_op)}")
    if os.environ.get("OBELISK_CRASH_REPORT"):
        Path(os.environ["OBELISK_CRASH_REPORT"]).write_text(json.dumps([
            {"op": v.state.op, "kind": v.state.kind, "writes": len(v.state.writes), "grub": v.grub_slot,
             "python": v.python_slot, "window": v.window, "problems": v.problems} for v in verdicts], indent=1))
    assert len(verdicts) >= 1000, f"only {len(verdicts)} distinct crash states"
    assert not bad, "\n".join(f"{v.state.op} {v.state.kind} ({len(v.state.writes)} writes): {v.problems}"
                              for v in bad[:20])
