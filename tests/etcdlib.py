"""Real etcd members on loopback, for the tests and `bench/fleet.py` (a lab on one machine).

Uses Debian's `etcd` binary (package etcd-server). Ports come from ports.free_port (never one port
twice in a process); data dirs are the caller's. `start()` returns only once every member answers
/health and the member list shows every member started, and starts the cluster afresh on new
ports when a member could not bind its port (another process took it in between). Members can be
killed with SIGKILL and restarted on the same data dir, which is how the fault tests take quorum
away and give it back.

Kept free of pytest and of the other test helpers: bench/fleet.py imports it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from ports import free_port

from obelisk.tools import require

__all__ = ["EtcdStartError", "LocalEtcd", "Member", "Tls", "free_port"]

CLASH = "address already in use"


class EtcdStartError(RuntimeError):
    """The cluster did not become healthy; `clash` when a member could not bind its port."""

    def __init__(self, message: str, *, clash: bool = False) -> None:
        super().__init__(message)
        self.clash = clash


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
    max_request_bytes: int | None = None
    proc: subprocess.Popen | None = None
    killed: bool = False  # stopped on purpose (kill()), not died
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
        if self.max_request_bytes:
            argv += ["--max-request-bytes", str(self.max_request_bytes)]
        if self.tls:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        self.killed = False
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed by the OS on exit
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        self.killed = True
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    @property
    def died(self) -> bool:
        """Exited by itself after start() (a bad flag, a port someone else holds)."""
        return bool(self.proc and not self.killed and self.proc.poll() is not None)

    def log_tail(self, n: int = 400) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class LocalEtcd:
    """One or more members on loopback. `with LocalEtcd(dir, 3) as etcd: etcd.endpoints`."""

    def __init__(self, base: Path, members: int = 1, *, tls: Tls | None = None,
                 client_cert: tuple[Path, Path] | None = None, max_request_bytes: int | None = None) -> None:
        self.base = Path(base)
        self.size = members
        self.tls = tls
        self.client_cert = client_cert  # (cert, key) the health check presents when TLS is on
        self.max_request_bytes = max_request_bytes
        self.base.mkdir(parents=True, exist_ok=True)
        self.clashes = 0  # starts that were retried because a port was taken (tests report it)
        self.members: list[Member] = []
        self._plan()

    def _plan(self) -> None:
        """Fresh ports and empty data dirs for every member."""
        for m in self.members:  # a failed attempt: its logs kept aside (m0.log.try1, ...), its data thrown away
            shutil.rmtree(m.data_dir, ignore_errors=True)
            if m.log_path.exists():
                m.log_path.replace(m.log_path.with_suffix(f".log.try{self.clashes}"))
        self.members = [
            Member(f"m{i}", self.base / f"m{i}", free_port(), free_port(), tls=self.tls,
                   max_request_bytes=self.max_request_bytes)
            for i in range(self.size)
        ]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster
            m.token = f"obelisk-{self.members[0].peer_port}"

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self, timeout: float = 30.0, attempts: int = 3) -> LocalEtcd:
        """Start every member and wait until all are healthy; a start that failed on a port clash
        is retried on new ports (up to `attempts` in all). Raises EtcdStartError."""
        for attempt in range(1, attempts + 1):
            for m in self.members:
                m.start()
            try:
                self.wait_healthy(timeout)
                return self
            except EtcdStartError as exc:
                self.close()
                if not exc.clash or attempt == attempts:
                    raise
                self.clashes += 1
                self._plan()
        raise AssertionError("unreachable")

    def restart(self, member: Member, timeout: float = 30.0) -> None:
        member.start(state="existing")
        self.wait_healthy(timeout)

    def _get(self, m: Member, path: str, body: dict | None = None) -> requests.Response:
        kw: dict = {"timeout": 2}
        if self.tls:
            kw["verify"] = str(self.tls.ca)
            kw["cert"] = tuple(map(str, self.client_cert)) if self.client_cert else None
        if body is None:
            return requests.get(m.url + path, **kw)
        return requests.post(m.url + path, json=body, **kw)

    def _problem(self, live: list[Member]) -> str | None:
        """Why the cluster is not ready yet (None when it is): every live member healthy, and the
        member list shows all members of the cluster started."""
        for m in live:
            r = self._get(m, "/health")
            if not (r.ok and r.json().get("health") == "true"):
                return f"{m.name} /health: {r.status_code} {r.text.strip()[:120]}"
        listed = self._get(live[0], "/v3/cluster/member/list", {}).json().get("members") or []
        started = sorted(x.get("name") for x in listed if x.get("name") and x.get("clientURLs"))
        want = sorted(m.name for m in self.members)
        if started != want:
            return f"member list shows {started or 'none'} started, want {want}"
        return None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member is healthy and listed as started (members killed on purpose
        are skipped, but at least one must run); raises EtcdStartError at the deadline, or at once
        when a member exits by itself (clash=True when its port was taken)."""
        deadline = time.monotonic() + timeout
        last = "no member running"
        while True:
            for m in self.members:
                if m.died:
                    clash = CLASH in m.log_tail(4000)
                    why = "could not bind its port" if clash else f"exited with status {m.proc.returncode}"
                    raise EtcdStartError(f"etcd {m.name} {why}: {m.log_tail(300)!r}", clash=clash)
            live = [m for m in self.members if m.alive]
            if live:
                try:
                    problem = self._problem(live)
                except (requests.RequestException, ValueError) as exc:
                    problem = f"{exc.__class__.__name__}: {str(exc)[:160]}"
                if problem is None:
                    return
                last = problem
            if time.monotonic() > deadline:
                tails = "; ".join(f"{m.name}: {m.log_tail(300)!r}" for m in self.members)
                raise EtcdStartError(f"etcd did not become healthy in {timeout:.0f}s ({last}); logs: {tails}")
            time.sleep(0.05)

    def close(self) -> None:
        for m in self.members:
            m.kill()

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
