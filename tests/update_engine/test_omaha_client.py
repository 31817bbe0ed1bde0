"""The daemon's Omaha exchange against hostile servers on loopback: drips, endless bodies, huge announced
lengths, redirect loops and redirects to other hosts. The servers are raw sockets (ue_helpers.RawServer) so
they can break HTTP on purpose; the client is the real one."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ue_helpers import APPID, RawServer

from update_engine import omaha
from update_engine.omaha import OmahaError
from update_engine.omaha_client import Exchange, HostInfo, Limits, OmahaClient

HOST = HostInfo(APPID, "1.0.0", "stable", "ab" * 16, "{boot}", "amd64-usr", "1.0.0", "1.0.0_x86_64")
NOUPDATE = omaha.build_response(APPID)


def _answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n").encode() + body


def _drip_body(conn, request, stop) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    while not stop.wait(1.0):
        conn.sendall(b"<")


def _drip_headers(conn, request, stop) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stop.wait(1.0):
        conn.sendall(b"X")


def _silent(conn, request, stop) -> None:
    stop.wait(60)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("handler", [_drip_body, _drip_headers, _silent], ids=["body drip", "header drip", "silent"])
def test_whole_exchange_has_one_deadline(raw_server, handler) -> None:
    """One byte a second never times out a per-read timeout; the exchange's deadline still ends it."""
    srv: RawServer = raw_server(handler)
    client = OmahaClient(srv.url, limits=Limits(deadline=3.0, connect_timeout=2.0))
    start = time.monotonic()
    with pytest.raises(OmahaError) as ei:
        client.check(HOST, [])
    took = time.monotonic() - start
    assert took < 3.0 + 2.0, took
    assert "within 3 s" in str(ei.value) and ei.value.code == omaha.ERR_HTTP


def _endless(conn, request, stop) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n\r\n<response>")
    block = b"<a/>" * 16384
    sent = 0
    while sent < 1 << 30 and not stop.is_set():  # 1 GiB, close-delimited
        conn.sendall(block)
        sent += len(block)


def _chunked_endless(conn, request, stop) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    block = b"<a/>" * 16384
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    for _ in range(1 << 14):
        if stop.is_set():
            return
        conn.sendall(frame)


def _huge_length(conn, request, stop) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n<response>")
    stop.wait(30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", [_endless, _chunked_endless, _huge_length], ids=["close-delimited", "chunked",
                                                                                     "content-length"])
def test_answer_size_is_bounded(raw_server, handler) -> None:
    srv = raw_server(handler)
    with pytest.raises(OmahaError, match="larger than 1048576 bytes"):
        OmahaClient(srv.url, limits=Limits(deadline=30)).check(HOST, [])


RSS_CHILD = """
import sys
from update_engine.omaha_client import Exchange, Limits
from update_engine.omaha import OmahaError
try:
    Exchange(sys.argv[1], limits=Limits(deadline=50)).post(b"<request/>")
    print("no error")
except OmahaError as exc:
    print(exc)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]))
"""


@pytest.mark.timeout(90)
def test_peak_rss_under_a_one_gigabyte_answer(raw_server) -> None:
    """The daemon used to buffer the whole answer before checking its size (800 MB -> 2.5 GB RSS)."""
    srv = raw_server(_endless)
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, srv.url], capture_output=True, text=True, timeout=80)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and "larger than" in lines[0], r.stdout + r.stderr
    peak_kib = int(lines[-1])
    print(f"peak RSS of a client sent a 1 GiB Omaha answer: {peak_kib / 1024:.1f} MiB")
    assert peak_kib < 100 * 1024


def _redirect_to(location_of):
    def handler(conn, request, stop) -> None:
        conn.sendall(_answer(b"", "307 Temporary Redirect", f"Location: {location_of()}\r\n"))
    return handler


@pytest.mark.timeout(30)
def test_redirects_bounded_and_kept_on_one_origin(raw_server) -> None:
    final = raw_server(lambda conn, req, stop: conn.sendall(_answer(NOUPDATE)))
    # A loop: always back to itself.
    loop = raw_server(_redirect_to(lambda: loop.url))
    with pytest.raises(OmahaError, match="more than 5 redirects"):
        OmahaClient(loop.url).check(HOST, [])
    assert loop.hits == 6
    # Another port of the same address is another origin: the host's identity is not re-posted there.
    other = raw_server(_redirect_to(lambda: final.url))
    with pytest.raises(OmahaError, match="redirected to another host"):
        OmahaClient(other.url).check(HOST, [])
    assert final.hits == 0
    # localhost names the same machine, but it is another host name.
    named = raw_server(_redirect_to(lambda: final.url.replace("127.0.0.1", "localhost")))
    with pytest.raises(OmahaError, match="another host"):
        OmahaClient(named.url).check(HOST, [])
    # Within one origin a redirect is followed, with the request re-posted.
    hops = []

    def same(conn, request, stop) -> None:
        hops.append(request.split(b" ")[1])
        if request.startswith(b"POST /v1/update/ "):
            conn.sendall(_answer(b"", "308 Permanent Redirect", "Location: /v2/update/\r\n"))
        elif request.startswith(b"POST /v2/update/ ") and b"<request" in request:
            conn.sendall(_answer(NOUPDATE))
        else:
            conn.sendall(_answer(b"bad", "400 Bad Request"))
    one = raw_server(same)
    assert OmahaClient(one.url).check(HOST, []).update is None
    assert hops == [b"/v1/update/", b"/v2/update/"]


@pytest.mark.timeout(30)
def test_http_errors_and_bad_answers_carry_codes(raw_server) -> None:
    cases = [
        (lambda c, r, s: c.sendall(_answer(b"busy", "503 Service Unavailable")), omaha.ERR_OMAHA_HTTP_BASE + 503,
         "HTTP 503"),
        (lambda c, r, s: c.sendall(_answer(b"", "302 Found")), omaha.ERR_OMAHA_HTTP_BASE + 302, "HTTP 302"),
        (lambda c, r, s: c.sendall(b"garbage\r\n\r\n"), omaha.ERR_HTTP, "cannot reach"),
        (lambda c, r, s: c.sendall(b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n"),
         omaha.ERR_HTTP, "cannot reach"),
        (lambda c, r, s: c.sendall(_answer(b"<response")), omaha.ERR_OMAHA_INVALID, "XML"),
        (lambda c, r, s: None, omaha.ERR_HTTP, "cannot reach"),  # closes without an answer
    ]
    for handler, code, words in cases:
        srv = raw_server(handler)
        with pytest.raises(OmahaError) as ei:
            OmahaClient(srv.url, limits=Limits(deadline=10)).check(HOST, [])
        assert ei.value.code == code and words in str(ei.value), (words, str(ei.value))
        assert "\n" not in str(ei.value)


@pytest.mark.timeout(30)
def test_request_is_flatcars_and_events_need_no_body(raw_server) -> None:
    seen: list[bytes] = []

    def record(conn, request, stop) -> None:
        seen.append(request)
        conn.sendall(_answer(NOUPDATE))
    srv = raw_server(record)
    client = OmahaClient(srv.url)
    client.event(HOST, omaha.Event(3, 2, previousversion="0.9.0"))
    body = seen[0].partition(b"\r\n\r\n")[2]
    req = omaha.parse_request(body)
    assert req.app.machineid == "ab" * 16 and req.app.events == [omaha.Event(3, 2, None, "0.9.0")]
    assert b"Content-Type: text/xml" in seen[0]
    # A refused connection: one line, ERR_HTTP.
    srv.close()
    with pytest.raises(OmahaError) as ei:
        Exchange(srv.url, limits=Limits(deadline=5)).post(b"<request/>")
    assert ei.value.code == omaha.ERR_HTTP


@pytest.mark.timeout(60)
def test_daemon_refuses_local_codebases_the_same_whether_they_exist(fake_server, host, tmp_path: Path) -> None:
    """The root daemon never opens a path an Omaha answer names, so its error code cannot tell the server
    whether the path exists on the host."""
    from update_engine.daemon import Daemon

    exists = tmp_path / "secret"
    exists.mkdir()
    (exists / "update.payload").write_bytes(b"x" * 100)
    outcomes = []
    for codebase in (f"file://{exists}", "file:///nonexistent/dir", str(exists), "/nonexistent", "ftp://h/x",
                     "http://user:pw@127.0.0.1:1/x", "gopher://127.0.0.1/"):
        body = omaha.build_response(APPID, update=omaha.Update("1.1.0", [], "update.payload", 100, "00" * 32),
                                    codebase=codebase)
        fake_server.script.omaha_body = body
        fake_server.events.clear()
        d = Daemon(host(fake_server.url).options())
        assert d.run_once() == 1
        st = d.status()
        outcomes.append((st["state"], st["last_error_code"]))
        assert st["last_error_code"] == omaha.ERR_OMAHA_INVALID, (codebase, st["last_error"])
        assert omaha.Event(3, 0, omaha.ERR_OMAHA_INVALID) in fake_server.events
        assert not fake_server.payload_gets
    assert len(set(outcomes)) == 1
    assert json.dumps(outcomes)


@pytest.mark.timeout(60)
def test_https_verifies_the_server_and_the_deadline_holds_over_tls(tmp_path: Path, monkeypatch, raw_server) -> None:
    """TLS against a test CA on loopback: trusted via REQUESTS_CA_BUNDLE (requests' rule, as for payloads)
    it works, also through an HTTP CONNECT proxy; without it the certificate is refused; a TLS server that
    drips still ends at the deadline."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from testlib import make_pki

    make_pki(tmp_path)
    drip = threading.Event()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(NOUPDATE)))
            self.end_headers()
            if drip.is_set():
                for b in NOUPDATE:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(1)
            self.wfile.write(NOUPDATE)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    url = f"https://127.0.0.1:{httpd.server_address[1]}/v1/update/"
    try:
        with pytest.raises(OmahaError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            OmahaClient(url, limits=Limits(deadline=10)).check(HOST, [])
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
        assert OmahaClient(url, limits=Limits(deadline=10)).check(HOST, []).update is None
        tunnels: list[bytes] = []

        def connect_proxy(conn, request, stop) -> None:
            import socket
            tunnels.append(request.split(b"\r\n")[0])
            host, _, port = request.split(b" ")[1].decode().rpartition(":")
            with socket.create_connection((host, int(port))) as up:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

                def pump(a, b) -> None:
                    try:
                        while data := a.recv(65536):
                            b.sendall(data)
                    except OSError:
                        pass
                    finally:
                        with contextlib.suppress(OSError):
                            b.shutdown(socket.SHUT_WR)
                back = threading.Thread(target=pump, args=(up, conn), daemon=True)
                back.start()
                pump(conn, up)
                back.join(10)
        px = raw_server(connect_proxy)
        via = OmahaClient(url, proxy=f"http://127.0.0.1:{px.port}", limits=Limits(deadline=10))
        assert via.check(HOST, []).update is None
        assert len(tunnels) == 1 and tunnels[0].startswith(f"CONNECT 127.0.0.1:{httpd.server_address[1]} ".encode())
        drip.set()
        start = time.monotonic()
        with pytest.raises(OmahaError, match="within 2 s"):
            OmahaClient(url, limits=Limits(deadline=2)).check(HOST, [])
        assert time.monotonic() - start < 4
    finally:
        drip.clear()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.timeout(30)
def test_http_proxy_gets_the_absolute_url_and_credentials(raw_server) -> None:
    seen: list[bytes] = []

    def proxy(conn, request, stop) -> None:
        seen.append(request)
        conn.sendall(_answer(NOUPDATE))
    p = raw_server(proxy)
    client = OmahaClient("http://updates.invalid/v1/update/", proxy=f"http://u:p%40ss@127.0.0.1:{p.port}",
                         limits=Limits(deadline=10))
    assert client.check(HOST, []).update is None
    head = seen[0].split(b"\r\n")
    assert head[0] == b"POST http://updates.invalid/v1/update/ HTTP/1.1"
    import base64
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"u:p@ss") in head
    with pytest.raises(OmahaError, match="only http:// proxies"):
        OmahaClient("http://x/", proxy="socks5://127.0.0.1:1").check(HOST, [])
