"""`obelisk lock serve` against hostile FleetLock clients: the real server (uvicorn on loopback).

The body is read and checked before etcd is asked anything, so most cases run against a server
whose etcd is a closed port (any case that got past the checks would answer 503, not 400/413).
The last test puts a real etcd member (Debian's etcd) behind it and shows Zincati-shaped locks
still work after the same hostile requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from etcdlib import LocalEtcd
from srv_helpers import free_port, hostile_post, peak_rss_kib
from testlib import need_tools

MIB = 1 << 20
H = {"fleet-lock-protocol": "true"}


def _post(base: str, path: str, body: bytes | str, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{base}/v1/{path}", data=body, headers={**H, **(headers or {})}, timeout=10)


def _params(ident: object = "e0f3745b108f471cbd4883c6fbed8cdd", group: object = "default") -> str:
    return json.dumps({"client_params": {"id": ident, "group": group}})


def _nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return '{"client_params": ' + open_ * depth + close * depth + "}"


# What a hostile or broken client may send, by class: (case, body) -> 400 invalid_client_identity.
DEEP = [("list 32k deep", _nested(32_000)), ("list 2k deep", _nested(2_000)),
        ("object 5k deep", '{"client_params": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}"),
        ("33 levels", _nested(33)), ("deep inside client_params", json.dumps(
            {"client_params": {"id": "a", "group": "default", "x": json.loads(_nested(40))}})),
        ("deep unclosed", "[" * 30_000)]
BAD_IDS = [("empty id", _params("")), ("id a number", _params(7)), ("id null", _params(None)),
           ("id a list", _params(["a"])), ("id with newline", _params("a\nb")), ("id with CR", _params("a\rb")),
           ("id with tab", _params("a\tb")), ("id with space", _params("a b")), ("id with NUL", _params("a\x00")),
           ("id with ESC", _params("\x1b[31mred")), ("id with NEL", _params("a\x85b")),
           ("id with U+2028", _params("a\u2028b")), ("id 257 bytes", _params("a" * 257)),
           ("id 65 kB", _params("a" * 60_000)), ("id lone surrogate", '{"client_params": {"id": "\\ud800", '
                                                                          '"group": "default"}}')]
BAD_GROUPS = [("group empty", _params(group="")), ("group with space", _params(group="a b")),
              ("group with newline at the end", _params(group="default\n")), ("group with slash", _params(group="a/b")),
              ("group 129 characters", _params(group="g" * 129)), ("group a number", _params(group=3)),
              ("group unicode", _params(group="d\u00e9faut")), ("group with ..", _params(group="../x")),
              ("group null", _params(group=None))]
BAD_JSON = [("not JSON", "{not json"), ("empty body", ""), ("NaN", '{"client_params": NaN}'),
            ("a list", "[]"), ("no client_params", '{"id": "x"}'), ("client_params a string", '{"client_params": "x"}'),
            ("invalid UTF-8", b'{"client_params": {"id": "\xff", "group": "default"}}'), ("a bare number", "1" * 5000)]


@pytest.fixture
def deadend(lock_server) -> str:  # noqa: ANN001
    """A lock server whose etcd is a port nothing listens on."""
    return lock_server(f"http://127.0.0.1:{free_port()}").url


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["pre-reboot", "steady-state"])
def test_hostile_bodies_get_400_with_a_clear_value(deadend: str, path: str) -> None:
    counts = {}
    for cls, cases in (("deep", DEEP), ("id", BAD_IDS), ("group", BAD_GROUPS), ("json", BAD_JSON)):
        for case, body in cases:
            r = _post(deadend, path, body)
            assert r.status_code == 400, (case, r.status_code, r.text[:300])
            doc = r.json()
            assert doc["kind"] == "invalid_client_identity", (case, doc)
            assert doc["value"].isprintable() and 0 < len(doc["value"]) < 400, (case, doc)
            assert "\n" not in r.text
        counts[cls] = len(cases)
    assert counts == {"deep": len(DEEP), "id": len(BAD_IDS), "group": len(BAD_GROUPS), "json": len(BAD_JSON)}
    deep = _post(deadend, path, _nested(32_000)).json()["value"]
    assert "nested too deeply" in deep, deep
    assert "lock id" not in _post(deadend, path, _params("a b")).json()["value"]  # names client_params.id
    # The checks come before etcd: a good body reaches etcd, which is not there.
    assert _post(deadend, path, _params()).status_code == 503
    metrics = requests.get(deadend + "/metrics", timeout=5).text
    endpoint = "pre_reboot" if path == "pre-reboot" else "steady_state"
    assert f'obelisk_fleetlock_requests_total{{endpoint="{endpoint}",result="invalid_client_identity"}}' in metrics


@pytest.mark.timeout(180)
def test_a_1_gib_body_gets_413_and_little_memory(lock_server, capsys) -> None:  # noqa: ANN001
    s = lock_server(f"http://127.0.0.1:{free_port()}")
    before = peak_rss_kib(s.proc.pid)
    sent = {}
    for chunked in (False, True):
        for path in ("/v1/pre-reboot", "/v1/steady-state"):
            h = hostile_post(s.port, path, 1 << 30, chunked=chunked, headers=H)
            sent[(chunked, path)] = h.sent
            assert h.status == 413, (chunked, path, h)
            doc = json.loads(h.body)
            assert doc == {"kind": "request_too_large", "value": "request body larger than 65536 bytes"}, doc
            assert h.body.count(b"\n") == 0
            assert h.sent < 64 * MIB
    # Just over the limit with an honest length: refused before any parsing.
    r = _post(s.url, "pre-reboot", '{"client_params": {"id": "' + "a" * (64 * 1024) + '", "group": "default"}}')
    assert r.status_code == 413 and r.json()["kind"] == "request_too_large"
    peak = peak_rss_kib(s.proc.pid)
    with capsys.disabled():
        print(f"\nlock serve peak RSS: {before / 1024:.1f} MiB at start, {peak / 1024:.1f} MiB after 1 GiB bodies; "
              "sent before refusal: " + ", ".join(f"{'chunked' if c else 'length'} {n // 1024} KiB"
                                                   for (c, _), n in sent.items()))
    assert peak < 100 * 1024, f"peak RSS {peak} KiB"
    assert 'result="request_too_large"} 2' in requests.get(s.url + "/metrics", timeout=5).text


@pytest.mark.etcd
@pytest.mark.timeout(240)
def test_locks_still_work_after_hostile_requests(lock_server, tmp_path: Path) -> None:  # noqa: ANN001
    need_tools("etcd")
    with LocalEtcd(tmp_path / "etcd", 1) as etcd:
        base = lock_server(etcd.endpoints, "--group", "default=1").url
        for _, body in DEEP + BAD_IDS + BAD_GROUPS + BAD_JSON:
            assert _post(base, "pre-reboot", body).status_code == 400
        h = hostile_post(int(base.rsplit(":", 1)[1]), "/v1/pre-reboot", 256 * MIB, chunked=True, headers=H)
        assert h.status == 413
        a, b = "e0f3745b108f471cbd4883c6fbed8cdd", "0c9ba2a2b4fb4f6fa1b0c9ecbad14d5e"
        assert _post(base, "pre-reboot", _params(a)).status_code == 200
        r = _post(base, "pre-reboot", _params(b))
        assert r.status_code == 500 and r.json()["kind"] == "failed_lock"
        assert _post(base, "steady-state", _params(a)).status_code == 200
        assert _post(base, "pre-reboot", _params(b)).status_code == 200
        holders = requests.get(base + "/v1/status", timeout=5).json()["groups"][0]["holders"]
        assert [x["id"] for x in holders] == [b]
        # The longest id and group allowed are served.
        assert _post(base, "pre-reboot", _params("x" * 256, "g" * 128)).status_code == 400  # unknown group, not bad
        assert _post(base, "pre-reboot", _params("x" * 256, "g" * 128)).json()["kind"] == "unknown_group"
