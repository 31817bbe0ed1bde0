"""The fleet's JSON API (`/api/v1/fleet/...`), a Starlette router the update server mounts.

Reads need a read or an admin bearer token; changes need an admin token. Bearer tokens in a
header (never cookies), and changes accept only `application/json` bodies, so a browser form on
another site cannot drive them (no CSRF). Errors are `{"error": "<one line>"}` with 400 (bad
value, nothing stored), 401 (no or wrong token), 403 (read token on a change), 404, 413, 415.

GET  /api/v1/fleet/status                      instances per group/version/status, halted groups
GET  /api/v1/fleet/groups                      every group: channel, policy, paused/halted + reason
GET  /api/v1/fleet/groups/{g}
POST /api/v1/fleet/groups/{g}/policy           JSON object of policy fields to change (merged)
POST /api/v1/fleet/groups/{g}/channel          {"channel": NAME}: the channel the group follows
POST /api/v1/fleet/groups/{g}/pause | resume
GET  /api/v1/fleet/groups/{g}/preview?release=V&step=15m
GET  /api/v1/fleet/channels
POST /api/v1/fleet/channels/{c}                {"version": "1.2.0" | null, "floors": [...]}
GET  /api/v1/fleet/instances?group=&version=&status=&stale=1&limit=&offset=
GET  /api/v1/fleet/instances/{id}
GET  /api/v1/fleet/instances/{id}/events?limit=
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from obelisk.errors import ObeliskError
from obelisk.serving import BodyTooLarge, bearer_matches, read_body
from obelisk.windows import WindowError, parse_duration
from update_server.db.store import NotFound, Store, check_name
from update_server.policy import PolicyError
from update_server.tracking import STATUSES

PREFIX = "/api/v1/fleet"
MAX_BODY = 64 * 1024
MAX_PAGE = 1000
DEFAULT_STALE = 24 * 3600.0  # an instance not seen for a day is shown as stale

Handler = Callable[[Request], Awaitable[Response]]


class ApiError(ObeliskError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def make_router(store: Store, *, read_tokens: list[str] | None = None, admin_tokens: list[str] | None = None,
                clock: Callable[[], float] = time.time, stale_after: float = DEFAULT_STALE,
                resolve_target: Callable[[str], str | None] | None = None,
                on_change: Callable[[], None] | None = None) -> Router:
    """The API over `store`. `resolve_target(group)`: the release a group's channel offers now (the
    server's catalog knows "newest"); without it a channel's pinned version is the target.
    `on_change()` runs after every successful change (the server drops its cached channel versions)."""
    readers = list(read_tokens or []) + list(admin_tokens or [])
    admins = list(admin_tokens or [])

    def guard(write: bool, fn: Callable[[Request], Any]) -> Handler:
        async def endpoint(request: Request) -> Response:
            tokens = admins if write else readers
            if not readers:
                return _error(403, "the fleet API is off: start the server with --admin-token-file")
            auth = request.headers.get("authorization", "")
            if not any(bearer_matches(auth, t) for t in readers):
                return _error(401, "missing or wrong bearer token")
            if not any(bearer_matches(auth, t) for t in tokens):
                return _error(403, "this change needs an admin token")
            try:
                if write:
                    result = await run_in_threadpool(fn, request, await _json_body(request))
                    if on_change is not None:
                        on_change()
                else:
                    result = await run_in_threadpool(fn, request)
            except ApiError as exc:
                return _error(exc.status, str(exc))
            except BodyTooLarge as exc:
                return _error(413, str(exc))
            except NotFound as exc:
                return _error(404, str(exc))
            except (PolicyError, WindowError) as exc:
                return _error(400, str(exc))
            return JSONResponse(result)
        return endpoint

    def target_of(group: str) -> str | None:
        if resolve_target is not None:
            return resolve_target(group)
        g = store.group(group)
        try:
            return store.channel(g.channel).version
        except NotFound:
            return None

    def status(request: Request) -> dict[str, Any]:
        now = clock()
        groups = store.groups()
        _, stale = store.instances(seen_before=now - stale_after, limit=0)
        counts = store.counts()
        return {"instances": sum(c["count"] for c in counts), "stale": stale, "stale_after": stale_after,
                "counts": counts, "groups": len(groups),
                "halted": [{"group": g.name, "reason": g.halt_reason, "at": g.halted_at} for g in groups if g.halted],
                "paused": [g.name for g in groups if g.paused]}

    def groups(request: Request) -> dict[str, Any]:
        return {"groups": [_group_view(g, target_of) for g in store.groups()]}

    def group(request: Request) -> dict[str, Any]:
        return _group_view(store.group(_name(request, "group")), target_of)

    def set_policy(request: Request, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not body:
            raise ApiError(400, "policy: expected a JSON object of fields to change, e.g. "
                                '{"max_updates_per_period": 5}')
        return _group_view(store.set_policy(_name(request, "group"), body, clock()), target_of)

    def set_group_channel(request: Request, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"channel"}:
            raise ApiError(400, 'expected {"channel": NAME}')
        name = _name(request, "group")
        store.group(name)
        return _group_view(store.put_group(name, clock(), channel=check_name("channel", body["channel"])),
                           target_of)

    def pause(request: Request, body: Any) -> dict[str, Any]:
        return _group_view(store.pause(_name(request, "group"), clock()), target_of)

    def resume(request: Request, body: Any) -> dict[str, Any]:
        return _group_view(store.resume(_name(request, "group"), clock()), target_of)

    def preview(request: Request) -> dict[str, Any]:
        name = _name(request, "group")
        store.group(name)
        release = request.query_params.get("release") or target_of(name)
        step = _duration_param(request, "step", "0s")
        now = clock()
        entries = store.preview(name, release, now, step=step)
        return {"group": name, "release": release, "now": now, "step": step,
                "instances": [e.to_dict() for e in entries]}

    def channels(request: Request) -> dict[str, Any]:
        return {"channels": [c.to_dict() for c in store.channels()]}

    def set_channel(request: Request, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not set(body) <= {"version", "floors"} or "version" not in body:
            raise ApiError(400, 'expected {"version": "1.2.0" or null, "floors": [...] (optional)}')
        return store.set_channel(_name(request, "channel"), body["version"], clock(),
                                 floors=body.get("floors")).to_dict()

    def instances(request: Request) -> dict[str, Any]:
        q = request.query_params
        limit = _int_param(request, "limit", 100, 0, MAX_PAGE)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        st = q.get("status")
        if st is not None and st not in STATUSES:
            raise ApiError(400, f"status {st[:40]!r} is not one of {', '.join(STATUSES)}")
        stale = q.get("stale")
        if stale not in (None, "0", "1"):
            raise ApiError(400, "stale: expected 1 (only instances not seen for stale_after) or 0")
        now = clock()
        rows, total = store.instances(group=q.get("group"), version=q.get("version"), status=st,
                                      seen_before=now - stale_after if stale == "1" else None,
                                      limit=limit, offset=offset)
        return {"total": total, "limit": limit, "offset": offset,
                "instances": [_instance_view(r, now, stale_after) for r in rows]}

    def instance(request: Request) -> dict[str, Any]:
        return _instance_view(store.instance(request.path_params["id"]), clock(), stale_after)

    def events(request: Request) -> dict[str, Any]:
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        return {"events": store.events_of(request.path_params["id"], limit)}

    p = PREFIX
    return Router(routes=[
        Route(f"{p}/status", guard(False, status)),
        Route(f"{p}/groups", guard(False, groups)),
        Route(f"{p}/groups/{{group}}", guard(False, group)),
        Route(f"{p}/groups/{{group}}/policy", guard(True, set_policy), methods=["POST"]),
        Route(f"{p}/groups/{{group}}/channel", guard(True, set_group_channel), methods=["POST"]),
        Route(f"{p}/groups/{{group}}/pause", guard(True, pause), methods=["POST"]),
        Route(f"{p}/groups/{{group}}/resume", guard(True, resume), methods=["POST"]),
        Route(f"{p}/groups/{{group}}/preview", guard(False, preview)),
        Route(f"{p}/channels", guard(False, channels)),
        Route(f"{p}/channels/{{channel}}", guard(True, set_channel), methods=["POST"]),
        Route(f"{p}/instances", guard(False, instances)),
        Route(f"{p}/instances/{{id}}", guard(False, instance)),
        Route(f"{p}/instances/{{id}}/events", guard(False, events)),
    ])


async def _json_body(request: Request) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await read_body(request, MAX_BODY)
    if not raw:
        return {}
    if ctype != "application/json":
        raise ApiError(415, "send the body as application/json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON: {str(exc)[:80]}") from None


def _name(request: Request, key: str) -> str:
    return check_name(key, request.path_params[key])


def _int_param(request: Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(key)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise ApiError(400, f"{key}: expected a whole number from {low} to {high}, got {text[:20]!r}")
    return int(text)


def _duration_param(request: Request, key: str, default: str) -> float:
    text = request.query_params.get(key, default)
    try:
        secs = parse_duration(text).total_seconds()
    except WindowError as exc:
        raise ApiError(400, f"{key}: {exc}") from None
    if secs < 0 or secs > 7 * 86400:
        raise ApiError(400, f"{key}: expected a duration up to 7d")
    return secs


def _group_view(g: Any, target_of: Callable[[str], str | None]) -> dict[str, Any]:
    d = g.to_dict()
    d["release"] = target_of(g.name)
    return d


def _instance_view(row: dict[str, Any], now: float, stale_after: float) -> dict[str, Any]:
    return {**row, "stale": now - row["last_checkin"] > stale_after}
