"""The tiny PXE release and QEMU direct kernel boots of it, shared by the PXE tests.

`release` (session-scoped, exposed by tests/vm/conftest.py) builds ``images/tiny.toml`` once with
``--format raw,pxe`` through the real builder. `pxe_boot` boots a release's ``vmlinuz`` + ``initrd``
with no disk and no network card; `qemu_boot` boots any kernel and initrd with exactly the command
line given (what a PXE server hands out).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from testlib import OBELISK, REPO, need_tools

TINY = REPO / "images" / "tiny.toml"
BOOTED = "OBELISK-TINY-BOOTED"
# Lines after which the boot cannot succeed any more.
FAILED = ("OBELISK-VERITY-FAIL", "OBELISK-PXE-FAIL", "OBELISK-INITRAMFS-FAIL", "Kernel panic", "reboot: Restarting")


@dataclass
class Release:
    path: Path  # <out>/tiny/<version>
    root_hash: str
    hash_offset: int
    version: str

    @property
    def out(self) -> Path:
        """The folder holding <name>/<version>/ (what a provisioning server's --assets points at)."""
        return self.path.parent.parent


@dataclass
class Boot:
    log: str
    seconds: float
    exit: str  # booted | failed | timeout | exited


@pytest.fixture(scope="session")
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


def qemu_boot(kernel: Path, initrd: Path, append: str, log: Path, timeout: float = 300.0,
              extra: Sequence[str] = ()) -> Boot:
    """Boot kernel + initrd with exactly ``append`` and no disk or NIC (``extra``: more QEMU options);
    stop at the booted marker, a failure marker, QEMU's exit or the timeout."""
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-nic", "none",
            "-no-user-config", "-nodefaults", "-serial", "stdio", *extra, "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", append]
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


def pxe_boot(rel: Release, cmdline: str, log: Path, timeout: float = 300.0) -> Boot:
    """Boot a release's own vmlinuz + initrd with ``console=ttyS0 panic=1`` before ``cmdline``."""
    return qemu_boot(rel.path / "vmlinuz", rel.path / "initrd", f"console=ttyS0 panic=1 {cmdline}", log, timeout)
