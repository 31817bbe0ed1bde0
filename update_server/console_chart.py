"""The console's version-over-time chart: instances per version, reconstructed from the fleet state.

No history table is needed: start from today's instances per version and walk back in time through
the events that completed an update (3/2 with a previous version: one host moved from
`previous_version` to `version`) and the instances' first check-ins (before it a host was not in
the fleet). Pruned hosts are gone from both, so the chart shows the hosts the server still knows;
a host whose 3/2 event was lost (or trimmed from its history) shows on its new version earlier.
Rendered server-side as an inline SVG (a stacked area per version); only numbers and escaped
labels reach the page, no script.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from obelisk.versions import compare_versions
from update_server.db import models as m
from update_server.db.store import Store

WIDTH, HEIGHT, PAD_L, PAD_B, PAD_T = 720, 220, 44, 24, 8
MIN_SPAN, MAX_SPAN = 3600.0, 14 * 86400.0
MAX_SERIES = 8  # older versions past these are one "older" band
PALETTE = ("#2f6db5", "#e0822b", "#3a9a4a", "#c23b3b", "#7e57b8", "#8c6b4f", "#d062a6", "#6f7782", "#b5a82f")


@dataclass
class Series:
    label: str
    color: str
    points: str      # the SVG polygon's points
    latest: int      # instances on this version now


@dataclass
class Chart:
    width: int
    height: int
    series: list[Series]
    ticks_x: list[tuple[float, str, str]]  # x, label, text-anchor
    ticks_y: list[tuple[float, str]]
    empty: bool
    span: float  # seconds


def history(store: Store, now: float, *, span: float = 14 * 86400.0, points: int = 56, group: str | None = None
            ) -> list[tuple[float, Counter[str]]]:
    """(time, instances per version) at `points` + 1 evenly spaced times from now - span to now."""
    start = now - span
    where_i = sa.true() if group is None else (m.instances.c.group_name == group)
    with store.read() as c:
        current = Counter({v: n for v, n in c.execute(
            sa.select(m.instances.c.version, sa.func.count()).where(where_i).group_by(m.instances.c.version))})
        e = m.events.c
        moves = c.execute(sa.select(e.at, e.machine_id, e.previous_version, e.version)
                          .select_from(m.events.join(m.instances, m.instances.c.machine_id == e.machine_id))
                          .where(where_i & (e.status == "complete") & (e.at > start))).all()
        arrivals = c.execute(sa.select(m.instances.c.first_seen, m.instances.c.machine_id, m.instances.c.version)
                             .where(where_i & (m.instances.c.first_seen > start))).all()
    now_version = {r.machine_id: r.version for r in arrivals}
    changes = sorted([(r.at, 0, r.machine_id, r.previous_version or "", r.version) for r in moves]
                     + [(r.first_seen, 1, r.machine_id, "", "") for r in arrivals], reverse=True)
    step = span / points
    times = [start + i * step for i in range(points + 1)]
    out: list[tuple[float, Counter[str]]] = []
    counts, at = Counter(current), {}
    i = 0
    for t in reversed(times):  # newest first: undo every change after t
        while i < len(changes) and changes[i][0] > t:
            _, kind, mid, old, new = changes[i]
            if kind == 0:
                counts[new] -= 1
                counts[old] += 1
                at[mid] = old
            else:
                counts[at.get(mid, now_version.get(mid, ""))] -= 1
            i += 1
        out.append((t, +counts))  # unary plus drops zero and negative counts
    out.reverse()
    return out


def render(samples: list[tuple[float, Counter[str]]]) -> Chart:
    """A stacked area per version (newest on top), with time and count ticks."""
    if not samples:
        return Chart(WIDTH, HEIGHT, [], [], [], True, 0.0)
    versions = sorted({v for _, c in samples for v in c}, key=functools.cmp_to_key(compare_versions))
    keep = versions[-MAX_SERIES:]
    older = versions[:-MAX_SERIES]
    rows = []
    for _, c in samples:
        row = {v: c.get(v, 0) for v in keep}
        if older:
            row["older"] = sum(c.get(v, 0) for v in older)
        rows.append(row)
    labels = (["older"] if older else []) + keep
    top = max((sum(r.values()) for r in rows), default=0)
    empty = top == 0
    top = max(top, 1)
    t0, t1 = samples[0][0], samples[-1][0]
    plot_w, plot_h = WIDTH - PAD_L - 8, HEIGHT - PAD_B - PAD_T

    def x(t: float) -> float:
        return round(PAD_L + (t - t0) / max(t1 - t0, 1.0) * plot_w, 1)

    def y(n: float) -> float:
        return round(PAD_T + plot_h - n / top * plot_h, 1)

    series = []
    below = [0.0] * len(samples)
    for k, label in enumerate(labels):
        above = [b + r.get(label, 0) for b, r in zip(below, rows, strict=True)]
        upper = [f"{x(t)},{y(a)}" for (t, _), a in zip(samples, above, strict=True)]
        lower = [f"{x(t)},{y(b)}" for (t, _), b in zip(reversed(samples), reversed(below), strict=True)]
        series.append(Series(label, PALETTE[k % len(PALETTE)], " ".join(upper + lower), rows[-1].get(label, 0)))
        below = above
    ticks_x = []
    for i in range(5):
        t = t0 + (t1 - t0) * i / 4
        ticks_x.append((x(t), datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M"), ("start", "middle", "middle",
                                                                                          "middle", "end")[i]))
    ticks_y = [(y(n), str(n)) for n in sorted({0, top // 2, top})]
    return Chart(WIDTH, HEIGHT, list(reversed(series)), ticks_x, ticks_y, empty, t1 - t0)


def version_chart(store: Store, now: float, *, group: str | None = None, max_span: float = MAX_SPAN) -> Chart:
    """The chart over the fleet's own age: from its oldest first check-in (at least an hour, at most max_span)."""
    where = sa.true() if group is None else (m.instances.c.group_name == group)
    with store.read() as c:
        oldest = c.execute(sa.select(sa.func.min(m.instances.c.first_seen)).where(where)).scalar()
    span = min(max(now - (oldest if oldest is not None else now), MIN_SPAN), max_span)
    return render(history(store, now, span=span, group=group))

