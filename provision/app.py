"""The provisioning server's HTTP side (an ASGI app; `obelisk provision serve` runs it under uvicorn).

Read side (no login; may be limited to networks): `/boot.ipxe`, `/ipxe`, `/grub`, `/cloud`,
`/ignition` (the profile's ignition template, else its cloud template, as Ignition JSON, Butane
translated), `/generic`, `/metadata`,
`/assets/...`, and `/metrics` (Prometheus, no token, like the update server's; see provision/metrics.py).
Write side (`/api/v1/...`): off unless the server was given
a bearer token file or a mutual-TLS listener; see provision/write_api.py.

Every failure answers one line naming the cause (and logs it): 404 when something is missing (no
group, profile, template or release), 400 when a template needs a request label the request did not
give (or gave malformed) or a label's value holds a control character or a line break, 500 when
something is broken (an invalid file in the data folder, a template that fails strictly on the
group's data, a cloud-config or Ignition/Butane config that does not validate); /ignition for a
profile whose cloud template is a cloud-config is a 404. A host is never handed a half-rendered or
unvalidated config.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from provision import render, write_api
from provision.model import BadLabel
from provision.releases import AssetError
from provision.select import NoMatch
from provision.service import Host, Provision, Settings
from provision.store import NotFound, StoreError

__all__ = ["Settings", "make_app"]
log = logging.getLogger("obelisk.provision")


class AssetResponse(FileResponse):
    chunk_size = 1024 * 1024  # kernels and /usr images: 64 KiB chunks cost a lot of CPU per GiB


def _one_line(text: str) -> str:
    """Messages may quote a query value, a path or a template's error: one line, whatever they hold,
    so neither the answer nor the log can be forged or split."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(status: int, message: str, request: Request) -> Response:
    message = _one_line(message)
    log.warning("%s %s -> %d: %s", request.method, _one_line(request.url.path), status, message)
    return PlainTextResponse(f"error: {message}\n", status_code=status)


def make_app(settings: Settings) -> Starlette:
    prov = Provision(settings)
    metrics = prov.metrics

    async def answer(name: str, request: Request, handler: Callable[[Request], Awaitable[Response] | Response]
                     ) -> Response:
        if not prov.allowed(request):
            return _fail(403, f"client {request.client.host if request.client else '?'} is not in an "
                              f"allowed network", request)
        try:
            res = handler(request)
            return await res if not isinstance(res, Response) else res
        except (NoMatch, NotFound, AssetError, render.NotIgnition) as exc:  # NotIgnition before RenderError
            return _fail(404, str(exc), request)
        except (render.LabelMissing, BadLabel) as exc:  # LabelMissing before RenderError, its base
            if isinstance(exc, render.LabelMissing):
                metrics.render_errors.labels(name).inc()
            return _fail(400, str(exc), request)
        except (StoreError, render.RenderError, render.TemplateSyntax) as exc:
            if isinstance(exc, render.RenderError | render.TemplateSyntax):  # not a broken data file
                metrics.render_errors.labels(name).inc()
            return _fail(500, str(exc), request)

    def read(name: str, handler: Callable[[Request], Awaitable[Response] | Response]):  # noqa: ANN202
        async def endpoint(request: Request) -> Response:
            res = await answer(name, request, handler)
            metrics.request(name, res.status_code)
            return res
        return endpoint

    def text(body: str) -> Response:
        return PlainTextResponse(body)

    def boot(request: Request) -> tuple[Host, render.BootSpec, str]:
        host = prov.resolve(request)
        profile = prov.store.profile(host.profile_id)
        release = prov.releases.resolve(profile.release) if profile.release else None
        spec = render.boot_spec(profile, release, host.ctx)
        log.info("%s %s -> group %s, profile %s", request.url.path, host.labels.text(), host.ctx.group.id, profile.id)
        return host, spec, profile.name or profile.id

    def ipxe(request: Request) -> Response:
        host, spec, _ = boot(request)
        out = render.ipxe_script(spec, host.ctx.server_url)
        metrics.rendered.labels("ipxe").inc()
        return text(out)

    def grub(request: Request) -> Response:
        host, spec, title = boot(request)
        out = render.grub_script(spec, host.ctx.server_url, title, host.labels.values)
        metrics.rendered.labels("grub").inc()
        return text(out)

    def templated(route: str) -> Callable[[Request], Response]:
        def handler(request: Request) -> Response:
            host = prov.resolve(request)
            profile = prov.store.profile(host.profile_id)
            kind, renderer = {"cloud": ("cloud", render.render_cloud), "generic": ("generic", render.render),
                              "ignition": ("cloud", render.render_ignition)}[route]
            if route == "ignition" and profile.ignition_id is not None:
                # The profile's own Ignition/Butane template; without one, its cloud template if that is one.
                kind, renderer = "ignition", render.render_ignition_template
            name = getattr(profile, f"{kind}_id")
            if name is None:
                want = "ignition_id or cloud_id" if route == "ignition" else f"{kind}_id"
                raise NotFound(f"profile {profile.id!r} (group {host.ctx.group.id!r}) has no {want}")
            source = prov.store.template(kind, name)
            out = renderer(source, f"{kind}/{name}", host.ctx)
            metrics.rendered.labels(kind).inc()
            log.info("/%s %s -> group %s, %s/%s", route, host.labels.text(), host.ctx.group.id, kind, name)
            if route == "ignition":
                return Response(out, media_type="application/json")
            return text(out)
        return handler

    def metadata(request: Request) -> Response:
        out = render.metadata_env(prov.resolve(request).ctx)
        metrics.rendered.labels("metadata").inc()
        return text(out)

    async def scrape(request: Request) -> Response:
        if not prov.allowed(request):
            return _fail(403, f"client {request.client.host if request.client else '?'} is not in an "
                              f"allowed network", request)
        return await metrics.endpoint()

    def assets(request: Request) -> Response:
        if prov.assets_root is None:
            raise NotFound("this server has no assets folder (start it with --assets DIR)")
        rel = request.path_params["path"]
        parts = rel.split("/")
        if (not rel or "\x00" in rel or "\\" in rel
                or any(p in ("", ".", "..") or p.startswith(".") for p in parts)):
            return _fail(400, f"asset path {rel[:120]!r} is not allowed (no '..', hidden or absolute parts)", request)
        target = (prov.assets_root / rel).resolve()
        if not target.is_relative_to(prov.assets_root):
            return _fail(400, f"asset path {rel[:120]!r} leaves the assets folder", request)
        if not target.is_file():
            raise NotFound(f"no asset {rel[:120]!r}")
        return AssetResponse(target, media_type="application/octet-stream")

    routes = [
        Route("/", read("index", lambda r: text("obelisk provision\n")), methods=["GET", "HEAD"]),
        Route("/health", lambda r: PlainTextResponse("ok\n"), methods=["GET", "HEAD"]),
        Route("/metrics", scrape, methods=["GET"]),
        Route("/boot.ipxe", read("boot.ipxe", lambda r: text(render.BOOT_IPXE)), methods=["GET", "HEAD"]),
        Route("/boot.ipxe.0", read("boot.ipxe", lambda r: text(render.BOOT_IPXE)), methods=["GET", "HEAD"]),
        Route("/ipxe", read("ipxe", ipxe), methods=["GET", "HEAD"]),
        Route("/grub", read("grub", grub), methods=["GET", "HEAD"]),
        Route("/cloud", read("cloud", templated("cloud")), methods=["GET", "HEAD"]),
        Route("/ignition", read("ignition", templated("ignition")), methods=["GET", "HEAD"]),
        Route("/generic", read("generic", templated("generic")), methods=["GET", "HEAD"]),
        Route("/metadata", read("metadata", metadata), methods=["GET", "HEAD"]),
        Route("/assets/{path:path}", read("assets", assets), methods=["GET", "HEAD"]),
    ]
    return Starlette(routes=[*routes, *write_api.routes(prov)])
