"""The fleet API, /metrics and the Omaha glue over a real HTTP server on 127.0.0.1, SQLite and PostgreSQL.

The Omaha requests are built and parsed by the real codec (update_engine.omaha) and go through
`Fleet.check_in`, the call the update server's handler makes; the API is served by uvicorn.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from fleet_helpers import ADMIN, READ, T0, Served, free_port, omaha_req, serve_app
from starlette.applications import Starlette

from update_engine import omaha
from update_server.db.store import Store
from update_server.fleet_server import Fleet
from update_server.releases import Catalog

pytestmark = pytest.mark.timeout(120)

def api(s: Served, path: str, token: str | None = READ, method: str = "GET", **kw) -> requests.Response:  # noqa: ANN003
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{s.url}/api/v1/fleet{path}", headers=headers, timeout=10, **kw)


def test_tokens(served: Served) -> None:
    assert api(served, "/status", token=None).status_code == 401
    assert api(served, "/status", token="x" * 24).status_code == 401
    assert api(served, "/status", token=READ).status_code == 200
    assert api(served, "/status", token=ADMIN).status_code == 200
    r = api(served, "/groups/prod/pause", token=READ, method="POST", json={})
    assert r.status_code == 403 and "admin" in r.json()["error"]
    assert api(served, "/groups/prod/policy", token=ADMIN, method="POST", json={"soak": "1h"}).status_code == 200


def test_api_is_off_without_tokens(store: Store, tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    fleet = Fleet(store, Catalog(tmp_path / "r"))
    server, thread = serve_app(Starlette(routes=fleet.routes()), port := free_port())
    try:
        r = requests.get(f"http://127.0.0.1:{port}/api/v1/fleet/status", headers={"Authorization": "Bearer x"},
                         timeout=10)
        assert r.status_code == 403 and "--admin-token-file" in r.json()["error"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_check_ins_show_up_in_status_instances_and_events(served: Served) -> None:
    f = served.fleet
    a = f.check_in(omaha_req("a" * 32, "1.0.0"), "10.0.0.1")
    assert a.release is not None and a.release.version == "2.0.0"  # no policy: the newest, at once
    f.check_in(omaha_req("a" * 32, "1.0.0", omaha.Event(13, 1), check=False), "10.0.0.1")
    f.check_in(omaha_req("b" * 32, "1.0.0", track="canary"), "10.0.0.2")
    f.check_in(omaha_req("b" * 32, "1.0.0", omaha.Event(3, 0, 10), track="canary", check=False), "10.0.0.2")
    st = api(served, "/status").json()
    assert st["instances"] == 2 and st["halted"] == []
    assert {(c["group"], c["status"]) for c in st["counts"]} == {("prod", "downloading"), ("canary", "error")}
    page = api(served, "/instances", params={"group": "prod"}).json()
    assert page["total"] == 1 and page["instances"][0]["ip"] == "10.0.0.1"
    assert api(served, "/instances", params={"status": "error"}).json()["instances"][0]["machine_id"] == "b" * 32
    evs = api(served, f"/instances/{'b' * 32}/events").json()["events"]
    assert evs[0]["error_code"] == 10 and evs[0]["status"] == "error"
    assert api(served, "/instances/nope").status_code == 404
    served.clock.now = T0 + 2 * 86400
    stale = api(served, "/instances", params={"stale": "1"}).json()
    assert stale["total"] == 2 and all(i["stale"] for i in stale["instances"])


def test_channel_pin_and_floors_through_the_catalog(served: Served) -> None:
    f = served.fleet
    assert api(served, "/channels/prod", token=ADMIN, method="POST",
               json={"version": "2.0.0", "floors": ["1.5.0", "1.7.0"]}).status_code == 200
    ans = f.check_in(omaha_req("c" * 32, "1.0.0"), "10.0.0.3")
    assert ans.release is not None and ans.release.version == "1.5.0"  # the floor, served from its folder
    f.check_in(omaha_req("c" * 32, "1.5.0", omaha.Event(3, 2, previousversion="1.0.0"), check=False), "x")
    missing = f.check_in(omaha_req("c" * 32, "1.5.0"), "10.0.0.3")
    assert missing.release is None and "1.7.0 is missing" in missing.reason
    api(served, "/channels/prod", token=ADMIN, method="POST", json={"version": "1.5.0", "floors": []})
    assert f.check_in(omaha_req("d" * 32, "1.0.0"), "x").release.version == "1.5.0"
    groups = api(served, "/groups").json()["groups"]
    assert groups == [] or all(g["release"] for g in groups)


BAD_BODIES = [
    ({"max_updates_per_period": 0}, "max_updates_per_period"),
    ({"period": "fortnight"}, "period"),
    ({"windows": "Mon 26:00 1h"}, "windows"),
    ({"timezone": "Nowhere/City"}, "timezone"),
    ({"waves": [["1h", 101]]}, "waves"),
    ({"halt_failure_share": -1}, "halt_failure_share"),
    ({"bogus": True}, "unknown field"),
    ([1, 2], "JSON object"),
    ({}, "JSON object"),
]


@pytest.mark.parametrize("body,word", BAD_BODIES, ids=[w for _, w in BAD_BODIES])
def test_bad_policy_values_are_400_and_store_nothing(served: Served, body, word: str) -> None:  # noqa: ANN001
    assert api(served, "/groups/prod/policy", token=ADMIN, method="POST",
               json={"max_updates_per_period": 3}).status_code == 200
    before = api(served, "/groups/prod").json()
    r = api(served, "/groups/prod/policy", token=ADMIN, method="POST", json=body)
    assert r.status_code == 400 and word in r.json()["error"] and "\n" not in r.json()["error"]
    assert api(served, "/groups/prod").json() == before


@pytest.mark.parametrize("kw,code", [
    ({"data": "not json", "headers_ct": "application/json"}, 400),
    ({"data": '{"soak": "1h"}', "headers_ct": "application/x-www-form-urlencoded"}, 415),
    ({"data": "x" * (70 * 1024), "headers_ct": "application/json"}, 413),
])
def test_bad_bodies(served: Served, kw: dict, code: int) -> None:
    r = requests.post(f"{served.url}/api/v1/fleet/groups/prod/policy", data=kw["data"], timeout=10,
                      headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": kw["headers_ct"]})
    assert r.status_code == code, r.text
    assert api(served, "/groups/prod").status_code == 404  # nothing was created


@pytest.mark.parametrize("path,params", [("/instances", {"limit": "5000"}), ("/instances", {"limit": "-1"}),
                                         ("/instances", {"status": "sleeping"}), ("/instances", {"stale": "yes"}),
                                         ("/instances/x/events", {"limit": "0"})])
def test_bad_query_values_are_400(served: Served, path: str, params: dict) -> None:
    served.fleet.check_in(omaha_req("x" * 32, "1.0.0"), "1")
    r = api(served, path, params=params)
    assert r.status_code in (400, 404) and "error" in r.json()


@pytest.mark.parametrize("name", ["a%20b", "x" * 65, "-x", "%3Cscript%3E"])
def test_bad_group_names_are_400(served: Served, name: str) -> None:
    r = api(served, f"/groups/{name}/policy", token=ADMIN, method="POST", json={"soak": "1h"})
    assert r.status_code == 400 and "not valid" in r.json()["error"]


def test_pause_resume_halt_over_the_api(served: Served) -> None:
    f = served.fleet
    api(served, "/groups/prod/policy", token=ADMIN, method="POST", json={"halt_failure_share": 0.5,
                                                                        "halt_window": 2})
    assert api(served, "/groups/prod/pause", token=ADMIN, method="POST").json()["paused"]
    assert f.check_in(omaha_req("e" * 32, "1.0.0"), "x").release is None
    assert not api(served, "/groups/prod/resume", token=ADMIN, method="POST").json()["paused"]
    assert f.check_in(omaha_req("e" * 32, "1.0.0"), "x").release is not None
    f.check_in(omaha_req("e" * 32, "1.0.0", omaha.Event(3, 0, 44), check=False), "x")
    g = api(served, "/groups/prod").json()
    assert g["halted"] and "e" * 32 in g["halt_reason"]
    st = api(served, "/status").json()
    assert st["halted"][0]["group"] == "prod"
    metrics = requests.get(f"{served.url}/metrics", timeout=10).text
    assert 'obelisk_fleet_group_halted{group="prod"} 1.0' in metrics
    assert 'obelisk_fleet_failed_updates{group="prod"} 1.0' in metrics
    assert 'obelisk_fleet_updates_started_total{group="prod"} 1.0' in metrics
    assert 'obelisk_fleet_update_checks_total{group="prod"} 2.0' in metrics
    assert 'obelisk_fleet_update_failures_total{group="prod"} 1.0' in metrics
    assert 'obelisk_fleet_instances{group="prod",status="rolled_back",version="1.0.0"} 1.0' in metrics


def test_preview_over_the_api(served: Served) -> None:
    f = served.fleet
    for i in range(6):
        f.check_in(omaha_req(f"{i:032x}", "1.0.0", check=False), "x")
    api(served, "/groups/prod/policy", token=ADMIN, method="POST", json={"max_updates_per_period": 2,
                                                                        "period": "1h"})
    d = api(served, "/groups/prod/preview", params={"step": "15m"}).json()
    assert d["release"] == "2.0.0" and len(d["instances"]) == 6
    times = sorted(e["at"] for e in d["instances"])
    assert times == [T0, T0, T0 + 3600, T0 + 3600, T0 + 7200, T0 + 7200]
    assert api(served, "/groups/prod/preview", params={"step": "forever"}).status_code == 400
    assert api(served, "/groups/nope/preview").status_code == 404
