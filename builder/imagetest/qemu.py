"""Run one power-on of a VM (OVMF + GRUB + the disk) and follow its serial console.

One :func:`power_on` is one QEMU process: the guest may reset itself any number of times (a
verity panic, a failed trial boot) and each reset shows up as a new :class:`Boot` in the same
run, the way a real machine comes back without anyone's help. The run ends when the guest
powers off, when ``stop_when`` says so, on a fatal marker (no bootable slot, a GRUB prompt), when
a boot takes longer than ``boot_timeout``, or when ``kill_on`` asks for a SIGKILL (power loss).
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from obelisk.errors import ObeliskError
from obelisk.tools import require

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

BOOTING = re.compile(r"OBELISK-GRUB: booting slot (\w) version=(\S*) trial=(\d)")
GOOD = "OBELISK-BOOT-GOOD"
HEALTH_FAIL = "OBELISK-HEALTH-FAIL"
VERITY_FAIL = re.compile(r"OBELISK-VERITY-FAIL|verity: .*(data|metadata) block \d+ is corrupted|dm-verity.*corrupt")
PANIC = "Kernel panic - not syncing"
VERSION = re.compile(r"obelisk-initramfs: booting .*version (\S+)")
USR_MOUNT = re.compile(r"OBELISK-USR: (\S+) /usr (\S+) (\S+)")
# Markers after which nothing good can follow in this power-on.
FATAL = ("OBELISK-GRUB-FAIL", "grub rescue>", "Press any key to continue", "emergency mode", "(initramfs)",
         "Give root password")


class VmError(ObeliskError, RuntimeError):
    pass


@dataclass
class Boot:
    """One pass from firmware to the end of a boot (power off, reset, kill)."""

    start: float
    slot: str = ""
    version: str = ""
    os_version: str = ""
    trial: bool = False
    good_at: float | None = None
    health_failed: bool = False
    verity_failed: bool = False
    panicked: bool = False
    usr_mount: tuple[str, str, str] | None = None
    end: float | None = None

    @property
    def good(self) -> bool:
        return self.good_at is not None

    @property
    def seconds(self) -> float:
        """Time from power-on/reset to marked good (or to the end of this boot)."""
        end = self.good_at if self.good_at is not None else self.end
        return (end or self.start) - self.start

    def describe(self) -> str:
        what = "good" if self.good else "verity-fail" if self.verity_failed else \
            "health-fail" if self.health_failed else "panic" if self.panicked else "no-good"
        trial = " trial" if self.trial else ""
        return f"{self.slot or '?'}{trial} {what} {self.seconds:.1f}s"


@dataclass
class Run:
    boots: list[Boot] = field(default_factory=list)
    end: str = ""  # poweroff | stopped | killed | timeout | fatal: ...
    log: Path | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        return ", ".join(b.describe() for b in self.boots) + f" [{self.end}]"


def prepare_vars(dest: Path) -> Path:
    shutil.copyfile(OVMF_VARS, dest)
    return dest


def qemu_argv(disk: Path, vars_fd: Path, *, extra_disks: list[Path] = (), memory_mib: int = 768, smp: int = 1,
              net: list[str] = ()) -> list[str]:
    """``net``: QEMU network arguments (default: no network at all)."""
    argv = [
        require("qemu-system-x86_64"), "-accel", "tcg", "-machine", "q35", "-m", str(memory_mib), "-smp", str(smp),
        "-nographic", *(net or ["-nic", "none"]), "-no-user-config", "-nodefaults", "-serial", "stdio",
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_fd}",
        "-drive", f"file={disk},format=raw,if=virtio,cache=writeback",
    ]
    for extra in extra_disks:
        argv += ["-drive", f"file={extra},format=raw,if=virtio,readonly=on"]
    return argv


def power_on(disk: Path, log: Path, *, vars_fd: Path | None = None, boot_timeout: float = 180.0,
             max_boots: int = 4, stop_when: Callable[[Boot, str], bool] | None = None,
             kill_on: Callable[[Boot, str], bool] | None = None, extra_disks: list[Path] = (),
             memory_mib: int = 768) -> Run:
    """Power the VM on once; see the module docstring for when it ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    vars_fd = vars_fd or prepare_vars(log.with_suffix(".vars.fd"))
    argv = qemu_argv(disk, vars_fd, extra_disks=list(extra_disks), memory_mib=memory_mib)
    run = Run(log=log)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    boot = Boot(start=0.0)
    run.boots.append(boot)
    deadline = t0 + boot_timeout

    def finish(end: str) -> None:
        run.end = end

    try:
        with open(log, "w", errors="replace") as out:
            while True:
                now = time.monotonic()
                if now > deadline:
                    finish(f"timeout: no end of boot {len(run.boots)} within {boot_timeout:.0f}s")
                    break
                events = sel.select(timeout=min(1.0, max(0.0, deadline - now)))
                chunk = b""
                if events:
                    try:
                        chunk = proc.stdout.read(65536) or b""
                    except BlockingIOError:
                        chunk = b""
                    if not chunk and proc.poll() is not None:
                        finish("poweroff" if run.boots and run.boots[-1].good else f"exit {proc.returncode}")
                        break
                elif proc.poll() is not None:
                    finish("poweroff" if run.boots[-1].good else f"exit {proc.returncode}")
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                stop = None
                for raw in lines:
                    t = time.monotonic() - t0
                    line = raw.decode(errors="replace").replace("\r", "")
                    # ANSI clutter from OVMF/GRUB hides markers at the start of a line.
                    clean = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line)
                    out.write(f"[{t:7.2f}] {clean}\n")
                    m = BOOTING.search(clean)
                    if m:
                        if boot.slot:  # a reset: the firmware came back and GRUB chose again
                            boot.end = t
                            boot = Boot(start=t)
                            run.boots.append(boot)
                            if len(run.boots) > max_boots:
                                stop = f"too many boots (> {max_boots})"
                                break
                        boot.slot, boot.version, boot.trial = m.group(1), m.group(2), m.group(3) == "1"
                        deadline = time.monotonic() + boot_timeout
                    if GOOD in clean:
                        boot.good_at = t
                    if HEALTH_FAIL in clean:
                        boot.health_failed = True
                    if VERITY_FAIL.search(clean):
                        boot.verity_failed = True
                    if PANIC in clean:
                        boot.panicked = True
                    vm = VERSION.search(clean)
                    if vm:
                        boot.os_version = vm.group(1)
                    um = USR_MOUNT.search(clean)
                    if um:
                        boot.usr_mount = (um.group(1), um.group(2), um.group(3))
                    if kill_on is not None and kill_on(boot, clean):
                        stop = "killed"
                        break
                    if stop_when is not None and stop_when(boot, clean):
                        stop = "stopped"
                        break
                    fatal = next((f for f in FATAL if f in clean), None)
                    if fatal:
                        stop = f"fatal: {clean.strip()[:160]}"
                        break
                if stop:
                    finish(stop)
                    break
                out.flush()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if run.end == "killed" else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sel.close()
        proc.stdout.close()
    run.seconds = time.monotonic() - t0
    boot.end = boot.end or run.seconds
    return run
