"""The etcd key layout of a reboot group, in one place (the semaphore, its watch and the CLI read it).

    com.coreos.airlock/groups/<group>/v1/semaphore              Airlock's semaphore
    com.coreos.airlock/groups/<group>/v1/obelisk-taken          take times and reclaims (semaphore.py)
    com.coreos.airlock/groups/<group>/v1/obelisk-waiting/<id>   one key per queued host (watch.py)

<group> and <id> are escaped as Go's url.QueryEscape does (Airlock's way): quote_plus with nothing
kept but unreserved characters. The JSON gateway takes keys and values base64-encoded.
"""

from __future__ import annotations

import base64
from urllib.parse import quote_plus

GROUP_PREFIX = "com.coreos.airlock/groups/{group}/v1/"


def _escape(s: str) -> str:
    return quote_plus(s, safe="")


def group_prefix(group: str) -> str:
    """Every key of the group starts with this (the watch covers the whole prefix)."""
    return GROUP_PREFIX.format(group=_escape(group))


def sem_key(group: str) -> str:
    return group_prefix(group) + "semaphore"


def taken_key(group: str) -> str:
    return group_prefix(group) + "obelisk-taken"


def waiting_prefix(group: str) -> str:
    return group_prefix(group) + "obelisk-waiting/"


def waiting_key(group: str, holder: str) -> str:
    return waiting_prefix(group) + _escape(holder)


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def prefix_end(prefix: str) -> str:
    """range_end (base64) that makes a range cover every key starting with `prefix`."""
    raw = prefix.encode()
    return b64(raw[:-1] + bytes([raw[-1] + 1]))


def prefix_range(prefix: str) -> tuple[str, str]:
    """(key, range_end) of every key under `prefix`, base64 as the gateway wants them."""
    return b64(prefix), prefix_end(prefix)


def waiting_prefix_range(group: str) -> tuple[str, str]:
    """(key, range_end) of the group's waiting keys."""
    return prefix_range(waiting_prefix(group))
