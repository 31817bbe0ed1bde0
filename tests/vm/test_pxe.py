"""PXE boot of images/tiny.toml: QEMU direct kernel boot of the release's ``vmlinuz`` + ``initrd``.

No disk and no network card: the initrd carries ``/usr.img``, the command line carries the root hash
and hash offset from release.json, the way a PXE/iPXE server would pass them (docs/pxe.md). The
release comes from the real builder (``obelisk image build --format raw,pxe``); the boots are real
(Debian kernel under QEMU TCG). Each boot's time is printed past pytest's capture.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from testlib import OBELISK, REPO, need_tools, say

from bootloader import initramfs

TINY = REPO / "images" / "tiny.toml"
BOOTED = "OBELISK-TINY-BOOTED"
# Lines after which the boot cannot succeed any more.
FAILED = ("OBELISK-VERITY-FAIL", "OBELISK-PXE-FAIL", "OBELISK-INITRAMFS-FAIL", "Kernel panic", "reboot: Restarting")


@dataclass
class Release:
    path: Path
    root_hash: str
    hash_offset: int
    version: str


@dataclass
class Boot:
    log: str
    seconds: float
    exit: str  # booted | failed | timeout | exited


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    need_tools("qemu-system-x86_64", "mksquashfs", "veritysetup", "mcopy", "grub-mkimage")
    out = tmp_path_factory.mktemp("pxe")
    cache = Path(os.environ.get("OBELISK_TEST_CACHE") or out / "cache")
    keydir = out / "key"
    subprocess.run([OBELISK, "key", "generate", str(keydir)], check=True, capture_output=True)
    res = subprocess.run([OBELISK, "image", "build", str(TINY), "--out", str(out / "rel"), "--format", "raw,pxe",
                          "--cache", str(cache), "--key", str(keydir / "obelisk.key")],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    rel = next((out / "rel").glob("*/*/release.json")).parent
    meta = json.loads((rel / "release.json").read_text())
    assert (rel / "vmlinuz").is_file() and (rel / "initrd").is_file()
    return Release(rel, meta["verity_root_hash"], int(meta["hash_offset"]), meta["version"])


def pxe_boot(rel: Release, cmdline: str, log: Path, timeout: float = 300.0) -> Boot:
    """Boot kernel + initrd with no disk; stop at the booted marker, a failure marker, exit or timeout."""
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-nic", "none",
            "-no-user-config", "-nodefaults", "-serial", "stdio", "-kernel", str(rel.path / "vmlinuz"),
            "-initrd", str(rel.path / "initrd"), "-append", f"console=ttyS0 panic=1 {cmdline}"]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    end = "timeout"
    try:
        while time.monotonic() - t0 < timeout:
            text = log.read_text(errors="replace")
            if BOOTED in text:
                # Let the boot check print its /usr line too.
                if "OBELISK-USR:" in text or time.monotonic() - t0 > timeout - 5:
                    end = "booted"
                    break
            elif any(f in text for f in FAILED):
                end = "failed"
                break
            if proc.poll() is not None:
                end = "exited"
                break
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        if end == "failed":
            # A few more lines (the reboot the init asks for) for the log; -no-reboot makes QEMU exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return Boot(log.read_text(errors="replace"), seconds, end)


@pytest.mark.vm
def test_pxe_boots_verified_usr_on_tmpfs_root(release: Release, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    log = tmp_path / "pxe.log"
    boot = pxe_boot(release, f"obelisk.usrhash={release.root_hash} obelisk.usrhashoffset={release.hash_offset}", log)
    say(pytestconfig, f"PXE boot of tiny {release.version}: {boot.exit} in {boot.seconds:.1f}s (log {log})")
    assert boot.exit == "booted", f"{boot.exit}; see {log}"
    lines = boot.log.splitlines()
    # The init attached /usr.img to a loop device and verity checked it against the root hash.
    assert any("OBELISK-PXE-USR: /dev/loop" in ln and "verity=verified" in ln for ln in lines), log
    assert f"booting obelisk tiny (busybox) version {release.version} from PXE" in boot.log
    assert "ROOT tmpfs" in boot.log
    # The running system: the version from os-release, /usr read-only from the verity device.
    assert f"{BOOTED} version={release.version}" in boot.log
    usr = next(ln for ln in lines if ln.startswith("OBELISK-USR:")).split()
    assert usr[1:4] == ["/dev/mapper/usr", "/usr", "squashfs"], usr
    assert "ro" in usr[4].split(","), usr
    assert "OBELISK-VERITY-FAIL" not in boot.log and "Kernel panic" not in boot.log


@pytest.mark.vm
def test_pxe_wrong_root_hash_refuses(release: Release, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    log = tmp_path / "pxe-bad.log"
    wrong = ("0" if release.root_hash[0] != "0" else "1") + release.root_hash[1:]
    boot = pxe_boot(release, f"obelisk.usrhash={wrong} obelisk.usrhashoffset={release.hash_offset}", log)
    say(pytestconfig, f"PXE boot with a wrong root hash: {boot.exit} in {boot.seconds:.1f}s")
    assert boot.exit == "failed", f"{boot.exit}; see {log}"
    assert f"OBELISK-VERITY-FAIL: PXE /usr.img does not match root hash {wrong}" in boot.log
    assert "is corrupted" in boot.log  # the kernel's dm-verity said so, not only our script
    assert BOOTED not in boot.log and "switching root" not in boot.log


@pytest.mark.vm
def test_pxe_without_root_hash_refuses(release: Release, tmp_path: Path) -> None:
    log = tmp_path / "pxe-nohash.log"
    boot = pxe_boot(release, "", log)
    assert boot.exit == "failed", f"{boot.exit}; see {log}"
    assert "OBELISK-PXE-FAIL: kernel command line lacks obelisk.usrhash=" in boot.log
    assert BOOTED not in boot.log and "device-mapper: verity" not in boot.log


def test_initramfs_has_loop_for_pxe() -> None:
    """loop is loaded when the kernel has it, but a disk boot does not depend on it."""
    assert "loop" in initramfs.MODULES and "loop" in initramfs.OPTIONAL
    res = subprocess.run(["sh", "-n", str(initramfs.DATA / "init")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
