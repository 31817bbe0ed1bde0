"""The daemon's status socket: `obelisk update status|check|watch` talk to it as one JSON line each way.

A Unix socket, mode 0600 in a 0755 folder (modes set explicitly, whatever the umask), and every peer
checked by SO_PEERCRED: only root (or the daemon's own user) may talk. Commands: ``status`` (the
``status --json`` view) and ``check`` (ask for a check now).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import struct
import time
from pathlib import Path
from typing import Protocol

from update_engine import adaptive
from update_engine.state import ensure_dir

SOCKET_DIR_MODE = 0o755
SOCKET_MODE = 0o600
MAX_LINE = 4096


class Backend(Protocol):
    def status(self) -> dict: ...
    def request_check(self) -> None: ...


class StatusServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, backend: Backend) -> None:
        self.backend = backend
        self.started = time.monotonic()
        ensure_dir(path.parent, SOCKET_DIR_MODE)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)  # the socket is born 0600: no moment in which others could connect
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            self.wfile.write(b'{"error": "permission denied: root only"}\n')
            return
        line = self.rfile.readline(MAX_LINE)
        try:
            cmd = json.loads(line or b"{}").get("cmd", "status")
        except (ValueError, AttributeError):
            cmd = "?"
        backend: Backend = self.server.backend  # type: ignore[attr-defined]
        if cmd == "status":
            out = backend.status()
            # Bytes reused / fetched / saved by the last apply since this server started (docs/adaptive.md).
            figures = adaptive.current(self.server.started)  # type: ignore[attr-defined]
            if figures:
                out = {**out, "transfer": figures}
        elif cmd == "check":
            backend.request_check()
            out = {"ok": True, **backend.status()}
        else:
            out = {"error": f"unknown command {str(cmd)[:40]!r}"}
        self.wfile.write(json.dumps(out).encode() + b"\n")


def ask(socket_path: Path, cmd: str, timeout: float = 5.0, max_bytes: int = 1 << 20) -> dict:
    """Client side of the status socket; OSError when no daemon listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < max_bytes:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        out = json.loads(data or b"{}")
    except ValueError:
        return {"error": f"the daemon at {socket_path} answered something that is not JSON"}
    return out if isinstance(out, dict) else {"error": f"the daemon at {socket_path} answered {type(out).__name__}"}
