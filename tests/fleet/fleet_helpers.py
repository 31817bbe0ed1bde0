"""Fleet test helpers: a real PostgreSQL on a Unix socket, stores on SQLite and on it, simulated hosts."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from update_engine import omaha
from update_server.db.store import Store

PG_USER = "obelisk"  # the cluster's superuser (initdb -U); the OS user running the server is `nobody`


def pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        pytest.fail("PostgreSQL is missing: run 'make setup' (Debian package postgresql)")
    return found[-1]


def _as_nobody(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """initdb and postgres refuse to run as root: run them as nobody (only when we are root)."""
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


@dataclass
class PgServer:
    root: Path
    sock: Path
    _template: str = ""

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@/{db}?host={self.sock}"

    def admin(self) -> sa.Engine:
        return sa.create_engine(f"postgresql+psycopg://{PG_USER}@/postgres?host={self.sock}",
                                isolation_level="AUTOCOMMIT")

    def create_db(self, *, migrated: bool = False) -> str:
        """A new database: empty, or a copy of one migrated once per session (skips the migrations' cost)."""
        name = "t_" + uuid.uuid4().hex[:12]
        template = ""
        if migrated:
            if not self._template:
                self._template = self.create_db()
                Store(self.url(self._template).replace("postgresql://", "postgresql+psycopg://")).close()
            template = f' TEMPLATE "{self._template}"'
        eng = self.admin()
        with eng.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"{template}')
        eng.dispose()
        return name


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL cluster: initdb in a temp folder, listening on a Unix socket only (no TCP)."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="obelisk-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for p in (root, sock):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    started = False
    try:
        r = _as_nobody([initdb, "-D", str(data), "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-sync"])
        assert r.returncode == 0, f"initdb failed: {r.stderr}"
        opts = f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=100"
        r = _as_nobody([pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start"])
        assert r.returncode == 0, f"pg_ctl start failed: {r.stderr} {(root / 'log').read_text()[-2000:]}"
        started = True
        yield PgServer(root, sock)
    finally:
        if started:
            _as_nobody([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.sqlite'}"
        return
    pg: PgServer = request.getfixturevalue("pg_server")
    yield pg.url(pg.create_db())  # left for the cluster's removal at the end of the session (a DROP is slow)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once; each test gets a copy (the migrations' own test starts from empty)."""
    path = tmp_path_factory.mktemp("fleet-template") / "fleet.sqlite"
    Store(f"sqlite:///{path}").close()
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated store of each kind (PostgreSQL: a copy of a database migrated once per session)."""
    if request.param == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        shutil.copy(template, tmp_path / "fleet.sqlite")
        s = Store(f"sqlite:///{tmp_path / 'fleet.sqlite'}")
        try:
            yield s
        finally:
            s.close()
        return
    pg: PgServer = request.getfixturevalue("pg_server")
    name = pg.create_db(migrated=True)
    s = Store(pg.url(name).replace("postgresql://", "postgresql+psycopg://"))
    try:
        yield s
    finally:
        s.close()


def machine_ids(n: int, prefix: str = "") -> list[str]:
    """Stable fake machine ids (32 hex digits, like /etc/machine-id)."""
    return [uuid.uuid5(uuid.NAMESPACE_OID, f"{prefix}{i}").hex for i in range(n)]


def wait_for(pred, timeout: float, what: str, step: float = 0.05):  # noqa: ANN001 - any predicate
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


class Sim:
    """Simulated hosts driving the real tracking and guard (time injected by the caller, never slept).

    A host granted an update reports it done at its next check-in (3/2 with its previous version),
    or failed with `fail_code` when it is in `failing`.
    """

    def __init__(self, store: Store, group: str, target: str, *, published_at: float | None = None,
                 failing: set[str] | None = None, fail_code: int = 10) -> None:
        self.store, self.group, self.target = store, group, target
        self.published_at = published_at
        self.failing = failing or set()
        self.fail_code = fail_code
        self.version: dict[str, str] = {}
        self.granted: dict[str, str] = {}   # machine id -> version being applied
        self.starts: list[tuple[float, str]] = []  # (time, machine id) of every new start

    def add(self, ids: list[str], version: str = "1.0.0") -> None:
        for mid in ids:
            self.version[mid] = version

    def checkin(self, mid: str, now: float):  # noqa: ANN201 - a policy.Decision
        from update_server import tracking

        events: list[tracking.CheckEvent] = []
        new = self.granted.pop(mid, None)
        if new is not None:
            if mid in self.failing:
                events.append(tracking.CheckEvent(3, 0, self.fail_code, reason="payload hash mismatch"))
            else:
                events.append(tracking.CheckEvent(3, 2, previous_version=self.version[mid]))
                self.version[mid] = new
        out = tracking.check_in(self.store, tracking.CheckIn(mid, self.group, self.version[mid], app_id="app",
                                                             updatecheck=True, events=events), now,
                                target=self.target, published_at=self.published_at)
        d = out.decision
        if d.offer:
            self.granted[mid] = d.version
            if d.new_start:
                self.starts.append((now, mid))
        return d


def max_in_any_window(times: list[float], period: float) -> int:
    """The most starts inside any half-open window (t - period, t] (sliding, as the guard counts)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - period:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


class Clock:
    """Injected time for a server under test: tests set `.now`, nothing sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    url: str
    fleet: object  # update_server.fleet_server.Fleet
    clock: Clock


def serve_app(app, port: int):  # noqa: ANN001, ANN201 - a Starlette app -> (uvicorn.Server, Thread)
    """A real uvicorn server on 127.0.0.1 in a thread; stop with `server.should_exit = True` + join."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    wait_for(lambda: server.started, 20, "uvicorn to start")
    return server, t


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APP = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
READ, ADMIN = "r" * 24, "a" * 24
T0 = 1_772_409_600.0  # 2026-03-02 00:00Z, a Monday


def publish(root: Path, version: str) -> None:
    d = root / "tiny" / version
    d.mkdir(parents=True)
    data = version.encode() * 100
    (d / "update.payload").write_bytes(data)
    (d / "release.json").write_text(json.dumps({
        "name": "tiny", "version": version, "app_id": APP, "arch": "amd64",
        "artifacts": {"update.payload": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))


@pytest.fixture
def served(store: Store, tmp_path: Path) -> Iterator[Served]:
    """Fleet API + /metrics of a Fleet over `store` and three releases, on a real loopback server."""
    from update_server.fleet_server import Fleet
    from update_server.releases import Catalog

    releases = tmp_path / "releases"
    for v in ("1.0.0", "1.5.0", "2.0.0"):
        publish(releases, v)
    clock = Clock(T0)
    fleet = Fleet(store, Catalog(releases), clock=clock, read_tokens=[READ], admin_tokens=[ADMIN])
    server, thread = serve_app(Starlette(routes=fleet.routes()), port := free_port())
    try:
        yield Served(f"http://127.0.0.1:{port}", fleet, clock)
    finally:
        server.should_exit = True
        thread.join(10)


def omaha_req(mid: str, version: str, *events: omaha.Event, track: str = "prod", check: bool = True
              ) -> omaha.Request:
    app = omaha.AppRequest(appid=APP, version=version, track=track, machineid=mid, board="amd64-usr",
                           ping=True, updatecheck=check, events=list(events))
    return omaha.parse_request(omaha.build_request(omaha.Request(app=app)))  # through the real codec
