"""Records from before userspace: the initramfs's functions that leave and collect them, and `obelisk boot log`.

The shell functions are the initramfs's own (``bootloader/initramfs/functions.sh``), run by busybox sh
with only busybox's applets on PATH, as in the initramfs. The ESP they write to and the pstore they
read are folders here (a stand-in for the mounted FAT and ``/sys/fs/pstore``: the pstore filesystem
only holds what a firmware backend gave the kernel, which no test can make outside a VM); the
pstore dump's text is the kernel's format. `obelisk boot log` and `boot status` read a real disk image
(GPT + FAT ESP made with mkfs.fat/mcopy) and run as the real CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from bootdisks import make_esp_disk, obelisk
from testlib import REPO, need_tools

from bootloader import esp, grub, loader
from obelisk import trial_record

FUNCTIONS = REPO / "bootloader/initramfs/functions.sh"
pytestmark = pytest.mark.timeout(120)

PANIC = """Panic#1 Part1
<6>[   12.001] obelisk-initramfs: switching root: slot B, /usr from /dev/vda4 (verity), ROOT /dev/vda9
<3>[   14.210] device-mapper: verity: 254:0: data block 1234 is corrupted
<3>[   14.211] device-mapper: verity: 254:0: data block 1234 is corrupted
<0>[   14.212] Kernel panic - not syncing: dm-verity device corrupted
<4>[   14.213] CPU: 0 PID: 1 Comm: systemd Not tainted 6.1.0-57-amd64 #1  Debian 6.1.158-1
<4>[   14.214] Call Trace:
"""


@pytest.fixture(scope="module")
def bbpath(tmp_path_factory: pytest.TempPathFactory) -> str:
    need_tools("busybox")
    d = tmp_path_factory.mktemp("busybox-bin")
    bb = shutil.which("busybox")
    subprocess.run([bb, "--install", "-s", str(d)], check=True)
    return str(d)


def sh(bbpath: str, tmp: Path, script: str, *args: str | Path) -> str:
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    p = subprocess.run([f"{bbpath}/sh", "-c", f". {FUNCTIONS}; {script}", "sh", *map(str, args)],
                       env={"PATH": bbpath, "TMPDIR": str(run)}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    need_tools("mkfs.fat", "mcopy")
    return make_esp_disk(tmp_path)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    (tmp_path / "esp").mkdir()
    (tmp_path / "pstore").mkdir()
    return tmp_path / "esp", tmp_path / "pstore", tmp_path / "state"


def test_initramfs_failure_is_kept_on_root_by_the_next_boot(bbpath: str, tmp_path: Path, dirs, disk: Path) -> None:
    espdir, pdir, state = dirs
    why = "verity: slot B (/dev/vda4) does not match root hash ab12: data block 7 is corrupted"
    sh(bbpath, tmp_path, 'write_esp_record "$1" B 1.2.0 "$2"', espdir, why)
    assert (espdir / "EFI/obelisk/trial-B.txt").is_file()
    out = sh(bbpath, tmp_path, 'collect_records "$1" "$2" "$3" A ""', espdir, pdir, state)
    assert out.strip() == "kept the ESP's record of slot B"
    assert not (espdir / "EFI/obelisk/trial-B.txt").exists()  # a mailbox: taken once
    rec = trial_record.read(state)
    assert rec is not None and (rec.slot, rec.version, rec.source, rec.reason) == ("B", "1.2.0", "initramfs", why)
    assert trial_record.reason_for(state, "1.2.0") == f"trial of 1.2.0 on slot B failed: {why}"
    assert trial_record.history(state) == [rec]
    r = obelisk("boot", "status", "--disk", disk, "--state-dir", state)
    assert "last fallback: slot B (1.2.0) fell back at " in r.out and why in r.out
    # Nothing left: the next boot keeps nothing more, and creates nothing.
    assert sh(bbpath, tmp_path, 'collect_records "$1" "$2" "$3" A ""', espdir, pdir, state) == ""
    assert len(trial_record.history(state)) == 1
    empty = tmp_path / "empty-state"
    sh(bbpath, tmp_path, 'collect_records "$1" "$2" "$3" A ""', espdir, pdir, empty)
    assert not empty.exists()


def test_grub_mark_is_newest_and_a_bad_one_is_ignored(bbpath: str, tmp_path: Path, dirs) -> None:
    espdir, pdir, state = dirs
    sh(bbpath, tmp_path, 'write_esp_record "$1" B 1.1.0 "initramfs: USR partition PARTUUID=x did not appear"', espdir)
    for bad in ("$obelisk_fell", "B:linux", "C:linux:1", "B:linux:1.0;reboot", "B:linux:" + "9" * 65):
        assert "GRUB" not in sh(bbpath, tmp_path, 'collect_records "" "" "$1" A "$2"', state, bad)
    out = sh(bbpath, tmp_path, 'collect_records "$1" "$2" "$3" A "B:linux:1.2.0"', espdir, pdir, state)
    assert out.splitlines() == ["kept the ESP's record of slot B", "kept GRUB's mark: slot B did not load (linux)"]
    rec = trial_record.read(state)
    assert rec is not None and (rec.slot, rec.version, rec.source) == ("B", "1.2.0", "grub")
    assert rec.reason == "GRUB could not load the kernel of slot B; it booted slot A instead"
    assert [r.source for r in trial_record.history(state)] == ["initramfs", "grub"]


def test_panic_in_pstore_becomes_a_record_of_the_trial_slot(bbpath: str, tmp_path: Path, dirs) -> None:
    espdir, pdir, state = dirs
    sh(bbpath, tmp_path, 'note_trial_boot "$1" B 1.2.0', state)
    assert trial_record.reason_for(state, "1.2.0").startswith("no record of the trial: it reached userspace")
    (pdir / "dmesg-efi-170000000001001").write_text(PANIC)
    (pdir / "dmesg-efi-170000000002001.enc.z").write_bytes(b"\x78\x9c\x00\xff" * 10)
    out = sh(bbpath, tmp_path, 'collect_records "$1" "$2" "$3" A ""', espdir, pdir, state)
    assert out.strip() == "kept the kernel's pstore record"
    assert not list(pdir.iterdir())  # the firmware's space is given back
    rec = trial_record.read(state)
    assert rec is not None and (rec.slot, rec.version, rec.source) == ("B", "1.2.0", "pstore")
    assert rec.reason == ("kernel panic - not syncing: dm-verity device corrupted "
                          "(dm-verity: data block 1234 is corrupted)")
    assert "Call Trace:" in rec.detail and "compressed pstore record" in rec.detail
    assert trial_record.reason_for(state, "1.2.0") == f"trial of 1.2.0 on slot B failed: {rec.reason}"


def test_no_record_says_where_the_boot_stopped(tmp_path: Path) -> None:
    assert trial_record.reason_for(tmp_path, "1.2.0") == trial_record.NO_RECORD
    assert "never reached the initramfs" in trial_record.NO_RECORD


@pytest.mark.parametrize("content", [
    b"\x00\xff" * 60_000,
    b"time=99999999999999999\nslot=Z\x1b[2J\nversion=" + b"v" * 500 + b"\nsource=evil\nreason="
    + b"\x1b]0;x\x07y" * 800,
    b"reason=ok\n" + b"detail=" + b"d" * 100_000,
])
def test_hostile_records_stay_bounded_and_printable(bbpath: str, tmp_path: Path, dirs, disk: Path,
                                                    content: bytes) -> None:
    espdir, pdir, state = dirs
    (espdir / "EFI/obelisk").mkdir(parents=True)
    (espdir / "EFI/obelisk/trial-B.txt").write_bytes(content)
    (pdir / "dmesg-efi-1").write_bytes(content)
    sh(bbpath, tmp_path, 'collect_records "$1" "$2" "$3" A "B:initrd:1.0"', espdir, pdir, state)
    for name in (trial_record.NAME, trial_record.LOG):
        assert (state / name).stat().st_size <= 20_000
    for rec in trial_record.history(state):
        for text in (rec.reason, rec.detail, rec.slot, rec.version):
            assert text.isprintable() and len(text) <= trial_record.MAX_DETAIL
    # The same bytes straight on a disk's ESP, not collected: `boot log` and `boot status` read them safely.
    esp.copy_in(disk, "EFI/obelisk/trial-B.txt", content)
    for args in (("log",), ("log", "--json"), ("status",), ("status", "--json")):
        r = obelisk("boot", *args, "--disk", disk, "--state-dir", state)
        assert r.code == 0 and "Traceback" not in r.err, r.err
        assert all(line.isprintable() for line in r.out.splitlines())


def test_boot_log_is_bounded_after_many_records(bbpath: str, tmp_path: Path, dirs) -> None:
    _, _, state = dirs
    sh(bbpath, tmp_path, 'i=0; while [ $i -lt 300 ]; do collect_records "" "" "$1" A "B:linux:1.0.$i"; '
       'i=$((i+1)); done', state)
    assert (state / trial_record.LOG).stat().st_size < 16_500
    hist = trial_record.history(state)
    assert 20 < len(hist) <= trial_record.MAX_LOG_RECORDS and hist[-1].version == "1.0.299"


def test_boot_log_cli(bbpath: str, tmp_path: Path, dirs, disk: Path) -> None:
    espdir, pdir, state = dirs
    state.mkdir()
    r = obelisk("boot", "log", "--disk", disk, "--state-dir", state)
    assert r.code == 0 and r.out.strip() == "no boot records for any slot: no failed boot was recorded here"
    r = obelisk("boot", "log", "--slot", "B", "--disk", disk, "--state-dir", state)
    assert r.out.strip() == "no boot records for slot B: no failed boot was recorded here"
    # One record collected on ROOT, one the initramfs left on the ESP, and GRUB's mark in the grubenv.
    (state / trial_record.NAME).write_text("time=1796299200\nslot=B\nversion=1.2.0\nreason=health hook 50-app "
                                          "failed (exit 1): db down\n")
    esp.copy_in(disk, "EFI/obelisk/trial-A.txt", b"time=1796299300\nslot=A\nversion=1.1.0\nsource=initramfs\n"
                b"reason=initramfs: cannot mount ROOT (/dev/vda9)\n")
    env = loader.read_env(disk)
    assert env is not None
    env.loadfail = "B:initrd:1.2.0"
    esp.rewrite_file(disk, grub.ENV_PATH, grub.render_env(env.to_vars()))
    r = obelisk("boot", "log", "--disk", disk, "--state-dir", state)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == "3 boot records for any slot, oldest first:"
    assert lines[1] == ("2026-12-03 12:00:00 UTC  slot B (1.2.0)  health-check: health hook 50-app failed (exit 1): "
                        "db down")
    assert "slot A (1.1.0)  initramfs: initramfs: cannot mount ROOT (/dev/vda9)" in r.out
    assert "kept in: ESP /EFI/obelisk/trial-A.txt (not collected yet)" in r.out
    assert "grub: GRUB could not load the initrd of slot B" in r.out and "kept in: grubenv obelisk_loadfail" in r.out
    j = json.loads(obelisk("boot", "log", "--slot", "b", "--json", "--disk", disk, "--state-dir", state).out)
    assert j["slot"] == "B" and [e["source"] for e in j["records"]] == ["health-check", "grub"]
    assert j["records"][0]["where"].endswith("trial-failure")
    r = obelisk("boot", "log", "--slot", "C", "--disk", disk)
    assert r.code == 2 and r.err.startswith("error: ") and "Traceback" not in r.err
