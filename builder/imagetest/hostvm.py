"""A VM that keeps running while a scenario talks to it: QEMU with user networking that reaches
nothing (``restrict=on``) but the ports forwarded to it from 127.0.0.1, its serial console
followed in a thread, and the real OpenSSH client to log in.

Unlike :func:`qemu.power_on` (one power-on, followed to its end), a :class:`GuestVm` is started,
used (``wait_for``, ``ssh``), and then powered off or killed; it is always killed on exit of its
``with`` block, so a failing scenario leaves no QEMU behind.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.imagetest import qemu
from obelisk.errors import ObeliskError
from obelisk.tools import require

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class GuestError(ObeliskError, AssertionError):
    """The guest did not do what the scenario waited for; the message says what and where its log is."""


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a process the test started, SIGKILL it after ``grace`` seconds, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def user_net(forwards: dict[int, int], mac: str) -> list[str]:
    """QEMU user networking: DHCP from QEMU itself, no route anywhere (restrict=on), and each guest port
    forwarded from a port on the host's loopback only."""
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in forwards.items())
    return ["-netdev", f"user,id=n0,restrict=on{fwd}", "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]


@dataclass
class GuestVm:
    disk: Path
    log: Path
    key: Path  # private SSH key whose public half cloud-config gave to core
    guest_ports: tuple[int, ...] = (22,)
    extra_disks: list[Path] = field(default_factory=list)
    mac: str = "52:54:00:12:34:56"
    memory_mib: int = 1536
    ports: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    # On a private network instead (netns.PrivateNet): QEMU's -netdev arguments, the prefix that runs a
    # command inside that network, and the guest's address there (its ports are then its own).
    net: list[str] | None = None
    wrap: list[str] = field(default_factory=list)
    address: str = "127.0.0.1"
    lines: list[tuple[float, str]] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    t0: float = 0.0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    def __enter__(self) -> GuestVm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def start(self) -> None:
        if self.net is None:
            self.ports = dict(zip(self.guest_ports, free_ports(len(self.guest_ports)), strict=True))
            net = user_net(self.ports, self.mac)
        else:
            self.ports = {p: p for p in self.guest_ports}
            net = self.net
        vars_fd = qemu.prepare_vars(self.log.with_suffix(".vars.fd"))
        argv = [*self.wrap, *qemu.qemu_argv(self.disk, vars_fd, extra_disks=self.extra_disks,
                                            memory_mib=self.memory_mib, net=net)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log, "w", errors="replace") as out:
            for raw in self.proc.stdout:
                line = ANSI.sub("", raw.decode(errors="replace").replace("\r", "")).rstrip("\n")
                t = time.monotonic() - self.t0
                out.write(f"[{t:7.2f}] {line}\n")
                out.flush()
                with self._cond:
                    self.lines.append((t, line))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def wait_for(self, pattern: str, timeout: float, *, after: int = 0) -> tuple[int, str]:
        """(index, line) of the first console line from ``after`` on matching ``pattern``; a fatal boot
        marker or the end of QEMU fails at once, the deadline fails with the last lines."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.lines):
                    line = self.lines[i][1]
                    if rx.search(line):
                        return i, line
                    fatal = next((f for f in qemu.FATAL if f in line), None)
                    if fatal:
                        raise GuestError(f"the guest hit {fatal!r} while waiting for {pattern!r}: {line.strip()[:200]} "
                                         f"(log {self.log})")
                    i += 1
                if self.proc is not None and self.proc.poll() is not None:
                    raise GuestError(f"QEMU exited ({self.proc.returncode}) while waiting for {pattern!r} "
                                     f"(log {self.log})")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = " | ".join(ln for _, ln in self.lines[-5:])[-400:]
                    raise GuestError(f"no {pattern!r} on the console within {timeout:.0f}s; last lines: {tail} "
                                     f"(log {self.log})")
                self._cond.wait(timeout=min(left, 1.0))

    def ssh_argv(self, user: str = "core", *opts: str, log_level: str = "ERROR") -> list[str]:
        kh = self.log.parent / "known_hosts"
        return [*self.wrap, require("ssh"), "-p", str(self.ports[22]), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={kh}",
                "-o", "ConnectTimeout=15", "-o", f"LogLevel={log_level}", *opts, f"{user}@{self.address}"]

    def ssh(self, command: str, *, user: str = "core", timeout: float = 120.0, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on the guest over SSH (as ``user``, key login); with ``check`` a failure raises."""
        try:
            res = subprocess.run([*self.ssh_argv(user), command], capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise GuestError(f"ssh {command!r} took longer than {timeout:.0f}s (log {self.log})") from None
        if check and res.returncode != 0:
            raise GuestError(f"ssh {command!r} exited {res.returncode}: {(res.stderr or res.stdout).strip()[-400:]}")
        return res

    def wait_ssh(self, timeout: float) -> float:
        """Seconds until a key login as core works."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise GuestError(f"QEMU exited ({self.proc.returncode}) before SSH answered (log {self.log})")
            res = self.ssh("true", check=False, timeout=30)
            if res.returncode == 0:
                return self.seconds()
            last = (res.stderr or res.stdout).strip()[-200:]
            time.sleep(2)
        raise GuestError(f"no SSH login as core within {timeout:.0f}s: {last} (log {self.log})")

    def host_key(self) -> str:
        """The guest's ed25519 host key, as ssh-keyscan sees it on the forwarded port."""
        res = subprocess.run([*self.wrap, require("ssh-keyscan"), "-t", "ed25519", "-p", str(self.ports[22]),
                              self.address],
                             capture_output=True, text=True, timeout=60)
        keys = [ln.split(None, 1)[1] for ln in res.stdout.splitlines() if ln and not ln.startswith("#")]
        if not keys:
            raise GuestError(f"ssh-keyscan found no ed25519 host key: {res.stderr.strip()[-200:]}")
        return keys[0]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=10)

    def power_off(self, timeout: float = 120.0) -> None:
        """A clean shutdown from inside (so ROOT is unmounted cleanly), then wait for QEMU to exit."""
        self.ssh("sudo systemctl poweroff", check=False, timeout=30)
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"the guest did not power off within {timeout:.0f}s (log {self.log})") from None
