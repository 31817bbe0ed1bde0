"""`update.conf`: where a host asks for updates and how it reboots (owner of this file format).

key=value lines, `#` comments. The host reads `/etc/obelisk/update.conf` over
`/usr/share/obelisk/update.conf`, key by key (the first file that defines a key wins, as Flatcar
does), with `APPID`/`VERSION` defaults from `/usr/share/obelisk/release`. cloud-config writes
the `/etc` file through :meth:`UpdateConf.render`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from obelisk.errors import ObeliskError

ETC_CONF = Path("/etc/obelisk/update.conf")
USR_CONF = Path("/usr/share/obelisk/update.conf")
RELEASE_FILE = Path("/usr/share/obelisk/release")
DEFAULT_GROUP = "stable"
DEFAULT_APPID = "{4f6b0a36-8a53-4b6e-9d8c-6f62656c6973}"  # used only when neither file nor release names one

Strategy = Literal["off", "reboot", "etcd-lock", "fleetlock", "best-effort"]
# The reboot strategies, in the order users see them (cloud-config, the coordinator and update.conf share it).
REBOOT_STRATEGIES: tuple[str, ...] = Strategy.__args__
KEYS = {
    "SERVER": "server",
    "GROUP": "group",
    "APPID": "app_id",
    "REBOOT_STRATEGY": "reboot_strategy",
    "PROXY": "proxy",
    "BANDWIDTH_LIMIT": "bandwidth_limit",
    "METRICS_TEXTFILE": "metrics_textfile",
}
# The node-exporter textfile collector's usual folders: the common convention first, then Debian's
# prometheus-node-exporter package. Without METRICS_TEXTFILE the daemon writes obelisk.prom into the
# first that exists (and nowhere when none does); METRICS_TEXTFILE=off writes nothing.
TEXTFILE_DIRS = (Path("/var/lib/node_exporter/textfile_collector"), Path("/var/lib/prometheus/node-exporter"))
TEXTFILE_NAME = "obelisk.prom"
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class UpdateConfigError(ObeliskError, ValueError):
    """update.conf cannot be used; the message names the file and key."""


def parse_kv(text: str, source: str = "update.conf") -> dict[str, str]:
    """key=value lines; quotes around a value are dropped (systemd EnvironmentFile style)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise UpdateConfigError(f"{source} line {n}: expected KEY=value, got {line[:60]!r}")
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise UpdateConfigError(f"{source} line {n}: {key!r} is not a KEY (upper case letters, digits, _)")
        out[key] = value
    return out


def parse_bandwidth(text: str) -> int:
    """Bytes per second from `10M`, `512K`, `1G`, `1000`; 0 or empty means no limit."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?(?:/s)?\s*", text or "0", re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a rate like 10M (bytes per second, K/M/G suffix)")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


class UpdateConf(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str | None = None  # Omaha URL, e.g. http://updates.example:8080/v1/update/
    group: str = DEFAULT_GROUP  # sent as the Omaha `track`
    app_id: str | None = None
    reboot_strategy: Strategy = "reboot"
    proxy: str | None = None  # http(s) proxy for the Omaha request and the payload download
    bandwidth_limit: str | None = None  # bytes/s with K/M/G suffix; empty = unlimited
    metrics_textfile: str | None = None  # the daemon's node-exporter textfile: a /path/NAME.prom, or "off"

    @field_validator("server", "proxy")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v):
            raise ValueError(f"{v!r} is not a group name (letters, digits, . _ -)")
        return v

    @field_validator("app_id")
    @classmethod
    def _appid(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not re.fullmatch(r"[A-Za-z0-9{}._:-]{1,128}", v):
            raise ValueError(f"{v!r} is not an app id (a UUID in braces, or letters, digits, . _ - :)")
        return v

    @field_validator("bandwidth_limit")
    @classmethod
    def _bw(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        parse_bandwidth(v)
        return v

    @field_validator("metrics_textfile")
    @classmethod
    def _textfile(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if v == "off":
            return v
        if not v.startswith("/") or not v.endswith(".prom") or v.endswith("/.prom") or any(c.isspace() for c in v):
            raise ValueError(f"{v!r} is not an absolute path ending in .prom (node-exporter reads only *.prom), "
                             "or off")
        return v

    def textfile_path(self, search: tuple[Path, ...] = TEXTFILE_DIRS) -> Path | None:
        """Where the daemon writes its metrics: METRICS_TEXTFILE, else obelisk.prom in the first textfile
        collector folder in ``search`` that exists; None when off or when no such folder exists."""
        if self.metrics_textfile == "off":
            return None
        if self.metrics_textfile:
            return Path(self.metrics_textfile)
        return next((d / TEXTFILE_NAME for d in search if d.is_dir()), None)

    @property
    def bandwidth_bytes(self) -> int:
        return parse_bandwidth(self.bandwidth_limit or "0")

    @classmethod
    def parse(cls, text: str, source: str = "update.conf", *, strict: bool = True) -> UpdateConf:
        """Model from key=value text. Unknown keys are errors when ``strict`` (cloud-config), else ignored."""
        return cls.from_kv(parse_kv(text, source), source, strict=strict)

    @classmethod
    def from_kv(cls, kv: dict[str, str], source: str = "update.conf", *, strict: bool = True) -> UpdateConf:
        fields: dict[str, str] = {}
        for key, value in kv.items():
            if key in KEYS:
                fields[KEYS[key]] = value
            elif strict:
                raise UpdateConfigError(f"{source}: unknown key {key} (known: {', '.join(KEYS)})")
        try:
            return cls(**fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "?"
            key = next((k for k, f in KEYS.items() if f == name), name)
            raise UpdateConfigError(f"{source}: {key}: {err['msg'].removeprefix('Value error, ')}") from None

    def render(self) -> str:
        lines = ["# obelisk update settings (update.conf); see 'obelisk update --help'"]
        for key, name in KEYS.items():
            value = getattr(self, name)
            if value not in (None, ""):
                lines.append(f"{key}={value}")
        return "\n".join(lines) + "\n"


def read_release(path: Path = RELEASE_FILE) -> dict[str, str]:
    """`/usr/share/obelisk/release` (VERSION, APPID, ARCH, NAME, BUILD_ID); empty if absent."""
    try:
        return parse_kv(path.read_text(), str(path))
    except OSError:
        return {}


def load(etc: Path = ETC_CONF, usr: Path = USR_CONF, release: Path = RELEASE_FILE) -> UpdateConf:
    """The effective settings: /etc over /usr key by key, APPID falling back to the release file."""
    merged: dict[str, str] = {}
    for path in (usr, etc):  # later wins
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UpdateConfigError(f"cannot read {path}: {exc.strerror}") from None
        merged.update(parse_kv(text, str(path)))
    if not merged.get("APPID"):
        rel = read_release(release)
        if rel.get("APPID"):
            merged["APPID"] = rel["APPID"]
    return UpdateConf.from_kv(merged, str(etc), strict=False)
