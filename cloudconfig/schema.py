"""The coreos-cloudinit dialect of #cloud-config as a tree of field specs.

Only what obelisk applies (plus the keys CoreOS users still carry around, so they get a
"deprecated/ignored" warning instead of "unrecognized key") is listed here. Keys are spelled
with underscores; the validator maps "-" to "_" before it looks them up, as coreos-cloudinit did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from obelisk.update_conf import REBOOT_STRATEGIES
from obelisk.windows import WEEK, Window, WindowError, parse_duration

MAX_ID = 2**32 - 2  # uid/gid range of chown(2): (uid_t)-1 means "leave unchanged"

Check = Callable[[object], "str | None"]


@dataclass(frozen=True)
class Field:
    kind: str  # "str" | "bool" | "int" | "list" | "map" | "any"
    item: Field | None = None  # element spec of a list
    fields: dict[str, Field] = field(default_factory=dict)  # members of a map
    check: Check | None = None  # value -> error message (None when fine)
    deprecated: str | None = None  # warning text when the key is used
    required: bool = False


def S(check: Check | None = None, **kw: object) -> Field:
    return Field("str", check=check, **kw)  # type: ignore[arg-type]


def B(**kw: object) -> Field:
    return Field("bool", **kw)  # type: ignore[arg-type]


def I(**kw: object) -> Field:  # noqa: E743 - short spec constructor, mirrors S/B/L/M
    return Field("int", **kw)  # type: ignore[arg-type]


def L(item: Field, **kw: object) -> Field:
    return Field("list", item=item, **kw)  # type: ignore[arg-type]


def M(fields: dict[str, Field], **kw: object) -> Field:
    return Field("map", fields=fields, **kw)  # type: ignore[arg-type]


# --- value checks (each returns an error message or None) ------------------------------------

PERMISSIONS_RE = re.compile(r"^0?[0-7]{3,4}$")
ENCODINGS = ("b64", "base64", "gz", "gzip", "gz+b64", "gz+base64", "gzip+b64", "gzip+base64")
UNIT_COMMANDS = ("start", "stop", "restart", "reload", "try-restart", "reload-or-restart", "reload-or-try-restart")
UNIT_SUFFIXES = (
    "service", "socket", "device", "mount", "automount", "swap", "target", "path", "timer", "slice", "scope",
    "network", "netdev", "link",
)
UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.(" + "|".join(UNIT_SUFFIXES) + r")$")
HOSTNAME_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
URL_RE = re.compile(r"^https?://[^\s/]+(?:/\S*)?$")


def one_of(*values: str) -> Check:
    def check(v: object) -> str | None:
        return None if v in values else f"invalid value {v!r}: use one of {', '.join(values)}"
    return check


def permissions(v: object) -> str | None:
    if not PERMISSIONS_RE.match(str(v)):
        return f"invalid value {v!r}: permissions must be an octal mode such as '0644' (quote it)"
    return None


def unit_name(v: object) -> str | None:
    s = str(v)
    if len(s) > 255 or not UNIT_NAME_RE.match(s):
        return (f"invalid unit name {s!r}: use name.service (or .socket, .timer, .mount, .target, ...) "
                "with letters, digits and :_.\\-@ only")
    return None


def dropin_name(v: object) -> str | None:
    s = str(v)
    if "/" in s or not s.endswith(".conf") or s == ".conf":
        return f"invalid drop-in name {s!r}: systemd only reads drop-ins named like 10-name.conf"
    return None


def absolute_path(v: object) -> str | None:
    s = str(v)
    if not s.startswith("/"):
        return f"invalid path {s!r}: write_files paths must be absolute"
    if "\0" in s or any(part == ".." for part in s.split("/")):
        return f"invalid path {s!r}: '..' and NUL are not allowed"
    if s == "/usr" or s.startswith("/usr/"):
        return f"file cannot be written to a read-only filesystem: {s} is under /usr; use /etc or /var"
    return None


def hostname(v: object) -> str | None:
    s = str(v)
    if not s or len(s) > 253 or not all(HOSTNAME_LABEL_RE.match(p) for p in s.rstrip(".").split(".")):
        return f"invalid hostname {s!r}: use letters, digits and '-' in dot-separated labels of 1-63 characters"
    return None


def window_start(v: object) -> str | None:
    """locksmith's `[Day ]HH:MM`, parsed by the reboot windows' own parser (what lock.conf is read with)."""
    s = str(v)
    try:
        if len(s.split()) not in (1, 2):
            raise WindowError(s)
        Window.parse(f"{s} 1h")
    except WindowError:
        return f"invalid value {v!r}: window_start is an optional weekday and a 24 h time, e.g. 'Thu 04:00' or '3:30'"
    return None


def duration(v: object) -> str | None:
    try:
        d = parse_duration(str(v))
    except WindowError:
        d = timedelta(0)
    if d <= timedelta(0):
        return f"invalid value {v!r}: use a positive duration such as '1h30m' or '45m'"
    if d > WEEK:
        return f"invalid value {v!r}: a reboot window is at most 7 days long"
    return None


def url(v: object) -> str | None:
    return None if URL_RE.match(str(v)) else f"invalid URL {v!r}: use http:// or https://"


def url_list(v: object) -> str | None:
    for part in str(v).split(","):
        if part.strip() and not URL_RE.match(part.strip()):
            return f"invalid URL {part.strip()!r} in list: use comma-separated http:// or https:// URLs"
    return None


def initial_cluster(v: object) -> str | None:
    for part in str(v).split(","):
        name, eq, peer = part.strip().partition("=")
        if not eq or not name or not URL_RE.match(peer):
            return f"invalid initial_cluster entry {part.strip()!r}: use name=http://host:2380[,name2=...]"
    return None


BOOL_WORDS = {"true": "true", "yes": "true", "on": "true", "1": "true",
              "false": "false", "no": "false", "off": "false", "0": "false"}


def boolish(v: object) -> str | None:
    return None if str(v).lower() in BOOL_WORDS else f"invalid value {v!r}: use true or false"


def digits(v: object) -> str | None:
    return None if str(v).isdigit() else f"invalid value {v!r}: use a whole number"


def owner(v: object) -> str | None:
    s = str(v)
    if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$", s):
        return f"invalid owner {s!r}: use user, user:group or uid:gid"
    for part in s.split(":"):
        if part.isdigit() and int(part) > MAX_ID:
            return f"invalid owner {s!r}: a uid or gid is at most {MAX_ID}"
    return None


def groupname(v: object) -> str | None:
    s = str(v)
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$", s):
        return f"invalid group name {s!r}: use letters, digits, '_', '.', '-' (at most 32)"
    return None


def no_colon(v: object) -> str | None:
    return f"invalid value {v!r}: ':' is not allowed here (it separates passwd fields)" if ":" in str(v) else None


def abs_no_colon(v: object) -> str | None:
    s = str(v)
    if not s.startswith("/") or ":" in s:
        return f"invalid path {s!r}: use an absolute path without ':'"
    return None


def home_path(v: object) -> str | None:
    s = str(v)
    msg = abs_no_colon(s)
    if msg is None and any(part == ".." for part in s.split("/")):
        return f"invalid path {s!r}: '..' is not allowed (a home must stay inside the target root)"
    return msg


def username(v: object) -> str | None:
    s = str(v)
    if not re.match(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", s):
        return f"invalid user name {s!r}: use lower-case letters, digits, '_', '.', '-' (at most 32)"
    return None


# --- the tree ------------------------------------------------------------------------------

_ETCD2_STR = (  # noqa: SIM905 - readable groups of flag names
    "name discovery discovery_srv discovery_fallback discovery_proxy initial_cluster_state initial_cluster_token "
    "data_dir wal_dir proxy_dial_timeout proxy_failure_wait proxy_read_timeout proxy_refresh_interval "
    "proxy_write_timeout cert_file key_file trusted_ca_file peer_cert_file peer_key_file peer_trusted_ca_file "
    "heartbeat_interval election_timeout snapshot_count max_snapshots max_wals cors log_package_levels"
).split()
_ETCD2_BOOL_LIKE = "client_cert_auth peer_client_cert_auth strict_reconfig_check force_new_cluster debug enable_pprof"

ETCD2_FIELDS: dict[str, Field] = {k: S() for k in _ETCD2_STR}
ETCD2_FIELDS.update({k: S(boolish) for k in _ETCD2_BOOL_LIKE.split()})  # etcd parses them with ParseBool
_ETCD2_NUMBERS = (  # noqa: SIM905 - readable groups of flag names
    "heartbeat_interval election_timeout snapshot_count max_snapshots max_wals proxy_dial_timeout proxy_failure_wait "
    "proxy_read_timeout proxy_refresh_interval proxy_write_timeout").split()
ETCD2_FIELDS.update({k: S(digits) for k in _ETCD2_NUMBERS})
ETCD2_FIELDS.update({
    "discovery": S(url),
    "discovery_proxy": S(url),
    "initial_cluster": S(initial_cluster),
    "initial_cluster_state": S(one_of("new", "existing")),
    "discovery_fallback": S(one_of("exit", "proxy")),
    "initial_advertise_peer_urls": S(url_list),
    "advertise_client_urls": S(url_list),
    "listen_client_urls": S(url_list),
    "listen_peer_urls": S(url_list),
    "proxy": S(one_of("on", "off", "readonly")),
    "ca_file": S(deprecated="ca_file is deprecated: use trusted_ca_file (written as ETCD_TRUSTED_CA_FILE)"),
    "peer_ca_file": S(deprecated="peer_ca_file is deprecated: use peer_trusted_ca_file"),
})
# etcd 0.4 spellings under coreos.etcd, translated to etcd 3.4 flags by bootstrap.py.
ETCD_FIELDS: dict[str, Field] = dict(ETCD2_FIELDS)
ETCD_FIELDS.update({k: S() for k in ("addr", "bind_addr", "peer_addr", "peer_bind_addr")})
ETCD_FIELDS["peers"] = S(deprecated="peers (etcd 0.4) has no etcd 3.4 equivalent and is ignored: use initial_cluster")

LOCKSMITH = M({
    "endpoint": S(url_list),
    "group": S(),
    "window_start": S(window_start),
    "window_length": S(duration),
    "etcd_cafile": S(),
    "etcd_certfile": S(),
    "etcd_keyfile": S(),
    "etcd_username": S(deprecated="etcd_username is not supported by obelisk's lock client and is ignored"),
    "etcd_password": S(deprecated="etcd_password is not supported by obelisk's lock client and is ignored"),
})

UPDATE = M({
    "reboot_strategy": S(one_of(*REBOOT_STRATEGIES)),
    "group": S(),
    "server": S(url),
})

UNIT = M({
    "name": S(unit_name, required=True),
    "content": S(),
    "enable": B(),
    "command": S(one_of(*UNIT_COMMANDS)),
    "runtime": B(),
    "mask": B(),
    "drop_ins": L(M({"name": S(dropin_name, required=True), "content": S()})),
})

_IGNORED = "is not part of obelisk and is ignored"

COREOS = M({
    "etcd": M(ETCD_FIELDS, deprecated="coreos.etcd (etcd 0.4) is deprecated: use coreos.etcd2; obelisk runs etcd 3.4"),
    "etcd2": M(ETCD2_FIELDS),
    "update": UPDATE,
    "locksmith": LOCKSMITH,
    "units": L(UNIT),
    "fleet": Field("any", deprecated=f"coreos.fleet {_IGNORED}"),
    "flannel": Field("any", deprecated=f"coreos.flannel {_IGNORED}"),
    "oem": M({k: S() for k in ("id", "name", "version_id", "home_url", "bug_report_url")}),
})

USER = M({
    "name": S(username, required=True),
    "gecos": S(no_colon),
    "passwd": S(no_colon),
    "homedir": S(home_path),
    "no_create_home": B(),
    "primary_group": S(groupname),
    "groups": L(S(groupname)),
    "no_user_group": B(),
    "ssh_authorized_keys": L(S()),
    "system": B(),
    "no_log_init": B(),
    "shell": S(abs_no_colon),
    "inactive": B(deprecated="users.inactive is not implemented and is ignored"),
    "lock_passwd": B(deprecated="users.lock_passwd is not implemented and is ignored"),
    "sudo": S(deprecated="users.sudo is not implemented and is ignored: add the user to the sudo group"),
    "selinux_user": S(deprecated="users.selinux_user is not implemented and is ignored"),
    "ssh_import_id": S(deprecated="users.ssh_import_id is not implemented and is ignored"),
    "coreos_ssh_import_github": S(deprecated="coreos_ssh_import_github is deprecated (remote fetches) and ignored"),
    "coreos_ssh_import_github_users": L(S(), deprecated="coreos_ssh_import_github_users is deprecated and ignored"),
    "coreos_ssh_import_url": S(deprecated="coreos_ssh_import_url is deprecated (remote fetches) and ignored"),
})

WRITE_FILE = M({
    "path": S(absolute_path, required=True),
    "content": S(),
    "permissions": S(permissions),
    "owner": S(owner),
    "encoding": S(one_of(*ENCODINGS)),
})

ROOT = M({
    "coreos": COREOS,
    "ssh_authorized_keys": L(S()),
    "hostname": S(hostname),
    "users": L(USER),
    "write_files": L(WRITE_FILE),
    "manage_etc_hosts": S(one_of("localhost")),
})
