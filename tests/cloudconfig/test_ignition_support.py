"""Shared pieces of the Ignition tests: a loopback HTTP server, config builders, a tree digest.

(Named test_ignition_* so it sits with the Ignition tests; it holds no tests itself.)
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudconfig_helpers import make_root

from cloudconfig.ignition import MARKER

HERE = Path(__file__).parent
CORPUS = HERE / "ignition_corpus"
FILES = CORPUS / "files"


def data_url(data: bytes | str, b64: bool = False) -> str:
    raw = data.encode() if isinstance(data, str) else data
    if b64:
        return "data:;base64," + base64.b64encode(raw).decode()
    return "data:," + urllib.parse.quote(raw, safe="")


def sha512(data: bytes) -> str:
    return "sha512-" + hashlib.sha512(data).hexdigest()


def sha256(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


def ign(version: str = "3.4.0", **sections: Any) -> bytes:
    return json.dumps({"ignition": {"version": version}, **sections}).encode()


def fresh_root(tmp: Path, name: str = "root") -> Path:
    return make_root(tmp / name)


def tree(root: Path, *, skip_marker: bool = True) -> dict[str, tuple[str, int, int, int, bytes | str]]:
    """Every path under root: (type, mode, uid, gid, contents or link target); the result file left out
    when ``skip_marker`` (it records the config's hash and the date)."""
    out: dict[str, tuple[str, int, int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = "/" + p.relative_to(root).as_posix()
            if skip_marker and rel == MARKER:
                continue
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", 0, st.st_uid, st.st_gid, os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, st.st_uid, st.st_gid, "")
            else:
                data = p.read_bytes()
                if rel == "/etc/shadow":  # the last-change day is today's
                    data = b"\n".join(b":".join(f[:2] + f[3:]) for f in (ln.split(b":") for ln in data.splitlines()))
                out[rel] = ("file", st.st_mode & 0o7777, st.st_uid, st.st_gid, data)
    return out


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the response headers
    redirect: str | None = None
    length: bool = True  # send Content-Length (else the body ends when the connection closes)
    hits: int = 0
    seen_headers: list[dict[str, str]] = field(default_factory=list)


class Server:
    """A real HTTP server on 127.0.0.1 (port 0) serving ``routes``; ``url(path)`` gives its address."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                r = routes.get(self.path)
                if r is None:
                    self.send_error(404)
                    return
                r.hits += 1
                r.seen_headers.append(dict(self.headers))
                if r.delay:
                    time.sleep(r.delay)
                if r.redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", r.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(r.status)
                for k, v in r.headers.items():
                    self.send_header(k, v)
                if r.length and "Content-Length" not in r.headers:
                    self.send_header("Content-Length", str(len(r.body)))
                self.end_headers()
                with suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(r.body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def add(self, path: str, body: bytes = b"", **kw: Any) -> str:
        self.routes[path] = Route(body, **kw)
        return self.url(path)


@contextmanager
def serving() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join(timeout=5)
