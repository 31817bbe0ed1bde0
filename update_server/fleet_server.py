"""Glue between the Omaha handler and the fleet state: one object the update server holds.

`Fleet.check_in(request, ip)` is what the handler calls on every Omaha request: it records the
instance and its events and, for an update check, asks the rollout guard which release (if any) to
offer. The handler then answers with that release, or `noupdate` when the policy holds the host
(never an error status: update_engine would report a failure for it). `Fleet.routes()` gives the
fleet API and `/metrics` to mount next to `/v1/update`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Route

from obelisk.versions import compare_versions
from update_engine import omaha
from update_server import tracking
from update_server.db.store import Store
from update_server.fleet_api import make_router
from update_server.metrics import FleetMetrics
from update_server.releases import Catalog, Release

log = logging.getLogger("obelisk.update_server")
PRUNE_EVERY = 3600.0
MAX_EVENTS = 16  # per request, as the Omaha handler's own log keeps (real clients send one or two)
CHANNEL_TTL = 2.0  # seconds a group's channel version is reused before it is read again


@dataclass
class Answer:
    release: Release | None        # what to offer now (None: noupdate)
    outcome: tracking.Outcome | None
    reason: str


class Fleet:
    def __init__(self, store: Store, catalog: Catalog, *, clock: Callable[[], float] = time.time,
                 read_tokens: list[str] | None = None, admin_tokens: list[str] | None = None,
                 history: int = tracking.DEFAULT_HISTORY, prune_after: float | None = 90 * 86400.0,
                 stale_after: float = 86400.0, lock_endpoint: str | None = None) -> None:
        self.store, self.catalog, self.clock = store, catalog, clock
        # The console's reboot-lock view: etcd:URL or fleetlock:URL (console_locks.py); None: "not configured".
        self.lock_endpoint = lock_endpoint or os.environ.get("OBELISK_CONSOLE_LOCK_ENDPOINT") or None
        self.history, self.prune_after, self.stale_after = history, prune_after, stale_after
        self.read_tokens, self.admin_tokens = read_tokens or [], admin_tokens or []
        self.metrics = FleetMetrics(store, clock=clock, stale_after=stale_after)
        self._published: dict[tuple[str, str], float] = {}
        self._channels: dict[str, tuple[float, str | None]] = {}
        self._next_prune = 0.0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- which release a group gets

    def target(self, app_id: str, group: str, arch: str) -> Release | None:
        """The group's channel's release: its pinned version, else what the catalog picks (groups file or newest)."""
        channel = self._channel_version(group)
        if channel is not None:
            return self._find(app_id, channel, arch)
        return self.catalog.choose(app_id, group, arch)

    def _channel_version(self, group: str) -> str | None:
        """The group's channel's pinned version, cached for CHANNEL_TTL (a change reaches every replica by then)."""
        now = time.monotonic()
        hit = self._channels.get(group)
        if hit is not None and hit[0] > now:
            return hit[1]
        version = self.store.channel_version_of(group)
        if len(self._channels) > 10_000:
            self._channels.clear()
        self._channels[group] = (now + CHANNEL_TTL, version)
        return version

    def _find(self, app_id: str, version: str, arch: str) -> Release | None:
        for r in self.catalog.releases():
            if r.app_id.lower() == app_id.lower() and compare_versions(r.version, version) == 0 and (
                    not r.arch or not arch or r.arch == arch):
                return r
        return None

    def published_at(self, app_id: str, version: str, now: float | None = None) -> float:
        key = (app_id.lower(), version)
        at = self._published.get(key)
        if at is None:
            at = self.store.note_release(app_id, version, self.clock() if now is None else now)
            self._published[key] = at
        return at

    def resolve_group_target(self, group: str) -> str | None:
        """For the API's views and preview: the version the group's channel offers (any app id)."""
        v = self._channel_version(group)
        if v is not None:
            return v
        best = None
        for r in self.catalog.releases():
            pick = self.catalog.choose(r.app_id, group, r.arch)
            if pick is not None and (best is None or compare_versions(pick.version, best) > 0):
                best = pick.version
        return best

    # ---------------------------------------------------------------- the Omaha request

    def check_in(self, req: omaha.Request, ip: str) -> Answer:
        """Record the request and decide; raises tracking.TrackingError for ids the server cannot record."""
        a = req.app
        now = self.clock()
        arch = omaha.arch_of_board(a.board) if a.board else req.os_arch
        rel = self.target(a.appid, a.track, arch) if a.updatecheck else None
        published = self.published_at(a.appid, rel.version, now) if rel is not None else None
        ci = tracking.CheckIn(
            machine_id=a.machineid, group=a.track, version=a.version, app_id=a.appid, arch=arch, ip=ip,
            boot_id=a.bootid, alias=a.machinealias, oem=a.oem, updatecheck=a.updatecheck,
            events=[tracking.CheckEvent(e.type, e.result, e.errorcode, e.previousversion,
                                        getattr(e, "reason", "") or "") for e in a.events[:MAX_EVENTS]])
        out = tracking.check_in(self.store, ci, now, target=rel.version if rel else None, published_at=published,
                                history=self.history)
        failures = sum(1 for e in a.events[:MAX_EVENTS] if e.result == omaha.RESULT_ERROR)
        d = out.decision
        self.metrics.observe(a.track, updatecheck=a.updatecheck, started=bool(d and d.new_start), failures=failures)
        if out.halted:
            log.warning("group %s halted: %s", out.halted, self.store.group(out.halted).halt_reason)
        self._maybe_prune(now)
        if d is None or not d.offer or d.version is None:
            return Answer(None, out, d.reason if d else "")
        offered = rel if rel is not None and compare_versions(rel.version, d.version) == 0 else self._find(
            a.appid, d.version, arch)
        if offered is None:  # a floor the release folders do not hold: say so rather than skip it
            log.warning("group %s: floor %s is not in the release folders; %s waits", a.track, d.version,
                        a.machineid)
            return Answer(None, out, f"floor {d.version} is missing from the release folders")
        return Answer(offered, out, d.reason)

    def _maybe_prune(self, now: float) -> None:
        if self.prune_after is None or now < self._next_prune:
            return
        with self._lock:
            if now < self._next_prune:
                return
            self._next_prune = now + PRUNE_EVERY
        n = self.store.prune(self.prune_after, now)
        if n:
            self.metrics.pruned.inc(n)
            log.info("pruned %d instance(s) not seen for %.0f days", n, self.prune_after / 86400)

    # ---------------------------------------------------------------- mounting

    def routes(self) -> list[BaseRoute]:
        api = make_router(self.store, read_tokens=self.read_tokens, admin_tokens=self.admin_tokens, clock=self.clock,
                          stale_after=self.stale_after, resolve_target=self.resolve_group_target,
                          on_change=self._channels.clear)
        return [Route("/metrics", self.metrics.endpoint), *api.routes, *self._console_routes()]

    def _console_routes(self) -> list[BaseRoute]:
        from update_server.console import make_console
        from update_server.console_locks import lock_source

        return make_console(self.store, read_tokens=self.read_tokens, admin_tokens=self.admin_tokens, clock=self.clock,
                            stale_after=self.stale_after, resolve_target=self.resolve_group_target,
                            on_change=self._channels.clear, locks=lock_source(self.lock_endpoint))

    def summary(self) -> dict[str, Any]:
        return {"database": self.store.dialect, "revision": self.store.revision()}
