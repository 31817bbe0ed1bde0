"""Instance tracking: what the Omaha handler records on every request.

`record(store, checkin, now)` upserts the instance (group, version, arch, IP as seen, last
check-in), stores its events (bounded history per instance), derives the status from them, and
ends the instance's update attempt when an event says how it went (which may halt its group).
Status from Omaha events, the way Flatcar's update_engine reports progress (update-engine.md §1.2):

| event (type/result)              | status        |
|----------------------------------|---------------|
| 13/1 download started            | downloading   |
| 14/1 download finished           | downloaded    |
| 3/1 installed, reboot pending    | staged        |
| 800/1 installed (Nebraska)       | staged        |
| 3/2 with a previous version      | complete      |
| 3/0 with errorcode 44            | rolled_back   |
| 3/0 with another code            | error         |
| x/9 deferred                     | (unchanged)   |

A host sends no event when it reboots, so a staged host stays `staged` until its first check-in
from the new boot. A check-in on (or past) the version it was granted also completes the attempt
(a lost 3/2 event does not leave it pending). A host's first check-in is `checking`; the server's
own grant sets `granted` (`Store.grant`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite  # noqa: F401 - the upsert constructs of both dialects

from obelisk.errors import ObeliskError
from obelisk.versions import compare_versions
from update_server.db import models as m
from update_server.db.store import Store
from update_server.policy import Decision

DEFAULT_HISTORY = 200  # events kept per instance
ERR_ROLLBACK = 44
MACHINE_ID_RE = re.compile(r"[A-Za-z0-9{}._:-]{1,64}")
TRACK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
STATUSES = ("checking", "granted", "downloading", "downloaded", "staged", "complete", "error", "rolled_back")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TrackingError(ObeliskError, ValueError):
    """A request names an instance or group the server cannot record (the Omaha handler answers 400)."""


@dataclass(frozen=True)
class CheckEvent:
    type: int
    result: int
    error_code: int | None = None
    previous_version: str | None = None
    reason: str = ""  # the host's own words for an error, when it sends them


@dataclass
class CheckIn:
    machine_id: str
    group: str
    version: str
    app_id: str = ""
    arch: str = ""
    ip: str = ""
    boot_id: str = ""
    alias: str = ""
    oem: str = ""
    updatecheck: bool = False
    events: list[CheckEvent] = field(default_factory=list)


def clean(text: str | None, limit: int) -> str:
    """Control characters out, cut to the column's length: what a host sends is stored as plain text."""
    return _CONTROL.sub(" ", text or "")[:limit]


def validate(ci: CheckIn) -> None:
    if not MACHINE_ID_RE.fullmatch(ci.machine_id):
        raise TrackingError(f"machineid {ci.machine_id[:70]!r} is not valid: expected 1-64 letters, digits or "
                            f"{{}}._:- (e.g. the 32 hex digits of /etc/machine-id)")
    if not TRACK_RE.fullmatch(ci.group):
        raise TrackingError(f"track {ci.group[:70]!r} is not a valid group name: expected 1-64 letters, digits, "
                            f"'.', '_' or '-'")


def status_of(ev: CheckEvent, current_version: str) -> str | None:
    """The status an event moves the instance to, or None when it says nothing new."""
    if ev.result == 9:
        return None
    if (ev.type, ev.result) == (13, 1):
        return "downloading"
    if (ev.type, ev.result) == (14, 1):
        return "downloaded"
    if (ev.type, ev.result) in ((3, 1), (800, 1)):
        return "staged"
    if (ev.type, ev.result) == (3, 2):
        prev = ev.previous_version or ""
        if prev in ("", "0.0.0.0") or compare_versions(prev, current_version) == 0:
            return None  # an ordinary check: nothing was pending
        return "complete"
    if ev.result == 0:
        return "rolled_back" if ev.error_code == ERR_ROLLBACK else "error"
    return None


@dataclass
class Outcome:
    decision: Decision | None  # None for a request without an updatecheck
    halted: str | None         # the group this request halted, if it did
    status: str                # the instance's status after the request


_UPSERT_COLS = ("group_name", "app_id", "version", "arch", "alias", "oem", "boot_id", "ip", "last_checkin",
                "updated_at")


@functools.lru_cache(maxsize=4)
def _upsert_stmt(dialect_name: str) -> sa.Insert:
    """INSERT ... ON CONFLICT DO UPDATE ... RETURNING, built once per dialect."""
    dialect = sa.dialects.postgresql if dialect_name == "postgresql" else sa.dialects.sqlite
    ins = dialect.insert(m.instances).values(machine_id=sa.bindparam("machine_id"), first_seen=sa.bindparam("now"),
                                             status="checking", **{k: sa.bindparam(k) for k in _UPSERT_COLS})
    ins = ins.on_conflict_do_update(index_elements=[m.instances.c.machine_id],
                                    set_={k: getattr(ins.excluded, k) for k in _UPSERT_COLS})
    return ins.returning(m.instances.c.status, m.instances.c.target_version)


def _upsert(c: sa.Connection, ci: CheckIn, now: float) -> sa.Row:
    """Insert or refresh the instance row; returns its (status, target_version) after the write."""
    values = {"machine_id": ci.machine_id, "now": now, "group_name": ci.group, "app_id": clean(ci.app_id, m.NAME_LEN),
              "version": clean(ci.version, 64), "arch": clean(ci.arch, 32), "alias": clean(ci.alias, m.NAME_LEN),
              "oem": clean(ci.oem, m.NAME_LEN), "boot_id": clean(ci.boot_id, m.MACHINE_ID_LEN),
              "ip": clean(ci.ip, 64), "last_checkin": now, "updated_at": now}
    return c.execute(_upsert_stmt(c.dialect.name), values).one()


def record(store: Store, ci: CheckIn, now: float, *, history: int = DEFAULT_HISTORY) -> Outcome:
    """Record one request (no update decision); see `check_in` for the Omaha handler's call."""
    return check_in(store, ci, now, offer=False, history=history)


def check_in(store: Store, ci: CheckIn, now: float, *, target: str | None = None, published_at: float | None = None,
             offer: bool = True, history: int = DEFAULT_HISTORY) -> Outcome:
    """Everything one Omaha request does to the state, in one transaction.

    Upsert the instance, store its events, move its status and its attempt, and, for an
    updatecheck, run the rollout guard (`Store.grant_in`) against `target` (the release its
    group's channel offers it). Instance row first, then the group's: the one lock order.
    """
    validate(ci)
    with store.write() as c:
        row = _upsert(c, ci, now)
        status, halted = _apply_events(store, c, ci, now, row.status)
        if status == row.status and row.target_version and status not in ("complete", "error", "rolled_back") \
                and compare_versions(ci.version, row.target_version) >= 0:
            # On (or past) the granted version: finished, even if its 3/2 event was lost.
            store.finish_attempt(c, ci.machine_id, "success", now, reached=ci.version)
            status = "complete"
            c.execute(_SET_STATUS, {"m": ci.machine_id, "status": status, "code": None, "reason": ""})
        if ci.events:
            _trim(c, ci.machine_id, history)
        decision = None
        if offer and ci.updatecheck:
            decision = store.grant_in(c, ci.group, ci.machine_id, clean(ci.version, 64), target, now,
                                      published_at=published_at)
            if decision.new_start:
                status = "granted"
    return Outcome(decision, halted, status)


def _apply_events(store: Store, c: sa.Connection, ci: CheckIn, now: float, status: str) -> tuple[str, str | None]:
    halted = None
    for ev in ci.events:
        new = status_of(ev, ci.version)
        reason = clean(ev.reason, m.TEXT_LEN)
        prev = clean(ev.previous_version, 64) if ev.previous_version is not None else None
        c.execute(_EVENT, {"m": ci.machine_id, "at": now, "t": ev.type, "r": ev.result, "code": ev.error_code,
                           "prev": prev, "v": clean(ci.version, 64), "status": new or "", "reason": reason})
        if new is None:
            continue
        status = new
        code, text = None, ""
        if new in ("error", "rolled_back"):
            code, text = ev.error_code, reason
            halted = store.finish_attempt(c, ci.machine_id, "failed", now, error_code=ev.error_code,
                                          reason=reason) or halted
        elif new == "complete":
            store.finish_attempt(c, ci.machine_id, "success", now, reached=ci.version)
        c.execute(_SET_STATUS, {"m": ci.machine_id, "status": new, "code": code, "reason": text})
    return status, halted


def _trim(c: sa.Connection, machine_id: str, keep: int) -> None:
    """Keep the newest `keep` events of this instance (Nebraska's event table grows forever)."""
    cutoff = (sa.select(m.events.c.id).where(m.events.c.machine_id == machine_id)
              .order_by(m.events.c.id.desc()).limit(1).offset(keep - 1).scalar_subquery())
    c.execute(sa.delete(m.events).where((m.events.c.machine_id == machine_id) & (m.events.c.id < cutoff)))


_EVENT = sa.insert(m.events).values(
    machine_id=sa.bindparam("m"), at=sa.bindparam("at"), event_type=sa.bindparam("t"),
    event_result=sa.bindparam("r"), error_code=sa.bindparam("code"), previous_version=sa.bindparam("prev"),
    version=sa.bindparam("v"), status=sa.bindparam("status"), reason=sa.bindparam("reason"))
_SET_STATUS = sa.update(m.instances).where(m.instances.c.machine_id == sa.bindparam("m")).values(
    status=sa.bindparam("status"), error_code=sa.bindparam("code"), reason=sa.bindparam("reason"))
