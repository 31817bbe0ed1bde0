"""The write API under `/api/v1/`: create, replace, delete profiles, groups and templates.

Off unless the server was started with `--write-token-file` (bearer token) or a mutual-TLS write
listener; then every `/api/v1/` call but the OpenAPI description must authenticate. Writes go
through `Store`, which locks, checks references (a group's profile must exist, a used profile
cannot be deleted) and replaces files atomically. The OpenAPI description is built from the same
pydantic models that check the bodies, so the two cannot drift apart. Every answer under the prefix
is JSON, errors too (`{"error": "..."}`; 4xx for anything a client sent, never a 500 for it).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from obelisk.serving import BodyTooLarge, bearer_matches, read_body
from provision import render
from provision.model import (
    ID_PATTERN,
    LABEL_VALUE_PATTERN,
    TEMPLATE_KINDS,
    BadLabel,
    Group,
    ModelError,
    Profile,
    parse_group,
    parse_profile,
)
from provision.releases import AssetError
from provision.select import NoMatch, labels_from_query, select
from provision.service import Provision
from provision.store import NotFound, StoreConflict, StoreError, TooLarge

MAX_BODY = 1 << 20
# Metadata nests, but not like this; deeper bodies are an attack on every recursive reader after us.
MAX_DEPTH = 64
PREFIX = "/api/v1"


def _err(status: int, message: str, **headers: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def _body(request: Request) -> bytes:
    return await read_body(request, MAX_BODY)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(value: Any) -> None:
    """Refuse what json.loads accepts but nothing after it can store or answer: nesting deeper than
    MAX_DEPTH and lone surrogates (an escaped "\\ud800" decodes to a str that cannot be UTF-8)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ModelError("the body has a string with a lone surrogate (\\ud800-\\udfff escape); "
                                 "send UTF-8 text") from None
        elif isinstance(v, dict | list):
            if depth > MAX_DEPTH:
                raise ModelError(f"the body nests deeper than {MAX_DEPTH} levels")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in items)


def routes(prov: Provision) -> list[Route]:
    s = prov.s
    enabled = bool(s.write_token) or bool(s.mtls_ports)

    def authorized(request: Request) -> bool:
        server = request.scope.get("server")
        if server is not None and server[1] in s.mtls_ports:
            return True  # the TLS handshake on this listener already required a client certificate we trust
        if not s.write_token:
            return False
        return bearer_matches(request.headers.get("authorization", ""), s.write_token)

    def refusal(request: Request) -> Response:
        if not s.write_token:
            # Only the mutual-TLS listener opens the API; no token can, so do not ask for one.
            return _err(403, "the write API is served only on the mutual-TLS listener (--write-listen) "
                             "to clients with a certificate from --client-ca")
        return _err(401, "authentication required: send 'Authorization: Bearer <token>' "
                         "(the token in the server's --write-token-file)", **{"WWW-Authenticate": "Bearer"})

    def guarded(handler):  # noqa: ANN001, ANN202
        async def endpoint(request: Request) -> Response:
            res = await attempt(request)
            prov.metrics.write(res.status_code)
            return res

        async def attempt(request: Request) -> Response:
            if not enabled:
                return _err(403, "the write API is off: start the server with --write-token-file FILE "
                                 "or --write-listen with --client-ca")
            if not authorized(request):
                return refusal(request)
            try:
                return await handler(request)
            except BodyTooLarge:
                return _err(413, f"request body larger than {MAX_BODY} bytes", Connection="close")
            except TooLarge as exc:
                return _err(413, str(exc))
            except StoreConflict as exc:
                return _err(409, str(exc))
            except NotFound as exc:
                return _err(404, str(exc))
            except (ModelError, render.TemplateSyntax) as exc:
                return _err(422, str(exc))
            except StoreError as exc:
                return _err(500, str(exc))
        return endpoint

    async def json_body(request: Request) -> Any:
        raw = await _body(request)
        try:
            # NaN and Infinity are Python's extension, not JSON: stored, they would be unreadable to others.
            value = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"the body is not valid JSON ({exc})") from None
        except RecursionError:
            raise ModelError(f"the body nests deeper than {MAX_DEPTH} levels") from None
        _check_tree(value)
        return value

    def entity(kind: str, parse, put, get, delete):  # noqa: ANN001, ANN202
        async def listing(request: Request) -> Response:
            return JSONResponse({kind: prov.store.ids(kind)})

        async def one(request: Request) -> Response:
            ident = request.path_params["id"]
            if request.method == "GET":
                return JSONResponse(get(ident).model_dump(mode="json"))
            if request.method == "DELETE":
                await run_in_threadpool(delete, ident)
                prov.metrics.change(kind, "deleted")
                return Response(status_code=204)
            obj = parse(await json_body(request), ident=ident)
            created = await run_in_threadpool(put, obj)
            prov.metrics.change(kind, "created" if created else "updated")
            return JSONResponse(obj.model_dump(mode="json"), status_code=201 if created else 200)

        return [Route(f"{PREFIX}/{kind}", guarded(listing), methods=["GET"]),
                Route(f"{PREFIX}/{kind}/{{id}}", guarded(one), methods=["GET", "PUT", "DELETE"])]

    async def template_list(request: Request) -> Response:
        kind = request.path_params["kind"]
        prov.store.template_path(kind, "x")  # 404 for an unknown kind
        return JSONResponse({"templates": prov.store.ids(kind)})

    async def template_one(request: Request) -> Response:
        kind, name = request.path_params["kind"], request.path_params["name"]
        prov.store.template_path(kind, name)
        if request.method == "GET":
            return PlainTextResponse(prov.store.template(kind, name))
        if request.method == "DELETE":
            await run_in_threadpool(prov.store.delete_template, kind, name)
            prov.metrics.change(kind, "deleted")
            return Response(status_code=204)
        raw = await _body(request)
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError("a template must be UTF-8 text") from None
        if "\x00" in source:
            raise ModelError("a template must not contain NUL characters")
        render.compile_template(source, f"{kind}/{name}")
        created = await run_in_threadpool(prov.store.put_template, kind, name, source)
        prov.metrics.change(kind, "created" if created else "updated")
        return PlainTextResponse(source, status_code=201 if created else 200)

    async def which(request: Request) -> Response:
        """Which group and profile a host with these labels gets (matchbox's SelectGroup)."""
        try:
            labels = labels_from_query(request.query_params.multi_items())
        except BadLabel as exc:
            return _err(400, str(exc))
        try:
            group = select(prov.store.groups(), labels)
        except NoMatch as exc:
            return _err(404, str(exc))
        out: dict[str, Any] = {"labels": labels.values, "ignored": labels.dropped, "group": group.id,
                               "profile": group.profile}
        try:
            p = prov.store.profile(group.profile)
            out["release"] = prov.releases.resolve(p.release).path if p.release else None
        except (NotFound, AssetError) as exc:
            out["problem"] = str(exc)
        return JSONResponse(out)

    async def openapi_doc(request: Request) -> Response:
        return JSONResponse(openapi())

    table = [
        *entity("profiles", parse_profile, prov.store.put_profile, prov.store.profile, prov.store.delete_profile),
        *entity("groups", parse_group, prov.store.put_group, prov.store.group, prov.store.delete_group),
        Route(f"{PREFIX}/templates/{{kind}}", guarded(template_list), methods=["GET"]),
        Route(f"{PREFIX}/templates/{{kind}}/{{name}}", guarded(template_one), methods=["GET", "PUT", "DELETE"]),
        Route(f"{PREFIX}/select", guarded(which), methods=["GET"]),
        Route(f"{PREFIX}/openapi.json", openapi_doc, methods=["GET"]),
    ]

    class Fallback:
        """API clients parse errors as JSON; Starlette's own 404/405 are plain text. An ASGI app, not a
        function, because Starlette gives function endpoints a GET-only method list."""

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            methods = sorted({m for r in table if r.matches(scope)[0] != Match.NONE for m in r.methods or ()})
            if methods:
                res = _err(405, f"{request.method[:16]} is not allowed here; use {', '.join(methods)}",
                           Allow=", ".join(methods))
            else:
                res = _err(404, f"no API endpoint {request.url.path[:200]!r}; see {PREFIX}/openapi.json")
            await res(scope, receive, send)

    # Every other method and path under the prefix lands here, after the table.
    return [*table, Route(PREFIX, Fallback()), Route(f"{PREFIX}/{{rest:path}}", Fallback())]


# --- OpenAPI ---------------------------------------------------------------------------------------

# The common forms of the reserved labels that normalize_mac/normalize_uuid accept (they take a few
# more), for clients and fuzzers: pydantic's own schema only says "a string" there.
_MAC_FORMS = (r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$|^([0-9A-Fa-f]{2}-){5}[0-9A-Fa-f]{2}$"
              r"|^[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}$|^[0-9A-Fa-f]{12}$")
_UUID_FORMS = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$|^[0-9A-Fa-f]{32}$"


def _schemas() -> dict[str, Any]:
    """The models' JSON Schemas (2020-12, as OpenAPI 3.1 uses), plus what the models check in code."""
    defs: dict[str, Any] = {}
    for model in (Profile, Group):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
        # PUT bodies: the id is the path's. A body may repeat it (what GET returns can be PUT back),
        # but the schema leaves it out, since any other value is refused.
        body = {**schema, "title": f"{model.__name__}Body",
                "properties": {k: v for k, v in schema["properties"].items() if k != "id"},
                "required": [r for r in schema.get("required", []) if r != "id"]}
        defs[f"{model.__name__}Body"] = body
    for name in ("Group", "GroupBody"):
        # Group.selector's keys are checked by pattern and mac/uuid values by a validator.
        selector = defs[name]["properties"]["selector"] = dict(defs[name]["properties"]["selector"])
        value = next(iter(selector["patternProperties"].values()))
        selector["additionalProperties"] = False
        selector["properties"] = {"mac": {**value, "pattern": _MAC_FORMS}, "uuid": {**value, "pattern": _UUID_FORMS}}
    defs["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    return defs


def _errors(*codes: int) -> dict[str, Any]:
    texts = {400: "a label with a control character or line break",
             401: "no or wrong bearer token", 403: "the write API is off", 404: "not found",
             409: "would leave a dangling reference", 413: "body too large", 422: "invalid body"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(c): {"description": texts[c], "content": error} for c in codes}


def openapi() -> dict[str, Any]:
    ident = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": ID_PATTERN}}
    kind = {"name": "kind", "in": "path", "required": True, "schema": {"type": "string", "enum": list(TEMPLATE_KINDS)}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": ID_PATTERN}}
    paths: dict[str, Any] = {}
    for plural, model in (("profiles", "Profile"), ("groups", "Group")):
        ref = {"$ref": f"#/components/schemas/{model}"}
        body = {"required": True, "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{model}Body"}}}}
        ok = {"content": {"application/json": {"schema": ref}}}
        paths[f"{PREFIX}/{plural}"] = {"get": {
            "operationId": f"list_{plural}", "summary": f"ids of all {plural}",
            "responses": {"200": {"description": "ids", "content": {"application/json": {"schema": {
                "type": "object", "properties": {plural: {"type": "array", "items": {"type": "string"}}}}}}},
                **_errors(401, 403)}}}
        paths[f"{PREFIX}/{plural}/{{id}}"] = {
            "parameters": [ident],
            "get": {"operationId": f"get_{model.lower()}", "responses": {"200": {"description": model, **ok},
                                                                         **_errors(401, 403, 404)}},
            "put": {"operationId": f"put_{model.lower()}", "summary": f"create or replace a {model.lower()}",
                    "requestBody": body,
                    "responses": {"200": {"description": "replaced", **ok}, "201": {"description": "created", **ok},
                                  **_errors(401, 403, 404, 409, 413, 422)}},
            "delete": {"operationId": f"delete_{model.lower()}",
                       "responses": {"204": {"description": "deleted"}, **_errors(401, 403, 404, 409)}},
        }
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths[f"{PREFIX}/templates/{{kind}}"] = {"parameters": [kind], "get": {
        "operationId": "list_templates",
        "responses": {"200": {"description": "names", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"templates": {"type": "array", "items": {"type": "string"}}}}}}},
            **_errors(401, 403, 404)}}}
    paths[f"{PREFIX}/templates/{{kind}}/{{name}}"] = {
        "parameters": [kind, name],
        "get": {"operationId": "get_template", "responses": {"200": {"description": "jinja2 source", "content": text},
                                                             **_errors(401, 403, 404)}},
        "put": {"operationId": "put_template", "summary": "create or replace a jinja2 template",
                "requestBody": {"required": True, "content": text},
                "responses": {"200": {"description": "replaced", "content": text},
                              "201": {"description": "created", "content": text}, **_errors(401, 403, 404, 413, 422)}},
        "delete": {"operationId": "delete_template",
                   "responses": {"204": {"description": "deleted"}, **_errors(401, 403, 404, 409)}},
    }
    paths[f"{PREFIX}/select"] = {"get": {
        "operationId": "select", "summary": "which group and profile a host with these labels gets",
        # Any query parameter is a label (mac, uuid, hostname, serial, arch, or the site's own).
        "parameters": [{"name": "labels", "in": "query", "required": False, "style": "form", "explode": True,
                        "schema": {"type": "object", "additionalProperties": {
                            "type": "string", "pattern": LABEL_VALUE_PATTERN}}}],
        "responses": {"200": {"description": "the choice", "content": {"application/json": {"schema": {
            "type": "object"}}}}, **_errors(400, 401, 403, 404)}}}
    return {
        "openapi": "3.1.0",  # the models' schemas are JSON Schema 2020-12 ("type": "null" and the like)
        "info": {"title": "obelisk provisioning write API", "version": "1"},
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
