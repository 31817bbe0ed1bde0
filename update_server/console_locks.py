"""Reboot lock holders per group, for the console: read from etcd or from an obelisk FleetLock server.

The endpoint is one string: `etcd:http://HOST:2379[,http://...]` (the semaphore keys Airlock and
obelisk hosts share, read only) or `fleetlock:http://HOST:PORT` (the obelisk FleetLock server's
`GET /v1/status`, its extension to the protocol). A group's lock group is the update group of the
same name. A lock service that does not answer is shown as such on the page, never an error page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import requests

from obelisk.errors import ObeliskError

TIMEOUT = 3.0
MAX_GROUPS = 50  # one page asks for at most this many groups' locks


class LockEndpointError(ObeliskError):
    """The lock endpoint string is malformed; the message shows the accepted forms."""


@dataclass
class LockView:
    group: str
    initialized: bool = False
    total_slots: int = 0
    holders: list[dict[str, Any]] = field(default_factory=list)  # {"id", "taken", "held_seconds", "stale"}
    queued: int = 0


@dataclass
class LockReport:
    source: str                 # e.g. "etcd http://127.0.0.1:2379"
    groups: dict[str, LockView] = field(default_factory=dict)
    error: str = ""             # the lock service did not answer: one line


class LockSource(Protocol):
    description: str

    def read(self, groups: list[str]) -> LockReport: ...


def _view(doc: dict[str, Any]) -> LockView:
    return LockView(str(doc.get("group", "")), bool(doc.get("initialized")), int(doc.get("total_slots") or 0),
                    [h for h in doc.get("holders") or [] if isinstance(h, dict)], int(doc.get("queued") or 0))


class EtcdLocks:
    def __init__(self, urls: str) -> None:
        from update_engine.reboot.semaphore import EtcdEndpoints

        self.endpoints = EtcdEndpoints(urls, timeout=TIMEOUT)
        self.description = f"etcd {urls}"

    def read(self, groups: list[str]) -> LockReport:
        from update_engine.reboot.semaphore import EtcdSemaphore, LockError

        report = LockReport(self.description)
        now = datetime.now(UTC)
        try:
            for g in groups[:MAX_GROUPS]:
                report.groups[g] = _view(EtcdSemaphore(self.endpoints, g).read().to_json(now, None))
        except LockError as exc:
            report.error = str(exc).splitlines()[0][:300]
        return report


class FleetLockStatus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.description = f"FleetLock {self.url}"

    def read(self, groups: list[str]) -> LockReport:
        report = LockReport(self.description)
        try:
            r = requests.get(f"{self.url}/v1/status", params=[("group", g) for g in groups[:MAX_GROUPS]],
                             timeout=TIMEOUT)
            r.raise_for_status()
            docs = r.json().get("groups") or []
        except (requests.RequestException, ValueError, AttributeError) as exc:
            report.error = f"cannot read {self.url}/v1/status: {str(exc).splitlines()[0][:200]}"
            return report
        for doc in docs:
            if isinstance(doc, dict):
                v = _view(doc)
                report.groups[v.group] = v
        return report


def lock_source(spec: str | None) -> LockSource | None:
    """`etcd:URL[,URL]`, `fleetlock:URL`, or nothing (None: the console says "not configured")."""
    if not spec or not spec.strip():
        return None
    kind, _, rest = spec.strip().partition(":")
    if kind == "etcd" and rest.startswith(("http://", "https://")):
        return EtcdLocks(rest)
    if kind == "fleetlock" and rest.startswith(("http://", "https://")):
        return FleetLockStatus(rest)
    raise LockEndpointError(f"lock endpoint {spec[:80]!r}: expected etcd:http://HOST:2379[,...] or "
                            f"fleetlock:http://HOST:PORT")
