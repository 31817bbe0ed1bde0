"""What each console page shows, read from the fleet store (plain dicts for the templates, no HTML here)."""

from __future__ import annotations

import functools
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from obelisk.versions import compare_versions
from update_server.console_chart import Chart, version_chart
from update_server.console_locks import LockReport, LockSource
from update_server.db.store import NotFound, Store, check_name
from update_server.policy import Policy, PolicyError
from update_server.tracking import STATUSES

PAGE = 50
FAILING_SHOWN = 20
TIMELINE = 200
EVENT_TYPES = {0: "unknown", 1: "download complete", 2: "install complete", 3: "update complete",
               13: "download started", 14: "download finished", 800: "installed"}
EVENT_RESULTS = {0: "error", 1: "success", 2: "success, rebooted", 9: "deferred"}
FAILED = ("error", "rolled_back")
CHART_TTL = 15.0  # seconds a chart is reused: it spans days, and costs ~0.2 s with 10,000 instances


class ConsoleInputError(PolicyError):
    """A filter or page number in the console's query string is not valid (answered 400)."""


@dataclass
class Views:
    store: Store
    clock: Callable[[], float]
    stale_after: float
    resolve_target: Callable[[str], str | None]
    locks: LockSource | None = None
    _charts: dict[str | None, tuple[float, Chart]] = field(default_factory=dict)

    def chart(self, group: str | None = None) -> Chart:
        hit = self._charts.get(group)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        chart = version_chart(self.store, self.clock(), group=group)
        if len(self._charts) > 1000:
            self._charts.clear()
        self._charts[group] = (time.monotonic() + CHART_TTL, chart)
        return chart

    # ---------------------------------------------------------------- pieces

    def group_state(self, name: str) -> dict[str, Any]:
        try:
            g = self.store.group(name)
        except NotFound:
            return {"name": name, "configured": False, "channel": name, "policy": Policy().to_dict(),
                    "paused": False, "halted": False, "halt_reason": "", "halted_at": None,
                    "release": self.resolve_target(name), "state": "active"}
        d = g.to_dict()
        d.update(configured=True, release=self.resolve_target(name),
                 state="halted" if g.halted else "paused" if g.paused else "active")
        return d

    def lock_report(self, groups: list[str]) -> LockReport | None:
        return self.locks.read(groups) if self.locks is not None else None

    # ---------------------------------------------------------------- pages

    def overview(self) -> dict[str, Any]:
        now = self.clock()
        counts = self.store.counts()
        names = sorted({g.name for g in self.store.groups()} | {c["group"] for c in counts})
        versions = sorted({c["version"] for c in counts}, key=functools.cmp_to_key(compare_versions), reverse=True)
        matrix: dict[str, Counter[str]] = defaultdict(Counter)
        statuses: Counter[str] = Counter()
        for c in counts:
            matrix[c["group"]][c["version"]] += c["count"]
            statuses[c["status"]] += c["count"]
        stale = dict(self.store.stale_counts(now - self.stale_after))
        groups = [{**self.group_state(n), "total": sum(matrix[n].values()), "stale": stale.get(n, 0),
                   "by_version": matrix[n]} for n in names]
        return {"groups": groups, "versions": versions, "total": sum(statuses.values()),
                "stale": sum(stale.values()), "statuses": [(s, statuses[s]) for s in STATUSES if statuses[s]],
                "chart": self.chart(), "locks": self.lock_report(names),
                "halted": [g for g in groups if g["halted"]], "stale_after": self.stale_after}

    def group(self, name: str) -> dict[str, Any]:
        check_name("group", name)
        st = self.group_state(name)
        counts = [c for c in self.store.counts() if c["group"] == name]
        if not st["configured"] and not counts:
            raise NotFound(f"no group {name!r}: no instance checked in with this track and none was configured")
        failing: list[dict[str, Any]] = []
        for status in FAILED:
            rows, _ = self.store.instances(group=name, status=status, limit=FAILING_SHOWN)
            failing += rows
        failing.sort(key=lambda r: -r["last_checkin"])
        by_version: dict[str, Counter[str]] = defaultdict(Counter)
        for c in counts:
            by_version[c["version"]][c["status"]] += c["count"]
        versions = sorted(by_version, key=functools.cmp_to_key(compare_versions), reverse=True)
        return {"g": st, "failing": failing[:FAILING_SHOWN],
                "by_version": [(v, sum(by_version[v].values()), sorted(by_version[v].items())) for v in versions],
                "total": sum(c["count"] for c in counts), "chart": self.chart(name),
                "locks": self.lock_report([name]), "policy": _policy_rows(st["policy"])}

    def instances(self, query: dict[str, str]) -> dict[str, Any]:
        f = _filters(query)
        now = self.clock()
        page = f.pop("page")
        rows, total = self.store.instances(
            group=f["group"] or None, version=f["version"] or None, status=f["status"] or None,
            seen_before=now - self.stale_after if f["stale"] else None, limit=PAGE, offset=(page - 1) * PAGE)
        pages = max(1, -(-total // PAGE))
        for r in rows:
            r["stale"] = now - r["last_checkin"] > self.stale_after
        names = sorted({g.name for g in self.store.groups()} | {c["group"] for c in self.store.counts()})
        return {"rows": rows, "total": total, "page": page, "pages": pages, "first": (page - 1) * PAGE + 1,
                "last": (page - 1) * PAGE + len(rows), "filters": f, "statuses": STATUSES, "group_names": names,
                "query": {k: "1" if v is True else v for k, v in f.items() if v}}  # the pager's links keep the filters

    def instance(self, machine_id: str) -> dict[str, Any]:
        inst = self.store.instance(machine_id)
        inst["stale"] = self.clock() - inst["last_checkin"] > self.stale_after
        events = self.store.events_of(machine_id, TIMELINE)
        for e in events:
            e["type_name"] = EVENT_TYPES.get(e["event_type"], f"type {e['event_type']}")
            e["result_name"] = EVENT_RESULTS.get(e["event_result"], f"result {e['event_result']}")
            e["failed"] = e["status"] in FAILED or e["event_result"] == 0
        return {"i": inst, "events": events}


def _filters(query: dict[str, str]) -> dict[str, Any]:
    group = query.get("group", "").strip()
    if group:
        check_name("group", group)
    version = query.get("version", "").strip()
    if len(version) > 64:
        raise ConsoleInputError("version filter: at most 64 characters")
    status = query.get("status", "").strip()
    if status and status not in STATUSES:
        raise ConsoleInputError(f"status {status[:40]!r} is not one of {', '.join(STATUSES)}")
    stale = query.get("stale", "")
    if stale not in ("", "0", "1"):
        raise ConsoleInputError("stale: expected 1 or nothing")
    page_text = query.get("page", "1")
    if not (page_text.isascii() and page_text.isdigit()) or not 1 <= int(page_text) <= 10**6:
        raise ConsoleInputError(f"page: expected a whole number from 1, got {page_text[:20]!r}")
    return {"group": group, "version": version, "status": status, "stale": stale == "1", "page": int(page_text)}


def _policy_rows(policy: dict[str, Any]) -> list[tuple[str, str]]:
    def show(k: str, v: Any) -> str:
        if v is None:
            return "none"
        if k == "waves":
            return ", ".join(f"{a}={p:g}%" for a, p in v) or "none (all at once)"
        if k == "windows":
            return v or "always"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v)

    return [(k, show(k, v)) for k, v in policy.items()]
