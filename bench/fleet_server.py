"""Omaha check-ins per second with 10,000 known instances, SQLite and PostgreSQL, against /health.

    python -m bench fleet_server [--duration 5] [--concurrency 1,8,32,64] [--instances 10000] [--db sqlite,postgresql]

For each database it starts the real `obelisk update serve --database URL` (uvicorn, one process)
over a database that already holds --instances hosts. Endpoints, each at every concurrency, back
to back:

- health : GET /health, the ceiling of Starlette + uvicorn on this machine;
- current: an update check from a host already on the newest release (the common check-in: one
  upsert, no lock);
- held   : an update check from a host on an older release in a group whose rate is used up (the
  guard's read path: policy, counts, the decision and the note; only an offer takes the group lock).
- console: the web console's instances page (50 rows; the first page, page 100, and a status filter in
  turn) with an admin bearer token, over the same 10,000 instances; and the overview page (counts
  and the version chart, which the server reuses for 15 s).

Machine ids rotate over all known instances. PostgreSQL is a throwaway cluster on a Unix socket
(initdb + pg_ctl as nobody, removed after). The load generator is `wrk` (Debian package) with a
Lua script; percentiles are wrk's (closed loop, not corrected for coordinated omission).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
NEW, OLD = "2.0.0", "1.0.0"

LUA = """
local kind = "%s"
local n = %d
local i = 0
function init(args)
  i = (tid or 0) * 7919
end
function request()
  i = i + 1
  local k = i %% n
  local version = "%s"
  local track = "current"
  if kind == "held" then version = "%s"; track = "held" end
  local body = '<?xml version="1.0" encoding="UTF-8"?>\\n<request protocol="3.0" version="obelisk-update_engine-0.1.0" '
    .. 'installsource="scheduler" ismachine="1"><os version="Chateau" platform="CoreOS" sp=""></os>'
    .. '<app appid="%s" version="' .. version .. '" track="' .. track .. '" machineid="'
    .. string.format("%%032x", k) .. '" board="amd64-usr"><ping active="1"></ping><updatecheck></updatecheck>'
    .. '</app></request>'
  return wrk.format("POST", "/v1/update/", {["Content-Type"] = "text/xml"}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests": %%d, "duration_us": %%d, "p50": %%d, "p99": %%d, "errors": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
"""

HEALTH_LUA = LUA.split("function request()")[0] + """function request()
  return wrk.format("GET", "/health")
end
function done""" + LUA.split("function done")[1]

CONSOLE_LUA = LUA.split("function request()")[0] + """local token = "%s"
local paths = {%s}
function request()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1], {["Authorization"] = "Bearer " .. token})
end
function done""" + LUA.split("function done")[1]
CONSOLE_PAGES = {
    "console": '"/console/instances", "/console/instances?page=100", "/console/instances?status=complete"',
    "overview": '"/console/"',
}
TOKEN = "bench-admin-token-0123456789abcdef"


# ---------------------------------------------------------------- set-up


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise SystemExit("error: PostgreSQL is missing (apt-get install postgresql)")
    return found[-1]


def _as_nobody(argv: list[str]) -> None:
    if os.geteuid() == 0:
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def start_pg(root: Path) -> str:
    sock = root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        nb = pwd.getpwnam("nobody")
        for p in (root, sock):
            os.chown(p, nb.pw_uid, nb.pw_gid)
    _as_nobody([_pg_bin("initdb"), "-D", str(root / "data"), "-U", "obelisk", "-A", "trust", "--no-sync"])
    _as_nobody([_pg_bin("pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
                f"-k {sock} -c listen_addresses='' -c max_connections=100", "start"])
    return f"postgresql+psycopg://obelisk@/postgres?host={sock}"


def stop_pg(root: Path) -> None:
    if (root / "data" / "postmaster.pid").exists():
        _as_nobody([_pg_bin("pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop"])


def publish(releases: Path) -> None:
    import hashlib

    for v in (OLD, NEW):
        d = releases / "tiny" / v
        d.mkdir(parents=True)
        data = v.encode() * 1000
        (d / "update.payload").write_bytes(data)
        (d / "release.json").write_text(json.dumps({"name": "tiny", "version": v, "app_id": APP_ID, "arch": "amd64",
                                                    "artifacts": {"update.payload": {
                                                        "size": len(data),
                                                        "sha256": hashlib.sha256(data).hexdigest()}}}))


def fill(url: str, n: int) -> None:
    """n hosts in group `current` on the newest release; group `held` with its one start a day used up.

    The `held` requests reuse the same machine ids (a host moving group is an upsert like any other).
    """
    import sqlalchemy as sa

    from update_server.db import models as m
    from update_server.db.store import Store

    store = Store(url)
    now = time.time()
    rows = [{"machine_id": f"{i:032x}", "group_name": "current", "app_id": APP_ID, "version": NEW, "arch": "amd64",
             "first_seen": now, "last_checkin": now, "status": "complete", "updated_at": now} for i in range(n)]
    with store.write() as c:
        c.execute(sa.insert(m.instances), rows)
    # `held`: a group whose single allowed start per day is already used up by a host outside the rotation.
    store.set_policy("held", {"max_updates_per_period": 1, "period": "1d"}, now)
    store.grant("held", "f" * 32, OLD, NEW, now)
    store.close()


# ---------------------------------------------------------------- measuring


def run_wrk(lua: str, base: str, conns: int, duration: float, work: Path) -> dict:
    script = work / "bench.lua"
    script.write_text(lua)
    out = subprocess.run(["wrk", "-t", "1", "-c", str(conns), "-d", f"{duration:g}s", "--timeout", "10s",
                          "--latency", "-s", str(script), base], capture_output=True, text=True, check=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line[len("BENCHJSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def bench_db(kind: str, url: str, args: argparse.Namespace, work: Path) -> list[tuple]:
    fill(url, args.instances)
    port = _free_port()
    obelisk = str(Path(sys.executable).with_name("obelisk"))
    token = work / "admin.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    proc = subprocess.Popen([obelisk, "update", "serve", str(work / "releases"), "--listen", f"127.0.0.1:{port}",
                             "--database", url, "--prune-after", "0", "--admin-token-file", str(token)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(base + "/health", timeout=1)
                break
            except requests.RequestException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.1)
        rows = []
        n = args.instances
        for c in args.concurrency:
            health = run_wrk(HEALTH_LUA % ("health", n), base, c, args.duration, work)
            for name in ("current", "held"):
                r = run_wrk(LUA % (name, n, NEW, OLD, APP_ID), base, c, args.duration, work)
                rows.append((kind, c, name, r["rps"], r["p50"] / 1000, r["p99"] / 1000, r["errors"],
                             r["rps"] / health["rps"]))
                _print_row(rows[-1])
            if c <= 8:  # a console has a few readers, not a fleet's worth
                for name, pages in CONSOLE_PAGES.items():
                    r = run_wrk(CONSOLE_LUA % ("console", n, TOKEN, pages), base, c, args.duration, work)
                    rows.append((kind, c, name[:8], r["rps"], r["p50"] / 1000, r["p99"] / 1000, r["errors"],
                                 r["rps"] / health["rps"]))
                    _print_row(rows[-1])
            rows.append((kind, c, "health", health["rps"], health["p50"] / 1000, health["p99"] / 1000,
                         health["errors"], 1.0))
            _print_row(rows[-1])
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench fleet_server")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--db", default="sqlite,postgresql")
    args = ap.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed (apt-get install wrk)")
    rows: list[tuple] = []
    print(HEADER, flush=True)
    for kind in args.db.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{kind}-"))
        try:
            publish(work / "releases")
            if kind == "sqlite":
                rows += bench_db(kind, f"sqlite:///{work / 'fleet.sqlite'}", args, work)
            else:
                pg = Path(tempfile.mkdtemp(prefix="bench-fleet-pg-"))  # its own folder: nobody must reach it
                try:
                    rows += bench_db(kind, start_pg(pg), args, work)
                finally:
                    stop_pg(pg)
                    shutil.rmtree(pg, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"done: {len(rows)} measurements")


HEADER = f"{'db':<11}{'conc':>5}  {'endpoint':<8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'err':>5}{'vs health':>11}"


def _print_row(row: tuple) -> None:
    kind, c, name, rps, p50, p99, err, ratio = row
    print(f"{kind:<11}{c:>5}  {name:<8}{rps:>9.0f}{p50:>9.2f}{p99:>9.2f}{err:>5}{ratio:>11.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
