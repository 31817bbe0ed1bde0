"""Two server processes on one database: concurrent check-ins never start more updates than the rate allows.

Each process is a real Store with 4 threads (tests/fleet/grant_worker.py); both race the schema
migration on the empty database, then check in the same 300 hosts in opposite orders, step by step
at injected times. The guard is the database's row lock, so the sum over both processes must hit
the limit exactly in each period and never pass it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fleet_helpers import machine_ids, max_in_any_window
from testlib import stop_process

from update_server.db.store import Store, url_for

pytestmark = pytest.mark.timeout(170)

WORKER = Path(__file__).with_name("grant_worker.py")
LIMIT = 10
HOUR = 3600.0


def _line(p: subprocess.Popen, want: str) -> str:
    line = p.stdout.readline()
    if not line.startswith(want):
        raise AssertionError(f"worker said {line!r}, stderr: {p.stderr.read()[-3000:]}")
    return line[len(want):].strip()


def test_two_processes_never_exceed_the_rate(db_url: str) -> None:
    url = url_for(db_url, None)
    ids = machine_ids(300, "conc")
    procs = []
    try:
        for order in (ids, ids[::-1]):
            cfg = {"url": url, "group": "prod", "target": "2.0.0", "ids": order, "threads": 4}
            procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(cfg)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for p in procs:
            _line(p, "ready")
        store = Store(url)
        store.set_policy("prod", {"max_updates_per_period": LIMIT, "period": "1h"}, 0.0)
        steps = [0.0, 1800.0, HOUR + 1, HOUR + 1800, 2 * HOUR + 2, 2 * HOUR + 3]
        per_step = []
        for now in steps:
            for p in procs:
                p.stdin.write(f"go {now}\n")
                p.stdin.flush()
            started = [json.loads(_line(p, "done ")) for p in procs]
            per_step.append(sum(len(s) for s in started))
            both = set(started[0]) & set(started[1])
            assert not both, f"one host started twice: {both}"
        assert per_step == [LIMIT, 0, LIMIT, 0, LIMIT, 0]
        attempts = store.attempts_of("prod")
        assert len(attempts) == 3 * LIMIT
        assert len({a["machine_id"] for a in attempts}) == 3 * LIMIT
        assert max_in_any_window([a["started_at"] for a in attempts], HOUR) == LIMIT
        store.close()
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            stop_process(p)
