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

import re
from dataclasses import dataclass, field

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite  # noqa: F401 - the upsert constructs of both dialects

from obelisk.errors import ObeliskError
from obelisk.versions import compare_versions
from update_server.db import models as m
from update_server.db.store import Store

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


def _upsert(c: sa.Connection, ci: CheckIn, now: float) -> None:
    values = {"group_name": ci.group, "app_id": clean(ci.app_id, m.NAME_LEN), "version": clean(ci.version, 64),
              "arch": clean(ci.arch, 32), "alias": clean(ci.alias, m.NAME_LEN), "oem": clean(ci.oem, m.NAME_LEN),
              "boot_id": clean(ci.boot_id, m.MACHINE_ID_LEN), "ip": clean(ci.ip, 64), "last_checkin": now,
              "updated_at": now}
    dialect = sa.dialects.postgresql if c.dialect.name == "postgresql" else sa.dialects.sqlite
    ins = dialect.insert(m.instances).values(machine_id=ci.machine_id, first_seen=now, status="checking", **values)
    c.execute(ins.on_conflict_do_update(index_elements=[m.instances.c.machine_id], set_=values))


def record(store: Store, ci: CheckIn, now: float, *, history: int = DEFAULT_HISTORY) -> str | None:
    """Record one request; returns the group that halted because of it, if one did."""
    validate(ci)
    halted = None
    with store.write() as c:
        _upsert(c, ci, now)  # first: the instance row lock comes before the group's (see Store.grant)
        status: str | None = None
        for ev in ci.events:
            new = status_of(ev, ci.version)
            reason = clean(ev.reason, m.TEXT_LEN)
            c.execute(sa.insert(m.events).values(
                machine_id=ci.machine_id, at=now, event_type=ev.type, event_result=ev.result,
                error_code=ev.error_code, previous_version=clean(ev.previous_version, 64) if ev.previous_version
                is not None else None, version=clean(ci.version, 64), status=new or "", reason=reason))
            if new is None:
                continue
            status = new
            fields: dict = {"status": new}
            if new in ("error", "rolled_back"):
                fields.update(error_code=ev.error_code, reason=reason)
                halted = store.finish_attempt(c, ci.machine_id, "failed", now, error_code=ev.error_code,
                                              reason=reason) or halted
            elif new == "complete":
                fields.update(error_code=None, reason="")
                store.finish_attempt(c, ci.machine_id, "success", now, reached=ci.version)
            c.execute(sa.update(m.instances).where(m.instances.c.machine_id == ci.machine_id).values(**fields))
        if status is None:
            _implicit_success(store, c, ci, now)
        if ci.events:
            _trim(c, ci.machine_id, history)
    return halted


def _implicit_success(store: Store, c: sa.Connection, ci: CheckIn, now: float) -> None:
    """A host that checks in on (or past) its granted version finished, even if its 3/2 event was lost."""
    row = c.execute(sa.select(m.instances.c.status, m.instances.c.target_version)
                    .where(m.instances.c.machine_id == ci.machine_id)).first()
    if row is None or not row.target_version or row.status in ("complete", "error", "rolled_back"):
        return
    if compare_versions(ci.version, row.target_version) >= 0:
        store.finish_attempt(c, ci.machine_id, "success", now, reached=ci.version)
        c.execute(sa.update(m.instances).where(m.instances.c.machine_id == ci.machine_id)
                  .values(status="complete", error_code=None, reason=""))


def _trim(c: sa.Connection, machine_id: str, keep: int) -> None:
    """Keep the newest `keep` events of this instance (Nebraska's event table grows forever)."""
    cutoff = (sa.select(m.events.c.id).where(m.events.c.machine_id == machine_id)
              .order_by(m.events.c.id.desc()).limit(1).offset(keep - 1).scalar_subquery())
    c.execute(sa.delete(m.events).where((m.events.c.machine_id == machine_id) & (m.events.c.id < cutoff)))
