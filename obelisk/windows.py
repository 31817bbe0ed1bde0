"""Weekly maintenance windows (`Mon..Fri 02:00 1h30m`) in a timezone, and Go-style durations.

A window names the days it *starts* on, a start time and a length; it may run past midnight
and wrap the week (`Sun 23:00 2h` ends Monday 01:00). Lengths are absolute time: across a DST
change a window keeps its length in seconds, as Zincati documents for its periodic strategy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from obelisk.errors import ObeliskError

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
WEEK = timedelta(days=7)


class WindowError(ObeliskError, ValueError):
    """A window, duration or timezone string is malformed; the message says what is expected."""


def parse_duration(text: str) -> timedelta:
    """`1h30m`, `90m`, `45s`, `2d`, `1.5h` (Go's time.ParseDuration units plus `d`)."""
    s = text.strip().lower()
    if not s:
        raise WindowError("empty duration: expected e.g. '1h30m', '90m' or '45s'")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise WindowError(f"bad duration {text!r}: expected a number with a unit, e.g. '1h30m', '90m' or '45s'")
    return timedelta(seconds=total)


def format_duration(d: timedelta) -> str:
    secs = d.total_seconds()
    if secs != int(secs):
        return f"{int(round(secs * 1000))}ms"
    secs = int(secs)
    out = ""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            out += f"{secs // size}{unit}"
            secs %= size
    return out or "0s"


def parse_timezone(name: str | None) -> tzinfo:
    """IANA name, `UTC` (the default, as Zincati) or `localtime` (the host's /etc/localtime)."""
    if not name or name.strip().upper() == "UTC":
        return UTC
    name = name.strip()
    if name == "localtime":
        return datetime.now().astimezone().tzinfo or UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise WindowError(
            f"unknown timezone {name!r}: use an IANA name such as 'Europe/Berlin', 'UTC' or 'localtime'"
        ) from exc


_FULL_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


def _day(name: str) -> int:
    n = name.strip().lower()
    if n in DAYS:
        return DAYS.index(n)
    if n in _FULL_DAYS:
        return _FULL_DAYS.index(n)
    raise WindowError(f"bad day {name!r}: use short day names Mon Tue Wed Thu Fri Sat Sun, or a range like Mon..Fri")


def _parse_days(spec: str) -> tuple[int, ...]:
    days: list[int] = []
    for part in spec.split(","):
        if ".." in part:
            a, _, b = part.partition("..")
            i, j = _day(a), _day(b)
            # A range may wrap the week: Fri..Mon = Fri Sat Sun Mon.
            k = i
            while True:
                days.append(k)
                if k == j:
                    break
                k = (k + 1) % 7
        else:
            days.append(_day(part))
    return tuple(sorted(set(days)))


def _render_days(days: tuple[int, ...]) -> str:
    """Consecutive days as ranges: (0,1,2,3,4,6) -> 'Mon..Fri,Sun'."""
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    out = []
    for r in runs:
        if len(r) == 2:
            out.extend(DAYS[d].capitalize() for d in r)
        else:
            out.append(DAYS[r[0]].capitalize() + (f"..{DAYS[r[-1]].capitalize()}" if len(r) > 2 else ""))
    return ",".join(out)


def _parse_clock(text: str) -> time:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise WindowError(f"bad start time {text!r}: expected HH:MM between 00:00 and 23:59")
    return time(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class Window:
    days: tuple[int, ...]  # 0 = Monday
    start: time
    length: timedelta

    @classmethod
    def parse(cls, text: str) -> Window:
        """`[DAYS] HH:MM LENGTH`; DAYS = `Mon`, `Mon,Wed`, `Mon..Fri` (no DAYS = every day)."""
        parts = text.split()
        if len(parts) == 2:
            days: tuple[int, ...] = tuple(range(7))
            clock, length = parts
        elif len(parts) == 3:
            days = _parse_days(parts[0])
            clock, length = parts[1], parts[2]
        else:
            raise WindowError(f"bad window {text!r}: expected '[DAYS] HH:MM LENGTH', e.g. 'Mon..Fri 02:00 1h30m'")
        start = _parse_clock(clock)
        dur = parse_duration(length)
        if dur <= timedelta(0) or dur > WEEK:
            raise WindowError(f"bad window {text!r}: the length must be more than 0 and at most 7 days")
        return cls(days, start, dur)

    def render(self) -> str:
        day = "" if self.days == tuple(range(7)) else _render_days(self.days) + " "
        return f"{day}{self.start:%H:%M} {format_duration(self.length)}"

    def openings(self, around: datetime, tz: tzinfo) -> list[tuple[datetime, datetime]]:
        """Every (start, end) in UTC of this window that starts between 8 days before and 8 after `around`."""
        local = around.astimezone(tz)
        out = []
        for delta in range(-8, 9):
            day = (local + timedelta(days=delta)).date()
            if day.weekday() in self.days:
                start = datetime.combine(day, self.start, tzinfo=tz).astimezone(UTC)
                out.append((start, start + self.length))
        return out


@dataclass(frozen=True)
class WindowSet:
    """Several windows in one timezone; no windows = always open."""

    windows: tuple[Window, ...] = ()
    tz: tzinfo = field(default=UTC)

    @classmethod
    def parse(cls, text: str | None, timezone: str | None = None) -> WindowSet:
        """`;`-separated windows, e.g. `Mon..Fri 02:00 1h30m; Sat 04:00 4h`."""
        tz = parse_timezone(timezone)
        items = [p.strip() for p in (text or "").split(";") if p.strip()]
        return cls(tuple(Window.parse(p) for p in items), tz)

    @property
    def always(self) -> bool:
        return not self.windows

    def is_open(self, now: datetime | None = None) -> bool:
        if self.always:
            return True
        now = now or datetime.now(UTC)
        return any(s <= now < e for w in self.windows for s, e in w.openings(now, self.tz))

    def next_open(self, now: datetime | None = None) -> datetime:
        """`now` if a window is open, else the next start."""
        now = now or datetime.now(UTC)
        if self.is_open(now):
            return now
        starts = [s for w in self.windows for s, _ in w.openings(now, self.tz) if s > now]
        return min(starts)

    def render(self) -> str:
        return "; ".join(w.render() for w in self.windows)
