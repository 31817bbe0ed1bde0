"""Prometheus metrics of the update server (`/metrics`), named in the style of Nebraska and Zincati.

Fleet-wide state is read from the database at scrape time (every replica reports the same
numbers, so use `max` over replicas); what one process did since it started is a counter
(sum over replicas). Names (anchors-2026.md §5: Nebraska's `nebraska_application_instances_per_channel`,
`nebraska_failed_updates`, `nebraska_instances_pruned_total`; Zincati's `update_checks_total`):

- `obelisk_fleet_instances{group,version,status}`     gauge: instances known, per group/version/status
- `obelisk_fleet_stale_instances{group}`              gauge: not seen for the stale age
- `obelisk_fleet_failed_updates{group}`               gauge: attempts that failed or timed out (kept rows)
- `obelisk_fleet_attempts{group,outcome}`             gauge: attempts per outcome (pending, success, ...)
- `obelisk_fleet_group_halted{group}` / `_paused`     gauge: 1 when the group's rollout is halted / paused
- `obelisk_fleet_update_checks_total{group}`          counter: Omaha update checks this process answered
- `obelisk_fleet_updates_started_total{group}`        counter: updates this process started (granted)
- `obelisk_fleet_update_failures_total{group}`        counter: error and rollback events this process recorded
- `obelisk_fleet_instances_pruned_total`              counter: instances deleted by the retention pruner
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from update_server.db.store import Store

MAX_GROUP_LABELS = 200  # hosts choose their track: past this many, new names are counted as "_other"


class _StoreCollector(Collector):
    def __init__(self, store: Store, clock: Callable[[], float], stale_after: float) -> None:
        self.store, self.clock, self.stale_after = store, clock, stale_after

    def collect(self) -> Iterator[GaugeMetricFamily]:
        inst = GaugeMetricFamily("obelisk_fleet_instances", "Instances known, per group, version and status",
                                 labels=["group", "version", "status"])
        for c in self.store.counts():
            inst.add_metric([c["group"], c["version"], c["status"]], c["count"])
        yield inst
        stale = GaugeMetricFamily("obelisk_fleet_stale_instances", "Instances not seen for the stale age",
                                  labels=["group"])
        for group, n in self.store.stale_counts(self.clock() - self.stale_after):
            stale.add_metric([group], n)
        yield stale
        failed = GaugeMetricFamily("obelisk_fleet_failed_updates", "Update attempts that failed or timed out",
                                   labels=["group"])
        attempts = GaugeMetricFamily("obelisk_fleet_attempts", "Update attempts per outcome",
                                     labels=["group", "outcome"])
        fails: dict[str, int] = {}
        for a in self.store.attempt_totals():
            attempts.add_metric([a["group"], a["outcome"]], a["count"])
            if a["outcome"] in ("failed", "timeout"):
                fails[a["group"]] = fails.get(a["group"], 0) + a["count"]
        for group, n in sorted(fails.items()):
            failed.add_metric([group], n)
        yield failed
        yield attempts
        halted = GaugeMetricFamily("obelisk_fleet_group_halted", "1 when the group's rollout is halted",
                                   labels=["group"])
        paused = GaugeMetricFamily("obelisk_fleet_group_paused", "1 when the group's rollout is paused",
                                   labels=["group"])
        for g in self.store.groups():
            halted.add_metric([g.name], 1 if g.halted else 0)
            paused.add_metric([g.name], 1 if g.paused else 0)
        yield halted
        yield paused


class FleetMetrics:
    """The registry behind `/metrics`; the Omaha handler calls `observe` once per request."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time, stale_after: float = 86400.0) -> None:
        self.registry = CollectorRegistry()
        self.checks = Counter("obelisk_fleet_update_checks", "Omaha update checks answered by this process",
                              ["group"], registry=self.registry)
        self.started = Counter("obelisk_fleet_updates_started", "Updates started (granted) by this process",
                               ["group"], registry=self.registry)
        self.failures = Counter("obelisk_fleet_update_failures", "Error and rollback events recorded by this process",
                                ["group"], registry=self.registry)
        self.pruned = Counter("obelisk_fleet_instances_pruned", "Instances deleted by the retention pruner",
                              registry=self.registry)
        self._groups: set[str] = set()
        self.registry.register(_StoreCollector(store, clock, stale_after))

    def _label(self, group: str) -> str:
        if group in self._groups:
            return group
        if len(self._groups) < MAX_GROUP_LABELS:
            self._groups.add(group)
            return group
        return "_other"

    def observe(self, group: str, *, updatecheck: bool, started: bool, failures: int) -> None:
        g = self._label(group)
        if updatecheck:
            self.checks.labels(g).inc()
        if started:
            self.started.labels(g).inc()
        if failures:
            self.failures.labels(g).inc(failures)

    async def endpoint(self, request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
