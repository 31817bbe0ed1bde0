"""`obelisk boot` in real processes: bad input, the next/mark-good/rollback cycle, human output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from bootdisks import DISK_SIZE, OBELISK, make_disk, obelisk, obelisk_inproc, sha, state

from bootloader import gpt, slots

# Deadline for each test here (the slow ones name their own below).
pytestmark = pytest.mark.timeout(30)


def _corrupt(path: Path, offset: int, data: bytes = b"\xde\xad\xbe\xef") -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def _bad_disks(tmp: Path) -> dict[str, Path]:
    out = {}
    (tmp / "text.img").write_text("not a disk\n" * 100)
    out["text file"] = tmp / "text.img"
    (tmp / "zeros.img").write_bytes(bytes(2 * 1024 * 1024))
    out["zeros"] = tmp / "zeros.img"
    (tmp / "empty.img").write_bytes(b"")
    out["empty"] = tmp / "empty.img"
    trunc = make_disk(tmp / "trunc.raw")
    os.truncate(trunc, DISK_SIZE - 4096)
    out["truncated"] = trunc
    both = make_disk(tmp / "both.raw")
    _corrupt(both, 512 + 24)
    _corrupt(both, gpt.read_table(make_disk(tmp / "ref.raw")).backup_lba * 512 + 24)
    out["both copies corrupt"] = both
    out["missing"] = tmp / "missing.raw"
    out["directory"] = tmp
    return out


BAD_REQUESTS = [
    ("set 1", ["set", "1", "--priority", "1"]),  # the ESP, not a USR slot
    ("set 9", ["set", "9", "--tries", "1"]),
    ("set 7 (empty)", ["set", "7", "--tries", "1"]),
    ("set C", ["set", "C", "--priority", "1"]),
    ("priority 16", ["set", "3", "--priority", "16"]),
    ("priority -1", ["set", "3", "--priority", "-1"]),
    ("priority abc", ["set", "3", "--priority", "abc"]),
    ("tries 16", ["set", "4", "--tries", "16"]),
    ("tries -3", ["set", "4", "--tries", "-3"]),
    ("successful 2", ["set", "4", "--successful", "2"]),
    ("prioritize 1", ["prioritize", "1"]),
    ("prioritize --max 0", ["prioritize", "4", "--max", "0"]),
    ("prioritize --max 16", ["prioritize", "4", "--max", "16"]),
    ("mark-good --slot 6", ["mark-good", "--slot", "6"]),
    ("rollback to a never-good slot", ["rollback"]),
]


def _check_one_line_exit_2(r, what: str) -> None:
    assert r.code == 2, f"{what}: exit {r.code}, stderr {r.err!r}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: stderr {r.err!r}"
    assert "Traceback" not in r.err and r.out == "", what


@pytest.mark.timeout(90)
def test_bad_disks_exit_2_with_one_line_and_nothing_written(tmp_path: Path) -> None:
    """Each bad disk through every command kind (reading, setting, next): a real process for one
    command per disk, the in-process runner for the rest."""
    disks = _bad_disks(tmp_path)
    tried = 0
    for what, path in disks.items():
        before = sha(path) if path.is_file() else None
        for args in (["status", "--json"], ["set", "3", "--priority", "2"], ["next"], ["mark-good", "--slot", "A"],
                     ["prioritize", "B"], ["rollback"], ["repair"]):
            real = args[0] == "status" and what in ("text file", "truncated", "both copies corrupt")
            run = obelisk if real else obelisk_inproc
            r = run("boot", *args, "--disk", path)
            _check_one_line_exit_2(r, f"{what}: {args}")
            tried += 1
        if before is not None:
            assert sha(path) == before, what
    assert "truncated" in obelisk_inproc("boot", "status", "--disk", disks["truncated"]).err
    assert "not a GPT disk" in obelisk_inproc("boot", "status", "--disk", disks["zeros"]).err
    assert "no such disk" in obelisk_inproc("boot", "status", "--disk", disks["missing"]).err
    assert tried == 49


COMMANDS = [["status"], ["status", "--json"], ["set", "3", "--priority", "2"], ["prioritize", "B"], ["next"],
            ["next", "--dry-run"], ["mark-good", "--slot", "A"], ["mark-good"], ["rollback"], ["repair"],
            ["repair", "--move-backup"]]


@pytest.mark.timeout(30)
def test_fifo_socket_or_char_device_as_disk_is_refused_without_hanging(tmp_path: Path) -> None:
    """A FIFO given as --disk blocked open() forever. Every command (and the library calls) now
    refuses it, a socket and a character device at once, naming the path."""
    fifo = tmp_path / "disk.fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "disk.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "link.raw"
    link.symlink_to(fifo)
    try:
        for path, kind in ((fifo, "a FIFO"), (sock_path, "a socket"), (Path("/dev/null"), "a character device"),
                           (link, "a FIFO")):
            for i, args in enumerate(COMMANDS):
                run = obelisk if i == 0 else obelisk_inproc
                r = run("boot", *args, "--disk", path)
                _check_one_line_exit_2(r, f"{path}: {args}")
                assert f"{path}: is {kind}, not a disk" in r.err, r.err
            for call in (gpt.read_table, slots.read_slots, gpt.repair, lambda d: slots.set_attrs(d, 3, priority=1)):
                with pytest.raises(gpt.GptError, match="neither a disk image file nor a block device"):
                    call(path)
    finally:
        sock.close()


@pytest.mark.timeout(60)
def test_bad_requests_exit_2_with_one_line_and_nothing_written(disk: Path) -> None:
    for i, (what, args) in enumerate(BAD_REQUESTS):
        before = sha(disk)
        r = (obelisk if i % 8 == 0 else obelisk_inproc)("boot", *args, "--disk", disk)
        _check_one_line_exit_2(r, what)
        assert sha(disk) == before, what
    assert "not a USR slot" in obelisk_inproc("boot", "set", "1", "-P", "1", "--disk", disk).err


@pytest.mark.parametrize("where", ["header", "entries"])
def test_damaged_primary_is_read_from_backup_and_repaired_only_on_request_or_write(tmp_path: Path, where: str) -> None:
    path = make_disk(tmp_path / "d.raw")
    _corrupt(path, 512 + 16 if where == "header" else 2 * 512 + 2 * 128 + 48)
    damaged = sha(path)
    r = (obelisk if where == "header" else obelisk_inproc)("boot", "status", "--json", "--disk", path)
    assert r.code == 0 and json.loads(r.out)["next"] == 3
    assert r.err.count("\n") == 1 and r.err.startswith("warning: ") and "obelisk boot repair" in r.err
    assert obelisk_inproc("boot", "next", "--dry-run", "--disk", path).out.strip() == str(slots.USR_A_UUID)
    r = obelisk_inproc("boot", "set", "4", "--priority", "16", "--disk", path)  # bad request: no repair either
    assert r.code == 2 and sha(path) == damaged
    if where == "header":
        r = obelisk_inproc("boot", "repair", "--disk", path)
        assert r.code == 0 and "repaired: primary GPT is corrupt" in r.out
    else:
        assert obelisk_inproc("boot", "set", "4", "--priority", "0", "--disk", path).code == 0  # a write repairs
    assert not gpt.read_table(path).needs_repair
    assert obelisk_inproc("boot", "status", "--disk", path).err == ""


@pytest.mark.timeout(60)
def test_next_burns_a_try_and_prints_the_guid(disk: Path) -> None:
    """`boot next` against the reference rules: B staged (P2 T1 S0) boots once, then A again."""
    slots.stage_trial(disk, 4)
    r = obelisk("boot", "next", "--dry-run", "--disk", disk)
    assert r.code == 0 and r.out.strip() == str(slots.USR_B_UUID)
    assert state(disk)[4] == (2, 1, False)
    assert obelisk("boot", "next", "--disk", disk).out.strip() == str(slots.USR_B_UUID)
    assert state(disk)[4] == (2, 0, False)
    assert obelisk_inproc("boot", "next", "--disk", disk).out.strip() == str(slots.USR_A_UUID)  # fall back
    assert state(disk) == {3: (1, 0, True), 4: (2, 0, False)}
    slots.set_attrs(disk, 3, priority=0)
    before = sha(disk)
    r = obelisk_inproc("boot", "next", "--disk", disk)
    assert r.code == 2 and "no USR slot is bootable" in r.err and sha(disk) == before


@pytest.mark.timeout(60)
def test_mark_good_rollback_and_status(disk: Path) -> None:
    slots.stage_trial(disk, 4)
    r = obelisk("boot", "mark-good", "--slot", "B", "--disk", disk)
    assert r.code == 0 and "priority=2 tries=0 successful=1" in r.out
    r = obelisk("boot", "rollback", "--disk", disk)
    assert r.code == 0 and "slot A (partition 3)" in r.out
    assert state(disk) == {3: (2, 0, True), 4: (1, 0, True)}
    r = obelisk_inproc("boot", "mark-good", "--disk", disk)  # not the booted disk: the next-boot slot (A)
    assert r.code == 0 and r.out.startswith("USR-A")
    human = obelisk_inproc("boot", "status", "--disk", disk).out
    assert "USR-A" in human and str(slots.USR_B_UUID) in human and "next boot: slot A (partition 3)" in human


def test_no_disk_on_a_non_obelisk_host_says_to_pass_one() -> None:
    r = obelisk("boot", "status")
    if r.code == 0:  # running on an obelisk host: it found the boot disk
        return
    _check_one_line_exit_2(r, "no --disk")
    assert "--disk" in r.err


def test_root_cli_mounts_boot(disk: Path) -> None:
    p = subprocess.run([OBELISK, "boot", "status", "--json", "--disk", str(disk)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["next"] == 3


def test_status_says_why_the_host_last_fell_back(disk: Path, tmp_path: Path) -> None:
    """The boot check's record of a failed trial (obelisk/trial_record.py) shows in `boot status`, before and
    after the daemon reported it; --json carries it; a hostile reason stays one line."""
    st = tmp_path / "state"
    st.mkdir()
    r = obelisk("boot", "status", "--json", "--disk", disk, "--state-dir", st)
    assert r.code == 0 and json.loads(r.out)["fallback"] is None and json.loads(r.out)["running"] is None
    (st / "trial-failure").write_text("time=1796299200\nslot=B\nversion=1.2.0\n"
                                      "reason=health hook 50-app failed (exit 1): [red]x[/red]\x1b[2J\n")
    r = obelisk("boot", "status", "--disk", disk, "--state-dir", st)
    line = next(ln for ln in r.out.splitlines() if ln.startswith("last fallback:"))
    assert line == ("last fallback: slot B (1.2.0) fell back at 2026-12-03 12:00:00 UTC: health hook 50-app failed "
                    "(exit 1): [red]x[/red] [2J (not yet reported)")
    (st / "trial-failure").rename(st / "trial-failure.sent")
    fell = json.loads(obelisk("boot", "status", "--json", "--disk", disk, "--state-dir", st).out)["fallback"]
    assert fell["slot"] == "B" and fell["version"] == "1.2.0" and fell["reported"] is True
    assert fell["reason"].startswith("health hook 50-app failed")
