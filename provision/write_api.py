"""The write API under `/api/v1/`: create, replace, delete profiles, groups and templates.

Off unless the server was started with `--write-token-file` (bearer token) or a mutual-TLS write
listener; then every `/api/v1/` call but the OpenAPI description must authenticate. Writes go
through `Store`, which locks, checks references (a group's profile must exist, a used profile
cannot be deleted) and replaces files atomically. The OpenAPI description is built from the same
pydantic models that check the bodies, so the two cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from provision import render
from provision.model import ID_PATTERN, TEMPLATE_KINDS, Group, ModelError, Profile, parse_group, parse_profile
from provision.releases import ReleaseError
from provision.select import NoMatch, labels_from_query, select
from provision.store import Conflict, NotFound, StoreError

if TYPE_CHECKING:
    from provision.app import Provision

MAX_BODY = 1 << 20
PREFIX = "/api/v1"


def _err(status: int, message: str, **headers: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise _TooBig
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise _TooBig
    return bytes(data)


class _TooBig(Exception):
    pass


def routes(prov: Provision) -> list[Route]:
    s = prov.s
    enabled = bool(s.write_token) or bool(s.mtls_ports)

    def authorized(request: Request) -> bool:
        server = request.scope.get("server")
        if server is not None and server[1] in s.mtls_ports:
            return True  # the TLS handshake on this listener already required a client certificate we trust
        if not s.write_token:
            return False
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), s.write_token.encode())

    def guarded(handler):  # noqa: ANN001, ANN202
        async def endpoint(request: Request) -> Response:
            if not enabled:
                return _err(403, "the write API is off: start the server with --write-token-file FILE "
                                 "or --write-listen with --client-ca")
            if not authorized(request):
                return _err(401, "authentication required: send 'Authorization: Bearer <token>' "
                                 "(the token in the server's --write-token-file)", **{"WWW-Authenticate": "Bearer"})
            try:
                return await handler(request)
            except _TooBig:
                return _err(413, f"request body larger than {MAX_BODY} bytes")
            except Conflict as exc:
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
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"the body is not valid JSON ({exc})") from None

    def entity(kind: str, parse, put, get, delete):  # noqa: ANN001, ANN202
        async def listing(request: Request) -> Response:
            return JSONResponse({kind: prov.store.ids(kind)})

        async def one(request: Request) -> Response:
            ident = request.path_params["id"]
            if request.method == "GET":
                return JSONResponse(get(ident).model_dump(mode="json"))
            if request.method == "DELETE":
                await run_in_threadpool(delete, ident)
                return Response(status_code=204)
            obj = parse(await json_body(request), ident=ident)
            created = await run_in_threadpool(put, obj)
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
        return PlainTextResponse(source, status_code=201 if created else 200)

    async def which(request: Request) -> Response:
        """Which group and profile a host with these labels gets (matchbox's SelectGroup)."""
        labels = labels_from_query(request.query_params.multi_items())
        try:
            group = select(prov.store.groups(), labels)
        except NoMatch as exc:
            return _err(404, str(exc))
        out: dict[str, Any] = {"labels": labels.values, "ignored": labels.dropped, "group": group.id,
                               "profile": group.profile}
        try:
            p = prov.store.profile(group.profile)
            out["release"] = prov.releases.resolve(p.release).path if p.release else None
        except (NotFound, ReleaseError) as exc:
            out["problem"] = str(exc)
        return JSONResponse(out)

    async def openapi_doc(request: Request) -> Response:
        return JSONResponse(openapi())

    return [
        *entity("profiles", parse_profile, prov.store.put_profile, prov.store.profile, prov.store.delete_profile),
        *entity("groups", parse_group, prov.store.put_group, prov.store.group, prov.store.delete_group),
        Route(f"{PREFIX}/templates/{{kind}}", guarded(template_list), methods=["GET"]),
        Route(f"{PREFIX}/templates/{{kind}}/{{name}}", guarded(template_one), methods=["GET", "PUT", "DELETE"]),
        Route(f"{PREFIX}/select", guarded(which), methods=["GET"]),
        Route(f"{PREFIX}/openapi.json", openapi_doc, methods=["GET"]),
    ]


# --- OpenAPI ---------------------------------------------------------------------------------------

def _schemas() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    for model in (Profile, Group):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
    defs["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    return defs


def _errors(*codes: int) -> dict[str, Any]:
    texts = {400: "bad request", 401: "no or wrong bearer token", 403: "the write API is off", 404: "not found",
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
        body = {"required": True, "content": {"application/json": {"schema": ref}}}
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
        "parameters": [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                       for n in ("mac", "uuid", "hostname", "serial", "arch")],
        "responses": {"200": {"description": "the choice", "content": {"application/json": {"schema": {
            "type": "object"}}}}, **_errors(401, 403, 404)}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "obelisk provisioning write API", "version": "1"},
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
