"""Payload sources: local files (regular files only), HTTP with Range, retries, redirect bounds, and the
daemon's rule that a source from Omaha is always a URL. Servers are real, on 127.0.0.1."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from update_engine import omaha
from update_engine.errors import ApplyError, Stopped
from update_engine.transfer import FileStream, HttpStream, Retrier, Source, Transfer, TransferFailed

FAST = Transfer(connect_timeout=5, low_speed_time=3, retries=2, retry_delay=0.01)


def test_daemon_sources_must_be_urls_and_the_answer_ignores_the_disk(tmp_path: Path) -> None:
    real = tmp_path / "payload"
    real.write_bytes(b"x")
    errors = []
    for source in (str(real), str(tmp_path / "missing"), f"file://{real}", "/etc/shadow"):
        with pytest.raises(ApplyError) as ei:
            Source(source, FAST, local_ok=False)
        errors.append((ei.value.code, str(ei.value).replace(source[:80], "S")))
    assert len(set(errors)) == 1 and errors[0][0] == omaha.ERR_OMAHA_INVALID, errors


@pytest.mark.timeout(30)
def test_local_sources(tmp_path: Path) -> None:
    with pytest.raises(ApplyError, match="does not exist: pass a file or an http"):
        Source(str(tmp_path / "missing"), FAST)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ApplyError, match="is a FIFO"):
        Source(str(fifo), FAST)
    with pytest.raises(ApplyError, match="is a directory"):
        Source(str(tmp_path), FAST)
    f = tmp_path / "p"
    f.write_bytes(b"0123456789")
    s = FileStream(f, 4)
    buf = bytearray(3)
    assert s.readinto(memoryview(buf)) == 3 and bytes(buf) == b"456" and s.read(100) == b"789"
    s.close()


def _answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n".encode() + body


@pytest.mark.timeout(30)
def test_range_requests_and_servers_that_ignore_them(raw_server) -> None:
    data = bytes(range(256)) * 40
    ranges: list[bytes] = []

    def ranged(conn, request, stop) -> None:
        line = next((ln for ln in request.split(b"\r\n") if ln.lower().startswith(b"range:")), b"")
        ranges.append(line)
        if line:
            start = int(line.split(b"=")[1].split(b"-")[0])
            conn.sendall(_answer(data[start:], "206 Partial Content"))
        else:
            conn.sendall(_answer(data))
    srv = raw_server(ranged)
    src = Source(srv.url, FAST)
    s = src.open(1000)
    assert isinstance(s, HttpStream) and s.read(5) == data[1000:1005]
    s.close()
    assert ranges[-1] == b"Range: bytes=1000-"
    deaf = raw_server(lambda conn, request, stop: conn.sendall(_answer(data)))
    with pytest.raises(TransferFailed, match="ignored the Range request"):
        Source(deaf.url, FAST).open(1000)
    src.close()


@pytest.mark.timeout(30)
def test_retries_skip_4xx_and_stop_on_request(raw_server) -> None:
    gone = raw_server(lambda conn, request, stop: conn.sendall(_answer(b"no", "404 Not Found")))
    with pytest.raises(TransferFailed, match="HTTP 404"):
        Retrier(FAST, lambda: False).open(Source(gone.url, FAST), 0)
    assert gone.hits == 1  # the server's considered answer: not retried
    busy = raw_server(lambda conn, request, stop: conn.sendall(_answer(b"no", "503 Service Unavailable")))
    with pytest.raises(TransferFailed, match="HTTP 503"):
        Retrier(FAST, lambda: False).open(Source(busy.url, FAST), 0)
    assert busy.hits == 1 + FAST.retries
    start = time.monotonic()
    with pytest.raises(Stopped):
        Retrier(Transfer(retry_delay=60), lambda: time.monotonic() - start > 0.3).sleep(60)
    assert time.monotonic() - start < 5


@pytest.mark.timeout(30)
def test_redirects_are_bounded(raw_server) -> None:
    loop = raw_server(lambda conn, request, stop: conn.sendall(
        _answer(b"", "302 Found", f"Location: http://127.0.0.1:{loop.port}/again\r\n")))
    with pytest.raises(TransferFailed, match="more than 5 redirects"):
        Retrier(FAST, lambda: False).open(Source(loop.url, FAST), 0)
    assert loop.hits == 6  # the first request and five redirects, and no retry of a loop
    to_file = raw_server(lambda conn, request, stop: conn.sendall(
        _answer(b"", "302 Found", "Location: file:///etc/passwd\r\n")))
    with pytest.raises(TransferFailed):
        Source(to_file.url, Transfer(retries=0)).open(0)
