"""The web console of `obelisk update serve`, in a real headless Chromium and at the HTTP level.

Hosts check in through the real Omaha endpoint of a real server process: the trial boot's failure
with its reason text too when the Omaha codec carries one (`Event.reason`), else that one event is
written into the server's SQLite file by the same tracking code the handler runs, as is a host
last seen days ago (the server's clock is real time).
Screenshots of every page the browser visits are kept under the test's tmp_path (printed).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import console_helpers
import pytest
import requests
from console_helpers import HOSTILE, WAIT, ConsoleServer, form_csrf, logged_in, login_csrf
from fleet_helpers import ADMIN, APP, READ, machine_ids

from update_engine import omaha
from update_server import tracking
from update_server.console_chart import history, render
from update_server.db.store import NotFound, Store

REASON = "trial boot of 2.0.0 failed: podman.service did not start " + HOSTILE
PROD = machine_ids(55, "console-prod")
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
console_server, browser = console_helpers.console_server, console_helpers.browser  # the fixtures


def populate(s: ConsoleServer) -> None:
    """55 hosts in prod (4 updated to 2.0.0, one stale on 0.9.0, one with hostile strings), canary halted."""
    assert s.api("/groups/canary/policy", "POST", json={"halt_failure_share": 0.5, "halt_window": 2}).ok
    assert s.api("/groups/prod/policy", "POST", json={"updates_enabled": True}).ok
    for mid in PROD:
        assert s.check(mid, "1.0.0").update.version == "2.0.0"
    for mid in PROD[:4]:
        s.check(mid, "2.0.0", omaha.Event(3, 2, previousversion="1.0.0"), check=False)
    for mid in ("canary-a", "canary-b"):
        assert s.check(mid, "1.0.0", track="canary").update is not None
    for ev in (omaha.Event(13, 1), omaha.Event(14, 1), omaha.Event(3, 1)):  # download, stage, then the trial boot
        s.check("canary-a", "1.0.0", ev, track="canary", check=False)
    if "reason" in {f.name for f in dataclasses.fields(omaha.Event)}:  # the codec carries a host's reason text
        s.check("canary-a", "1.0.0", omaha.Event(3, 0, 10, reason=REASON), track="canary", check=False)
    else:  # a codec without it: the same tracking code, straight into the server's database
        s.record("canary-a", "canary", "1.0.0", tracking.CheckEvent(3, 0, 10, reason=REASON))
    s.check("canary-b", "1.0.0", omaha.Event(3, 0, 10), track="canary", check=False)
    s.check("h0stile", "1.0.0", track="prod", check=False, oem=HOSTILE, alias="<b>x</b>")
    s.record("old-host", "prod", "0.9.0", at=time.time() - 3 * 86400)
    assert s.group("canary")["halted"]


class Shots:
    def __init__(self, driver, folder: Path) -> None:  # noqa: ANN001 - a selenium WebDriver
        self.driver, self.folder, self.n = driver, folder, 0
        folder.mkdir(parents=True, exist_ok=True)
        print(f"console screenshots: {folder}")

    def __call__(self, name: str) -> None:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot {path}"


@pytest.mark.timeout(240)
def test_console_in_chromium(console_server, browser, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    s = console_server()
    populate(s)
    d, wait = browser, WebDriverWait(browser, WAIT)
    shot = Shots(d, tmp_path / "screenshots")

    def text(css: str) -> str:
        return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css))).text

    def submit(css: str) -> None:
        el = d.find_element(By.CSS_SELECTOR, css)
        el.click()
        wait.until(ec.staleness_of(el))

    def login(token: str) -> None:
        d.find_element(By.ID, "token").send_keys(token)
        submit("#login-submit")

    def no_alert() -> None:
        with pytest.raises(NoAlertPresentException):
            d.switch_to.alert  # noqa: B018 - the property raises when no alert is open

    # Without a session every page sends the browser to the login page, which remembers where it was going.
    d.get(s.url + "/console/instances?group=prod")
    wait.until(ec.url_contains("/console/login"))
    shot("login")
    login("not-the-token")
    assert "wrong token" in text("#login-error")
    shot("login-refused")
    login(ADMIN)
    wait.until(ec.url_contains("/console/instances"))
    assert text("#role") == "admin"

    # The overview: instances per group and version, the halted group, the chart, the locks' state.
    d.find_element(By.ID, "nav-overview").click()
    wait.until(ec.presence_of_element_located((By.ID, "matrix")))
    assert text("#total") == str(len(PROD) + 4)
    assert text("#stale-count") == "1"
    prod_row = d.find_element(By.ID, "group-row-prod").text
    assert "prod" in prod_row and "57" in prod_row
    assert "halted" in text("#group-row-canary")
    halt = text("#halt-canary")
    assert "canary-a" in halt and "<script>alert(1)" in halt  # the host's own words (cut at 80), as text
    assert d.find_elements(By.CSS_SELECTOR, "#version-chart svg polygon")
    assert "2.0.0" in text("#version-chart .legend") and "1.0.0" in text("#version-chart .legend")
    assert "Not configured" in text("#locks-off")
    assert not d.find_elements(By.TAG_NAME, "script")
    no_alert()
    shot("overview")

    # Instances: filter by group and status, then by stale, then page through prod.
    d.find_element(By.ID, "nav-instances").click()
    Select(wait.until(ec.presence_of_element_located((By.ID, "f-group")))).select_by_value("prod")
    Select(d.find_element(By.ID, "f-status")).select_by_value("complete")
    submit("#f-apply")
    assert text("#total") == "4"
    assert {e.text for e in d.find_elements(By.CSS_SELECTOR, "#instances a.mid")} == set(PROD[:4])
    shot("instances-filtered")
    Select(d.find_element(By.ID, "f-status")).select_by_value("")
    d.find_element(By.ID, "f-stale").click()
    submit("#f-apply")
    assert text("#total") == "1" and "old-host" in text("#instances")
    d.find_element(By.ID, "f-stale").click()
    submit("#f-apply")
    assert text("#total") == "57" and len(d.find_elements(By.CSS_SELECTOR, "#instances tbody tr")) == 50
    shot("instances-page-1")
    submit("#next")
    assert "page 2 of 2" in text("#pager")
    assert len(d.find_elements(By.CSS_SELECTOR, "#instances tbody tr")) == 7
    shot("instances-page-2")

    # The halted group: its reason, its failing hosts; one of them has a timeline with its reason text.
    d.get(s.url + "/console/groups/canary")
    assert "canary-a" in text("#halt-reason")
    failing = {e.text for e in d.find_elements(By.CSS_SELECTOR, "#failing a.mid")}
    assert failing == {"canary-a", "canary-b"}
    shot("group-halted")
    d.find_element(By.LINK_TEXT, "canary-a").click()
    wait.until(ec.url_contains("/console/instances/canary-a"))
    timeline = text("#timeline")
    assert REASON in timeline and "update complete: error" in timeline and "code 10" in timeline
    assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "#timeline li .badge")] == [
        "error", "staged", "downloaded", "downloading"]
    assert REASON in text("#last-reason")
    assert not d.find_elements(By.TAG_NAME, "script")
    assert ESCAPED in d.page_source
    no_alert()
    shot("instance-timeline")

    # Resume lifts the halt, pause and resume go through the forms; the API sees each change.
    d.get(s.url + "/console/groups/canary")
    submit("#resume")
    assert text("h1 .badge") == "active"
    g = s.group("canary")
    assert not g["halted"] and not g["paused"]
    submit("#pause")
    assert text("h1 .badge") == "paused" and "Paused" in text("#paused")
    assert s.group("canary")["paused"]
    shot("group-paused")
    submit("#resume")
    assert text("h1 .badge") == "active"
    assert not s.group("canary")["paused"]
    shot("group-resumed")

    # Hostile strings a host sent (OEM, alias) render as text, never as markup.
    d.get(s.url + "/console/instances/h0stile")
    assert text("#oem") == HOSTILE and text("#alias") == "<b>x</b>"
    assert not d.find_elements(By.CSS_SELECTOR, "#alias b")
    assert not d.find_elements(By.TAG_NAME, "script")
    no_alert()
    shot("instance-hostile")

    # Log out: the session is gone. A read-only login sees the group but has no pause button.
    submit("#logout")
    wait.until(ec.url_contains("/console/login"))
    d.get(s.url + "/console/groups/prod")
    wait.until(ec.url_contains("/console/login"))
    login(READ)
    wait.until(ec.url_contains("/console/groups/prod"))
    assert text("#role") == "read-only"
    assert "Read-only" in text("#read-only")
    assert not d.find_elements(By.ID, "pause")
    shot("group-read-only")
    assert not s.group("prod")["paused"]


@pytest.mark.timeout(120)
def test_console_auth_csrf_and_escaping_over_http(console_server) -> None:  # noqa: ANN001
    s = console_server()
    populate(s)
    u = s.url + "/console"

    # No credentials: pages redirect to the login page (GET), a wrong bearer token is 401, changes are 401.
    r = requests.get(u + "/groups/prod", allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/console/login?next=%2Fconsole%2Fgroups%2Fprod"
    assert requests.get(u + "/", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert requests.get(u + "/", headers={"Authorization": f"Bearer {READ}"}, timeout=10).status_code == 200
    r = requests.post(u + "/groups/prod/pause", data={"csrf": "x"}, allow_redirects=False, timeout=10)
    assert r.status_code == 401
    assert requests.get(u + "/static/console.css", timeout=10).headers["content-type"].startswith("text/css")

    # Login: the form's double-submit value is required; a wrong token is 401; the cookie is locked down.
    anon = requests.Session()
    login_csrf(anon, s.url)
    r = anon.post(u + "/login", data={"token": ADMIN}, allow_redirects=False, timeout=10)
    assert r.status_code == 403 and "CSRF" in r.text
    csrf = login_csrf(anon, s.url)
    r = anon.post(u + "/login", data={"token": "nope", "csrf": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 401 and "obelisk_console=" not in r.headers.get("set-cookie", "")
    r = anon.post(u + "/login", data={"token": ADMIN, "csrf": csrf, "next": "//evil.example/"},
                  allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/console/"  # never an open redirect
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert ADMIN not in r.headers["set-cookie"]
    admin = anon
    page = admin.get(u + "/groups/prod", timeout=10)
    assert page.status_code == 200 and 'id="pause"' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp
    links = re.findall(r'(?:src|href|action)="([^"]*)"', page.text)
    assert links and all(x.startswith("/console/") for x in links), links  # nothing from anywhere else
    csrf = form_csrf(page.text)

    # A POST without the CSRF token, with a wrong one, or from another origin changes nothing.
    for data, headers in (({}, {}), ({"csrf": "0" * 40}, {}), ({"csrf": csrf}, {"Origin": "http://evil.example"})):
        r = admin.post(u + "/groups/prod/pause", data=data, headers=headers, allow_redirects=False, timeout=10)
        assert r.status_code == 403, (data, headers, r.text)
    assert not s.group("prod")["paused"]
    r = admin.post(u + "/groups/prod/pause", json={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 415
    r = admin.post(u + "/groups/prod/pause", data={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and s.group("prod")["paused"]
    r = admin.post(u + "/groups/prod/resume", data={"csrf": csrf}, allow_redirects=False, timeout=10)
    assert r.status_code == 303 and not s.group("prod")["paused"]

    # A read-only session cannot pause, even with its own valid CSRF token; nor can a read bearer token.
    reader = logged_in(s.url, READ)
    page = reader.get(u + "/groups/prod", timeout=10)
    assert 'id="pause"' not in page.text and "Read-only" in page.text
    r = reader.post(u + "/groups/prod/pause", data={"csrf": form_csrf(page.text)}, allow_redirects=False, timeout=10)
    assert r.status_code == 403 and "admin token" in r.text
    r = requests.post(u + "/groups/prod/pause", data={}, headers={"Authorization": f"Bearer {READ}"},
                      allow_redirects=False, timeout=10)
    assert r.status_code == 403
    assert not s.group("prod")["paused"]

    # A forged or tampered cookie is no session.
    value = reader.cookies.get("obelisk_console", path="/console")
    assert value and value.startswith("r.")
    for forged in ("a." + value[2:], value[:-1] + ("0" if value[-1] != "0" else "1"), "a.x.99999999999.00"):
        r = requests.get(u + "/", cookies={"obelisk_console": forged}, allow_redirects=False, timeout=10)
        assert r.status_code == 303, forged

    # Paging keeps the filters.
    page = admin.get(u + "/instances", params={"group": "prod", "status": "granted", "stale": "0"}, timeout=10)
    assert "1–50 of <b id=\"total\">51</b>" in page.text
    nxt = re.search(r'id="next" href="([^"]+)"', page.text).group(1)
    assert nxt == "/console/instances?group=prod&amp;status=granted&amp;page=2"
    page = admin.get(s.url + nxt.replace("&amp;", "&"), timeout=10)
    assert page.text.count('class="mid"') == 1 and 'id="prev"' in page.text
    page = admin.get(u + "/instances", params={"stale": "1", "page": "1"}, timeout=10)
    assert "old-host" in page.text and "h0stile" not in page.text
    assert admin.get(u + "/instances", params={"page": "0"}, timeout=10).status_code == 400

    # Hostile strings: a host's OEM, reason texts, a filter value, a path: escaped wherever they appear.
    pages = [admin.get(u + "/instances/h0stile", timeout=10), admin.get(u + "/instances/canary-a", timeout=10),
             admin.get(u + "/groups/canary", timeout=10), admin.get(u + "/", timeout=10),
             admin.get(u + "/instances", params={"version": HOSTILE}, timeout=10),
             admin.get(u + "/instances/" + quote(HOSTILE, safe=""), timeout=10),
             admin.get(u + "/groups/" + quote("<script>alert(1)", safe=""), timeout=10)]
    assert [p.status_code for p in pages] == [200, 200, 200, 200, 200, 404, 400]
    for p in pages:
        assert "<script" not in p.text.lower(), p.url
    assert ESCAPED in pages[0].text and ESCAPED in pages[1].text and ESCAPED in pages[4].text


@pytest.mark.timeout(60)
def test_hostile_machine_id_is_refused_before_it_is_stored(console_server) -> None:  # noqa: ANN001
    s = console_server()
    body = omaha.build_request(omaha.Request(app=omaha.AppRequest(appid=APP, version="1.0.0", track="prod",
                                                                  machineid=HOSTILE, updatecheck=True)))
    r = requests.post(s.url + "/v1/update/", data=body, timeout=10)
    assert r.status_code == 400 and "machineid" in r.text
    store = Store(f"sqlite:///{s.state / 'fleet.sqlite'}")
    try:
        with pytest.raises(NotFound):
            store.instance(HOSTILE)
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_version_history_walks_back_through_updates_and_arrivals(sqlite_template: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(sqlite_template, tmp_path / "fleet.sqlite")
    store = Store(f"sqlite:///{tmp_path / 'fleet.sqlite'}")
    day = 86400.0
    t0 = 1_772_409_600.0
    try:
        ids = machine_ids(6, "chart")
        for i, mid in enumerate(ids):  # one host arrives per day, all on 1.0.0
            tracking.check_in(store, tracking.CheckIn(mid, "prod", "1.0.0", app_id="a", updatecheck=True),
                              t0 + i * day, target="2.0.0", published_at=t0)
        for mid in ids[:3]:  # three of them finish the update on day 7
            tracking.check_in(store, tracking.CheckIn(mid, "prod", "2.0.0", app_id="a", events=[
                tracking.CheckEvent(3, 2, previous_version="1.0.0")]), t0 + 7 * day)
        now = t0 + 8 * day
        samples = history(store, now, span=8 * day, points=8)
        by_day = [dict(c) for _, c in samples]
        assert by_day[0] == {"1.0.0": 1}
        assert by_day[3] == {"1.0.0": 4}
        assert by_day[6] == {"1.0.0": 6}
        assert by_day[7] == {"1.0.0": 3, "2.0.0": 3} == by_day[8]
        assert history(store, now, span=8 * day, points=8, group="other")[-1][1] == Counter()
        chart = render(samples)
        assert [x.label for x in chart.series] == ["2.0.0", "1.0.0"] and not chart.empty
        assert all(ch in "0123456789., " for x in chart.series for ch in x.points)
    finally:
        store.close()


@pytest.mark.etcd
@pytest.mark.timeout(150)
def test_lock_holders_from_etcd_and_from_fleetlock(console_server, tmp_path: Path) -> None:  # noqa: ANN001
    """The group page lists the reboot lock's holders read from etcd, or from the FleetLock server's /v1/status;
    a lock service that does not answer is one line on the page, not an error page."""
    from etcdlib import LocalEtcd
    from fleet_helpers import serve_app
    from ports import free_port
    from testlib import need_tools, stop_process

    from fleetlock_server.app import make_app as fleetlock_app
    from update_engine.reboot.semaphore import EtcdEndpoints, EtcdSemaphore

    need_tools("etcd")
    headers = {"Authorization": f"Bearer {READ}"}
    with LocalEtcd(tmp_path / "etcd") as etcd:
        sem = EtcdSemaphore(EtcdEndpoints(etcd.endpoints), "prod")
        sem.ensure(2)
        sem.lock("host-a")
        server, thread = serve_app(fleetlock_app(EtcdEndpoints(etcd.endpoints), {"prod": 2}), port := free_port())
        try:
            for spec, source in ((f"etcd:{etcd.endpoints}", "etcd"), (f"fleetlock:http://127.0.0.1:{port}",
                                                                      "FleetLock")):
                s = console_server(env={"OBELISK_CONSOLE_LOCK_ENDPOINT": spec})
                s.check(PROD[0], "1.0.0")
                page = requests.get(s.url + "/console/groups/prod", headers=headers, timeout=10)
                assert page.status_code == 200
                locks = page.text[page.text.index('id="locks"'):]
                assert f"from {source}" in locks and "host-a" in locks and "1 / 2" in locks, locks
                overview = requests.get(s.url + "/console/", headers=headers, timeout=10).text
                assert "host-a" in overview[overview.index('id="locks"'):]
                stop_process(s.proc)
        finally:
            server.should_exit = True
            thread.join(10)
    dead = console_server(env={"OBELISK_CONSOLE_LOCK_ENDPOINT": f"fleetlock:http://127.0.0.1:{free_port()}"})
    page = requests.get(dead.url + "/console/groups/canary", headers=headers, timeout=10)
    assert page.status_code == 404  # no such group yet; the overview still renders with the lock's problem
    page = requests.get(dead.url + "/console/", headers=headers, timeout=10)
    assert page.status_code == 200 and "cannot read http://127.0.0.1:" in page.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("flag", "env", "value"), [([], True, "zookeeper://x"), (["--lock-endpoint"], False,
                                                                                   "etcd:ftp://x")],
                         ids=["env", "flag"])
def test_a_bad_lock_endpoint_is_one_line(tmp_path: Path, flag: list[str], env: bool, value: str) -> None:
    import subprocess

    from testlib import OBELISK

    (tmp_path / "r").mkdir()
    (tmp_path / "admin").write_text(ADMIN)
    (tmp_path / "admin").chmod(0o600)
    r = subprocess.run([OBELISK, "update", "serve", str(tmp_path / "r"), "--state-dir", str(tmp_path / "s"),
                        "--admin-token-file", str(tmp_path / "admin"), "--listen", "127.0.0.1:1",
                        *([*flag, value] if flag else [])],
                       capture_output=True, text=True, timeout=50,
                       env={**os.environ, **({"OBELISK_CONSOLE_LOCK_ENDPOINT": value} if env else {})})
    assert r.returncode == 2 and r.stderr.startswith(f"error: lock endpoint '{value}'"), r.stderr
    assert "Traceback" not in r.stderr
