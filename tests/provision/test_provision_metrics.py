"""`/metrics` of the real `obelisk provision serve` (uvicorn on loopback): what it counts, parsed back with
prometheus_client's own parser; no token needed, but `--allow` applies to it as to the read side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from prov_helpers import AUTH, Served, write_token_file

NODE1 = "52:54:00:12:34:56"
BROKEN = "52:54:00:00:00:99"


def scrape(s: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = s.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(r.text) for x in fam.samples}


def val(got: dict, name: str, **labels: str) -> float:
    return got[("obelisk_provision_" + name, tuple(sorted(labels.items())))]


def test_metrics_count_answers_renders_errors_and_writes(serve: Callable[..., Served], data: Path,
                                                         tmp_path: Path) -> None:
    s = serve(data, "--write-token-file", str(write_token_file(tmp_path)))
    got = scrape(s)  # every series is there from the start, at 0
    assert val(got, "requests_total", endpoint="cloud", result="served") == 0.0
    assert val(got, "render_errors_total", endpoint="cloud") == 0.0
    assert val(got, "config_groups") == 2 and val(got, "config_profiles") == 1
    assert val(got, "config_templates", kind="cloud") == 1 and val(got, "config_templates", kind="generic") == 1

    assert s.get("/cloud", params={"mac": NODE1}).status_code == 200
    assert s.get("/cloud", params={"mac": "52:54:00:aa:bb:cc"}).status_code == 200  # the default group
    assert s.get("/cloud").status_code == 400  # its template needs the mac: a render error
    assert s.get("/generic", params={"mac": NODE1}).status_code == 200
    assert s.get("/metadata", params={"mac": NODE1}).status_code == 200
    assert s.get("/ipxe", params={"mac": NODE1}).status_code == 404  # no assets: the profile's release is missing
    assert s.get("/cloud", params={"mac": NODE1, "os": "a\nb"}).status_code == 400
    assert s.get("/boot.ipxe").status_code == 200
    # Through the write API: a template that fails on the group's data, its profile and group.
    put = [("/templates/cloud/bad.yaml", {"data": b"#cloud-config\nhostname: {{ no_such_value }}\n"}),
           ("/profiles/bad", {"json": {"boot": {"kernel": "/k"}, "cloud_id": "bad.yaml"}}),
           ("/groups/bad", {"json": {"profile": "bad", "selector": {"mac": BROKEN}}})]
    for path, body in put:
        r = requests.put(s.url + "/api/v1" + path, headers=AUTH, timeout=10, **body)
        assert r.status_code == 201, r.text
    assert requests.put(s.url + "/api/v1/profiles/bad", headers=AUTH, timeout=10,
                        json={"boot": {"kernel": "/k2"}, "cloud_id": "bad.yaml"}).status_code == 200
    assert requests.get(s.url + "/api/v1/profiles", timeout=10).status_code == 401  # no token
    assert s.get("/cloud", params={"mac": BROKEN}).status_code == 500

    got = scrape(s)
    assert val(got, "requests_total", endpoint="cloud", result="served") == 2
    assert val(got, "requests_total", endpoint="cloud", result="bad_request") == 2
    assert val(got, "requests_total", endpoint="cloud", result="error") == 1
    assert val(got, "requests_total", endpoint="generic", result="served") == 1
    assert val(got, "requests_total", endpoint="ipxe", result="not_found") == 1
    assert val(got, "requests_total", endpoint="boot.ipxe", result="served") == 1
    assert val(got, "configs_rendered_total", kind="cloud") == 2
    assert val(got, "configs_rendered_total", kind="generic") == 1
    assert val(got, "configs_rendered_total", kind="metadata") == 1
    assert val(got, "configs_rendered_total", kind="ipxe") == 0
    assert val(got, "render_errors_total", endpoint="cloud") == 2  # the missing mac, the broken template
    assert val(got, "write_requests_total", result="ok") == 4
    assert val(got, "write_requests_total", result="unauthorized") == 1
    assert val(got, "write_changes_total", kind="cloud", change="created") == 1
    assert val(got, "write_changes_total", kind="profiles", change="created") == 1
    assert val(got, "write_changes_total", kind="profiles", change="updated") == 1
    assert val(got, "write_changes_total", kind="groups", change="created") == 1
    assert val(got, "config_groups") == 3 and val(got, "config_profiles") == 2
    assert val(got, "config_templates", kind="cloud") == 2
    assert requests.delete(s.url + "/api/v1/groups/bad", headers=AUTH, timeout=10).status_code == 204
    got = scrape(s)
    assert val(got, "write_changes_total", kind="groups", change="deleted") == 1 and val(got, "config_groups") == 2
    # Counts only: nothing a host sent or a template holds.
    body = s.get("/metrics").text
    assert NODE1 not in body and BROKEN not in body and "no_such_value" not in body


def test_metrics_need_no_token_but_honour_allow(serve: Callable[..., Served], data: Path) -> None:
    s = serve(data, "--allow", "10.0.0.0/8")
    r = s.get("/metrics")
    assert r.status_code == 403 and r.text.startswith("error: client 127.0.0.1 is not in an allowed network")
    assert s.get("/health").status_code == 200
    open_ = serve(data, "--allow", "127.0.0.0/8")
    assert open_.get("/metrics").status_code == 200
