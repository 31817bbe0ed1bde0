"""One apply per disk: two at once both said "staged into slot B"; now the second is refused at once, naming
the first one's pid. Real processes, a real flock, real disk images; the slow first apply downloads from a
trickling loopback server (ue_helpers.FakeServer)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ue_helpers import World, run_ue, slot_attrs, slot_bytes

from update_engine import disklock
from update_engine.disklock import DiskBusy

HOLD = """
import sys, time
from pathlib import Path
from update_engine import disklock
with disklock.exclusive(Path(sys.argv[1]), Path(sys.argv[2])):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(disk: Path, lock_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(disk), str(lock_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


@pytest.mark.timeout(60)
def test_second_holder_refused_at_once_with_the_pid(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 4096)
    other = tmp_path / "other.raw"
    other.write_bytes(b"\0" * 4096)
    link = tmp_path / "link.raw"
    link.symlink_to(disk)
    hard = tmp_path / "hard.raw"
    os.link(disk, hard)
    locks = tmp_path / "locks"
    p = _holder(disk, locks)
    try:
        for path in (disk, link, hard):  # every name of the same disk meets the same lock
            start = time.monotonic()
            with pytest.raises(DiskBusy) as ei, disklock.exclusive(path, locks):
                pass
            assert time.monotonic() - start < 2
            assert str(ei.value).startswith(f"another update apply is running on {path} (pid {p.pid})")
        with disklock.exclusive(other, locks):  # another disk is not held
            pass
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with disklock.exclusive(disk, locks):  # the kernel dropped the dead holder's lock
        pass
    assert oct((locks).stat().st_mode & 0o777) == oct(0o700)


@pytest.mark.timeout(30)
def test_lock_folder_must_be_ours(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0")
    wrong = tmp_path / "file-not-dir"
    wrong.write_text("x")
    with pytest.raises(disklock.ApplyError, match="not a folder owned by this user"), \
            disklock.exclusive(disk, wrong):
        pass


@pytest.mark.timeout(120)
def test_two_concurrent_applies_one_refused(world: World, fake_server, ue_argv: list[str], tmp_path: Path) -> None:
    new = world.build("1.1.0", seed=2)
    fake_server.script.payload = new.payload.read_bytes()
    fake_server.script.trickle = 0.03  # ~3 s for the payload: the first apply is still writing
    disk = world.disk(tmp_path / "disk.raw")
    url = f"http://127.0.0.1:{fake_server.port}/pkg/update.payload"
    first = subprocess.Popen([*ue_argv, "apply", url, "--disk", str(disk), "--key", str(world.pub)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not fake_server.payload_gets and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()
        start = time.monotonic()
        second = run_ue(ue_argv, "apply", str(new.payload), "--disk", str(disk), "--key", str(world.pub))
        assert time.monotonic() - start < 10
        assert second.returncode == 2, second.stdout + second.stderr
        line = second.stderr.strip()
        assert line == (f"error: another update apply is running on {disk} (pid {first.pid}): "
                        "wait for it to finish"), line
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0 and "into slot B" in out, err
    assert slot_bytes(disk, 4)[: new.usr.stat().st_size] == new.usr.read_bytes()
    assert slot_attrs(disk)["A"] == (1, 0, True)
