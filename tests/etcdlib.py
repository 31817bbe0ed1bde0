"""Start throw-away etcd members on loopback (tests, `bench/fleet.py`, a lab on one machine).

Uses Debian's `etcd` binary (package etcd-server). Ports are picked by binding port 0; data dirs
are the caller's. Members can be killed with SIGKILL and restarted on the same data dir, which is
how the fault tests take quorum away and give it back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from obelisk.tools import require


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Tls:
    """Server cert/key for the members, the CA that signed the client certs (client-cert auth on)."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class Member:
    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    initial_cluster: str = ""
    token: str = "obelisk"  # the same for every member of one cluster
    tls: Tls | None = None
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.with_suffix(".log")

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, state: str = "new") -> None:
        argv = [
            require("etcd"), "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", state, "--initial-cluster-token", self.token,
            # Short timers: a lost leader is noticed and replaced in well under a second on loopback.
            "--heartbeat-interval", "50", "--election-timeout", "500",
        ]
        if self.tls:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed by the OS on exit
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)


class LocalEtcd:
    """One or more members on loopback. `with LocalEtcd(dir, 3) as etcd: etcd.endpoints`."""

    def __init__(self, base: Path, members: int = 1, *, tls: Tls | None = None,
                 client_cert: tuple[Path, Path] | None = None) -> None:
        self.base = Path(base)
        self.tls = tls
        self.client_cert = client_cert  # (cert, key) the health check presents when TLS is on
        self.base.mkdir(parents=True, exist_ok=True)
        self.members = [
            Member(f"m{i}", self.base / f"m{i}", free_port(), free_port(), tls=tls) for i in range(members)
        ]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster
            m.token = f"obelisk-{self.members[0].peer_port}"

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self, timeout: float = 30.0) -> LocalEtcd:
        for m in self.members:
            m.start()
        self.wait_healthy(timeout)
        return self

    def restart(self, member: Member, timeout: float = 30.0) -> None:
        member.start(state="existing")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for m in self.members:
                if not m.alive:
                    continue
                try:
                    kw = {}
                    if self.tls:
                        kw = {"verify": str(self.tls.ca),
                              "cert": tuple(map(str, self.client_cert)) if self.client_cert else None}
                    r = requests.get(m.url + "/health", timeout=1, **kw)
                    if r.ok and r.json().get("health") == "true":
                        return
                    last = r.text
                except requests.RequestException as exc:
                    last = str(exc)
            time.sleep(0.1)
        tails = "; ".join(f"{m.name}: {m.log_path.read_text()[-300:]!r}" for m in self.members if m.log_path.exists())
        raise RuntimeError(f"etcd did not become healthy in {timeout:.0f}s ({last}); logs: {tails}")

    def close(self) -> None:
        for m in self.members:
            m.kill()

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
