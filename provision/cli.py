"""`obelisk provision serve|check`: thin layer over provision.app and provision.check."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import stat
import sys
from pathlib import Path
from urllib.parse import urlsplit

import typer
from rich.console import Console

from obelisk.errors import fail

# How long requests in flight may finish after SIGTERM. Unbounded, one idle HTTPS keep-alive client
# holds the exit for asyncio's 30 s TLS close_notify wait, and a slow asset download for its whole length.
GRACEFUL_SECONDS = 5

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
app = typer.Typer(help="Provisioning server: per-host iPXE/GRUB scripts and cloud-config by MAC, UUID or labels.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        fail(f"listen address {value!r} is not HOST:PORT (for example 127.0.0.1:8080 or [::1]:8080)")
    return host.strip("[]"), int(port)


def _read_token(path: Path) -> str:
    try:
        st = path.stat()
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the write token file {path}: {exc}")
    if len(token) < 16 or any(c.isspace() for c in token):
        fail(f"{path}: the write token must be one word of at least 16 characters "
             f"(make one with: head -c 32 /dev/urandom | base64 > {path})")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {path} can be read by other users; chmod 600 it", file=sys.stderr)
    return token


def _networks(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            fail(f"--allow {v!r} is not a network (for example 10.0.0.0/8 or 127.0.0.1/32)")
    return out


@app.command()
def serve(
    data: Path = typer.Option(..., help="data folder: profiles/, groups/, cloud/, generic/"),
    listen: str = typer.Option("127.0.0.1:8080", help="HOST:PORT for the read side (and the write API with a token)"),
    assets: Path | None = typer.Option(None, help="folder served under /assets/ (default: DATA/assets if present)"),
    public_url: str | None = typer.Option(None, help="base URL hosts reach this server at (default: the request's)"),
    allow: list[str] | None = typer.Option(None, help="only these networks may read (repeatable CIDR)"),
    write_token_file: Path | None = typer.Option(None, help="enable the write API; clients send this bearer token"),
    tls_cert: Path | None = typer.Option(None, help="serve HTTPS with this certificate (PEM)"),
    tls_key: Path | None = typer.Option(None, help="private key of --tls-cert (PEM)"),
    write_listen: str | None = typer.Option(None, help="HOST:PORT of a mutual-TLS listener that opens the write API"),
    client_ca: Path | None = typer.Option(None, help="CA (PEM) whose client certificates --write-listen accepts"),
    log_level: str = typer.Option("info", help="critical, error, warning, info, debug or trace"),
    access_log: bool = typer.Option(True, help="uvicorn's line per request (the group/profile line stays)"),
) -> None:
    """Serve boot scripts, cloud-configs and assets over HTTP."""
    import uvicorn

    from provision.app import Settings, make_app
    from provision.check import check
    from provision.store import Store

    if not data.is_dir():
        fail(f"data folder {data} does not exist; see examples/provision for one to start from")
    if assets is None and (data / "assets").is_dir():
        assets = data / "assets"
    if assets is not None and not assets.is_dir():
        fail(f"assets folder {assets} does not exist")
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together")
    if write_listen and not (tls_cert and client_ca):
        fail("--write-listen needs --tls-cert, --tls-key and --client-ca (it accepts only verified client certs)")
    if client_ca and not write_listen:
        fail("--client-ca is for --write-listen; give both")
    for f in (tls_cert, tls_key, client_ca):
        if f is not None and not f.is_file():
            fail(f"{f} does not exist")
    if log_level.lower() not in LOG_LEVELS:
        fail(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    log_level = log_level.lower()
    if public_url is not None:
        parts = urlsplit(public_url)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number or out of range
        except ValueError:
            parts = parts._replace(netloc="")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            fail(f"--public-url {public_url!r} is not a base URL like http://boot.example.net:8080")
    host, port = _split_listen(listen)
    settings = Settings(data=data, assets=assets, public_url=public_url, allow=_networks(allow or []),
                        write_token=_read_token(write_token_file) if write_token_file else None)
    configs = []
    tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)} if tls_cert else {}
    if write_listen:
        whost, wport = _split_listen(write_listen)
        if wport == port:
            fail("--write-listen must use another port than --listen")
        settings.mtls_ports.add(wport)
    web = make_app(settings)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from loopback clients, and any
    # local process could claim an address that --allow lets in.
    # loop pinned to asyncio: uvloop, which uvicorn would pick when installed, made p99 several times worse.
    common = {"log_level": log_level, "timeout_graceful_shutdown": GRACEFUL_SECONDS, "proxy_headers": False,
              "access_log": access_log, "loop": "asyncio"}
    configs.append(uvicorn.Config(web, host=host, port=port, **common, **tls))
    if write_listen:
        configs.append(uvicorn.Config(web, host=whost, port=wport, ssl_ca_certs=str(client_ca),
                                      ssl_cert_reqs=ssl.CERT_REQUIRED, **common, **tls))
    # A previous server killed mid-write leaves a temporary beside the file it was replacing.
    Store(data).recover()
    rep = check(data, assets)
    for f in rep.findings:
        print(f"{f.level}: {f.where}: {f.message}", file=sys.stderr)
    _log_to_stderr(log_level)
    servers = [uvicorn.Server(c) for c in configs]
    try:
        with asyncio.Runner(loop_factory=configs[0].get_loop_factory()) as runner:
            failed = runner.run(_serve_all(servers))
    except OSError as exc:
        fail(f"cannot listen: {exc}")
    if failed:
        fail(f"cannot listen on {', '.join(f'{s.config.host}:{s.config.port}' for s in failed)} (the reason is "
             f"logged above)")


def _log_to_stderr(level: str) -> None:
    """Which group and profile each host got, and why a request failed, beside uvicorn's own lines."""
    log = logging.getLogger("obelisk.provision")
    handler = logging.StreamHandler()
    from uvicorn.logging import DefaultFormatter  # the same "INFO:     ..." shape as uvicorn's own lines

    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=False))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if level == "trace" else level.upper())
    log.propagate = False


async def _serve_all(servers: list) -> list:  # list[uvicorn.Server] -> the ones that could not start
    failed = []

    async def serve(server) -> None:  # noqa: ANN001
        try:
            await server.serve()
        except SystemExit:
            # uvicorn's way of giving up at startup (port taken, bad certificate), after logging why.
            # Caught here: a SystemExit escaping a task would tear through the event loop.
            failed.append(server)

    tasks = [asyncio.create_task(serve(s)) for s in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for s in servers:  # one stopped (a signal, or it could not bind): stop the others too
        s.should_exit = True
    await asyncio.gather(*tasks)
    return failed


@app.command("check")
def check_cmd(
    data: Path = typer.Option(..., help="data folder to check"),
    assets: Path | None = typer.Option(None, help="assets folder, to check the releases profiles name"),
    as_json: bool = typer.Option(False, "--json", help="print the findings as JSON"),
) -> None:
    """Check every profile, group and template offline; exit 2 when any error is found."""
    from provision.check import check

    if assets is None and (data / "assets").is_dir():
        assets = data / "assets"
    rep = check(data, assets)
    if as_json:
        print(json.dumps({"ok": not rep.errors, "counts": rep.counts,
                          "findings": [f.__dict__ for f in rep.findings]}, indent=2))
    else:
        con = Console(stderr=False, highlight=False)
        for f in rep.findings:
            style = "red" if f.level == "error" else "yellow"
            con.print(f"[{style}]{f.level}[/]: {f.where}: {f.message}", soft_wrap=True)
        c = rep.counts
        summary = (f"{c.get('profiles', 0)} profiles, {c.get('groups', 0)} groups, {c.get('templates', 0)} templates: "
                   f"{len(rep.errors)} errors, {len(rep.findings) - len(rep.errors)} warnings")
        con.print(summary if not rep.errors else f"[red]{summary}[/]")
    if rep.errors:
        raise typer.Exit(2)
