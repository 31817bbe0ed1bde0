"""The FleetLock server (`obelisk lock serve`, a real uvicorn process) over real etcd, driven by
requests shaped exactly as Zincati sends them, and by obelisk's own fleetlock strategy.

`serve` is fleetlock_server/cli.py's command, mounted into `obelisk lock` by the root CLI, so the
server runs as the installed `obelisk` command does."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
from ports import free_port
from testlib import OBELISK, stop_process

from obelisk.lock_conf import LockConfig
from update_engine.reboot import coordinator_from_config
from update_engine.reboot.fleetlock import FleetLockClient
from update_engine.reboot.semaphore import SlotsFull, sem_key

pytestmark = pytest.mark.etcd


@contextmanager
def serving(etcd_urls: str, *groups: str) -> Iterator[str]:
    port = free_port()
    args = [a for g in groups for a in ("--group", g)]
    proc = subprocess.Popen(
        [OBELISK, "lock", "serve", "--etcd", etcd_urls, "--listen", f"127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                requests.get(base + "/nothing", timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"lock serve exited: {proc.stdout.read().decode()[-500:]}")
                time.sleep(0.05)
        yield base
    finally:
        stop_process(proc, 10)


@pytest.fixture(scope="module")
def server(etcd1) -> Iterator[str]:
    with serving(etcd1.endpoints, "default=2", "workers=1") as base:
        yield base


def zincati(base: str, path: str, node: str, group: str = "default") -> requests.Response:
    """What Zincati's fleet_lock client sends: POST, `fleet-lock-protocol: true`, JSON client_params."""
    return requests.post(f"{base}/v1/{path}", headers={"fleet-lock-protocol": "true"},
                         json={"client_params": {"group": group, "id": node}}, timeout=10)


def etcd1_client(etcd1):
    import etcd3gw

    return etcd3gw.client(host="127.0.0.1", port=etcd1.members[0].client_port)


def test_zincati_shaped_lock_unlock(server, etcd1) -> None:
    a, b, c = "e0f3745b108f471cbd4883c6fbed8cdd", "0c9ba2a2b4fb4f6fa1b0c9ecbad14d5e", "1ab2c3d4e5f60718293a4b5c6d7e8f90"
    assert zincati(server, "pre-reboot", a).status_code == 200
    assert zincati(server, "pre-reboot", a).status_code == 200  # recursive
    assert zincati(server, "pre-reboot", b).status_code == 200
    r = zincati(server, "pre-reboot", c)
    assert r.status_code == 500 and r.json()["kind"] == "failed_lock" and "all 2 slot" in r.json()["value"]
    import etcd3gw

    raw = etcd3gw.client(host="127.0.0.1", port=etcd1.members[0].client_port).get(sem_key("default"))
    assert json.loads(raw[0]) == {"total_slots": 2, "holders": sorted([a, b])}
    assert zincati(server, "steady-state", a).status_code == 200
    assert zincati(server, "steady-state", a).status_code == 200  # unlock if held: idempotent
    assert zincati(server, "pre-reboot", c).status_code == 200
    status = requests.get(server + "/v1/status", timeout=5).json()
    default = next(g for g in status["groups"] if g["group"] == "default")
    assert [h["id"] for h in default["holders"]] == sorted([b, c])
    for node in (b, c):
        assert zincati(server, "steady-state", node).status_code == 200


def test_bad_requests_get_kind_and_value(server) -> None:
    body = {"client_params": {"group": "default", "id": "x"}}
    cases = [
        (requests.post(server + "/v1/pre-reboot", json=body, timeout=5), 400, "invalid_client_identity"),
        (requests.post(server + "/v1/pre-reboot", json=body, headers={"fleet-lock-protocol": "false"}, timeout=5),
         400, "invalid_client_identity"),
        (requests.post(server + "/v1/pre-reboot", data="{not json", headers={"fleet-lock-protocol": "true"},
                       timeout=5), 400, "invalid_client_identity"),
        (requests.post(server + "/v1/pre-reboot", json={"id": "x"}, headers={"fleet-lock-protocol": "true"},
                       timeout=5), 400, "invalid_client_identity"),
        (requests.post(server + "/v1/pre-reboot", json={"client_params": {"group": "default", "id": ""}},
                       headers={"fleet-lock-protocol": "true"}, timeout=5), 400, "invalid_client_identity"),
        (requests.post(server + "/v1/pre-reboot", json={"client_params": {"group": "a b", "id": "x"}},
                       headers={"fleet-lock-protocol": "true"}, timeout=5), 400, "invalid_client_identity"),
        (zincati(server, "pre-reboot", "x", group="nosuchgroup"), 400, "unknown_group"),
        (zincati(server, "steady-state", "x", group="nosuchgroup"), 400, "unknown_group"),
        (requests.get(server + "/v1/pre-reboot", headers={"fleet-lock-protocol": "true"}, timeout=5),
         405, "method_not_allowed"),
        (requests.put(server + "/v1/steady-state", json=body, headers={"fleet-lock-protocol": "true"}, timeout=5),
         405, "method_not_allowed"),
        (zincati(server, "reboot-now", "x"), 404, "not_found"),
    ]
    for resp, status, kind in cases:
        assert resp.status_code == status, (resp.request.method, resp.request.url, resp.text)
        doc = resp.json()
        assert doc["kind"] == kind and isinstance(doc["value"], str) and doc["value"], doc
    metrics = requests.get(server + "/metrics", timeout=5).text
    assert 'obelisk_fleetlock_requests_total{endpoint="pre_reboot",result="unknown_group"} 1' in metrics
    assert 'obelisk_fleetlock_semaphore_slots{group="default"} 2' in metrics
    assert "obelisk_fleetlock_etcd_up 1" in metrics


def test_fleetlock_strategy_reboots_through_the_server(server) -> None:
    conf = LockConfig(fleetlock_url=server, group="workers")
    first = coordinator_from_config("fleetlock", conf, host_id="obelisk-1")
    second = coordinator_from_config("fleetlock", conf, host_id="obelisk-2")
    first.courtesy_delay = second.courtesy_delay = 0
    second.retry_min = second.retry_max = 0.05
    rebooted = []
    assert first.wait_and_reboot(lambda: rebooted.append(1), lambda: False)
    deadline = time.monotonic() + 1
    assert not second.wait_and_reboot(lambda: rebooted.append(2), lambda: time.monotonic() > deadline)
    assert rebooted == [1] and "failed_lock" in (second.last_error or "")
    first.release_after_boot()
    assert second.wait_and_reboot(lambda: rebooted.append(2), lambda: False)
    second.release_after_boot()
    assert rebooted == [1, 2]
    client = FleetLockClient(server, "workers")
    client.lock("a")
    with pytest.raises(SlotsFull, match="failed_lock"):
        client.lock("b")
    client.unlock("a")


def test_corrupt_semaphore_through_the_server(server, etcd1) -> None:
    import etcd3gw

    raw = etcd3gw.client(host="127.0.0.1", port=etcd1.members[0].client_port)
    raw.put(sem_key("workers"), "{oops")
    try:
        r = zincati(server, "pre-reboot", "x", group="workers")
        assert r.status_code == 500 and r.json()["kind"] == "corrupt_semaphore"
        assert "refuses to overwrite" in r.json()["value"]
        assert raw.get(sem_key("workers")) == [b"{oops"]
    finally:
        raw.delete(sem_key("workers"))


def test_server_without_etcd_refuses_with_503() -> None:
    with serving(f"http://127.0.0.1:{free_port()}") as base:
        r = zincati(base, "pre-reboot", "x")
        assert r.status_code == 503 and r.json()["kind"] == "etcd_unavailable"
        assert r.json()["value"].startswith("etcd unavailable")


def test_hostile_semaphores_through_the_server(server, etcd1) -> None:
    """A semaphore nested too deeply, or too big for one etcd request: a clear FleetLock error
    naming the problem (not a bare 500, not "etcd unavailable"), and the value left as it was."""
    raw = etcd1_client(etcd1)
    cases = [
        ('{"total_slots":1,"holders":[],"x":' + "[" * 100_000 + "]" * 100_000 + "}", "corrupt_semaphore",
         "nested too deeply"),
        (json.dumps({"total_slots": 7000, "holders": [f"{i:06d}" + "x" * 194 for i in range(6000)]},
                    separators=(",", ":")), None, "request size limit"),
    ]
    try:
        for value, kind, words in cases:
            raw.put(sem_key("workers"), value)
            r = zincati(server, "pre-reboot", "x", group="workers")
            assert r.status_code == 500, r.text[:200]
            doc = r.json()
            assert words in doc["value"] and doc["kind"] != "etcd_unavailable", doc
            assert kind is None or doc["kind"] == kind
            assert raw.get(sem_key("workers")) == [value.encode()]
    finally:
        raw.delete(sem_key("workers"))


def test_deeply_nested_request_body_is_a_400(server) -> None:
    """The server parses bodies with update_engine.reboot.limits.parse_json_bounded."""
    # Deep enough to overflow the parser, yet under the server's body size bound (64 KiB).
    for body in ("[" * 20_000 + "]" * 20_000, '{"client_params":' + "[" * 40 + "]" * 40 + "}",
                 '{"client_params":{"id":"a","group":"default","x":' + '{"a":' * 8_000 + "1" + "}" * 8_001 + "}"):
        r = requests.post(server + "/v1/pre-reboot", data=body, headers={"fleet-lock-protocol": "true"}, timeout=10)
        assert r.status_code == 400, r.text[:200]
        assert r.json()["kind"] == "invalid_client_identity" and "nested too deeply" in r.json()["value"]


def test_unbounded_lock_ids_are_a_400(server, etcd1) -> None:
    """The server checks ids with update_engine.reboot.limits.check_holder_id."""
    before = etcd1_client(etcd1).get(sem_key("default"))
    for ident in ("x" * 10_000, "a\nb", "a b", "\x00"):
        r = zincati(server, "pre-reboot", ident)
        assert r.status_code == 400, r.text[:200]
        assert r.json()["kind"] == "invalid_client_identity"
    assert etcd1_client(etcd1).get(sem_key("default")) == before
