"""PXE boot of images/tiny.toml: QEMU direct kernel boot of the release's ``vmlinuz`` + ``initrd``.

No disk and no network card: the initrd carries ``/usr.img``, the command line carries the root hash
and hash offset from release.json, the way a PXE/iPXE server would pass them (docs/pxe.md). The
release comes from the real builder (``obelisk image build --format raw,pxe``); the boots are real
(Debian kernel under QEMU TCG). Each boot's time is printed past pytest's capture. The release
fixture and the boot helper live in pxeboot.py (shared with test_provision_pxe.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pxeboot import BOOTED, Release, pxe_boot
from testlib import say

from bootloader import initramfs


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
