"""Why a boot fell back, kept across the fallback, on the real boot chain (QEMU TCG, OVMF, GRUB, the tiny release).

Two power-ons of one disk, each followed on the serial console by builder.imagetest.qemu; afterwards
ROOT's records are read off the disk with debugfs and shown by the real `obelisk boot log` / `boot status`:
1. slot B is good and on top but holds no filesystem, so GRUB cannot load its kernel: GRUB boots A in the
   same run (no reset, no loop), and A's initramfs keeps GRUB's mark as the reason.
2. slot B is staged for a trial with A's content under a wrong root hash: B's initramfs finds the verity
   failure, leaves a record on the ESP and resets; GRUB falls back to A, whose initramfs takes the record
   into ROOT and deletes it from the ESP.
No network at all (qemu_argv's default ``-nic none``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pxeboot import Release
from testlib import OBELISK, need_tools

from bootloader import esp, gpt, grub, loader, slots
from builder.imagetest import qemu
from obelisk import trial_record

pytestmark = pytest.mark.timeout(900)


def _root_file(disk: Path, tmp: Path, name: str) -> bytes | None:
    """A file of /var/lib/obelisk on the disk's ROOT (ext4), read with debugfs."""
    part = gpt.read_table(disk).partition(9)
    assert part is not None
    img = tmp / "root.img"
    with open(disk, "rb") as src, open(img, "wb") as dst:
        src.seek(part.first_lba * 512)
        left = (part.last_lba - part.first_lba + 1) * 512
        while left > 0:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)
    res = subprocess.run(["debugfs", "-R", f"cat /var/lib/obelisk/{name}", str(img)], capture_output=True, timeout=60)
    return res.stdout if res.returncode == 0 and res.stdout else None


def _state(disk: Path, tmp: Path) -> Path:
    st = tmp / "state"
    st.mkdir(parents=True, exist_ok=True)
    for name in (trial_record.NAME, trial_record.LOG):
        data = _root_file(disk, tmp, name)
        if data is not None:
            (st / name).write_bytes(data)
    return st


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OBELISK, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_grub_load_failure_and_initramfs_verity_failure_leave_their_reasons(release: Release, tmp_path: Path) -> None:
    need_tools("qemu-system-x86_64", "debugfs")
    disk = tmp_path / "disk.raw"
    disk.write_bytes((release.path / "disk.raw").read_bytes())
    good = lambda b, _line: b.good  # noqa: E731

    # 1. A good slot B that GRUB cannot load: one power-on, GRUB goes on to A by itself.
    slots.set_attrs(disk, 4, priority=2, tries=0, successful=True)
    run = qemu.power_on(disk, tmp_path / "boot1.log", boot_timeout=300, stop_when=good)
    log = (tmp_path / "boot1.log").read_text()
    assert run.boots[-1].good and run.boots[-1].slot == "A", f"{run.summary()}: see {tmp_path / 'boot1.log'}"
    assert [b.slot for b in run.boots] == ["B", "A"] and "reboot: Restarting" not in log  # no reset, no loop
    assert f"{grub.MARK_FALLBACK} B (B:linux:)" in log and "falling back to slot A" in log
    assert "kept GRUB's mark: slot B did not load (linux)" in log
    env = loader.read_env(disk)
    assert env is not None and env.loadfail == "B:linux:"
    st = _state(disk, tmp_path / "s1")
    rec = trial_record.read(st)
    assert rec is not None and (rec.slot, rec.source) == ("B", "grub")
    assert rec.reason == "GRUB could not load the kernel of slot B; it booted slot A instead"
    r = _cli("boot", "log", "--slot", "B", "--disk", disk, "--state-dir", st)
    assert r.returncode == 0 and "grub: GRUB could not load the kernel of slot B" in r.stdout, r.stdout + r.stderr
    assert "kept in: grubenv obelisk_loadfail" in r.stdout

    # 2. B on trial with A's content and a wrong root hash: the initramfs's own record, via the ESP.
    slots.mark_unbootable(disk, 4)
    a_off, a_len = slots.slot_extent(disk, 3)
    b_off, b_len = slots.slot_extent(disk, 4)
    with open(disk, "r+b") as f:
        f.seek(a_off)
        data = f.read(min(a_len, b_len))
        f.seek(b_off)
        f.write(data)
    wrong = "0" * 64
    loader.stage(disk, 4, root_hash=wrong, hash_offset=release.hash_offset, version="9.9.9")
    slots.stage_trial(disk, 4)
    run = qemu.power_on(disk, tmp_path / "boot2.log", boot_timeout=300, stop_when=good)
    log = (tmp_path / "boot2.log").read_text()
    assert run.boots[-1].good and run.boots[-1].slot == "A", f"{run.summary()}: see {tmp_path / 'boot2.log'}"
    assert run.boots[0].slot == "B" and run.boots[0].trial and run.boots[0].verity_failed
    assert "kept the ESP's record of slot B" in log
    assert not esp.has_file(disk, "EFI/obelisk/trial-B.txt")  # collected, so deleted
    st = _state(disk, tmp_path / "s2")
    rec = trial_record.read(st)
    assert rec is not None and (rec.slot, rec.version, rec.source) == ("B", "9.9.9", "initramfs"), rec
    assert rec.reason.startswith(f"verity: slot B (/dev/vda4) does not match root hash {wrong}"), rec.reason
    assert trial_record.reason_for(st, "9.9.9").startswith("trial of 9.9.9 on slot B failed: verity: ")
    j = json.loads(_cli("boot", "log", "--json", "--disk", disk, "--state-dir", st).stdout)
    assert [e["source"] for e in j["records"] if e["where"].endswith("boot-log")] == ["grub", "initramfs"]
    fell = json.loads(_cli("boot", "status", "--json", "--disk", disk, "--state-dir", st).stdout)["fallback"]
    assert fell["slot"] == "B" and fell["version"] == "9.9.9" and "does not match root hash" in fell["reason"]
    # Printed for the closing note: what an operator sees.
    print(_cli("boot", "log", "--disk", disk, "--state-dir", st).stdout)
