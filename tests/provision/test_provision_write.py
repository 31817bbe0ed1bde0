"""The write API (/api/v1/) against the real server on loopback: off unless enabled, bearer token
or mutual TLS, create/replace/delete changing what /ipxe and /cloud serve, reference checks, bad
input answered 4xx with a JSON error (never 500), 20 concurrent writers never tearing a file, and
SIGKILL in the middle of writes leaving only whole files."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from ports import free_port
from prov_helpers import AUTH, TOKEN, Served, serving_rw, start, stop, write_token_file
from testlib import make_pki

from obelisk.atomicfile import is_temporary
from provision.model import parse_group, parse_profile

WEB_MAC = "52:54:00:aa:bb:cc"
NODE1_MAC = "52:54:00:12:34:56"  # examples/provision/groups/node1.json
WRITERS = 20
# The example group's metadata, which the example cloud template (node.yaml) needs.
EXAMPLE_META = {"role": "worker", "update_group": "stable", "reboot_strategy": "off",
                "etcd_endpoints": "http://10.0.0.11:2379"}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token_file(tmp_path)


def api(s: Served, method: str, path: str, *, auth: dict[str, str] | None = AUTH, base: str | None = None,
        **kw: object) -> requests.Response:
    kw.setdefault("timeout", 30)
    # A kept-alive TLS connection that the client never closes makes the server's graceful stop wait
    # for its close_notify; tests hold responses (and so connections) longer than clients would.
    headers = {**(auth or {}), "Connection": "close"}
    return requests.request(method, (base or s.url) + "/api/v1" + path, headers=headers, **kw)


def files(data: Path) -> dict[str, bytes]:
    """Every file in the data folder (but the writers' lock file), by relative path."""
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def temporaries(data: Path) -> list[str]:
    return [str(p.relative_to(data)) for p in data.rglob(".*") if p.name != ".lock"]


def assert_json_error(r: requests.Response, status: int | None = None) -> str:
    assert r.status_code != 500 and 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    message = r.json()["error"]
    assert isinstance(message, str) and message
    return message


def no_tracebacks(s: Served) -> None:
    log = s.log_text()
    assert "Traceback" not in log, log[-4000:]


def web_profile(*args: str, kernel: str = "/assets/web/vmlinuz") -> dict:
    return {"name": "web servers", "boot": {"kernel": kernel, "initrd": ["/assets/web/initrd.img"],
                                            "args": ["console=ttyS0", *args]},
            "cloud_id": "web.yaml"}


WEB_TEMPLATE = ("#cloud-config\nhostname: {{ hostname }}\nwrite_files:\n  - path: /etc/role\n"
                "    content: \"{{ role }}\"\n")


# --- off, token -----------------------------------------------------------------------------------

def test_write_api_is_off_unless_enabled(serve: Callable[..., Served], data: Path) -> None:
    s = serve(data)
    before = files(data)
    for method, path, body in (("GET", "/profiles", None), ("PUT", "/profiles/x", {"boot": {"kernel": "/k"}}),
                               ("DELETE", "/groups/default", None), ("PUT", "/templates/cloud/x", None),
                               ("GET", "/select", None)):
        # not even the right-looking token opens an API nobody enabled
        for auth in (None, AUTH):
            r = api(s, method, path, auth=auth, json=body)
            message = assert_json_error(r, 403)
            assert "write API is off" in message and "--write-token-file" in message
    assert files(data) == before
    # The description of the API is public either way (it holds no data).
    assert api(s, "GET", "/openapi.json", auth=None).json()["openapi"].startswith("3.")
    no_tracebacks(s)


def test_bearer_token_is_required(serve: Callable[..., Served], data: Path, token_file: Path) -> None:
    s = serve(data, "--write-token-file", str(token_file))
    before = files(data)
    for auth in (None, {"Authorization": "Bearer wrong-token-0123456789abcdef"},
                 {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                 {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}, {"Authorization": "Bearer"},
                 {"X-Token": TOKEN}):
        for method, path in (("GET", "/profiles"), ("PUT", "/groups/default"), ("DELETE", "/groups/node1")):
            r = api(s, method, path, auth=auth, json={"profile": "tiny"})
            message = assert_json_error(r, 401)
            assert "Bearer" in message and r.headers["www-authenticate"] == "Bearer"
    assert files(data) == before
    r = api(s, "GET", "/profiles")
    assert r.status_code == 200 and r.json() == {"profiles": ["tiny"]}
    # the scheme is case-insensitive (RFC 7235)
    assert api(s, "GET", "/groups", auth={"Authorization": f"bearer {TOKEN}"}).json() == \
        {"groups": ["default", "node1"]}
    no_tracebacks(s)


# --- create, replace, delete ----------------------------------------------------------------------

def test_create_replace_delete_changes_what_is_served(serve: Callable[..., Served], data: Path,
                                                      token_file: Path) -> None:
    s = serve(data, "--write-token-file", str(token_file))
    original = files(data)
    mac_query = f"?mac={WEB_MAC.upper().replace(':', '-')}"  # served MACs are normalised
    assert api(s, "GET", f"/select{mac_query}").json()["group"] == "default"

    # create: template, then the profile naming it, then the group naming the profile
    r = api(s, "PUT", "/templates/cloud/web.yaml", data=WEB_TEMPLATE.encode(),
            auth={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 201 and r.text == WEB_TEMPLATE
    r = api(s, "PUT", "/profiles/web", json=web_profile("web.v=1"))
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "web" and r.json()["boot"]["args"] == ["console=ttyS0", "web.v=1"]
    group = {"name": "web hosts", "profile": "web", "selector": {"mac": WEB_MAC},
             "metadata": {"hostname": "web1", "role": "frontend"}}
    r = api(s, "PUT", "/groups/web1", json=group)
    assert r.status_code == 201, r.text
    assert parse_group(json.loads((data / "groups" / "web1.json").read_text()), ident="web1").profile == "web"
    assert parse_profile(json.loads((data / "profiles" / "web.json").read_text()), ident="web").cloud_id == "web.yaml"
    assert (data / "cloud" / "web.yaml").read_text() == WEB_TEMPLATE

    ipxe = s.get(f"/ipxe{mac_query}")
    assert ipxe.status_code == 200, ipxe.text
    assert ipxe.text == (f"#!ipxe\nkernel {s.url}/assets/web/vmlinuz console=ttyS0 web.v=1\n"
                         f"initrd {s.url}/assets/web/initrd.img\nboot\n")
    cloud = s.get(f"/cloud{mac_query}")
    assert cloud.status_code == 200, cloud.text
    assert cloud.text == WEB_TEMPLATE.replace("{{ hostname }}", "web1").replace("{{ role }}", "frontend")
    assert api(s, "GET", "/groups/web1").json()["selector"] == {"mac": WEB_MAC}
    assert api(s, "GET", "/templates/cloud/web.yaml").text == WEB_TEMPLATE
    assert api(s, "GET", "/profiles").json() == {"profiles": ["tiny", "web"]}
    assert api(s, "GET", "/templates/cloud").json() == {"templates": ["node.yaml", "web.yaml"]}
    assert api(s, "GET", f"/select{mac_query}").json()["group"] == "web1"

    # replace: 200 (not 201), and the very next request gets the new version
    r = api(s, "PUT", "/profiles/web", json=web_profile("web.v=2", kernel="/assets/web/vmlinuz-2"))
    assert r.status_code == 200, r.text
    kernel_line = s.get(f"/ipxe{mac_query}").text.splitlines()[1]
    assert kernel_line == f"kernel {s.url}/assets/web/vmlinuz-2 console=ttyS0 web.v=2"
    new_template = WEB_TEMPLATE.replace("/etc/role", "/etc/obelisk/role")
    assert api(s, "PUT", "/templates/cloud/web.yaml", data=new_template).status_code == 200
    assert "/etc/obelisk/role" in s.get(f"/cloud{mac_query}").text
    r = api(s, "PUT", "/groups/web1", json={**group, "metadata": {"hostname": "web9", "role": "frontend"}})
    assert r.status_code == 200
    assert "hostname: web9\n" in s.get(f"/cloud{mac_query}").text
    assert "HOSTNAME=web9\n" in s.get(f"/metadata{mac_query}").text

    # delete, in the order references allow
    assert api(s, "DELETE", "/groups/web1").status_code == 204
    assert not (data / "groups" / "web1.json").exists()
    assert api(s, "GET", f"/select{mac_query}").json()["group"] == "default"
    assert "vmlinuz-2" not in s.get(f"/ipxe{mac_query}").text  # the default group's profile now
    assert api(s, "DELETE", "/profiles/web").status_code == 204
    assert api(s, "DELETE", "/templates/cloud/web.yaml").status_code == 204
    assert not (data / "profiles" / "web.json").exists() and not (data / "cloud" / "web.yaml").exists()
    for path in ("/groups/web1", "/profiles/web", "/templates/cloud/web.yaml"):
        assert_json_error(api(s, "GET", path), 404)
        assert_json_error(api(s, "DELETE", path), 404)
    assert files(data) == original
    assert temporaries(data) == []
    no_tracebacks(s)


def test_generic_templates_and_profile_without_id_in_body(serve: Callable[..., Served], data: Path,
                                                          token_file: Path) -> None:
    s = serve(data, "--write-token-file", str(token_file))
    assert api(s, "PUT", "/templates/generic/env.txt", data="ROLE={{ role }}\n").status_code == 201
    # The id comes from the path; giving it in the body too is fine when they agree.
    r = api(s, "PUT", "/profiles/gen", json={"id": "gen", "boot": {"kernel": "/k"}, "generic_id": "env.txt"})
    assert r.status_code == 201, r.text
    r = api(s, "PUT", "/groups/gen", json={"profile": "gen", "selector": {"tier": "gen"}, "metadata": {"role": "db"}})
    assert r.status_code == 201, r.text
    assert s.get("/generic?tier=gen").text == "ROLE=db\n"
    assert api(s, "PUT", "/templates/generic/env.txt", data="ROLE={{ role | upper }}\n").status_code == 200
    assert s.get("/generic?tier=gen").text == "ROLE=DB\n"
    no_tracebacks(s)


# --- reference checks -----------------------------------------------------------------------------

def test_reference_checks(serve: Callable[..., Served], data: Path, token_file: Path) -> None:
    s = serve(data, "--write-token-file", str(token_file))
    before = files(data)
    # a group naming a profile that does not exist
    message = assert_json_error(api(s, "PUT", "/groups/orphan", json={"profile": "missing"}), 409)
    assert "'missing'" in message and "does not exist" in message
    # a profile naming templates that do not exist
    message = assert_json_error(api(s, "PUT", "/profiles/p", json={"boot": {"kernel": "/k"}, "cloud_id": "nope.yaml"}),
                                409)
    assert "nope.yaml" in message
    assert_json_error(api(s, "PUT", "/profiles/p", json={"boot": {"kernel": "/k"}, "generic_id": "nope"}), 409)
    # deleting what is in use
    message = assert_json_error(api(s, "DELETE", "/profiles/tiny"), 409)
    assert "default" in message and "node1" in message
    message = assert_json_error(api(s, "DELETE", "/templates/cloud/node.yaml"), 409)
    assert "tiny" in message
    assert_json_error(api(s, "DELETE", "/templates/generic/hosts.txt"), 409)
    # re-pointing a group at a missing profile is refused as well, and leaves the old group in place
    assert_json_error(api(s, "PUT", "/groups/default", json={"profile": "gone"}), 409)
    # jinja syntax errors are refused before anything is stored, new or replacing
    for name in ("new.yaml", "node.yaml"):
        message = assert_json_error(api(s, "PUT", f"/templates/cloud/{name}", data="#cloud-config\nhostname: {{ x\n"),
                                    422)
        assert f"cloud/{name}" in message and "line" in message
    assert_json_error(api(s, "PUT", "/templates/generic/g", data="{% if x %}no endif"), 422)
    assert files(data) == before
    assert s.get(f"/cloud?mac={NODE1_MAC}").status_code == 200
    no_tracebacks(s)


# --- bad input ------------------------------------------------------------------------------------

def _deep(n: int) -> bytes:
    return b'{"profile": "tiny", "metadata": ' + b'{"a": ' * n + b"1" + b"}" * n + b"}"


BAD = [
    # (what, method, path, body, status)
    ("not JSON", "PUT", "/groups/g", b"{", 422),
    ("JSON, not an object", "PUT", "/groups/g", b"[1, 2]", 422),
    ("null", "PUT", "/profiles/p", b"null", 422),
    ("empty body", "PUT", "/profiles/p", b"", 422),
    ("unknown field", "PUT", "/groups/g", b'{"profile": "tiny", "colour": "red"}', 422),
    ("unknown nested field", "PUT", "/profiles/p", b'{"boot": {"kernel": "/k", "cmdline": "x"}}', 422),
    ("wrong type", "PUT", "/groups/g", b'{"profile": "tiny", "selector": ["mac"]}', 422),
    ("id disagrees with path", "PUT", "/groups/g", b'{"id": "h", "profile": "tiny"}', 422),
    ("id of the wrong type", "PUT", "/groups/g", b'{"id": 5, "profile": "tiny"}', 422),
    ("malformed MAC selector", "PUT", "/groups/g", b'{"profile": "tiny", "selector": {"mac": "zz:zz"}}', 422),
    ("bad selector key", "PUT", "/groups/g", b'{"profile": "tiny", "selector": {"Bad Key": "x"}}', 422),
    ("control character in an arg", "PUT", "/profiles/p", b'{"boot": {"kernel": "/k", "args": ["a\\nb"]}}', 422),
    ("NaN", "PUT", "/groups/g", b'{"profile": "tiny", "metadata": {"x": NaN}}', 422),
    ("Infinity", "PUT", "/groups/g", b'{"profile": "tiny", "metadata": {"x": -Infinity}}', 422),
    ("lone surrogate", "PUT", "/groups/g", b'{"profile": "tiny", "metadata": {"x": "\\ud800"}}', 422),
    ("lone surrogate key", "PUT", "/groups/g", b'{"profile": "tiny", "metadata": {"\\udfff": 1}}', 422),
    ("not UTF-8", "PUT", "/groups/g", b'{"profile": "tiny", "name": "\xff\xfe"}', 422),
    ("nested 100 deep", "PUT", "/groups/g", _deep(100), 422),
    ("nested 100000 deep", "PUT", "/groups/g", b"[" * 100_000 + b"]" * 100_000, 422),
    ("bad id: leading dot", "PUT", "/groups/.hidden", b'{"profile": "tiny"}', None),
    ("bad id: leading dash", "PUT", "/profiles/-p", b'{"boot": {"kernel": "/k"}}', None),
    ("bad id: too long", "PUT", "/groups/" + "a" * 65, b'{"profile": "tiny"}', None),
    ("bad id: space", "PUT", "/groups/a%20b", b'{"profile": "tiny"}', None),
    ("bad id: encoded slash", "PUT", "/groups/..%2F..%2Fprofiles%2Ftiny", b'{"profile": "tiny"}', 404),
    ("bad id: dot dot", "PUT", "/groups/..", b'{"profile": "tiny"}', None),
    ("bad id: GET", "GET", "/profiles/%00", None, None),
    ("bad id: DELETE", "DELETE", "/groups/.lock", None, None),
    ("bad template name", "PUT", "/templates/cloud/.lock", b"x", None),
    # `$` in Python's re also matches before a final newline: a file named "x\n" must not appear
    ("template name with a final newline", "PUT", "/templates/cloud/x%0A", b"x", None),
    ("profile id with a final newline", "PUT", "/profiles/p%0A", b'{"boot": {"kernel": "/k"}}', None),
    ("group id with a final newline", "GET", "/groups/default%0A", None, 404),
    ("template kind", "PUT", "/templates/bogus/x", b"x", 404),
    ("template kind traversal", "PUT", "/templates/..%2Fgroups/default.json", b"{}", 404),
    ("template not UTF-8", "PUT", "/templates/cloud/t", b"#cloud-config\n\xff", 422),
    ("template with NUL", "PUT", "/templates/cloud/t", b"#cloud-config\n\x00", 422),
    ("template syntax", "PUT", "/templates/cloud/t", b"{% for %}", 422),
    ("unknown endpoint", "GET", "/nodes", None, 404),
    ("the bare prefix", "GET", "", None, 404),
    ("wrong method", "POST", "/groups/g", b'{"profile": "tiny"}', 405),
    ("wrong method on a list", "DELETE", "/profiles", None, 405),
    ("odd method", "PATCH", "/templates/cloud/node.yaml", b"x", 405),
    ("too big", "PUT", "/templates/cloud/big", b"#" * ((1 << 20) + 1), 413),
    ("too big as JSON", "PUT", "/groups/g", b'{"profile": "tiny", "name": "' + b"x" * (1 << 20) + b'"}', 413),
    # a body under the limit whose stored (indented) form would be over it: a file every later
    # read would refuse, failing every host that selects a group
    ("too big once stored", "PUT", "/groups/g",
     json.dumps({"profile": "tiny", "metadata": {"x": [0] * 200_000}}, separators=(",", ":")).encode(), 413),
]


@pytest.fixture(scope="module")
def served_rw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    """One token-enabled server (and its data folder) for the many bad-input cases; each case checks
    that the data folder did not change, so sharing the server is safe and saves a start per case."""
    with serving_rw(tmp_path_factory.mktemp("rw")) as sd:
        yield sd


@pytest.mark.parametrize(("method", "path", "body", "status"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_4xx(served_rw: tuple[Served, Path], method: str, path: str, body: bytes | None,
                                 status: int | None) -> None:
    s, data = served_rw
    before = files(data)
    r = api(s, method, path, data=body)
    assert_json_error(r, status)
    assert files(data) == before
    assert temporaries(data) == []
    # the server is still well
    assert s.get(f"/metadata?mac={NODE1_MAC}").status_code == 200
    no_tracebacks(s)


def test_oversized_streamed_body_is_413(served_rw: tuple[Served, Path]) -> None:
    """No Content-Length (chunked): the limit holds while reading, not only from the header."""
    s, data = served_rw

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"#" * 65536

    r = api(s, "PUT", "/templates/cloud/big", data=chunks())
    assert_json_error(r, 413)
    assert not (data / "cloud" / "big").exists()
    no_tracebacks(s)


# --- 20 concurrent writers ------------------------------------------------------------------------

def _hammer(n: int, send: Callable[[int], requests.Response]) -> list[requests.Response]:
    """n threads released together by a barrier, thread i sending version i."""
    barrier = threading.Barrier(n)
    out: list[requests.Response | BaseException | None] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = send(i)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, requests.Response) for r in out), out
    return out  # type: ignore[return-value]


def race_group(i: int) -> dict:
    # Sizes differ a lot between versions, so a torn or interleaved file could not parse as any one.
    return {"name": f"version {i}", "profile": "tiny", "selector": {"mac": "52:54:00:00:00:01"},
            "metadata": {**EXAMPLE_META, "version": i, "pad": "x" * (1 + (i * 7919) % 20000)}}


def race_template(i: int) -> str:
    return (f"#cloud-config\n# version {i}\nhostname: v{i}-{{{{ role }}}}\nwrite_files:\n  - path: /etc/pad\n"
            f"    content: \"{'y' * (1 + (i * 7919) % 20000)}\"\n")


def test_20_concurrent_writers_of_one_group(serve: Callable[..., Served], data: Path, token_file: Path) -> None:
    """Two server processes on one data folder (so both the in-process mutex and the cross-process
    flock are in play), 20 writers PUT 20 versions of the same group at once; three rounds."""
    servers = [serve(data, "--write-token-file", str(token_file)) for _ in range(2)]
    versions = [race_group(i) for i in range(WRITERS)]
    for round_ in range(3):
        rs = _hammer(WRITERS, lambda i: api(servers[i % 2], "PUT", "/groups/race", json=versions[i]))
        codes = sorted(r.status_code for r in rs)
        # exactly one writer created the group (the check and the write are under one lock)
        assert codes == ([200] * (WRITERS - 1) + [201] if round_ == 0 else [200] * WRITERS), codes
        on_disk = json.loads((data / "groups" / "race.json").read_text())
        winner = on_disk["metadata"]["version"]
        assert on_disk == parse_group(versions[winner], ident="race").model_dump(mode="json")
        assert temporaries(data) == []
        for s in servers:
            assert api(s, "GET", "/groups/race").json() == on_disk
            assert f"VERSION={winner}\n" in s.get("/metadata?mac=52:54:00:00:00:01").text
        # the group is selectable and its cloud-config renders from the winning version
        assert 'group: "stable"' in servers[0].get("/cloud?mac=52:54:00:00:00:01").text
    for s in servers:
        no_tracebacks(s)


def test_20_concurrent_writers_of_one_template(serve: Callable[..., Served], data: Path, token_file: Path) -> None:
    s = serve(data, "--write-token-file", str(token_file))
    versions = [race_template(i) for i in range(WRITERS)]
    for _ in range(3):
        rs = _hammer(WRITERS, lambda i: api(s, "PUT", "/templates/cloud/node.yaml", data=versions[i].encode()))
        assert {r.status_code for r in rs} == {200}, [r.text for r in rs]
        text = (data / "cloud" / "node.yaml").read_text()
        assert text in versions
        winner = versions.index(text)
        assert temporaries(data) == []
        assert api(s, "GET", "/templates/cloud/node.yaml").text == text
        cloud = s.get(f"/cloud?mac={NODE1_MAC}")
        assert cloud.status_code == 200, cloud.text
        assert cloud.text == text.replace("{{ role }}", "etcd")
        assert f"hostname: v{winner}-etcd\n" in cloud.text
    no_tracebacks(s)


# --- SIGKILL while writing ------------------------------------------------------------------------

KILL_AFTER = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


def _writers_until_dead(s: Served, sent: dict[str, set], stop_flag: threading.Event,
                        problems: list[str]) -> list[threading.Thread]:
    """8 writers in a loop (a group, a template, a profile; each version recorded before it is sent)
    until the server stops answering. Any answer but 200 before that is a problem."""
    def loop(t: int) -> None:
        n = 0
        while not stop_flag.is_set():
            v = t * 100_000 + n
            n += 1
            kind = t % 3
            try:
                if kind == 0:
                    sent["group"].add(v)
                    r = api(s, "PUT", "/groups/race", json=race_group(v), timeout=5)
                elif kind == 1:
                    sent["template"].add(race_template(v))
                    r = api(s, "PUT", "/templates/cloud/node.yaml", data=race_template(v).encode(), timeout=5)
                else:
                    sent["profile"].add(v)
                    r = api(s, "PUT", "/profiles/tiny", json=_tiny(v), timeout=5)
            except requests.RequestException:
                return  # the server is gone
            if r.status_code not in (200, 201):
                problems.append(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:200]}")
                return

    threads = [threading.Thread(target=loop, args=(t,), daemon=True) for t in range(8)]
    for t in threads:
        t.start()
    return threads


def _tiny(v: int) -> dict:
    return {"name": f"version {v}", "boot": {"kernel": "/assets/k", "args": [f"v={v}", "p=" + "z" * (v % 5000 + 1)]},
            "cloud_id": "node.yaml", "generic_id": "hosts.txt"}


def test_sigkill_during_writes_leaves_whole_files(serve: Callable[..., Served], data: Path, token_file: Path,
                                                  tmp_path: Path) -> None:
    original = files(data)
    sent: dict[str, set] = {"group": set(), "template": set(), "profile": set()}
    leftovers = 0
    for round_, delay in enumerate(KILL_AFTER):
        s = serve(data, "--write-token-file", str(token_file))
        assert temporaries(data) == []  # a restarted server sweeps what the killed one left
        stop_flag = threading.Event()
        problems: list[str] = []
        before = sum(len(v) for v in sent.values())
        threads = _writers_until_dead(s, sent, stop_flag, problems)
        # The kill lands `delay` after the first write went out (a loaded machine may start the threads late).
        deadline = time.monotonic() + 30
        while sum(len(v) for v in sent.values()) == before and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        os.kill(s.proc.pid, signal.SIGKILL)
        s.proc.wait(10)
        stop_flag.set()
        for t in threads:
            t.join(30)
        assert problems == []
        leftovers += len(temporaries(data))
        # every file parses and is the original or one of the versions sent
        for rel, content in files(data).items():
            name = Path(rel).name
            if is_temporary(name):
                continue  # a killed writer's temporary: never read (dot file), swept on restart
            assert not name.startswith("."), rel
            if rel == "groups/race.json":
                g = json.loads(content)
                v = g["metadata"]["version"]
                assert v in sent["group"], f"round {round_}: {rel} is version {v}, never sent"
                assert g == parse_group(race_group(v), ident="race").model_dump(mode="json"), f"round {round_}: {rel}"
            elif rel == "cloud/node.yaml":
                assert content == original[rel] or content.decode() in sent["template"], f"round {round_}: {rel}"
            elif rel == "profiles/tiny.json":
                if content != original[rel]:
                    p = json.loads(content)
                    v = int(p["boot"]["args"][0][2:])
                    assert v in sent["profile"], f"round {round_}: {rel} is version {v}, never sent"
                    assert p == parse_profile(_tiny(v), ident="tiny").model_dump(mode="json"), f"round {round_}: {rel}"
            else:
                assert content == original[rel], f"round {round_}: {rel} changed"
        # a restarted server serves exactly what is on disk
        s2 = start(data, tmp_path / f"restart-{round_}.log", "--write-token-file", str(token_file))
        try:
            assert temporaries(data) == []
            disk = files(data)
            assert api(s2, "GET", "/templates/cloud/node.yaml").content == disk["cloud/node.yaml"]
            tiny = parse_profile(json.loads(disk["profiles/tiny.json"]), ident="tiny")
            assert api(s2, "GET", "/profiles/tiny").json() == tiny.model_dump(mode="json")
            if "groups/race.json" in disk:
                race = json.loads(disk["groups/race.json"])
                assert api(s2, "GET", "/groups/race").json() == race
                assert f"VERSION={race['metadata']['version']}\n" in s2.get("/metadata?mac=52:54:00:00:00:01").text
            cloud = s2.get(f"/cloud?mac={NODE1_MAC}")
            assert cloud.status_code == 200, cloud.text
            assert cloud.text.startswith("#cloud-config\n")
            no_tracebacks(s2)
        finally:
            stop(s2.proc)
    writes = sum(len(v) for v in sent.values())
    print(f"\nSIGKILL rounds: {len(KILL_AFTER)}, writes attempted: {writes}, temporaries left by kills: {leftovers}")
    assert writes > len(KILL_AFTER)  # the writers did run before each kill


# --- mutual TLS -----------------------------------------------------------------------------------

def _wait_tls(url: str, **kw: object) -> None:
    for _ in range(200):
        try:
            requests.get(url, timeout=2, **kw)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


def test_mutual_tls_write_listener(serve: Callable[..., Served], data: Path, tmp_path: Path,
                                   token_file: Path) -> None:
    pki, other = tmp_path / "pki", tmp_path / "other-pki"
    pki.mkdir()
    other.mkdir()
    make_pki(pki)
    make_pki(other)  # a second CA: its client certificate must not be accepted
    ca = str(pki / "ca.pem")
    cert = (str(pki / "client.pem"), str(pki / "client.key"))
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), "--client-ca", ca]

    # mutual TLS only: no token file
    wport = free_port()
    s = serve(data, *tls, "--write-listen", f"127.0.0.1:{wport}", scheme="https", verify=ca)
    w = f"https://127.0.0.1:{wport}"
    _wait_tls(w + "/health", verify=ca, cert=cert)
    # without a client certificate (or with one from another CA) the handshake fails: no HTTP at all
    for client_cert in (None, (str(other / "client.pem"), str(other / "client.key"))):
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is one
            requests.put(w + "/api/v1/groups/tls", json={"profile": "tiny"}, verify=ca, cert=client_cert, timeout=10)
    assert not (data / "groups" / "tls.json").exists()
    # with it, writes need no token
    r = api(s, "PUT", "/groups/tls", base=w, auth=None, json={"profile": "tiny", "selector": {"site": "tls"}},
            verify=ca, cert=cert)
    assert r.status_code == 201, r.text
    assert (data / "groups" / "tls.json").exists()
    assert api(s, "GET", "/select?site=tls", base=w, auth=None, verify=ca, cert=cert).json()["group"] == "tls"
    # the plain listener serves reads over HTTPS and refuses writes: no token can open it here
    assert "\nSITE=tls\n" in s.get("/metadata?site=tls", verify=ca).text
    for auth in (None, AUTH):
        message = assert_json_error(api(s, "DELETE", "/groups/tls", auth=auth, verify=ca), 403)
        assert "--write-listen" in message
    assert (data / "groups" / "tls.json").exists()
    # even with a client certificate: the plain listener never asked for one, so it proves nothing
    assert_json_error(api(s, "DELETE", "/groups/tls", auth=None, verify=ca, cert=cert), 403)
    no_tracebacks(s)
    stop(s.proc)

    # both: a token opens the plain listener; the mutual-TLS listener still needs no token
    wport = free_port()
    s = serve(data, *tls, "--write-listen", f"127.0.0.1:{wport}", "--write-token-file", str(token_file),
              scheme="https", verify=ca)
    w = f"https://127.0.0.1:{wport}"
    _wait_tls(w + "/health", verify=ca, cert=cert)
    assert_json_error(api(s, "DELETE", "/groups/tls", auth=None, verify=ca), 401)
    assert_json_error(api(s, "DELETE", "/groups/tls", auth={"Authorization": "Bearer nope"}, verify=ca), 401)
    assert api(s, "PUT", "/groups/tls", json={"profile": "tiny", "name": "via token"}, verify=ca).status_code == 200
    r = api(s, "PUT", "/groups/tls", base=w, auth=None, json={"profile": "tiny", "name": "via cert"},
            verify=ca, cert=cert)
    assert r.status_code == 200 and json.loads((data / "groups" / "tls.json").read_text())["name"] == "via cert"
    with pytest.raises(requests.exceptions.ConnectionError):
        api(s, "DELETE", "/groups/tls", base=w, verify=ca)  # a token is no substitute for the certificate there
    assert api(s, "DELETE", "/groups/tls", base=w, auth=None, verify=ca, cert=cert).status_code == 204
    no_tracebacks(s)


def test_mtls_flags_are_checked(data: Path, tmp_path: Path) -> None:
    """--write-listen without a CA (or the same port as --listen) is refused with one line, exit 2."""
    import subprocess

    from testlib import OBELISK

    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    base = [OBELISK, "provision", "serve", "--data", str(data), "--listen", "127.0.0.1:1"]
    cases = {
        "needs --tls-cert": ["--write-listen", "127.0.0.1:2"],
        "--client-ca": ["--write-listen", "127.0.0.1:2", "--tls-cert", str(pki / "server.pem"),
                        "--tls-key", str(pki / "server.key")],
        "another port": ["--write-listen", "127.0.0.1:1", "--tls-cert", str(pki / "server.pem"),
                         "--tls-key", str(pki / "server.key"), "--client-ca", str(pki / "ca.pem")],
    }
    for needle, extra in cases.items():
        r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert needle in r.stderr and re.match(r"^error: ", r.stderr), r.stderr
