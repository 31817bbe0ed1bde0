"""Postinstall on a real GPT disk image: the slot becomes the next boot for one trial."""

from __future__ import annotations

from pathlib import Path

import pytest
from ue_helpers import World, slot_attrs

from update_engine import omaha, target
from update_engine.errors import ApplyError
from update_engine.postinstall import postinstall


def test_staged_slot_boots_next_for_one_trial(world: World, tmp_path: Path) -> None:
    disk = world.disk(tmp_path / "disk.raw")
    m = world.build("1.1.0", seed=2).manifest
    target.make_unbootable(disk, 4)
    assert slot_attrs(disk)["B"] == (0, 0, False)
    postinstall(disk, 4, m)
    at = slot_attrs(disk)
    assert at["B"][1:] == (1, False) and at["B"][0] > at["A"][0] and at["A"] == (1, 0, True)


def test_failures_are_postinstall_errors(world: World, tmp_path: Path) -> None:
    disk = world.disk(tmp_path / "disk.raw")
    m = world.build("1.1.0", seed=2).manifest
    with pytest.raises(ApplyError) as ei:
        postinstall(disk, 9, m)  # not a USR slot
    assert ei.value.code == omaha.ERR_POSTINSTALL and "postinstall failed" in str(ei.value)
    with pytest.raises(ApplyError) as ei:
        target.make_unbootable(tmp_path / "missing.raw", 4)
    assert ei.value.code == omaha.ERR_POSTINSTALL
