"""The fleet run as a picture: one row per host against time (SVG, no dependencies).

Bars: staging (download started → installed), waiting for the reboot lock (installed → holding it),
holding the lock (rebooting, trial, marked good, given back), powered off (a power cut of the run).
Marks: each GRUB boot (tick), marked good (green dot), a failed health check (red cross), a rollback
reported to the server (red ring).
Input is the run's record (``fleet.json``); times are wall-clock seconds.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

COLORS = {"staging": "#6baed6", "waiting for the lock": "#fdae6b", "holding the lock": "#9e9ac8",
          "powered off": "#252525"}
OFFSETS = {"staging": 6, "waiting for the lock": 6, "holding the lock": 20, "powered off": 32}
LEFT, ROW, TOP, WIDTH = 110, 46, 40, 1100


def _intervals(samples: list[dict], mid: str) -> list[tuple[float, float]]:
    """Spans of the lock samples in which ``mid`` is a holder."""
    out: list[tuple[float, float]] = []
    start = None
    for s in samples:
        held = mid in (s.get("holders") or [])
        if held and start is None:
            start = s["time"]
        elif not held and start is not None:
            out.append((start, s["time"]))
            start = None
    if start is not None and samples:
        out.append((start, samples[-1]["time"]))
    return out


def segments(record: dict) -> dict[str, list[tuple[str, float, float]]]:
    """Per host name: (kind, start, end) bars."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    samples = record.get("lock_samples") or []
    for name, info in (record.get("hosts_info") or {}).items():
        mid = info.get("machine_id", "")
        evs = sorted((e for e in record.get("events") or [] if e.get("machineid") == mid),
                     key=lambda e: e.get("time", 0))
        bars: list[tuple[str, float, float]] = []
        held = _intervals(samples, info.get("holder") or mid)
        started = None
        for e in evs:
            kind = (e.get("eventtype"), e.get("eventresult"))
            if kind == (13, 1):
                started = e["time"]
            elif kind == (3, 1) and started is not None:
                bars.append(("staging", started, e["time"]))
                got = next((a for a, _ in held if a >= e["time"] - 1), None)
                if got is not None:
                    bars.append(("waiting for the lock", e["time"], got))
                started = None
        bars += [("holding the lock", a, b) for a, b in held]
        bars += [("powered off", a, b) for a, b in info.get("power_off") or []]
        out[name] = bars
    return out


def write_svg(path: Path, record: dict) -> Path:
    hosts = record.get("hosts_info") or {}
    bars = segments(record)
    t0 = float(record.get("t0") or 0)
    ends = [t for info in hosts.values() for t, _ in info.get("boots", [])]
    ends += [b for v in bars.values() for _, _, b in v] + [s["time"] for s in record.get("lock_samples") or []]
    t1 = max(ends + [t0 + 60])
    span = max(t1 - t0, 1.0)

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * (WIDTH - LEFT - 20)

    height = TOP + ROW * len(hosts) + 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
             f'<text x="{LEFT}" y="20" font-size="14">obelisk fleet run: {len(hosts)} host(s), '
             f'{escape(str(record.get("base", "")))} and the releases after it ({span / 60:.1f} min)</text>']
    step = next(s for s in (30, 60, 120, 300, 600, 900, 1800, 3600, 7200) if span / s <= 12)
    for k in range(0, int(span // step) + 1):
        xx = x(t0 + k * step)
        parts.append(f'<line x1="{xx:.1f}" y1="{TOP - 5}" x2="{xx:.1f}" y2="{TOP + ROW * len(hosts)}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{xx:.1f}" y="{TOP + ROW * len(hosts) + 14}" text-anchor="middle" '
                     f'fill="#555">{k * step // 60}m</text>')
    for row, (name, info) in enumerate(sorted(hosts.items())):
        y = TOP + row * ROW
        parts.append(f'<text x="8" y="{y + ROW / 2 + 4}">{escape(name)}</text>')
        for kind, a, b in bars.get(name, []):
            off = OFFSETS[kind]
            parts.append(f'<rect x="{x(a):.1f}" y="{y + off}" width="{max(x(b) - x(a), 1.5):.1f}" height="12" '
                         f'fill="{COLORS[kind]}"><title>{kind}: {b - a:.0f}s</title></rect>')
        for t, line in info.get("boots", []):
            parts.append(f'<line x1="{x(t):.1f}" y1="{y + 2}" x2="{x(t):.1f}" y2="{y + ROW - 6}" stroke="#333">'
                         f'<title>{escape(line[:120])}</title></line>')
        for t in info.get("good", []):
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y + 38}" r="4" fill="#31a354"><title>marked good</title>'
                         '</circle>')
        for t in info.get("failed", []):
            parts.append(f'<text x="{x(t):.1f}" y="{y + 42}" text-anchor="middle" fill="#de2d26" '
                         'font-weight="bold">x<title>health check failed</title></text>')
        mid = info.get("machine_id", "")
        for e in record.get("events") or []:
            if e.get("machineid") == mid and (e.get("eventtype"), e.get("eventresult"),
                                              e.get("errorcode")) == (3, 0, 44):
                parts.append(f'<circle cx="{x(e["time"]):.1f}" cy="{y + 38}" r="6" fill="none" stroke="#de2d26" '
                             'stroke-width="2"><title>rollback reported (44)</title></circle>')
    ly = TOP + ROW * len(hosts) + 34
    lx = LEFT
    for kind, color in COLORS.items():
        parts.append(f'<rect x="{lx}" y="{ly}" width="14" height="10" fill="{color}"/>'
                     f'<text x="{lx + 18}" y="{ly + 10}">{kind}</text>')
        lx += 40 + 7 * len(kind)
    parts.append(f'<line x1="{lx}" y1="{ly - 2}" x2="{lx}" y2="{ly + 12}" stroke="#333"/>'
                 f'<text x="{lx + 6}" y="{ly + 10}">boot</text>')
    parts.append(f'<circle cx="{lx + 56}" cy="{ly + 5}" r="4" fill="#31a354"/><text x="{lx + 64}" y="{ly + 10}">'
                 'marked good</text>')
    parts.append(f'<text x="{lx + 160}" y="{ly + 10}" fill="#de2d26" font-weight="bold">x</text>'
                 f'<text x="{lx + 172}" y="{ly + 10}">health failed / rolled back</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
    return path


def figures(record: dict) -> dict[str, dict[str, float]]:
    """Per host and roll: seconds staging (13/1 -> 3/1), waiting for the lock (3/1 -> holding it), and
    holding it until marked good on the new boot (the reboot), from the run's record."""
    out: dict[str, dict[str, float]] = {}
    samples = record.get("lock_samples") or []
    for name, info in (record.get("hosts_info") or {}).items():
        held = _intervals(samples, info.get("holder") or info.get("machine_id", ""))
        good = sorted(info.get("good") or [])
        bars = segments(record).get(name, [])
        for n, (_, a, b) in enumerate(k for k in bars if k[0] == "staging"):
            row = {"staging": b - a}
            got = next(((x, y) for x, y in held if x >= b - 1), None)
            if got is not None:
                row["waiting for the lock"] = max(0.0, got[0] - b)
                after = next((g for g in good if g > got[0]), None)
                if after is not None:
                    row["lock to marked good"] = after - got[0]
                row["lock held"] = got[1] - got[0]
            out[f"{name} update {n + 1}"] = row
    return out


def roll_figures(record: dict) -> dict[str, dict[str, float]]:
    """Per roll: its time (publish to every host done, the phase's own time) against the ideal of one host
    after the other with nothing but their reboots (hosts x the median time a host held the lock)."""
    out: dict[str, dict[str, float]] = {}
    per = figures(record)
    hosts = len(record.get("hosts_info") or {})
    phases = {p.get("name"): p for p in record.get("phases") or []}
    roll = phases.get("roll-1")
    held = sorted(row["lock held"] for what, row in per.items() if what.endswith("update 1") and "lock held" in row)
    if roll and held and hosts:
        ideal = hosts * held[len(held) // 2]
        out["roll-1"] = {"took": float(roll["seconds"]), "ideal": ideal, "ratio": float(roll["seconds"]) / ideal}
    return out
