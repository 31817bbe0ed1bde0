"""A private network for a VM scenario: a network namespace of its own holding a bridge and one tap per VM.

Nothing links it to anything outside: no veth, no uplink, no route but the bridge's own subnet (checked
after set-up). Every address of the run lives inside it; whatever the test runs on the network (the
update server, QEMU, ssh, etcdctl) runs inside it through :meth:`PrivateNet.argv`. The namespace, and
with it every tap and the bridge, is deleted on exit of the ``with`` block, also when the run fails;
processes started in it are stopped first, by their PID.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from builder.imagetest.hostvm import stop_process
from obelisk.errors import ObeliskError
from obelisk.tools import require, run

SUBNET = ipaddress.ip_network("10.77.0.0/24")


class NetnsError(ObeliskError, RuntimeError):
    """The private network could not be made (not root, no `ip netns`), or is not private."""


@dataclass
class PrivateNet:
    subnet: ipaddress.IPv4Network = SUBNET
    name: str = field(default_factory=lambda: f"obelisk-{os.getpid()}-{secrets.token_hex(3)}")
    bridge: str = "obr0"
    taps: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def host_address(self) -> str:
        """The bridge's address: where the test's servers listen inside the namespace."""
        return str(self.subnet.network_address + 1)

    def address(self, n: int) -> str:
        """The address of VM ``n`` (1-based)."""
        return str(self.subnet.network_address + 10 + n)

    def argv(self, argv: list[str | Path]) -> list[str]:
        """``argv`` run inside the namespace."""
        return [require("ip"), "netns", "exec", self.name, *map(str, argv)]

    def _ip(self, *args: str) -> None:
        run([require("ip"), "-n", self.name, *args], timeout=30)

    def __enter__(self) -> PrivateNet:
        if os.geteuid() != 0:
            raise NetnsError("a private network for the VMs needs root (ip netns, taps): run the test as root")
        run([require("ip"), "netns", "add", self.name], timeout=30)
        try:
            self._ip("link", "set", "lo", "up")
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._ip("addr", "add", f"{self.host_address}/{self.subnet.prefixlen}", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            self.check_private()
        except BaseException:
            self.close()
            raise
        return self

    def tap(self, n: int) -> str:
        """A tap on the bridge for VM ``n``; QEMU opens it by name from inside the namespace."""
        name = f"otap{n}"
        self._ip("tuntap", "add", "dev", name, "mode", "tap")
        self._ip("link", "set", name, "master", self.bridge, "up")
        self.taps.append(name)
        return name

    def check_private(self) -> None:
        """Only lo, the bridge and its taps; routes only to the bridge's own subnet."""
        links = run([require("ip"), "-n", self.name, "-o", "link", "show"], timeout=30).stdout
        names = {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if ln.strip()}
        extra = names - {"lo", self.bridge, *self.taps}
        routes = run([require("ip"), "-n", self.name, "-4", "route", "show"], timeout=30).stdout
        outside = [r for r in routes.splitlines() if r.strip() and not r.startswith(str(self.subnet))]
        if extra or outside:
            raise NetnsError(f"namespace {self.name} is not private: links {sorted(extra)}, routes {outside}")

    def dhcp(self, leases: dict[str, str], folder: Path) -> subprocess.Popen:
        """A DHCP server on the bridge (busybox udhcpd) giving each MAC its fixed address, as a cloud's
        network does; no router and no DNS server are offered."""
        conf = folder / "udhcpd.conf"
        first = self.subnet.network_address + 100
        conf.write_text("\n".join([
            f"start {first}", f"end {first + 50}", f"interface {self.bridge}",
            f"lease_file {folder / 'udhcpd.leases'}", f"pidfile {folder / 'udhcpd.pid'}",
            f"option subnet {self.subnet.netmask}", "option lease 86400",
            *(f"static_lease {mac} {ip}" for mac, ip in leases.items()), ""]))
        (folder / "udhcpd.leases").touch()
        return self.start([require("busybox"), "udhcpd", "-f", conf], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)

    def start(self, argv: list[str | Path], **kw: object) -> subprocess.Popen:
        """Start a process inside the namespace; it is stopped (by PID) when the network goes."""
        proc = subprocess.Popen(self.argv(argv), **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        # Deleting the namespace takes the bridge and every tap with it.
        subprocess.run([require("ip"), "netns", "del", self.name], capture_output=True, timeout=30)

    def __exit__(self, *exc: object) -> None:
        self.close()
