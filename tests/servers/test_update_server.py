"""`obelisk update serve` against hostile clients: the real server (uvicorn on loopback) over a real
release folder, driven with raw sockets and requests.

- POST bodies are read with a bound: 1 GiB declared with Content-Length or sent chunked gets a
  one-line 413 and the connection closed, and the server's peak RSS stays under 100 MiB.
- GET /v1/events lists machine ids: off (403) without --admin-token-file, 401 without the token.
- The event log keeps the last 10,000 events in memory, drops events of app ids the server does not
  serve, caps events per request and field lengths, and its file rotates (EventLog on a real file).
- Bad command lines (listen addresses, token files, FIFOs as files) are one `error:` line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from srv_helpers import (
    ADMIN_TOKEN,
    free_port,
    hostile_post,
    make_release,
    omaha_request,
    peak_rss_kib,
    start,
    token_file,
)
from testlib import OBELISK, stop_process

from update_server.app import MAX_EVENTS, EventLog

MIB = 1 << 20
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _post(s, body: bytes) -> requests.Response:  # noqa: ANN001
    return requests.post(s.url + "/v1/update/", data=body, headers={"Content-Type": "text/xml"}, timeout=10)


# --- bounded bodies --------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_a_1_gib_body_is_refused_with_413_and_little_memory(update_server, capsys) -> None:  # noqa: ANN001
    s = update_server()
    before = peak_rss_kib(s.proc.pid)
    results = {}
    for chunked in (False, True):
        for path in ("/v1/update/", "/v1/update"):
            h = hostile_post(s.port, path, 1 << 30, chunked=chunked)
            results[(chunked, path)] = h
            assert h.status == 413, (chunked, path, h)
            assert h.body.count(b"\n") == 1 and h.body.startswith(b"error: request body larger than 65536"), h.body
            assert h.sent < 64 * MIB, f"the server read {h.sent} bytes of a body it had refused"
    # Just over the limit, and a body that lies about its length (says small, sends more): refused too.
    assert _post(s, b"<" + b"x" * (64 * 1024)).status_code == 413
    h = hostile_post(s.port, "/v1/update/", 4 * MIB, chunked=True, headers={"Content-Length": "100"})
    assert h.status in (400, 413, None), h  # uvicorn refuses both framings at once (400) or we do (413)
    peak = peak_rss_kib(s.proc.pid)
    with capsys.disabled():
        print(f"\nupdate serve peak RSS: {before / 1024:.1f} MiB at start, {peak / 1024:.1f} MiB after 1 GiB "
              f"bodies (Content-Length and chunked); sent before refusal: "
              + ", ".join(f"{'chunked' if c else 'length'} {h.sent // 1024} KiB" for (c, _), h in results.items()))
    assert peak < 100 * 1024, f"peak RSS {peak} KiB"
    # Still serving.
    r = _post(s, omaha_request(updatecheck=True))
    assert r.status_code == 200 and 'status="ok"' in r.text and "update.payload" in r.text


# --- the event log ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_events_need_the_admin_token(update_server, tmp_path: Path) -> None:  # noqa: ANN001
    off = update_server()
    r = requests.get(off.url + "/v1/events", timeout=5)
    assert r.status_code == 403 and r.text.count("\n") == 1 and "--admin-token-file" in r.text, r.text
    assert requests.get(off.url + "/v1/events", headers=AUTH, timeout=5).status_code == 403

    on = update_server("--admin-token-file", str(token_file(tmp_path)))
    assert _post(on, omaha_request(machineid="secret-machine")).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": ADMIN_TOKEN},
                    {"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
                    {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, {"Authorization": "Bearer "},
                    {"X-Token": ADMIN_TOKEN}):
        r = requests.get(on.url + "/v1/events", headers=headers, timeout=5)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (headers, r.status_code)
        assert r.text.count("\n") == 1 and "secret-machine" not in r.text
    r = requests.get(on.url + "/v1/events", headers=AUTH, timeout=5)
    assert r.status_code == 200 and [e["machineid"] for e in r.json()] == ["secret-machine"]
    r = requests.get(on.url + "/v1/events", headers={"Authorization": f"bearer   {ADMIN_TOKEN}  "}, timeout=5)
    assert r.status_code == 200


@pytest.mark.timeout(120)
def test_event_log_is_bounded_and_keeps_only_served_app_ids(update_server, tmp_path: Path) -> None:  # noqa: ANN001
    events_file = tmp_path / "events.jsonl"
    # The event log alone (--no-state): with fleet state, a 20 kB machine id is refused (tests/fleet).
    s = update_server("--admin-token-file", str(token_file(tmp_path)), "--events", str(events_file), "--no-state")
    # Events of an app id this server does not serve: acknowledged (Nebraska does), not kept.
    for i in range(50):
        r = _post(s, omaha_request(app_id="{00000000-0000-0000-0000-00000000dead}", machineid=f"x{i}", events=3))
        assert r.status_code == 200 and r.text.count('<event status="ok">') == 3
        assert "error-unknownApplication" in r.text
    assert requests.get(s.url + "/v1/events", headers=AUTH, timeout=5).json() == []
    assert events_file.read_text() == ""
    # One request of 200 events with a 20 kB machine id: 16 events kept, fields cut to 256 characters.
    r = _post(s, omaha_request(machineid="M" * 20_000, events=200))
    assert r.status_code == 200 and r.text.count('<event status="ok">') == 200
    kept = requests.get(s.url + "/v1/events", headers=AUTH, timeout=5).json()
    assert len(kept) == 16 and {len(e["machineid"]) for e in kept} == {256}
    assert events_file.stat().st_size < 16 * 1024
    # More than MAX_EVENTS events: the newest MAX_EVENTS are kept, in order.
    n = 0
    with requests.Session() as http:
        while n < MAX_EVENTS + 500:
            r = http.post(s.url + "/v1/update/", data=omaha_request(machineid=f"h{n}", events=16), timeout=10)
            assert r.status_code == 200
            n += 16
    kept = requests.get(s.url + "/v1/events", headers=AUTH, timeout=10).json()
    assert len(kept) == MAX_EVENTS
    assert kept[-1]["machineid"] == f"h{n - 16}" and kept[0]["machineid"] != "M" * 256
    lines = events_file.read_text().splitlines()
    assert len(lines) == 16 + n and json.loads(lines[-1])["machineid"] == f"h{n - 16}"


def test_event_file_rotates_at_its_size(tmp_path: Path) -> None:
    """EventLog on a real file: past max_file_bytes, events.jsonl becomes events.jsonl.1 (replacing
    the older one), so at most two files of about that size exist."""
    path = tmp_path / "events.jsonl"
    path.write_text('{"old": 1}\n')
    log = EventLog(path, keep=5, max_file_bytes=1000)
    for i in range(100):
        log.add({"i": i, "pad": "x" * 50})
    assert len(log.events) == 5 and [e["i"] for e in log.events] == [95, 96, 97, 98, 99]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1000
        assert all(json.loads(line) for line in p.read_text().splitlines())
    assert json.loads(path.read_text().splitlines()[-1])["i"] == 99
    newest_rotated = json.loads((tmp_path / "events.jsonl.1").read_text().splitlines()[-1])["i"]
    assert json.loads(path.read_text().splitlines()[0])["i"] == newest_rotated + 1  # nothing lost between them


def test_event_file_write_errors_do_not_fail_the_request(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    path.unlink()
    path.mkdir()  # appending now fails (EISDIR): logged, the event stays in memory
    log.add({"i": 1})
    assert list(log.events) == [{"i": 1}]


# --- command line ----------------------------------------------------------------------------------

def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    rel = tmp_path / "releases"
    if not rel.exists():
        make_release(rel)
    return subprocess.run([OBELISK, "update", "serve", str(rel), *args], capture_output=True, text=True, timeout=60)


BAD_LISTEN = {"nope": "no ':PORT'", "127.0.0.1:0": "not in 1-65535", "127.0.0.1:99999": "not in 1-65535",
              "127.0.0.1:http": "is not a number", ":8080": "no host", "[::1]": "no ':PORT'",
              "127.0.0.1:-1": "is not a number", "::1:8080": "IPv6 address goes in brackets",
              "[::1:8080": "no closing ']'", "[nothost]:80": "is not an IPv6 address", "a b:80": "not a host name",
              "127.0.0.1:８０": "is not a number", "127.0.0.1:": "no port after ':'", "h\n:80": "not a host name"}


@pytest.mark.timeout(300)
def test_bad_command_lines_are_one_error_line(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "short.token").write_text("short\n")
    cases = {f"--listen {k!r}": (["--listen", k], v) for k, v in BAD_LISTEN.items()}
    cases |= {
        "token file missing": (["--admin-token-file", str(tmp_path / "none")], "cannot read the admin token file"),
        "token file a FIFO": (["--admin-token-file", str(fifo)], "is a FIFO"),
        "token file too short": (["--admin-token-file", str(tmp_path / "short.token")], "at least 16 characters"),
        "events a FIFO": (["--events", str(fifo), "--listen", "127.0.0.1:9"], "is not a regular file"),
        "events in a missing folder": (["--events", str(tmp_path / "no" / "ev.jsonl"), "--listen", "127.0.0.1:9"],
                                       "cannot append to it"),
        "groups a FIFO": (["--groups", str(fifo), "--listen", "127.0.0.1:9"], "is a FIFO"),
        "groups missing": (["--groups", str(tmp_path / "none.toml"), "--listen", "127.0.0.1:9"], "no such"),
    }
    for name, (args, needle) in cases.items():
        t0 = time.monotonic()
        res = _serve(tmp_path, *args)
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, res.stderr)
        if args[0] == "--listen" and name.startswith("--listen"):
            assert "is not HOST:PORT: " in lines[0]
        assert "Traceback" not in res.stderr and time.monotonic() - t0 < 30
    assert len(cases) == len(BAD_LISTEN) + 7


@pytest.mark.timeout(60)
def test_a_release_json_that_is_a_fifo_is_a_warning_not_a_hang(update_server, tmp_path: Path) -> None:  # noqa: ANN001
    rel = tmp_path / "releases"
    make_release(rel)
    bad = rel / "tiny" / "2.0.0"
    bad.mkdir()
    os.mkfifo(bad / "release.json")
    s = update_server()
    assert "warning: " in s.log_text() and "is a FIFO" in s.log_text()
    r = _post(s, omaha_request(updatecheck=True))
    assert r.status_code == 200 and 'version="1.1.0"' in r.text
    assert "is a FIFO" in requests.get(s.url + "/v1/releases", timeout=5).json()["problems"][0]


def test_a_listen_address_in_use_is_one_error_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = _serve(tmp_path, "--listen", f"127.0.0.1:{port}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot listen on 127.0.0.1:{port} (the reason is logged above)"], res.stderr


def test_ipv6_listen(tmp_path: Path) -> None:
    """`[::1]:PORT` is parsed and served (skipped where the host has no IPv6 loopback)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    rel = tmp_path / "releases"
    make_release(rel)
    port = free_port()
    s = start([OBELISK, "update", "serve", str(rel), "--listen", f"[::1]:{port}"], port, tmp_path / "v6.log",
              host="::1")
    try:
        assert f"at http://[::1]:{port}/v1/update/" in s.log_text()
        assert requests.get(f"http://[::1]:{port}/health", timeout=5).text == "ok"
    finally:
        stop_process(s.proc)
