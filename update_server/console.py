"""The web console at `/console/`: the fleet at a glance, per group, per instance; pause and resume.

Pages (GET, a read or an admin token: a session from /console/login, or an `Authorization: Bearer`
header):

    /console/                      instances per group and version, a version-over-time chart, groups' state
    /console/groups/{g}            the group's rollout state, policy, halt reason and failing hosts, lock holders
    /console/instances?group=&version=&status=&stale=1&page=
    /console/instances/{id}        one instance and its event timeline (with the host's reason texts)

Changes (POST, an admin token; form-encoded, with the session's CSRF token):

    /console/groups/{g}/pause | resume

No script at all, one stylesheet served from here (`/console/static/console.css`), every page
rendered by jinja2 with autoescape on and sent with a CSP that allows nothing from elsewhere. A GET
without a session is redirected to the login page; anything else without one is 401. See
update_server/console_auth.py for the session and CSRF scheme.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from obelisk.serving import BodyTooLarge, read_body
from update_server.console_auth import PATH, ConsoleAuth, ConsoleAuthError, Session
from update_server.console_locks import LockSource
from update_server.console_views import Views
from update_server.db.store import NotFound, Store, check_name
from update_server.policy import PolicyError

MAX_FORM = 16 * 1024
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[Request], Awaitable[Response]]


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("update_server", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, seconds=_seconds, url=lambda s: quote(str(s), safe=""))
    env.globals.update(urlencode=urlencode)
    return env


@functools.lru_cache(maxsize=1)
def stylesheet() -> bytes:
    return (resources.files("update_server") / "static" / "console.css").read_bytes()


def make_console(store: Store, *, read_tokens: list[str], admin_tokens: list[str], clock: Callable[[], float],
                 stale_after: float, resolve_target: Callable[[str], str | None],
                 on_change: Callable[[], None] | None = None, locks: LockSource | None = None) -> list[BaseRoute]:
    auth = ConsoleAuth(read_tokens, admin_tokens, clock=clock)
    views = Views(store, clock, stale_after, resolve_target, locks)

    def render(name: str, ctx: dict[str, Any], session: Session | None, status: int = 200) -> HTMLResponse:
        html = environment().get_template(name).render(session=session, now=clock(), path=PATH, **ctx)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def problem(status: int, message: str, session: Session | None) -> HTMLResponse:
        return render("error.html", {"status": status, "message": message}, session, status)

    def page(fn: Callable[[Request], tuple[str, dict[str, Any]]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            if not auth.enabled:
                return problem(403, "the console is off: start the server with --admin-token-file "
                                    "(or --read-token-file)", None)
            session = auth.session(request)
            if session is None:
                if "authorization" in request.headers:
                    return problem(401, "wrong bearer token", None)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"{PATH}/login?{urlencode({'next': target})}", 303, headers=HEADERS)
            try:
                name, ctx = await run_in_threadpool(fn, request)
            except NotFound as exc:
                return problem(404, str(exc), session)
            except PolicyError as exc:
                return problem(400, str(exc), session)
            return render(name, ctx, session)
        return endpoint

    def change(fn: Callable[[str, float], Any]) -> Handler:
        async def endpoint(request: Request) -> Response:
            session = auth.session(request)
            try:
                if session is None:
                    raise ConsoleAuthError(401, "log in first: changes need an admin token")
                form = await _form(request)
                auth.check_csrf(request, session, form)
                auth.require(request, admin=True)
                group = check_name("group", request.path_params["group"])
                await run_in_threadpool(fn, group, clock())
            except ConsoleAuthError as exc:
                return problem(exc.status, str(exc), session)
            except PolicyError as exc:
                return problem(400, str(exc), session)
            if on_change is not None:
                on_change()
            return RedirectResponse(f"{PATH}/groups/{quote(group, safe='')}", 303, headers=HEADERS)
        return endpoint

    def _ensure_group(name: str, now: float) -> None:
        try:
            store.group(name)
        except NotFound:  # a track no one configured: pausing it makes it a group with the default policy
            store.put_group(name, now)

    def pause(name: str, now: float) -> None:
        _ensure_group(name, now)
        store.pause(name, now)

    def resume(name: str, now: float) -> None:
        _ensure_group(name, now)
        store.resume(name, now)

    async def login_form(request: Request) -> Response:
        nxt = _safe_next(request.query_params.get("next"))
        if auth.session(request) is not None:
            return RedirectResponse(nxt, 303, headers=HEADERS)
        return _login_page(request, nxt, "", 200)

    def _login_page(request: Request, nxt: str, error: str, status: int) -> Response:
        nonce = auth.login_nonce(request)
        resp = render("login.html", {"next": nxt, "error": error, "csrf": nonce, "enabled": auth.enabled}, None,
                      status)
        auth.set_login_cookie(request, resp, nonce)
        return resp

    async def login(request: Request) -> Response:
        try:
            form = await _form(request)
        except ConsoleAuthError as exc:
            return problem(exc.status, str(exc), None)
        nxt = _safe_next(form.get("next"))
        try:
            auth.check_login_nonce(request, form)
        except ConsoleAuthError as exc:
            return _login_page(request, nxt, str(exc), exc.status)
        try:
            cookie, _ = auth.new_cookie(form.get("token", "").strip())
        except ConsoleAuthError:
            return _login_page(request, nxt, "wrong token: paste the content of the server's --admin-token-file "
                                             "or --read-token-file", 401)
        resp = RedirectResponse(nxt, 303, headers=HEADERS)
        auth.set_session_cookie(request, resp, cookie)
        return resp

    async def logout(request: Request) -> Response:
        session = auth.session(request)
        try:
            form = await _form(request)
            if session is not None:
                auth.check_csrf(request, session, form)
        except ConsoleAuthError as exc:
            return problem(exc.status, str(exc), session)
        resp = RedirectResponse(f"{PATH}/login", 303, headers=HEADERS)
        auth.clear_session_cookie(resp)
        return resp

    async def css(request: Request) -> Response:
        return Response(stylesheet(), media_type="text/css",
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    async def to_overview(request: Request) -> Response:
        return RedirectResponse(f"{PATH}/", 307)

    return [
        Route(PATH, to_overview),
        Route(f"{PATH}/", page(lambda r: ("overview.html", views.overview()))),
        Route(f"{PATH}/login", login_form, methods=["GET"]),
        Route(f"{PATH}/login", login, methods=["POST"]),
        Route(f"{PATH}/logout", logout, methods=["POST"]),
        Route(f"{PATH}/static/console.css", css),
        Route(f"{PATH}/groups/{{group}}", page(lambda r: ("group.html", views.group(r.path_params["group"])))),
        Route(f"{PATH}/groups/{{group}}/pause", change(pause), methods=["POST"]),
        Route(f"{PATH}/groups/{{group}}/resume", change(resume), methods=["POST"]),
        Route(f"{PATH}/instances", page(lambda r: ("instances.html", views.instances(dict(r.query_params))))),
        Route(f"{PATH}/instances/{{id}}", page(lambda r: ("instance.html", views.instance(r.path_params["id"])))),
    ]


async def _form(request: Request) -> dict[str, str]:
    """The POST's form fields (an empty body is an empty form); only url-encoded forms, at most MAX_FORM bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        raw = await read_body(request, MAX_FORM)
    except BodyTooLarge as exc:
        raise ConsoleAuthError(413, str(exc)) from None
    if not raw:
        return {}
    if ctype != "application/x-www-form-urlencoded":
        raise ConsoleAuthError(415, "send the form as application/x-www-form-urlencoded")
    try:
        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=20))
    except ValueError:
        raise ConsoleAuthError(400, "the form has too many fields") from None


def _safe_next(nxt: str | None) -> str:
    """Where to go after login: a console path only (never another site: no open redirect)."""
    if nxt and nxt.startswith(f"{PATH}/") and not nxt.startswith("//") and "\\" not in nxt and "\n" not in nxt:
        return nxt
    return f"{PATH}/"


def _when(t: float | None) -> str:
    return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _seconds(s: float) -> str:
    s = abs(s)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}"
    return f"{s:.0f}s"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return ""
    return f"{_seconds(now - t)} ago" if now >= t else f"in {_seconds(t - now)}"
