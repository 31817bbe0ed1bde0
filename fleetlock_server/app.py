"""The FleetLock HTTP API (coreos/zincati docs/development/fleetlock/protocol.md) over etcd.

POST /v1/pre-reboot    recursive lock of a reboot slot for client_params.id in client_params.group
POST /v1/steady-state  unlock if held
GET  /v1/status        obelisk extension: every known group's slots and holders (airlock#81 asks for it)
GET  /metrics          Prometheus text: requests by endpoint and result, slots and holders per group

Every request must carry `fleet-lock-protocol: true`. 200 is success; failures are
`{"kind": ..., "value": ...}` with Airlock's kinds where Airlock has one (invalid_client_identity,
unknown_group, failed_lock), so Zincati's logs and metrics read the same as behind Airlock.
The semaphore is the same etcd key Airlock uses; obelisk hosts with etcd-lock share it.

A body is read with a bound (413 request_too_large past MAX_BODY, the connection closed) and
parsed with a depth bound; the id must be printable text of at most 256 bytes (reboot.limits) and the
group ^[a-zA-Z0-9.-]+$ of at most MAX_GROUP characters: anything else is 400
invalid_client_identity naming the problem, never a traceback or a 500.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from obelisk.errors import ObeliskError
from obelisk.lock_conf import GROUP_RE
from obelisk.serving import BodyTooLarge, read_body
from update_engine.reboot.errors import BadJson, BadLockId
from update_engine.reboot.limits import check_holder_id, parse_json_bounded
from update_engine.reboot.semaphore import (
    CorruptSemaphore,
    EtcdEndpoints,
    EtcdSemaphore,
    EtcdUnavailable,
    LockError,
    SlotsFull,
)

log = logging.getLogger("obelisk.fleetlock")
MAX_BODY = 64 * 1024  # Zincati sends about 100 bytes
MAX_GROUP = 128


def error(status: int, kind: str, value: str) -> JSONResponse:
    return JSONResponse({"kind": kind, "value": value}, status_code=status)


class BadRequest(ObeliskError):
    def __init__(self, value: str) -> None:
        self.value = value


def make_app(endpoints: EtcdEndpoints, groups: dict[str, int] | None = None, *,
             stale_after: timedelta | None = None) -> Starlette:
    """groups: configured group -> slots used when its semaphore is first created (default: {"default": 1}).
    A group not configured is served only if its semaphore already exists in etcd (e.g. `obelisk lock set-max`)."""
    configured = dict(groups or {"default": 1})
    semaphores: dict[str, EtcdSemaphore] = {}
    counts: Counter[tuple[str, str]] = Counter()  # (endpoint, result kind or "ok") -> requests

    def semaphore(group: str) -> EtcdSemaphore:
        if group not in semaphores:
            semaphores[group] = EtcdSemaphore(endpoints, group, stale_after=stale_after,
                                              default_slots=configured.get(group, 1))
        return semaphores[group]

    async def client_params(request: Request) -> tuple[str, str]:
        if request.headers.get("fleet-lock-protocol", "").strip().lower() != "true":
            raise BadRequest("missing or wrong 'fleet-lock-protocol: true' header")
        body = await read_body(request, MAX_BODY)
        try:
            doc = parse_json_bounded(body, "body")
        except BadJson as exc:
            raise BadRequest(f"{exc}: expected {{\"client_params\": {{\"id\": ..., \"group\": ...}}}}") from None
        params = doc.get("client_params") if isinstance(doc, dict) else None
        if not isinstance(params, dict):
            raise BadRequest("body has no client_params object")
        ident, group = params.get("id"), params.get("group")
        try:
            check_holder_id(ident, "client_params.id")
        except BadLockId as exc:
            raise BadRequest(str(exc)) from None
        if not isinstance(group, str) or not GROUP_RE.fullmatch(group) or len(group) > MAX_GROUP:
            raise BadRequest(f"client_params.group is missing or not ^[a-zA-Z0-9.-]+$ of at most {MAX_GROUP} "
                             "characters")
        return ident, group

    async def known(group: str) -> bool:
        if group in configured:
            return True
        state = await run_in_threadpool(semaphore(group).read)
        return state.exists

    async def handle(request: Request, action: str) -> Response:
        resp = await _handle(request, action)
        kind = "ok"
        if resp.status_code != 200:
            kind = json.loads(bytes(resp.body)).get("kind", "error")
        counts[("pre_reboot" if action == "lock" else "steady_state", kind)] += 1
        return resp

    async def _handle(request: Request, action: str) -> Response:
        try:
            ident, group = await client_params(request)
        except BodyTooLarge as exc:
            resp = error(413, "request_too_large", str(exc))
            resp.headers["Connection"] = "close"  # uvicorn then drops the rest instead of reading it
            return resp
        except BadRequest as exc:
            return error(400, "invalid_client_identity", exc.value)
        try:
            if not await known(group):
                return error(400, "unknown_group", f"group '{group}' is not served here")
            sem = semaphore(group)
            if action == "lock":
                await run_in_threadpool(sem.lock, ident)
                log.info("pre-reboot: %s holds a slot of %s", ident, group)
            else:
                released = await run_in_threadpool(sem.unlock, ident)
                if released:
                    log.info("steady-state: %s gave back its slot of %s", ident, group)
        except SlotsFull as exc:
            return error(500, "failed_lock", str(exc))
        except CorruptSemaphore as exc:
            return error(500, "corrupt_semaphore", str(exc))
        except EtcdUnavailable as exc:
            return error(503, "etcd_unavailable", str(exc))
        except LockError as exc:
            return error(500, "failed_lock" if action == "lock" else "failed_unlock", str(exc))
        return Response(status_code=200)

    async def pre_reboot(request: Request) -> Response:
        return await handle(request, "lock")

    async def steady_state(request: Request) -> Response:
        return await handle(request, "unlock")

    async def status(request: Request) -> Response:
        names = sorted(set(configured) | set(request.query_params.getlist("group")))
        now = datetime.now(UTC)
        out = []
        try:
            for g in names:
                state = await run_in_threadpool(semaphore(g).read)
                out.append(state.to_json(now, stale_after))
        except LockError as exc:
            return error(503 if isinstance(exc, EtcdUnavailable) else 500, exc.kind, str(exc))
        return JSONResponse({"groups": out})

    async def metrics(request: Request) -> Response:
        lines = ["# TYPE obelisk_fleetlock_requests_total counter"]
        for (endpoint, kind), n in sorted(counts.items()):
            lines.append(f'obelisk_fleetlock_requests_total{{endpoint="{endpoint}",result="{kind}"}} {n}')
        lines += ["# TYPE obelisk_fleetlock_semaphore_slots gauge", "# TYPE obelisk_fleetlock_semaphore_holders gauge"]
        up = 1
        for g in sorted(configured):
            try:
                state = await run_in_threadpool(semaphore(g).read)
            except LockError:
                up = 0
                continue
            lines.append(f'obelisk_fleetlock_semaphore_slots{{group="{g}"}} {state.total_slots}')
            lines.append(f'obelisk_fleetlock_semaphore_holders{{group="{g}"}} {len(state.holders)}')
        lines += ["# TYPE obelisk_fleetlock_etcd_up gauge", f"obelisk_fleetlock_etcd_up {up}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            resp = error(405, "method_not_allowed", f"{request.method} is not allowed here: FleetLock uses POST")
            resp.headers["Allow"] = exc.headers.get("Allow", "POST") if exc.headers else "POST"
            return resp
        if exc.status_code == 404:
            path = request.url.path
            return error(404, "not_found", f"no such endpoint {path}: use /v1/pre-reboot or /v1/steady-state")
        return error(exc.status_code, f"http_{exc.status_code}", str(exc.detail))

    routes = [
        Route("/v1/pre-reboot", pre_reboot, methods=["POST"]),
        Route("/v1/steady-state", steady_state, methods=["POST"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
