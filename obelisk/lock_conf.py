"""`lock.conf`: where the reboot lock lives and when a host may reboot.

key=value lines, `#` comments, values may be quoted. `/etc/obelisk/lock.conf` is read over
`/usr/share/obelisk/lock.conf` key by key. Keys (docs/contracts.md):

ENDPOINT        comma list of etcd client URLs (etcd-lock, best-effort, `obelisk lock`)
GROUP           reboot group (default `default`; `^[a-zA-Z0-9.-]+$` as FleetLock requires)
CAFILE CERTFILE KEYFILE   TLS material for etcd (client cert + key, CA to trust)
FLEETLOCK_URL   base URL of a FleetLock server (fleetlock strategy)
WINDOW          `Mon..Fri 02:00 1h30m`, several separated by `;`
TIMEZONE        IANA name, `UTC` (default) or `localtime`
STALE_AFTER     a holder older than this may be reclaimed (e.g. `2h`); unset = never
WINDOW_START WINDOW_LENGTH   locksmith's form (`Thu 04:00` + `1h`); both or neither
COURTESY_DELAY  wait this long after the wall message when users are logged in (default 5m, as locksmith)
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from obelisk.errors import ObeliskError
from obelisk.windows import Window, WindowError, WindowSet, format_duration, parse_duration, parse_timezone

ETC_PATH = Path("/etc/obelisk/lock.conf")
USR_PATH = Path("/usr/share/obelisk/lock.conf")
GROUP_RE = re.compile(r"^[a-zA-Z0-9.-]+$")

KEYS = [
    "ENDPOINT", "GROUP", "CAFILE", "CERTFILE", "KEYFILE", "FLEETLOCK_URL", "WINDOW", "TIMEZONE",
    "STALE_AFTER", "WINDOW_START", "WINDOW_LENGTH", "COURTESY_DELAY",
]


class LockConfigError(ObeliskError, ValueError):
    """lock.conf is malformed; the message names the file, line and key."""


def _check_group(v: str) -> str:
    if not GROUP_RE.match(v):
        raise ValueError(f"bad group {v!r}: use letters, digits, '.' and '-' only")
    return v


class LockConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    endpoint: list[str] = []
    group: str = "default"
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    fleetlock_url: str | None = None
    window: str | None = None
    timezone: str | None = None
    stale_after: timedelta | None = None
    window_start: str | None = None
    window_length: str | None = None
    courtesy_delay: timedelta = timedelta(minutes=5)

    @field_validator("endpoint", mode="before")
    @classmethod
    def _endpoints(cls, v: object) -> object:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        for url in v if isinstance(v, list) else []:
            if not re.match(r"^https?://[^/\s]+", str(url)):
                raise ValueError(f"bad etcd URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        return v

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        return _check_group(v)

    @field_validator("fleetlock_url")
    @classmethod
    def _fleetlock(cls, v: str | None) -> str | None:
        if v and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"bad URL {v!r}: expected http(s)://HOST[:PORT][/PATH]")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v:
            WindowSet.parse(v)
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v:
            parse_timezone(v)
        return v

    @field_validator("stale_after", "courtesy_delay", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        if isinstance(v, str):
            d = parse_duration(v)
            if d <= timedelta(0):
                raise ValueError(f"bad duration {v!r}: must be more than 0")
            return d
        return v

    @field_validator("window_start")
    @classmethod
    def _wstart(cls, v: str | None) -> str | None:
        if v:
            _locksmith_window(v, "1h")
        return v

    @field_validator("window_length")
    @classmethod
    def _wlength(cls, v: str | None) -> str | None:
        if v:
            parse_duration(v)
        return v

    @model_validator(mode="after")
    def _pairs(self) -> LockConfig:
        if bool(self.window_start) != bool(self.window_length):
            raise ValueError("WINDOW_START and WINDOW_LENGTH go together: set both or neither")
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("CERTFILE and KEYFILE go together: set both or neither")
        return self

    # -- what the rest of the code uses ------------------------------------------------------

    def windows(self) -> WindowSet:
        ws = WindowSet.parse(self.window, self.timezone)
        if self.window_start and self.window_length:
            ws = WindowSet(ws.windows + (_locksmith_window(self.window_start, self.window_length),), ws.tz)
        return ws

    @classmethod
    def parse(cls, text: str, source: str = "lock.conf") -> LockConfig:
        return cls.model_validate(_parse_pairs(text, source, cls))

    def render(self) -> str:
        lines = []
        for key in KEYS:
            v = getattr(self, key.lower())
            if key == "GROUP" and v == "default":
                continue
            if key == "COURTESY_DELAY" and v == timedelta(minutes=5):
                continue
            if v is None or v == []:
                continue
            if isinstance(v, list):
                v = ",".join(v)
            elif isinstance(v, timedelta):
                v = format_duration(v)
            lines.append(f"{key}={v}")
        return "".join(line + "\n" for line in lines)


def _locksmith_window(start: str, length: str) -> Window:
    """locksmith's `[Day ]HH:MM` + Go duration -> a Window."""
    parts = start.split()
    if len(parts) == 1:
        return Window.parse(f"{parts[0]} {length}")
    if len(parts) == 2:
        return Window.parse(f"{parts[0]} {parts[1]} {length}")
    raise WindowError(f"bad window start {start!r}: expected 'HH:MM' or 'Day HH:MM', e.g. 'Thu 04:00'")


def _parse_pairs(text: str, source: str, model: type[BaseModel]) -> dict[str, str]:
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise LockConfigError(f"{source} line {n}: expected KEY=VALUE, got {line!r}")
        if key not in KEYS:
            raise LockConfigError(f"{source} line {n}: unknown key {key!r} (known: {', '.join(KEYS)})")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.lower()] = value
        lines[key.lower()] = n
    try:
        model.model_validate(values)
    except Exception as exc:  # pydantic ValidationError: re-word it to name the key and line
        raise LockConfigError(_explain(exc, source, lines)) from None
    return values


def _explain(exc: Exception, source: str, lines: dict[str, int]) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return f"{source}: {exc}"
    first = errors()[0]
    loc = first.get("loc") or ()
    msg = str(first.get("msg", exc)).removeprefix("Value error, ")
    if loc:
        key = str(loc[0])
        where = f" line {lines[key]}" if key in lines else ""
        return f"{source}{where}: {key.upper()}: {msg}"
    return f"{source}: {msg}"


def load(etc: Path = ETC_PATH, usr: Path = USR_PATH) -> LockConfig:
    """The effective lock.conf: /usr defaults, then /etc overrides, key by key."""
    values: dict[str, str] = {}
    for path in (usr, etc):
        if path.is_file():
            values.update(_parse_pairs(path.read_text(), str(path), LockConfig))
    try:
        return LockConfig.model_validate(values)
    except Exception as exc:
        raise LockConfigError(_explain(exc, f"{usr} + {etc}", {})) from None
