"""The Omaha endpoint (`POST /v1/update/`), payload downloads with Range, and an event log.

Answers the way Nebraska does: unknown app id → app status `error-unknownApplication`; a host
already on (or past) the chosen version → `noupdate`; events are acknowledged with
`<event status="ok"/>` and recorded (memory, `GET /v1/events`, and optionally a JSONL file).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from obelisk.versions import compare_versions
from update_engine import omaha
from update_server.releases import PAYLOAD_NAME, Catalog

MAX_BODY = 64 * 1024  # Nebraska's cap


class PayloadResponse(FileResponse):
    chunk_size = 1024 * 1024  # starlette's 64 KiB costs the server a lot of CPU per GiB served
log = logging.getLogger("obelisk.update_server")


class EventLog:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def add(self, record: dict) -> None:
        with self._lock:
            self.events.append(record)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")


def make_app(catalog: Catalog, *, events: EventLog | None = None, public_url: str | None = None,
             poll_interval: int | None = None) -> Starlette:
    events = events or EventLog()

    async def update(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return PlainTextResponse("request too large", status_code=400)
        try:
            req = omaha.parse_request(body)
        except omaha.OmahaError as exc:
            return PlainTextResponse(f"bad Omaha request: {exc}", status_code=400)
        a = req.app
        for ev in a.events:
            rec = {"time": time.time(), "machineid": a.machineid, "appid": a.appid, "version": a.version,
                   "track": a.track, "eventtype": ev.type, "eventresult": ev.result, "errorcode": ev.errorcode,
                   "previousversion": ev.previousversion}
            events.add(rec)
            log.info("event %s", rec)
        if not catalog.known_app(a.appid):
            xml = omaha.build_response(a.appid, app_status="error-unknownApplication",
                                       updatecheck="error-internal" if a.updatecheck else None,
                                       events=len(a.events), ping=a.ping)
            return Response(xml, media_type="text/xml")
        if not a.updatecheck:
            return Response(omaha.build_response(a.appid, updatecheck=None, events=len(a.events), ping=a.ping),
                            media_type="text/xml")
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
        return JSONResponse(events.events)

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
    ]
    app = Starlette(routes=routes)
    app.state.events = events
    return app
