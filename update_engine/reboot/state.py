"""One group's semaphore as read from etcd, and the decoding of its two values.

The semaphore value is Airlock's `{"total_slots":N,"holders":["id",...]}`; anything Airlock could
not read is CorruptSemaphore, and obelisk never overwrites it. The take times live in the sibling
`obelisk-taken` key (see semaphore.py): our own advisory value, so a broken one is ignored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import BadJson, CorruptSemaphore
from .keys import sem_key, taken_key
from .limits import MAX_SLOTS, parse_json_bounded, shown

log = logging.getLogger("obelisk.reboot.lock")

RECLAIMS_KEPT = 20


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(s: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(s).replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


@dataclass
class SemaphoreState:
    group: str
    exists: bool
    total_slots: int = 0
    holders: list[str] = field(default_factory=list)
    taken: dict[str, datetime] = field(default_factory=dict)
    reclaims: list[dict[str, Any]] = field(default_factory=list)
    mod_revision: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # fields we do not know: kept as they are
    queued: int = 0  # obelisk hosts waiting in the group's queue (watch.py); never written back

    @property
    def free(self) -> int:
        return max(0, self.total_slots - len(self.holders))

    def value(self) -> str:
        doc: dict[str, Any] = {"total_slots": self.total_slots, "holders": sorted(self.holders)}
        doc.update(self.extra)
        return json.dumps(doc, separators=(",", ":"))

    def taken_value(self) -> str:
        taken = {h: iso(self.taken[h]) for h in sorted(self.holders) if h in self.taken}
        return json.dumps({"taken": taken, "reclaims": self.reclaims[-RECLAIMS_KEPT:]}, separators=(",", ":"))

    def to_json(self, now: datetime, stale_after: timedelta | None) -> dict[str, Any]:
        holders = []
        for h in sorted(self.holders):
            t = self.taken.get(h)
            holders.append({
                "id": h,
                "taken": iso(t) if t else None,
                "held_seconds": round((now - t).total_seconds(), 1) if t else None,
                "stale": bool(t and stale_after and now - t >= stale_after),
            })
        return {"group": self.group, "key": sem_key(self.group), "initialized": self.exists,
                "total_slots": self.total_slots, "available": self.free, "holders": holders,
                "reclaims": self.reclaims, "mod_revision": self.mod_revision, "queued": self.queued}


def parse_semaphore(group: str, raw: bytes, mod_revision: int) -> SemaphoreState:
    """Decode the semaphore value; anything Airlock could not read is CorruptSemaphore."""
    key = sem_key(group)
    fix = f"fix or delete it ('etcdctl del {key}') and retry; obelisk refuses to overwrite it"
    try:
        doc = parse_json_bounded(raw, f"semaphore {key}")
    except BadJson as exc:
        raise CorruptSemaphore(f"{exc}; {fix}") from None
    if not isinstance(doc, dict):
        raise CorruptSemaphore(f"semaphore {key} is not a JSON object; {fix}")
    total = doc.pop("total_slots", None)
    holders = doc.pop("holders", None)
    if not isinstance(total, int) or isinstance(total, bool) or not 0 <= total <= MAX_SLOTS:
        raise CorruptSemaphore(f"semaphore {key}: total_slots is {shown(total)}, not a whole number from 0 to "
                               f"{MAX_SLOTS}; {fix}")
    if holders is None:
        holders = []  # Go marshals a nil slice as null
    if not isinstance(holders, list) or not all(isinstance(h, str) for h in holders):
        raise CorruptSemaphore(f"semaphore {key}: holders is not a list of strings; {fix}")
    return SemaphoreState(group, True, total, list(holders), mod_revision=mod_revision, extra=doc)


def load_taken(state: SemaphoreState, raw: bytes) -> None:
    """Fill in take times and reclaims from the obelisk-taken value. Our own advisory key: a
    broken one costs only take times, so it is noted and the holders are stamped afresh."""
    try:
        doc = parse_json_bounded(raw, f"{taken_key(state.group)}")
        taken = doc.get("taken") or {}
        reclaims = doc.get("reclaims") or []
    except (BadJson, AttributeError):
        log.warning("ignoring unreadable %s; holders get a fresh take time", taken_key(state.group))
        return
    holders = set(state.holders)
    for h, t in taken.items() if isinstance(taken, dict) else []:
        ts = parse_iso(t)
        if ts and h in holders:
            state.taken[h] = ts
    if isinstance(reclaims, list):
        state.reclaims = [r for r in reclaims if isinstance(r, dict)]
