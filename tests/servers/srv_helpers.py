"""Start the real `obelisk update serve` / `obelisk lock serve` on a free loopback port, send them
hostile bodies over a raw socket, and read a server's peak resident memory from /proc."""

from __future__ import annotations

import hashlib
import json
import select
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from ports import free_port
from testlib import OBELISK, stop_process

from update_engine import omaha

APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start(argv: list[str], port: int, log: Path, *, probe: str = "/health", host: str = "127.0.0.1") -> Served:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(url + probe, timeout=1)
            return Served(url, port, proc, log)
        except requests.RequestException:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"server exited {proc.returncode}: {tail}") from None
            time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"server did not come up: {log.read_text(errors='replace')[-2000:]}")


def make_release(root: Path, version: str = "1.1.0", app_id: str = APP_ID) -> Path:
    """A release folder as `obelisk image build` publishes it, as far as the update server reads it."""
    d = root / "tiny" / version
    d.mkdir(parents=True)
    payload = b"payload " + version.encode() * 100
    (d / "update.payload").write_bytes(payload)
    (d / "release.json").write_text(json.dumps({
        "name": "tiny", "version": version, "app_id": app_id, "arch": "amd64",
        "artifacts": {"update.payload": {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}}))
    return d


def token_file(folder: Path, token: str = ADMIN_TOKEN) -> Path:
    f = folder / "admin.token"
    f.write_text(token + "\n")
    f.chmod(0o600)
    return f


def start_update_server(base: Path, *extra: str) -> Served:
    releases = base / "releases"
    if not releases.exists():
        make_release(releases)
    port = free_port()
    s = start([OBELISK, "update", "serve", str(releases), "--listen", f"127.0.0.1:{port}", *extra], port,
              base / f"update-serve-{port}.log")
    s.extra["releases"] = releases
    return s


def start_lock_server(base: Path, etcd: str, *extra: str) -> Served:
    port = free_port()
    return start([OBELISK, "lock", "serve", "--etcd", etcd, "--listen", f"127.0.0.1:{port}", *extra], port,
                 base / f"lock-serve-{port}.log", probe="/nothing")


def omaha_request(*, app_id: str = APP_ID, machineid: str = "m-1", version: str = "1.0.0", events: int = 1,
                  updatecheck: bool = False, **app: str) -> bytes:
    evs = [omaha.Event(3, 2, None, "0.0.0.0") for _ in range(events)]
    return omaha.build_request(omaha.Request(app=omaha.AppRequest(
        appid=app_id, version=version, track="stable", machineid=machineid, updatecheck=updatecheck,
        events=evs, **app)))


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


@dataclass
class Hostile:
    sent: int  # body bytes the server let us send before it answered or closed
    status: int | None  # the answer's status, None when the connection was reset before one arrived
    body: bytes
    seconds: float


def hostile_post(port: int, path: str, total: int, *, chunked: bool, headers: dict[str, str] | None = None,
                 deadline: float = 60.0) -> Hostile:
    """POST `total` bytes of 'A' (declared with Content-Length, or as 1 MiB chunks), stopping as soon as
    the server answers or drops the connection, then read whatever answer came."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/octet-stream"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    piece = b"A" * (1 << 20)
    frame = b"%x\r\n" % len(piece) + piece + b"\r\n" if chunked else piece
    t0 = time.monotonic()
    sent = 0
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(5)  # a server that stops reading without answering makes sendall time out
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            while sent < total and time.monotonic() - t0 < deadline:
                if select.select([s], [], [], 0)[0]:
                    break  # an answer (or a close) before the body ended: the server gave up on it
                s.sendall(frame)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        try:
            while len(reply) < _expected(reply):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    seconds = time.monotonic() - t0
    if not reply.startswith(b"HTTP/1.1 "):
        return Hostile(sent, None, b"", seconds)
    head_b, _, body = reply.partition(b"\r\n\r\n")
    return Hostile(sent, int(head_b.split()[1]), body, seconds)


def _expected(reply: bytes) -> int:
    """Bytes of a whole answer once its head is in (Content-Length), else one more than we have."""
    head, sep, _ = reply.partition(b"\r\n\r\n")
    if not sep:
        return len(reply) + 1
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(reply)
