"""The Omaha endpoint (`POST /v1/update/`), payload downloads with Range, and an event log.

Answers the way Nebraska does: unknown app id → app status `error-unknownApplication`; a host
already on (or past) the chosen version → `noupdate`; events are acknowledged with
`<event status="ok"/>` and, for the app ids this server serves, recorded: the last MAX_EVENTS in
memory (`GET /v1/events`, for an admin token only: it lists every machine id) and optionally in a
JSONL file that rotates to `FILE.1` at MAX_EVENTS_FILE bytes. Request bodies are read with a bound
(413 past MAX_BODY), never held whole first.

With a `fleet` (update_server.fleet_server.Fleet: state in SQLite or PostgreSQL) every request of a
served app id is also tracked (instance, events, status) and an update check is answered with what
the group's rollout policy allows now (`noupdate` while it holds the host); the fleet API
(`/api/v1/fleet/...`) and `/metrics` are served beside it. See docs/fleet.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from obelisk.errors import ObeliskError
from obelisk.serving import BodyTooLarge, bearer_matches, read_body
from obelisk.versions import compare_versions
from update_engine import omaha
from update_server.releases import PAYLOAD_NAME, Catalog, Release

if TYPE_CHECKING:
    from update_server.fleet_server import Fleet

MAX_BODY = 64 * 1024  # Nebraska's cap
MAX_EVENTS = 10_000  # kept in memory for GET /v1/events
MAX_EVENTS_FILE = 64 << 20  # the JSONL file moves to FILE.1 (replacing it) when the next line would pass this
# A 64 KiB request could carry hundreds of events each repeating a huge machine id: recorded, that
# was megabytes of log per request. Real clients send one or two events and short fields.
MAX_EVENTS_PER_REQUEST = 16
MAX_FIELD = 256
log = logging.getLogger("obelisk.update_server")


class PayloadResponse(FileResponse):
    chunk_size = 1024 * 1024  # starlette's 64 KiB costs the server a lot of CPU per GiB served


class EventLogError(ObeliskError):
    """The --events file cannot be used; the message names it."""


class EventLog:
    """The last ``keep`` events in memory, and every event appended to ``path`` (rotated at ``max_file_bytes``)."""

    def __init__(self, path: Path | None = None, *, keep: int = MAX_EVENTS,
                 max_file_bytes: int = MAX_EVENTS_FILE) -> None:
        self.path = path
        self.events: deque[dict] = deque(maxlen=keep)
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        self._size = 0
        if path is not None:
            if path.exists() and not path.is_file():  # a FIFO would block the first event's open for good
                raise EventLogError(f"--events {path} exists and is not a regular file: give a file path")
            try:
                with open(path, "ab") as f:
                    self._size = f.tell()
            except OSError as exc:
                raise EventLogError(f"--events {path}: cannot append to it: {exc.strerror}") from None

    def add(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._lock:
            self.events.append(record)
            if self.path is None:
                return
            try:
                if self._size and self._size + len(line) > self.max_file_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    self._size = 0
                with open(self.path, "ab") as f:
                    f.write(line)
                self._size += len(line)
            except OSError as exc:
                # A full disk must not turn into failed update checks: the event stays in memory.
                log.warning("cannot write the event to %s: %s", self.path, exc.strerror)


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_FIELD else text[:MAX_FIELD]


def _text(status: int, message: str, **headers: str) -> Response:
    return PlainTextResponse(f"error: {message}\n", status_code=status, headers=headers or None)


def make_app(catalog: Catalog, *, events: EventLog | None = None, public_url: str | None = None,
             poll_interval: int | None = None, admin_token: str | None = None, fleet: Fleet | None = None
             ) -> Starlette:
    """admin_token: the bearer token that opens GET /v1/events; without one that endpoint is off (403).
    fleet: track instances and apply rollout policy (and serve the fleet API and /metrics)."""
    events = events or EventLog()

    async def update(request: Request) -> Response:
        try:
            body = await read_body(request, MAX_BODY)
        except BodyTooLarge:
            return _text(413, f"request body larger than {MAX_BODY} bytes (Omaha requests are small)",
                         Connection="close")
        try:
            req = omaha.parse_request(body)
        except omaha.OmahaError as exc:
            return PlainTextResponse(f"bad Omaha request: {exc}", status_code=400)
        a = req.app
        known = catalog.known_app(a.appid)
        if known:  # events of app ids served elsewhere are acknowledged, not kept
            for ev in a.events[:MAX_EVENTS_PER_REQUEST]:
                rec = {"time": time.time(), "machineid": _cut(a.machineid), "appid": _cut(a.appid),
                       "version": _cut(a.version), "track": _cut(a.track), "eventtype": ev.type,
                       "eventresult": ev.result, "errorcode": ev.errorcode,
                       "previousversion": _cut(ev.previousversion), "reason": _cut(ev.reason)}
                events.add(rec)
                log.info("event %s", rec)
        if not known:
            xml = omaha.build_response(a.appid, app_status="error-unknownApplication",
                                       updatecheck="error-internal" if a.updatecheck else None,
                                       events=len(a.events), ping=a.ping)
            return Response(xml, media_type="text/xml")
        rel: Release | None = None
        if fleet is not None:
            from update_server.tracking import TrackingError

            ip = request.client.host if request.client else ""
            try:
                answer = await run_in_threadpool(fleet.check_in, req, ip)
            except TrackingError as exc:
                return PlainTextResponse(f"bad Omaha request: {exc}", status_code=400)
            rel = answer.release
        if not a.updatecheck:
            return Response(omaha.build_response(a.appid, updatecheck=None, events=len(a.events), ping=a.ping),
                            media_type="text/xml")
        if fleet is None:
            arch = omaha.arch_of_board(a.board) if a.board else req.os_arch
            rel = catalog.choose(a.appid, a.track, arch)
        if rel is None or compare_versions(rel.version, a.version) <= 0:
            xml = omaha.build_response(a.appid, events=len(a.events), ping=a.ping, poll_interval=poll_interval)
            return Response(xml, media_type="text/xml")
        base = (public_url or str(request.base_url)).rstrip("/")
        codebase = f"{base}/v1/payloads/{quote(rel.name)}/{quote(rel.version)}"
        upd = omaha.Update(version=rel.version, urls=[], package_name=PAYLOAD_NAME, size=rel.size,
                           sha256=rel.sha256, sha1_b64=rel.sha1_b64(), disable_payload_backoff=True)
        xml = omaha.build_response(a.appid, update=upd, codebase=codebase, events=len(a.events), ping=a.ping,
                                   poll_interval=poll_interval)
        return Response(xml, media_type="text/xml")

    async def payload(request: Request) -> Response:
        rel = catalog.find(request.path_params["name"], request.path_params["version"])
        if rel is None:
            return PlainTextResponse("no such release", status_code=404)
        return PayloadResponse(rel.payload, media_type="application/octet-stream")

    async def list_events(request: Request) -> Response:
        if admin_token is None:
            return _text(403, "GET /v1/events is off: it lists every machine id; start the server with "
                              "--admin-token-file FILE and send 'Authorization: Bearer <token>'")
        if not bearer_matches(request.headers.get("authorization", ""), admin_token):
            return _text(401, "authentication required: send 'Authorization: Bearer <token>' (the token in the "
                              "server's --admin-token-file)", **{"WWW-Authenticate": "Bearer"})
        return JSONResponse(list(events.events))

    async def list_releases(request: Request) -> Response:
        rels = catalog.releases()
        return JSONResponse({"releases": [{"name": r.name, "version": r.version, "app_id": r.app_id, "arch": r.arch,
                                           "size": r.size, "sha256": r.sha256} for r in rels],
                             "groups": catalog.groups, "problems": catalog.problems})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    routes = [
        Route("/v1/update/", update, methods=["POST"]),
        Route("/v1/update", update, methods=["POST"]),
        Route("/v1/payloads/{name}/{version}/" + PAYLOAD_NAME, payload, methods=["GET", "HEAD"]),
        Route("/v1/events", list_events),
        Route("/v1/releases", list_releases),
        Route("/health", health),
        *(fleet.routes() if fleet is not None else []),
    ]
    app = Starlette(routes=routes)
    app.state.events = events
    return app
