"""bootloader.slots: the pure A/B rules (property tests) and the full cycle on a real disk file."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from bootdisks import state
from hypothesis import given, settings
from hypothesis import strategies as st

from bootloader import gpt, loader, slots

# Deadline for each test here (none is slow).
pytestmark = pytest.mark.timeout(30)

OWNED = slots.PRIORITY_MASK | slots.TRIES_MASK | slots.SUCCESSFUL_MASK
nibble = st.integers(0, 15)


@given(st.integers(0, 2**64 - 1), nibble, nibble, st.booleans())
def test_encode_sets_only_the_slot_bits(attrs: int, p: int, t: int, s: bool) -> None:
    new = slots.encode(attrs, priority=p, tries=t, successful=s)
    assert slots.decode(new) == (p, t, s)
    assert new & ~OWNED == attrs & ~OWNED
    assert slots.encode(attrs) == attrs


def test_bit_positions_match_cgpt() -> None:
    # reference/machine-facts.md §6: P15 T7 S1 -> 0x017f000000000000; cgpt -A 0x101 = P1 T0 S1
    assert slots.encode(0, priority=15, tries=7, successful=True) == 0x017F000000000000
    assert slots.decode(0x0101 << 48) == (1, 0, True)


def test_out_of_range_values_are_refused() -> None:
    for kw in ({"priority": 16}, {"priority": -1}, {"tries": 16}, {"tries": -2}):
        with pytest.raises(slots.SlotError, match="out of range"):
            slots.encode(0, **kw)
    with pytest.raises(slots.SlotError, match="max priority 0"):
        slots.prioritized({3: 1}, 3, max_priority=0)


def _slot(index: int, p: int, t: int, s: bool) -> slots.Slot:
    return slots.Slot(index, f"P{index}", uuid.UUID(int=index), p, t, s, 0, 0)


slot_lists = st.lists(st.tuples(nibble, nibble, st.booleans()), min_size=0, max_size=6).map(
    lambda xs: [_slot(i + 1, *x) for i, x in enumerate(xs)]
)


@given(slot_lists)
def test_next_follows_gptprio_rules(found: list[slots.Slot]) -> None:
    """reference/image-build.md §2.3: candidates have tries > 0 or successful and priority > 0;
    the highest priority wins, ties go to the lowest index; nothing qualifies -> None."""
    chosen = slots.next_index(found)
    qualifies = [s for s in found if (s.tries > 0 or s.successful) and s.priority > 0]
    if not qualifies:
        assert chosen is None
        return
    top = max(s.priority for s in qualifies)
    assert chosen == min(s.index for s in qualifies if s.priority == top)


@given(st.dictionaries(st.integers(1, 20), nibble, min_size=1, max_size=10), st.data())
def test_prioritize_properties(prios: dict[int, int], data: st.DataObject) -> None:
    index = data.draw(st.sampled_from(sorted(prios)))
    friends = data.draw(st.booleans())
    top = data.draw(st.none() | st.integers(1, 15))
    new = slots.prioritized(prios, index, max_priority=top, friends=friends)
    raised = {i for i in prios if i == index or (friends and prios[i] == prios[index])}
    assert all(new[i] == new[index] for i in raised)
    others = [i for i in prios if i not in raised]
    assert all(new[i] <= new[index] for i in others)
    if top is None and len({prios[i] for i in others if prios[i]}) < 15:
        assert all(new[i] < new[index] for i in others)
    for a in others:  # the others keep their order; priority 0 stays 0, nothing drops to 0
        assert (new[a] == 0) == (prios[a] == 0)
        for b in others:
            if prios[a] > prios[b]:
                assert new[a] >= new[b]
    assert new[index] >= 1


def test_flatcar_update_cycle_on_disk(disk: Path) -> None:
    """Fresh disk -> stage B -> trial boot -> mark good; then a failed trial falls back to A."""
    assert state(disk) == {3: (1, 0, True), 4: (0, 0, False)}
    assert slots.next_index(slots.read_slots(disk)) == 3
    assert slots.boot_next(disk).index == 3  # successful, no tries: nothing written
    assert state(disk) == {3: (1, 0, True), 4: (0, 0, False)}

    slots.mark_unbootable(disk, 4)
    slots.stage_trial(disk, 4)  # flatcar-postinst: cgpt add -S0 -T1; cgpt prioritize
    assert state(disk) == {3: (1, 0, True), 4: (2, 1, False)}
    assert slots.boot_next(disk, dry_run=True).tries == 0
    assert state(disk) == {3: (1, 0, True), 4: (2, 1, False)}
    chosen = slots.boot_next(disk)
    assert (chosen.index, chosen.uuid, chosen.tries) == (4, slots.USR_B_UUID, 0)
    assert slots.running_index(disk) == 3  # not the booted disk: the next-boot slot (B used its try)
    slots.mark_good(disk, 4)
    assert state(disk) == {3: (1, 0, True), 4: (2, 0, True)}

    # a new release in A whose trial fails: its one try is burnt, the next boot falls back to B
    slots.mark_unbootable(disk, 3)
    slots.stage_trial(disk, 3)
    assert state(disk) == {3: (2, 1, False), 4: (1, 0, True)}
    assert slots.boot_next(disk).index == 3
    assert slots.boot_next(disk).index == 4
    assert state(disk) == {3: (2, 0, False), 4: (1, 0, True)}

    # rollback: refuses towards A (never marked good), works towards B after A is good
    with pytest.raises(slots.SlotError, match="not marked successful"):
        slots.rollback(disk)
    slots.mark_good(disk, 3)
    assert slots.rollback(disk).index == 4
    assert slots.next_index(slots.read_slots(disk)) == 4


def test_slot_extent_and_bad_index(disk: Path) -> None:
    assert slots.slot_extent(disk, 3) == (6144 * 512, 4096 * 512)
    for bad in (1, 9, 7, 0):
        with pytest.raises(slots.SlotError, match="is not a USR slot"):
            slots.set_attrs(disk, bad, priority=1)
    with pytest.raises(slots.SlotError):
        slots.stage_trial(disk, 4, tries=0)
    assert slots.parse_slot("b") == 4 and slots.parse_slot("USR-A") == 3 and slots.parse_slot("4") == 4
    with pytest.raises(slots.SlotError, match="not a slot"):
        slots.parse_slot("C")


def test_loader_hooks_wrap_every_disk_operation(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """reconcile before every read and mirror after every GPT write (spies on the real hooks)."""
    calls: list[str] = []
    monkeypatch.setattr(loader, "reconcile", lambda d: calls.append("reconcile"))
    monkeypatch.setattr(loader, "mirror", lambda d: calls.append("mirror"))
    ops = [
        (lambda: slots.read_slots(disk), ["reconcile"]),
        (lambda: slots.set_attrs(disk, 4, priority=0), ["reconcile"]),  # no change: no write
        (lambda: slots.stage_trial(disk, 4), ["reconcile", "mirror"]),
        (lambda: slots.boot_next(disk, dry_run=True), ["reconcile"]),
        (lambda: slots.boot_next(disk), ["reconcile", "mirror"]),
        (lambda: slots.mark_good(disk, 4), ["reconcile", "mirror"]),
        (lambda: slots.rollback(disk), ["reconcile", "mirror"]),
        (lambda: slots.prioritize(disk, 4), ["reconcile", "mirror"]),
        (lambda: slots.slot_extent(disk, 3), ["reconcile"]),
        (lambda: slots.running_index(disk), ["reconcile"]),
    ]
    for op, expected in ops:
        calls.clear()
        op()
        assert calls == expected


def test_running_index_uses_the_kernel_command_line_on_the_boot_disk(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc/cmdline and /dev/disk/by-partuuid are host state: we stand them in by patching the two
    lookups, since a test cannot boot this file (the VM tests cover a real boot)."""
    monkeypatch.setattr(slots, "_cmdline", lambda: f"obelisk.usr=PARTUUID={slots.USR_B_UUID} obelisk.slot=B")
    monkeypatch.setattr(slots, "find_boot_disk", lambda: disk)
    assert slots.running_index(disk) == 4
    assert slots.next_index(slots.read_slots(disk)) == 3
    monkeypatch.setattr(slots, "find_boot_disk", lambda: Path("/dev/null"))
    assert slots.running_index(disk) == 3


def test_every_change_is_one_table_write(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stage_trial changes two entries (S/T of one, priorities of both): one write_table call."""
    writes: list[gpt.GptTable] = []
    real = gpt.write_table
    monkeypatch.setattr(gpt, "write_table", lambda d, t: (writes.append(t), real(d, t)))
    slots.stage_trial(disk, 4)
    assert len(writes) == 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(nibble, nibble, st.booleans()), min_size=2, max_size=2))
def test_boot_next_on_disk_matches_pure_choice(tmp_path_factory: pytest.TempPathFactory,
                                               attrs: list[tuple[int, int, bool]]) -> None:
    from bootdisks import make_disk

    disk = tmp_path_factory.mktemp("n") / "d.raw"
    make_disk(disk)
    for index, (p, t, s) in zip((3, 4), attrs, strict=True):
        slots.set_attrs(disk, index, priority=p, tries=t, successful=s)
    expected = slots.next_index(slots.read_slots(disk))
    chosen = slots.boot_next(disk)
    after = state(disk)
    if expected is None:
        assert chosen is None and after == {3: attrs[0], 4: attrs[1]}
        return
    assert chosen.index == expected
    p, t, s = attrs[expected - 3]
    assert after[expected] == (p, max(t - 1, 0), s)
