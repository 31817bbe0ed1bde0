"""The real `obelisk update serve` with fleet state: Omaha over HTTP, the API, /metrics, two replicas on one PostgreSQL.

Servers are started as processes on free loopback ports and stopped by PID; the hosts are Omaha
requests built by the real codec and posted over HTTP, the way update_engine sends them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from fleet_helpers import ADMIN, APP, READ, PgServer, free_port, machine_ids, publish, wait_for
from testlib import OBELISK, stop_process

from update_engine import omaha

pytestmark = pytest.mark.timeout(170)


class Server:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    def check(self, mid: str, version: str, *events: omaha.Event, track: str = "prod", check: bool = True
              ) -> omaha.Response | None:
        app = omaha.AppRequest(appid=APP, version=version, track=track, machineid=mid, board="amd64-usr",
                               ping=True, updatecheck=check, events=list(events))
        r = requests.post(self.url + "/v1/update/", data=omaha.build_request(omaha.Request(app=app)), timeout=10,
                          headers={"Content-Type": "text/xml"})
        assert r.status_code == 200, r.text
        return omaha.parse_response(r.content) if check else None

    def api(self, path: str, method: str = "GET", token: str = ADMIN, **kw) -> requests.Response:  # noqa: ANN003
        return requests.request(method, f"{self.url}/api/v1/fleet{path}", timeout=10,
                                headers={"Authorization": f"Bearer {token}"}, **kw)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    releases = tmp_path / "releases"
    for v in ("1.0.0", "2.0.0"):
        publish(releases, v)
    (tmp_path / "admin").write_text(ADMIN)
    (tmp_path / "read").write_text(READ)
    for f in ("admin", "read"):
        (tmp_path / f).chmod(0o600)
    procs: list[subprocess.Popen] = []

    def start(*extra: str) -> Server:
        port = free_port()
        p = subprocess.Popen([OBELISK, "update", "serve", str(releases), "--listen", f"127.0.0.1:{port}",
                              "--admin-token-file", str(tmp_path / "admin"), "--read-token-file",
                              str(tmp_path / "read"), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        procs.append(p)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if p.poll() is not None:
                raise AssertionError(f"serve exited: {p.stderr.read()}")
            try:
                return requests.get(url + "/health", timeout=1).ok
            except requests.RequestException:
                return False

        wait_for(up, 30, "update serve to answer /health")
        return Server(p, url)

    yield start
    for p in procs:
        stop_process(p)


def test_serve_with_a_state_dir(serve, tmp_path: Path) -> None:  # noqa: ANN001
    s = serve("--state-dir", str(tmp_path / "state"))
    assert (tmp_path / "state" / "fleet.sqlite").is_file()
    assert s.check("a" * 32, "1.0.0").update.version == "2.0.0"  # no policy: as before, the newest
    s.check("a" * 32, "1.0.0", omaha.Event(13, 1), check=False)
    assert s.api("/groups/prod/policy", "POST", json={"max_updates_per_period": 1, "period": "1h"}).ok
    assert s.check("b" * 32, "1.0.0").status == "noupdate"  # the one start this hour went to a*32
    assert s.api("/instances/" + "b" * 32, token=READ).json()["note"].startswith("1 updates started")
    assert s.api("/groups/prod/pause", "POST", token=READ).status_code == 403
    inst = s.api("/instances", token=READ, params={"group": "prod"}).json()
    assert inst["total"] == 2 and {i["status"] for i in inst["instances"]} == {"downloading", "checking"}
    metrics = requests.get(s.url + "/metrics", timeout=10).text
    assert 'obelisk_fleet_updates_started_total{group="prod"} 1.0' in metrics
    bad = requests.post(s.url + "/v1/update/", timeout=10, data=omaha.build_request(omaha.Request(
        app=omaha.AppRequest(appid=APP, version="1.0.0", track="prod", machineid="<script>", updatecheck=True))))
    assert bad.status_code == 400 and "machineid" in bad.text
    r = subprocess.run([sys.executable, "-c", "from fleet.cli import app; app()", "status", "--json"],
                       env={"OBELISK_FLEET_SERVER": s.url, "OBELISK_FLEET_TOKEN": READ, "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"instances": 2' in r.stdout, r.stderr


def test_state_survives_a_restart(serve, tmp_path: Path) -> None:  # noqa: ANN001
    s = serve("--state-dir", str(tmp_path / "state"))
    s.api("/groups/prod/policy", "POST", json={"safe_mode": True})
    assert s.check("a" * 32, "1.0.0").update is not None
    stop_process(s.proc)
    s2 = serve("--state-dir", str(tmp_path / "state"))
    assert s2.check("b" * 32, "1.0.0").status == "noupdate"  # still waiting for the first host
    s2.check("a" * 32, "2.0.0", omaha.Event(3, 2, previousversion="1.0.0"), check=False)
    assert s2.check("b" * 32, "1.0.0").update is not None


def test_state_is_kept_in_sqlite_by_default(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """No --state-dir: the state folder is $XDG_STATE_HOME/obelisk/update-server (tests/conftest.py sets one
    per test), printed at start; a restart keeps what was tracked."""
    state = tmp_path / "xdg" / "obelisk" / "update-server"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    s = serve()
    assert s.proc.stdout.readline().startswith("serving 2 release(s)")
    assert s.proc.stdout.readline().startswith(f"fleet state: sqlite:///{state}/fleet.sqlite (schema ")
    assert (state / "fleet.sqlite").is_file()
    assert s.check("a" * 32, "1.0.0").update.version == "2.0.0"
    stop_process(s.proc)
    again = serve()
    assert again.api("/instances/" + "a" * 32, token=READ).json()["status"] == "granted"


def test_no_state_keeps_nothing(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    s = serve("--no-state")
    s.proc.stdout.readline()
    assert s.proc.stdout.readline().startswith("fleet state: none (--no-state)")
    assert s.check("a" * 32, "1.0.0").update.version == "2.0.0"
    assert s.api("/instances", token=READ).status_code == 404
    assert not (tmp_path / "xdg").exists()


def test_the_default_state_folder() -> None:
    from update_server.cli import default_state_dir

    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/obelisk-update-server:/var/lib/other",
                              "XDG_STATE_HOME": "/x"}) == Path("/var/lib/obelisk-update-server")
    assert default_state_dir({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/x/obelisk/update-server")
    assert default_state_dir({"XDG_STATE_HOME": "rel", "STATE_DIRECTORY": "rel2", "HOME": "/h"}) \
        == Path("/h/.local/state/obelisk/update-server")  # relative values are ignored (XDG spec)


@pytest.mark.parametrize("args,words", [
    (["--database", "mysql://x/y"], "unsupported database URL"),
    (["--state-dir", "/proc/1/nope"], "--state-dir"),
    (["--state-dir", "x", "--database", "postgresql://a@/b"], "not both"),
    (["--prune-after", "often", "--state-dir", "x"], "--prune-after"),
    (["--no-state", "--state-dir", "x"], "--no-state keeps no fleet state"),
    (["--no-state", "--database", "postgresql://a@/b"], "--no-state keeps no fleet state"),
])
def test_bad_fleet_options_are_one_line(tmp_path: Path, args: list[str], words: str) -> None:
    (tmp_path / "r").mkdir()
    r = subprocess.run([OBELISK, "update", "serve", str(tmp_path / "r"), *args], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_two_replicas_on_one_postgresql_never_pass_the_rate(serve, pg_server: PgServer) -> None:  # noqa: ANN001
    """Two real servers share one PostgreSQL; 120 hosts check in through both at once, 16 threads."""
    url = pg_server.url(pg_server.create_db())
    a, b = serve("--database", url), serve("--database", url)
    assert a.api("/groups/prod/policy", "POST", json={"max_updates_per_period": 7, "period": "1d"}).ok
    ids = machine_ids(120, "replicas")

    def one(i: int) -> bool:
        return (a if i % 2 else b).check(ids[i], "1.0.0").update is not None

    with ThreadPoolExecutor(16) as pool:  # every host's first check-in also races the release's first sighting
        offered = sum(pool.map(one, range(len(ids))))
    assert offered == 7
    metrics = requests.get(a.url + "/metrics", timeout=10).text
    assert 'obelisk_fleet_attempts{group="prod",outcome="pending"} 7.0' in metrics
