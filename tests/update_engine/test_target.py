"""Which slot an apply writes (never the last good one), on real GPT disk images, and applying twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ue_helpers import World, run_ue, slot_attrs, slot_bytes, veritysetup_verify

from bootloader import slots
from update_engine import target
from update_engine.errors import ApplyError

A, B = slots.USR_A, slots.USR_B


def _disk(world: World, tmp: Path, a: tuple[int, int, bool], b: tuple[int, int, bool]) -> Path:
    disk = world.disk(tmp / "disk.raw")
    for index, (p, t, s) in ((A, a), (B, b)):
        slots.set_attrs(disk, index, priority=p, tries=t, successful=s)
    return disk


@pytest.mark.parametrize("a, b, written", [
    ((1, 0, True), (0, 0, False), B),  # fresh disk
    ((1, 0, True), (2, 1, False), B),  # a trial of B is pending: replace the trial, keep A
    ((1, 0, True), (2, 0, False), B),  # B's trial used its try and failed: A is still the good one
    ((1, 0, True), (2, 0, True), A),  # B was marked good: it is the last good slot now
    ((2, 0, True), (1, 0, True), B),  # both good, A boots first (e.g. after `boot rollback`)
    ((1, 0, True), (1, 0, True), B),  # both good, same priority: gptprio takes the lower index, A
    ((0, 0, True), (1, 0, True), A),  # a successful slot with priority 0 never boots: B is the one to keep
    ((1, 0, False), (2, 1, False), A),  # nothing successful: keep what boots next (B's trial)
], ids=["fresh", "trial pending", "trial failed", "trial marked good", "both good, A first", "both good, tie",
        "good but priority 0", "nothing successful"])
def test_the_slot_kept_is_the_last_good_one(world: World, tmp_path: Path, a, b, written: int) -> None:
    disk = _disk(world, tmp_path, a, b)
    t = target.choose(disk)
    assert t.index == written and t.keep == slots.USR_A + slots.USR_B - written
    assert (t.offset, t.length) == slots.slot_extent(disk, written)


def test_explicit_slot_may_not_be_the_one_to_keep(world: World, tmp_path: Path) -> None:
    disk = _disk(world, tmp_path, (1, 0, True), (2, 1, False))
    with pytest.raises(ApplyError, match="slot A is the last good slot"):
        target.choose(disk, A)
    assert target.choose(disk, B).index == B  # the pending trial may be replaced by name too
    (tmp_path / "n").mkdir()
    nothing = _disk(world, tmp_path / "n", (0, 0, False), (0, 0, False))
    with pytest.raises(ApplyError, match="pass --slot"):
        target.choose(nothing)
    assert target.choose(nothing, A).index == A


@pytest.mark.timeout(120)
def test_apply_twice_keeps_the_good_slot(world: World, ue_argv: list[str], tmp_path: Path) -> None:
    """Before: the second apply took the pending trial of B for the running slot and overwrote A, the only good
    slot; then no slot was successful and `boot rollback` refused."""
    disk = world.disk(tmp_path / "disk.raw")
    a_before = hashlib.sha256(slot_bytes(disk, A)).hexdigest()
    first, second = world.build("1.1.0", seed=2), world.build("1.2.0", seed=3)
    for b in (first, second):
        r = run_ue(ue_argv, "apply", str(b.payload), "--disk", str(disk), "--key", str(world.pub))
        assert r.returncode == 0 and "into slot B" in r.stdout, r.stdout + r.stderr
    at = slot_attrs(disk)
    assert at["A"] == (1, 0, True) and at["B"][1:] == (1, False) and at["B"][0] > at["A"][0]
    assert hashlib.sha256(slot_bytes(disk, A)).hexdigest() == a_before
    assert slot_bytes(disk, B)[: second.usr.stat().st_size] == second.usr.read_bytes()
    veritysetup_verify(disk, B, second, tmp_path)
    assert slots.rollback(disk).index == A  # the good slot is still there to go back to
