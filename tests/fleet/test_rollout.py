"""Rollouts through the real tracking and database guard, SQLite and PostgreSQL, hundreds of simulated hosts.

Time is injected (epoch seconds chosen by the test); nothing sleeps.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from fleet_helpers import Sim, machine_ids, max_in_any_window

from update_server import tracking
from update_server.db.store import Store
from update_server.policy import seed_of

pytestmark = pytest.mark.timeout(170)

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC).timestamp()  # a Monday, 00:00Z
HOUR = 3600.0


def test_rate_is_never_exceeded_in_any_period(store: Store) -> None:
    store.set_policy("prod", {"max_updates_per_period": 4, "period": "1h"}, T0)
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    ids = machine_ids(200, "rate")
    sim.add(ids)
    rng = random.Random(7)
    now = T0
    while now < T0 + 8 * HOUR:
        for t in sorted(now + rng.random() * 600 for _ in range(40)):  # 40 check-ins per 10 minutes
            sim.checkin(rng.choice(ids), t)
        now += 600
    times = [t for t, _ in sim.starts]
    assert max_in_any_window(times, HOUR) == 4  # the limit is reached, never passed
    assert len(times) >= 4 * 7  # and the rollout keeps moving: 4 per hour
    attempts = store.attempts_of("prod")
    assert len(attempts) == len(times)
    assert max_in_any_window([a["started_at"] for a in attempts], HOUR) == 4


def test_window_and_soak_edges_through_the_store(store: Store) -> None:
    store.set_policy("prod", {"windows": "Mon..Fri 09:00 8h", "timezone": "Europe/Berlin", "soak": "2d"}, T0)
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    ids = machine_ids(4, "edge")
    sim.add(ids)
    # Wed 2026-03-04: Berlin is UTC+1, the window is 08:00Z-16:00Z; soak ends Wed 00:00Z.
    wed = datetime(2026, 3, 4, tzinfo=UTC).timestamp()
    assert sim.checkin(ids[0], wed - 1).code == "soak"
    assert sim.checkin(ids[0], wed + 8 * HOUR - 1).code == "window"
    assert sim.checkin(ids[0], wed + 8 * HOUR).code == "offer"
    assert sim.checkin(ids[1], wed + 16 * HOUR - 1).code == "offer"
    held = sim.checkin(ids[2], wed + 16 * HOUR)
    assert held.code == "window" and held.retry_at == wed + 24 * HOUR + 8 * HOUR
    assert store.instance(ids[2])["note"].startswith("outside the update windows")


def test_wave_shares_through_the_store(store: Store) -> None:
    store.set_policy("prod", {"waves": [["1h", 10], ["6h", 50], ["1d", 100]]}, T0)
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    ids = machine_ids(400, "waves")
    sim.add(ids)
    for dt, want in ((HOUR - 1, 0), (HOUR, 10), (6 * HOUR - 1, 10), (6 * HOUR, 50), (24 * HOUR, 100)):
        for mid in ids:
            sim.checkin(mid, T0 + dt)
        share = sum(v == "2.0.0" or mid in sim.granted for mid, v in sim.version.items()) / len(ids) * 100
        assert abs(share - want) <= 5.0, (dt, want, share)  # 400 hosts: 3 sigma at 50% is 7.5 points
        if want in (0, 100):
            assert share == want


def test_halt_on_failure_share_and_resume(store: Store) -> None:
    store.set_policy("prod", {"halt_failure_share": 0.3, "halt_window": 10}, T0)
    ids = machine_ids(30, "halt")
    bad = set(ids[2:5])  # the 3rd, 4th and 5th host to update fail
    sim = Sim(store, "prod", "2.0.0", published_at=T0, failing=bad)
    sim.add(ids)
    now = T0
    for mid in ids[:5]:
        assert sim.checkin(mid, now).offer
    for mid in ids[:4]:  # two successes, two failures: 2 of 10 < 30%, no halt yet
        sim.checkin(mid, now + 60)
    g = store.group("prod")
    assert not g.halted
    assert store.instance(ids[2])["status"] == "error" and store.instance(ids[2])["error_code"] == 10
    assert store.instance(ids[2])["reason"] == "payload hash mismatch"
    assert sim.checkin(ids[10], now + 90).offer  # still granting
    sim.checkin(ids[4], now + 120)  # the third failure: 3 of 10 = 30%: halt
    g = store.group("prod")
    assert g.halted and "3 of the last 10 updates failed" in g.halt_reason
    for mid in sorted(bad):
        assert mid in g.halt_reason
    held = sim.checkin(ids[20], now + 180)
    assert held.code == "halted" and not held.offer
    store.resume("prod", now + 200)  # the operator resumes: old failures no longer count
    assert not store.group("prod").halted
    assert sim.checkin(ids[20], now + 210).offer


def test_rollback_and_timeout_count_as_failures(store: Store) -> None:
    store.set_policy("prod", {"halt_failure_share": 0.5, "halt_window": 4, "update_timeout": "1h"}, T0)
    ids = machine_ids(10, "rb")
    sim = Sim(store, "prod", "2.0.0", published_at=T0, failing={ids[0]}, fail_code=44)
    sim.add(ids)
    assert sim.checkin(ids[0], T0).offer
    assert sim.checkin(ids[1], T0).offer  # this one never reports back
    sim.checkin(ids[0], T0 + 60)  # rolled back
    assert store.instance(ids[0])["status"] == "rolled_back"
    assert not store.group("prod").halted
    d = sim.checkin(ids[2], T0 + HOUR + 1)  # ids[1] timed out: 2 failures of 4 = 50%
    assert d.code == "halted"
    why = store.group("prod").halt_reason
    assert f"{ids[0]} (rolled back, code 44)" in why and f"{ids[1]} (did not finish in time)" in why


def test_safe_mode_one_host_first(store: Store) -> None:
    store.set_policy("prod", {"safe_mode": True}, T0)
    ids = machine_ids(50, "safe")
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    sim.add(ids)
    first = sim.checkin(ids[0], T0)
    assert first.offer
    for mid in ids[1:]:
        d = sim.checkin(mid, T0 + 10)
        assert d.code == "safe_mode" and ids[0] in d.reason
    sim.checkin(ids[0], T0 + 20)  # the canary reports success
    assert store.instance(ids[0])["status"] == "complete"
    assert all(sim.checkin(mid, T0 + 30).offer for mid in ids[1:])


def test_safe_mode_canary_failure_halts(store: Store) -> None:
    store.set_policy("prod", {"safe_mode": True}, T0)
    ids = machine_ids(5, "safefail")
    sim = Sim(store, "prod", "2.0.0", published_at=T0, failing={ids[0]})
    sim.add(ids)
    assert sim.checkin(ids[0], T0).offer
    sim.checkin(ids[0], T0 + 10)
    g = store.group("prod")
    assert g.halted and "safe mode" in g.halt_reason and ids[0] in g.halt_reason
    store.resume("prod", T0 + 20)
    assert sim.checkin(ids[1], T0 + 30).offer  # a new canary after the resume
    assert sim.checkin(ids[2], T0 + 30).code == "safe_mode"


def test_floors_are_walked_in_order(store: Store) -> None:
    store.set_channel("prod", "3.0.0", T0, floors=["2.0.0", "1.5.0"])
    sim = Sim(store, "prod", "3.0.0", published_at=T0)
    sim.add(["m1"], "1.0.0")
    seen = []
    for i in range(6):
        d = sim.checkin("m1", T0 + i)
        if d.offer:
            seen.append(d.version)
    assert seen == ["1.5.0", "2.0.0", "3.0.0"] and sim.version["m1"] == "3.0.0"
    assert [a["version"] for a in store.attempts_of("prod")] == ["1.5.0", "2.0.0", "3.0.0"]
    assert all(a["outcome"] == "success" for a in store.attempts_of("prod"))


def test_pause_disable_and_regrant(store: Store) -> None:
    ids = machine_ids(3, "pause")
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    sim.add(ids)
    store.set_policy("prod", {}, T0)
    store.pause("prod", T0)
    assert sim.checkin(ids[0], T0 + 1).code == "paused"
    store.resume("prod", T0 + 2)
    d = sim.checkin(ids[0], T0 + 3)
    assert d.offer and d.new_start
    sim.granted.pop(ids[0])  # the host crashed before it reported: it asks again
    again = sim.checkin(ids[0], T0 + 4)
    assert again.offer and again.code == "resume" and not again.new_start
    assert len(store.attempts_of("prod")) == 1
    store.set_policy("prod", {"updates_enabled": False}, T0 + 5)
    assert sim.checkin(ids[1], T0 + 6).code == "disabled"


def test_a_moved_channel_supersedes_an_unfinished_grant(store: Store) -> None:
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    sim.add(["m1"])
    assert sim.checkin("m1", T0).version == "2.0.0"
    sim.granted.pop("m1")
    sim.target = "2.1.0"
    d = sim.checkin("m1", T0 + 10)
    assert d.new_start and d.version == "2.1.0"
    assert [a["outcome"] for a in store.attempts_of("prod")] == ["superseded", "pending"]


def test_preview_equals_what_the_server_then_does(store: Store) -> None:
    """Plan at T0, then every host checks in on the hour (in seed order): each starts exactly when planned."""
    store.set_policy("prod", {"max_updates_per_period": 5, "period": "90m", "windows": "Mon..Fri 09:00 6h",
                              "timezone": "Europe/Berlin", "waves": [["0s", 25], ["5h", 100]], "soak": "3h"}, T0)
    store.note_release("app", "2.0.0", T0)
    ids = sorted(machine_ids(60, "preview"), key=lambda m: (seed_of(m), m))
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    sim.add(ids)
    sim.add(["f" * 32], "2.0.0")  # already there
    for mid in [*ids, "f" * 32]:  # hosts the server knows before the plan (they checked in before the release)
        tracking.record(store, tracking.CheckIn(mid, "prod", sim.version[mid], app_id="app"), T0 - HOUR)
    planned = {e.machine_id: e for e in store.preview("prod", "2.0.0", T0, step=HOUR)}
    assert planned["f" * 32].at is None and planned["f" * 32].reason.startswith("already on")
    times = [e.at for mid, e in planned.items() if mid != "f" * 32]
    assert all(t is not None for t in times)
    last = max(times)
    actual: dict[str, float] = {}
    now = T0
    while now <= last:
        for mid in ids:
            if mid not in actual:
                d = sim.checkin(mid, now)
                if d.new_start:
                    actual[mid] = now
                    sim.granted.pop(mid)  # it stays busy: a started host does not ask again in this test
        now += HOUR
    assert actual == {mid: planned[mid].at for mid in ids}
    assert max_in_any_window(list(actual.values()), 1.5 * HOUR) == 5


def test_a_timed_out_canary_halts_even_when_everyone_else_is_held(store: Store) -> None:
    """Held hosts skip the group lock; a pending attempt past its timeout still sends them through it."""
    store.set_policy("prod", {"safe_mode": True, "update_timeout": "1h"}, T0)
    ids = machine_ids(5, "canarytimeout")
    sim = Sim(store, "prod", "2.0.0", published_at=T0)
    sim.add(ids)
    assert sim.checkin(ids[0], T0).offer
    sim.granted.pop(ids[0])  # the first host goes silent
    assert sim.checkin(ids[1], T0 + HOUR - 1).code == "safe_mode"
    d = sim.checkin(ids[1], T0 + HOUR + 1)
    assert d.code == "halted" and "did not finish" in store.attempts_of("prod")[0]["reason"]
    assert "safe mode" in store.group("prod").halt_reason
