"""A disk made by `obelisk install` boots: the tiny release installed onto a real loop device larger
than the image, then QEMU (TCG, OVMF, no network) powered on from that block device, followed to the
boot check's mark-good by builder.imagetest.qemu. First boot grows ROOT to the disk's end, which
only works when the install put the backup GPT at the real end of the disk.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pxeboot import Release
from testlib import OBELISK, need_tools

from bootloader import gpt
from builder.imagetest import qemu

MIB = 1024 * 1024


@pytest.mark.timeout(900)
def test_installed_loop_device_boots_and_grows_root(release: Release, tmp_path: Path) -> None:
    need_tools("qemu-system-x86_64", "losetup")
    pub = release.path.parents[2] / "key" / "obelisk.pub"  # pxeboot.release keeps its test key beside rel/
    backing = tmp_path / "disk"
    with open(backing, "wb") as f:
        f.truncate((release.path / "disk.raw").stat().st_size + 96 * MIB)
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"loop devices do not work here: {made.stderr.strip()}")
    dev = Path(made.stdout.strip())
    try:
        proc = subprocess.run([OBELISK, "install", str(release.path), "--disk", str(dev), "--key", str(pub)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        run = qemu.power_on(dev, tmp_path / "boot.log", boot_timeout=300, stop_when=lambda b, _line: b.good)
        assert run.boots and run.boots[0].good, f"{run.summary()}: see {tmp_path / 'boot.log'}"
        assert run.boots[0].slot == "A" and run.boots[0].os_version == release.version
        table = gpt.read_table(dev)
        root = table.partition(9)
        assert not table.problems and table.backup_lba == table.disk_lbas - 1
        assert root is not None and root.last_lba >= table.last_usable_lba - 2048, "ROOT was not grown to the end"
    finally:
        subprocess.run(["losetup", "-d", str(dev)], capture_output=True, timeout=30)
