"""Manual `obelisk update apply` on a disk image enforces the daemon's policy, read from the disk itself:
the app id, arch and version of its last good slot (read out of the slot's squashfs), never a pending
trial. Each case is refused by default (one line, exit 2, the disk unchanged) and accepted only with
its override, which is printed. The live-host side of the same cases runs in the VM host scenario
(builder/imagetest/host.py, tests/vm/test_host.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ue_helpers import A_FIRST, World, run_ue, slot_attrs, slot_bytes

from bootloader import slots
from update_engine import installed
from update_engine.policy import Overrides, check_policy, resolve

OTHER_APP = "{00000000-0000-4000-8000-0000000000aa}"
pytestmark = pytest.mark.timeout(300)


def disk_running(world: World, dest: Path, version: str) -> Path:
    """The template disk with slot A (good, booting next) holding ``version``."""
    disk = world.disk(dest)
    with open(disk, "r+b") as f:
        f.seek(A_FIRST * 512)
        f.write(world.build(version).usr.read_bytes())
    return disk


def digest(disk: Path) -> str:
    return hashlib.sha256(disk.read_bytes()).hexdigest()


def apply(ue_argv, world: World, disk: Path, payload: Path, *flags: str):
    return run_ue(ue_argv, "apply", str(payload), "--disk", str(disk), "--key", str(world.pub), *flags)


def refused(r, *words: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_installed_is_read_from_the_last_good_slot(world: World, tmp_path: Path) -> None:
    disk = disk_running(world, tmp_path / "d.raw", "1.3.0")
    have = installed.of_slot(disk, 3)
    assert (have.version, have.app_id, have.arch) == ("1.3.0", world.build("1.3.0").manifest.app_id, "amd64")
    assert "slot A" in have.where


CASES = [
    # (name, what slot A runs, payload build args, words of the refusal, the override flags)
    ("older", "1.3.0", {"version": "1.2.0"}, ["(older)", "1.3.0", "--allow-downgrade"], ["--allow-downgrade"]),
    ("same", "1.3.0", {"version": "1.3.0"}, ["(the same version)", "--allow-downgrade"], ["--allow-downgrade"]),
    ("other app", "1.0.0", {"version": "1.4.0", "app_id": OTHER_APP, "name": "1.4.0-app"},
     ["wrong release", f"--app-id {OTHER_APP}"], ["--app-id", OTHER_APP]),
    ("other arch", "1.0.0", {"version": "1.4.0", "arch": "arm64", "name": "1.4.0-arm64"},
     ["wrong release", "arm64", "--arch arm64"], ["--arch", "arm64"]),
]


@pytest.mark.parametrize(("name", "running", "build", "words", "override"), CASES, ids=[c[0] for c in CASES])
def test_refused_by_default_accepted_with_the_override(world: World, ue_argv, tmp_path: Path, name: str,
                                                       running: str, build: dict, words: list[str],
                                                       override: list[str]) -> None:
    disk = disk_running(world, tmp_path / "d.raw", running)
    b = world.build(build.pop("version"), **build)
    before = digest(disk)
    refused(apply(ue_argv, world, disk, b.payload), *words)
    assert digest(disk) == before, "a refused apply changed the disk"
    # A dry run with the override: accepted, the override said, nothing written.
    r = apply(ue_argv, world, disk, b.payload, *override, "--dry-run")
    assert r.returncode == 0 and "dry run" in r.stdout and "note: override" in r.stderr, r.stdout + r.stderr
    assert digest(disk) == before
    r = apply(ue_argv, world, disk, b.payload, *override)
    assert r.returncode == 0 and "staged" in r.stdout and "slot B" in r.stdout, r.stdout + r.stderr
    assert "note: override: " + override[0] in r.stderr
    assert slot_attrs(disk)["B"][1:] == (1, False)
    assert slot_bytes(disk, 4)[: b.usr.stat().st_size] == b.usr.read_bytes()


def test_a_pending_trial_is_never_what_is_compared(world: World, ue_argv, tmp_path: Path) -> None:
    disk = disk_running(world, tmp_path / "d.raw", "1.0.0")
    assert apply(ue_argv, world, disk, world.build("1.5.0").payload).returncode == 0
    # B (1.5.0) is a pending trial: A (1.0.0) is still the last good slot, so 1.2.0 is newer and replaces it.
    r = apply(ue_argv, world, disk, world.build("1.2.0").payload)
    assert r.returncode == 0 and "slot B" in r.stdout, r.stderr
    # Once B's trial is marked good, B is the last good slot and 1.1.0 is older than what it runs.
    slots.mark_good(disk, 4)
    before = digest(disk)
    refused(apply(ue_argv, world, disk, world.build("1.1.0").payload), "(older)", "1.2.0", "slot B")
    assert digest(disk) == before


def test_higher_newer_than_tightens_without_a_note(world: World, ue_argv, tmp_path: Path) -> None:
    disk = disk_running(world, tmp_path / "d.raw", "1.0.0")
    refused(apply(ue_argv, world, disk, world.build("1.2.0").payload, "--newer-than", "2.0"), "(older)")
    r = apply(ue_argv, world, disk, world.build("1.2.0").payload, "--dry-run")
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr


def test_unreadable_slot_is_refused_with_the_reason(world: World, ue_argv, tmp_path: Path) -> None:
    disk = world.disk(tmp_path / "d.raw")
    with open(disk, "r+b") as f:
        f.seek(A_FIRST * 512)
        f.write(b"\xff" * 65536)  # slot A is good by its attributes but holds no squashfs
    before = digest(disk)
    r = apply(ue_argv, world, disk, world.build("1.2.0").payload)
    assert r.returncode != 0 and "cannot read /usr/share/obelisk/release" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert digest(disk) == before


def test_no_bootable_slot_compares_nothing_and_says_so(world: World, ue_argv, tmp_path: Path) -> None:
    disk = world.disk(tmp_path / "d.raw")
    slots.mark_unbootable(disk, 3)
    r = apply(ue_argv, world, disk, world.build("1.2.0").payload, "--slot", "B", "--dry-run")
    assert r.returncode == 0 and "nothing to compare" in r.stderr, r.stdout + r.stderr


def test_resolve_live_host_from_its_release_file(tmp_path: Path, world: World) -> None:
    """The live host's side, decided from its release file (the VM scenario runs it on a real host)."""
    rel = tmp_path / "release"
    rel.write_text(f"VERSION=1.3.0\nAPPID={world.build('1.3.0').manifest.app_id}\n")
    have = installed.of_running(rel)
    assert have.arch == installed.host_arch() and have.where == "the running host"
    policy, notes = resolve(have, Overrides())
    assert notes == []
    with pytest.raises(Exception, match=r"not newer than 1.3.0, which the running host runs \(older\)"):
        check_policy(world.build("1.2.0").manifest, policy, 1 << 30)
    policy, notes = resolve(have, Overrides(allow_downgrade=True))
    check_policy(world.build("1.2.0").manifest, policy, 1 << 30)
    assert notes and "--allow-downgrade" in notes[0]
