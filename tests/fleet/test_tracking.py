"""Instance tracking on SQLite and PostgreSQL: statuses from Omaha events, bounded history, pruning, hostile input."""

from __future__ import annotations

import pytest

from update_server import tracking
from update_server.db.store import NotFound, Store
from update_server.tracking import CheckEvent, CheckIn, TrackingError

pytestmark = pytest.mark.timeout(120)

MID = "0123456789abcdef0123456789abcdef"


def ci(version: str = "1.0.0", *events: CheckEvent, mid: str = MID, **kw) -> CheckIn:  # noqa: ANN003
    return CheckIn(mid, kw.pop("group", "prod"), version, app_id="app", arch="amd64", ip="10.1.2.3",
                   events=list(events), **kw)


def test_a_whole_update_as_update_engine_reports_it(store: Store) -> None:
    assert tracking.record(store, ci(), 100.0).status == "checking"
    row = store.instance(MID)
    assert (row["group_name"], row["version"], row["arch"], row["ip"], row["first_seen"]) == \
        ("prod", "1.0.0", "amd64", "10.1.2.3", 100.0)
    out = tracking.check_in(store, ci("1.0.0", CheckEvent(3, 2, previous_version=""), updatecheck=True), 110.0,
                            target="2.0.0", published_at=0.0)
    assert out.decision.offer and out.status == "granted"
    steps = [(CheckEvent(13, 1), "downloading"), (CheckEvent(14, 1), "downloaded"), (CheckEvent(3, 1), "staged")]
    for i, (ev, want) in enumerate(steps):
        assert tracking.record(store, ci("1.0.0", ev), 120.0 + i).status == want
        assert store.instance(MID)["status"] == want
    tracking.record(store, ci("1.0.0"), 130.0)  # a ping while waiting for the reboot lock
    assert store.instance(MID)["status"] == "staged"
    out = tracking.record(store, ci("2.0.0", CheckEvent(3, 2, previous_version="1.0.0")), 140.0)
    assert out.status == "complete"
    row = store.instance(MID)
    assert row["version"] == "2.0.0" and row["last_checkin"] == 140.0 and row["first_seen"] == 100.0
    assert [a["outcome"] for a in store.attempts_of("prod")] == ["success"]
    evs = store.events_of(MID)
    assert [(e["event_type"], e["event_result"]) for e in evs] == [(3, 2), (3, 1), (14, 1), (13, 1), (3, 2)]
    assert evs[0]["status"] == "complete" and evs[-1]["status"] == ""


def test_error_rollback_and_deferred(store: Store) -> None:
    tracking.check_in(store, ci(updatecheck=True), 1.0, target="2.0.0", published_at=0.0)
    out = tracking.record(store, ci("1.0.0", CheckEvent(3, 0, 10, reason="payload hash mismatch")), 2.0)
    row = store.instance(MID)
    assert out.status == "error" and row["error_code"] == 10 and row["reason"] == "payload hash mismatch"
    assert store.attempts_of("prod")[0]["outcome"] == "failed"
    tracking.record(store, ci("1.0.0", CheckEvent(3, 9, 40)), 3.0)  # deferred: says nothing new
    assert store.instance(MID)["status"] == "error"
    out = tracking.record(store, ci("1.0.0", CheckEvent(3, 0, 44), mid="f" * 32), 4.0)
    assert out.status == "rolled_back" and store.instance("f" * 32)["error_code"] == 44


def test_a_lost_completion_event_still_completes(store: Store) -> None:
    tracking.check_in(store, ci(updatecheck=True), 1.0, target="2.0.0", published_at=0.0)
    assert tracking.record(store, ci("2.0.0"), 2.0).status == "complete"
    assert store.attempts_of("prod")[0]["outcome"] == "success"


def test_a_plain_check_with_the_same_previous_version_is_not_a_completion(store: Store) -> None:
    tracking.record(store, ci("1.0.0"), 1.0)
    for prev in ("", "0.0.0.0", "1.0.0"):
        assert tracking.record(store, ci("1.0.0", CheckEvent(3, 2, previous_version=prev)), 2.0).status == "checking"


def test_history_is_bounded_per_instance(store: Store) -> None:
    other = "e" * 32
    for i in range(30):
        tracking.record(store, ci("1.0.0", CheckEvent(13, 1), CheckEvent(14, 1)), float(i), history=10)
        tracking.record(store, ci("1.0.0", CheckEvent(13, 1), mid=other), float(i), history=25)
    assert len(store.events_of(MID)) == 10
    assert [e["at"] for e in store.events_of(MID)][-1] == 25.0  # the newest ten: 5 requests of two events
    assert len(store.events_of(other)) == 25


def test_prune_forgets_instances_not_seen(store: Store) -> None:
    for i in range(20):
        tracking.check_in(store, ci(mid=f"{i:032x}", updatecheck=True), float(i * 100), target="2.0.0",
                          published_at=0.0)
        tracking.record(store, ci("1.0.0", CheckEvent(13, 1), mid=f"{i:032x}"), float(i * 100))
    assert store.prune(max_age=1000.0, now=2000.0) == 10  # seen before t=1000
    rows, total = store.instances(limit=100)
    assert total == 10 and min(r["last_checkin"] for r in rows) == 1000.0
    with pytest.raises(NotFound):
        store.events_of(f"{0:032x}")
    assert {a["machine_id"] for a in store.attempts_of("prod")} == {f"{i:032x}" for i in range(10, 20)}
    assert store.prune(max_age=1000.0, now=2000.0) == 0


def test_filters_and_paging(store: Store) -> None:
    for i in range(45):
        tracking.record(store, ci("1.0.0" if i % 3 else "2.0.0", mid=f"{i:032x}",
                                  group="prod" if i % 2 else "canary"), float(i))
    rows, total = store.instances(group="prod", limit=10, offset=0)
    assert total == 22 and len(rows) == 10
    page2, _ = store.instances(group="prod", limit=10, offset=10)
    page3, _ = store.instances(group="prod", limit=10, offset=20)
    assert len(page3) == 2 and not {r["machine_id"] for r in rows} & {r["machine_id"] for r in page2}
    _, n = store.instances(version="2.0.0")
    assert n == 15
    _, n = store.instances(group="canary", version="2.0.0", status="checking")
    assert n == 8
    _, n = store.instances(seen_before=10.0)
    assert n == 10
    counts = {(c["group"], c["version"]): c["count"] for c in store.counts()}
    assert counts[("prod", "1.0.0")] + counts[("prod", "2.0.0")] == 22


HOSTILE_IDS = ["", "x" * 65, "a b", "<script>", "id\n2", "ü" * 5, "a;b", "a/b", "'--"]


@pytest.mark.parametrize("mid", HOSTILE_IDS)
def test_hostile_machine_ids_are_refused(store: Store, mid: str) -> None:
    with pytest.raises(TrackingError, match="machineid"):
        tracking.record(store, ci(mid=mid), 1.0)
    assert store.instances()[1] == 0


@pytest.mark.parametrize("track", ["", "a b", "x" * 65, "<b>", "-x", "prod\n"])
def test_hostile_tracks_are_refused(store: Store, track: str) -> None:
    with pytest.raises(TrackingError, match="track"):
        tracking.record(store, ci(group=track), 1.0)
    assert store.instances()[1] == 0


def test_hostile_strings_are_stored_as_plain_text(store: Store) -> None:
    reason = "<img src=x onerror=alert(1)>\x00\x1b[31m" + "y" * 5000
    tracking.record(store, ci("1.0.0\x00<b>", CheckEvent(3, 0, 10, previous_version="\x07" * 100, reason=reason),
                              alias="<i>" * 40), 1.0)
    row = store.instance(MID)
    assert len(row["reason"]) == 1024 and "\x00" not in row["reason"] and row["reason"].startswith("<img")
    assert row["version"] == "1.0.0 <b>" and len(row["alias"]) <= 64
    ev = store.events_of(MID)[0]
    assert ev["previous_version"] == " " * 64 and "\x1b" not in ev["reason"]
