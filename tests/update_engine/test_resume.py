"""Crash safety by killing: SIGKILL the daemon during downloads and the apply during writes and
checkpoints; every rerun resumes (HTTP Range from the checkpoint) and ends with the same bytes, the
running slot never changes, and the half-written slot is never bootable."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from ue_helpers import World, slot_attrs, slot_bytes, veritysetup_verify

from bootloader import slots
from obelisk.signing import load_public_key
from update_engine import apply as applymod
from update_engine import progress, slotwriter


def _b_unbootable(disk: Path) -> bool:
    p, t, s = slot_attrs(disk)["B"]
    return p == 0 or (t == 0 and not s)


def test_daemon_sigkill_during_download_resumes(world: World, fake_server, host, ue_argv: list[str],
                                                tmp_path: Path) -> None:
    new = world.build("1.1.0", seed=2)
    fake_server.script.payload = new.payload.read_bytes()
    fake_server.script.trickle = 0.004  # ~1 s for the payload: time to land kills inside the download
    h = host(fake_server.url)
    a_before = hashlib.sha256(slot_bytes(h.disk, 3)).hexdigest()
    rng = random.Random(4)
    argv = [*ue_argv, *h.argv("--checkpoint-bytes", "65536", "--retries", "2", "--retry-delay", "0.1")]
    kills = 0
    # Each kill lands within 0.3 s of a run's first GET, so a ~1 s download takes several kills to
    # finish; runs go on until 4 kills landed or a run staged the update (bounded at 12 runs).
    for _ in range(12):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until this run is downloading (a new GET arrived), then kill at a random point of it.
        gets = len(fake_server.payload_gets)
        deadline = time.monotonic() + 30
        while len(fake_server.payload_gets) == gets and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        assert hashlib.sha256(slot_bytes(h.disk, 3)).hexdigest() == a_before
        if p.returncode != 0 and not _b_unbootable(h.disk):  # killed after postinstall: staged and complete
            assert slot_bytes(h.disk, 4)[: new.usr.stat().st_size] == new.usr.read_bytes()
        if p.returncode == 0 or kills >= 4:
            break
    assert kills >= 3
    fake_server.script.trickle = 0
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    resumed = [g for g in fake_server.payload_gets if g and not g.startswith("bytes=0-")]
    assert resumed, fake_server.payload_gets  # later runs asked for the rest with Range
    assert slot_bytes(h.disk, 4)[: new.usr.stat().st_size] == new.usr.read_bytes()
    assert hashlib.sha256(slot_bytes(h.disk, 3)).hexdigest() == a_before
    assert slot_attrs(h.disk)["B"][1:] == (1, False)
    veritysetup_verify(h.disk, 4, new, tmp_path)


def _apply_in_child(world: World, disk: Path, state: Path, die_at: tuple[str, int] | None) -> int:
    """Fork; the child applies the payload file and SIGKILLs itself at the chosen point; returns its status."""
    new = world.build("1.1.0", seed=2)
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        try:
            if die_at is not None:
                what, n = die_at
                counter = [0]
                module, target = {"write": (slotwriter, "pwrite_all"), "checkpoint": (progress, "write_atomic")}[what]
                orig = getattr(module, target)

                def dying(*a, **kw):
                    counter[0] += 1
                    if counter[0] == n:
                        if what == "checkpoint":  # die with the temp file half written, before the rename
                            Path(a[0]).with_name(f".{Path(a[0]).name}.tmp{os.getpid()}").write_bytes(b'{"ident')
                        os.kill(os.getpid(), signal.SIGKILL)
                    return orig(*a, **kw)
                setattr(module, target, dying)
            applymod.Applier(str(new.payload), disk, [load_public_key(world.pub)], state_dir=state,
                             transfer=applymod.Transfer(checkpoint_bytes=1)).run()
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return status


def test_sigkill_at_random_writes_and_checkpoints(world: World, tmp_path: Path) -> None:
    new = world.build("1.1.0", seed=2)
    chunks = len(new.manifest.operations[0].chunk_sha256)
    disk = world.disk(tmp_path / "disk.raw")
    state = tmp_path / "state"
    a_before = hashlib.sha256(slot_bytes(disk, 3)).hexdigest()
    rng = random.Random(7)
    killed = 0
    finished = False
    for _ in range(60):  # each run dies at its n-th write or checkpoint after where the last one got to
        point = (rng.choice(["write", "checkpoint"]), rng.randint(1, max(2, chunks // 4)))
        status = _apply_in_child(world, disk, state, point)
        assert hashlib.sha256(slot_bytes(disk, 3)).hexdigest() == a_before
        if not os.WIFSIGNALED(status):
            assert os.WEXITSTATUS(status) == 0
            finished = True
            break
        killed += 1
        assert _b_unbootable(disk)
    assert finished and killed >= 8  # it only finishes if progress survived every kill
    assert slot_bytes(disk, 4)[: new.usr.stat().st_size] == new.usr.read_bytes()
    assert hashlib.sha256(slot_bytes(disk, 3)).hexdigest() == a_before
    assert slot_attrs(disk)["B"][1:] == (1, False)
    assert not (state / applymod.PROGRESS_FILE).exists()


def test_resume_rechecks_written_chunks(world: World, tmp_path: Path) -> None:
    """Progress says N bytes are on the slot; if the slot changed meanwhile, the data is fetched again."""
    new = world.build("1.1.0", seed=2)
    disk = world.disk(tmp_path / "disk.raw")
    state = tmp_path / "state"
    assert os.WIFSIGNALED(_apply_in_child(world, disk, state, ("write", 10)))
    off, _ = slots.slot_extent(disk, 4)
    with open(disk, "r+b") as f:
        f.seek(off + 100)
        f.write(b"\xff" * 10)
    result = applymod.Applier(str(new.payload), disk, [load_public_key(world.pub)], state_dir=state).run()
    assert result.resumed_from == 0 and result.version == "1.1.0"  # started over instead of trusting it
    assert slot_bytes(disk, 4)[: new.usr.stat().st_size] == new.usr.read_bytes()
