"""Console test helpers: the real `obelisk update serve` on a loopback port, hosts over Omaha, headless Chromium.

The server is a process (stopped by PID even when a test fails); the browser is Debian's chromium
driven by its chromedriver through selenium, with its own temporary profile, every wait bounded.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fleet_helpers import ADMIN, APP, READ, publish, wait_for
from ports import free_port
from testlib import OBELISK, stop_process

from update_engine import omaha
from update_server import tracking
from update_server.db.store import Store

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 15.0  # seconds, every browser wait
HOSTILE = "<script>alert(1)</script>"


class ConsoleServer:
    def __init__(self, proc: subprocess.Popen, url: str, state: Path) -> None:
        self.proc, self.url, self.state = proc, url, state

    def check(self, mid: str, version: str, *events: omaha.Event, track: str = "prod", check: bool = True,
              oem: str = "", alias: str = "") -> omaha.Response | None:
        """One Omaha request, built by the real codec and posted the way update_engine posts it."""
        app = omaha.AppRequest(appid=APP, version=version, track=track, machineid=mid, board="amd64-usr",
                               ping=True, updatecheck=check, events=list(events), oem=oem, machinealias=alias)
        r = requests.post(self.url + "/v1/update/", data=omaha.build_request(omaha.Request(app=app)), timeout=10,
                          headers={"Content-Type": "text/xml"})
        assert r.status_code == 200, r.text
        return omaha.parse_response(r.content) if check else None

    def api(self, path: str, method: str = "GET", token: str = ADMIN, **kw) -> requests.Response:  # noqa: ANN003
        return requests.request(method, f"{self.url}/api/v1/fleet{path}", timeout=10,
                                headers={"Authorization": f"Bearer {token}"}, **kw)

    def group(self, name: str) -> dict:
        r = self.api(f"/groups/{name}", token=READ)
        assert r.ok, r.text
        return r.json()

    def record(self, mid: str, group: str, version: str, *events: tracking.CheckEvent, at: float | None = None
               ) -> None:
        """Write a host's request straight into the server's SQLite file (the same tracking code the
        Omaha handler runs): for what the Omaha codec cannot carry yet (an event's reason text) and
        for a check-in in the past (a stale host)."""
        store = Store(f"sqlite:///{self.state / 'fleet.sqlite'}")
        try:
            tracking.record(store, tracking.CheckIn(mid, group, version, app_id=APP, arch="amd64",
                                                    events=list(events)), time.time() if at is None else at)
        finally:
            store.close()


@pytest.fixture
def console_server(tmp_path: Path) -> Iterator:
    """start(env=...) -> a running ConsoleServer with read and admin token files and a SQLite state folder."""
    releases = tmp_path / "releases"
    for v in ("1.0.0", "2.0.0"):
        publish(releases, v)
    for name, token in (("admin", ADMIN), ("read", READ)):
        (tmp_path / name).write_text(token)
        (tmp_path / name).chmod(0o600)
    procs: list[subprocess.Popen] = []

    def start(env: dict[str, str] | None = None) -> ConsoleServer:
        port = free_port()
        state = tmp_path / "state"
        log = open(tmp_path / f"serve-{port}.log", "w")  # noqa: SIM115 - kept open for the process's life
        p = subprocess.Popen([OBELISK, "update", "serve", str(releases), "--listen", f"127.0.0.1:{port}",
                              "--admin-token-file", str(tmp_path / "admin"), "--read-token-file",
                              str(tmp_path / "read"), "--state-dir", str(state)],
                             stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        log.close()
        procs.append(p)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if p.poll() is not None:
                raise AssertionError(f"serve exited: {(tmp_path / f'serve-{port}.log').read_text()}")
            try:
                return requests.get(url + "/health", timeout=1).ok
            except requests.RequestException:
                return False

        wait_for(up, 30, "update serve to answer /health")
        return ConsoleServer(p, url, state)

    try:
        yield start
    finally:
        for p in procs:
            stop_process(p)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    """Headless Chromium (new headless mode, no sandbox: tests may run as root) with a throwaway profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for tool in (CHROMIUM, CHROMEDRIVER):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is missing: run 'make setup' (Debian chromium and chromium-driver)")
    profile = tempfile.mkdtemp(prefix="obelisk-chromium-", dir=tmp_path)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,1000", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-sync"):
        opts.add_argument(arg)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def login_csrf(session: requests.Session, url: str) -> str:
    """GET the login page in a requests session: its double-submit value (the cookie is set too)."""
    r = session.get(url + "/console/login", timeout=10)
    assert r.status_code == 200, r.text
    return form_csrf(r.text)


def form_csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def logged_in(url: str, token: str) -> requests.Session:
    s = requests.Session()
    csrf = login_csrf(s, url)
    r = s.post(url + "/console/login", data={"token": token, "csrf": csrf, "next": "/console/"},
               allow_redirects=False, timeout=10)
    assert r.status_code == 303, r.text
    return s
