"""The status socket on its own: commands, bad input, peers, modes. The backend is the test's own object
(the protocol the daemon implements), the socket and its client are real."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from update_engine.status_socket import StatusServer, ask


class Backend:
    def __init__(self) -> None:
        self.checks = 0

    def status(self) -> dict:
        return {"state": "IDLE", "checks": self.checks}

    def request_check(self) -> None:
        self.checks += 1


@pytest.fixture
def server(tmp_path: Path):
    b = Backend()
    path = tmp_path / "run" / "obelisk" / "update.sock"
    srv = StatusServer(path, b)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield path, b
    srv.shutdown()
    srv.server_close()


@pytest.mark.timeout(30)
def test_commands(server) -> None:
    path, b = server
    assert ask(path, "status") == {"state": "IDLE", "checks": 0}
    assert ask(path, "check") == {"ok": True, "state": "IDLE", "checks": 1}
    assert "unknown command" in ask(path, "explode")["error"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755


@pytest.mark.timeout(30)
def test_garbage_lines_and_answers(server, tmp_path: Path) -> None:
    path, _ = server
    for line in (b"not json\n", b"[1, 2]\n", b"\xff\xfe\n", b"x" * 10000 + b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(line)
            out = json.loads(s.makefile("rb").readline())
        assert "error" in out
    # A peer that answers something that is not JSON: one error, not a traceback.
    fake = tmp_path / "fake.sock"
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(str(fake))
    ls.listen(1)

    def answer() -> None:
        c, _ = ls.accept()
        c.recv(100)
        c.sendall(b"<html>\n")
        c.close()
    threading.Thread(target=answer, daemon=True).start()
    assert "not JSON" in ask(fake, "status")["error"]
    ls.close()
    with pytest.raises(OSError):
        ask(tmp_path / "nobody.sock", "status")
