"""`obelisk provision serve|check`: thin layer over provision.app and provision.check."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

import typer
from rich.console import Console

from obelisk.errors import clean_errors, fail
from obelisk.inputs import check_input
from obelisk.serving import Listener, parse_listen, parse_log_level, read_token, run_server

app = typer.Typer(help="Provisioning server: per-host iPXE/GRUB scripts and cloud-config by MAC, UUID or labels.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _networks(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            fail(f"--allow {v!r} is not a network (for example 10.0.0.0/8 or 127.0.0.1/32)")
    return out


def _check_public_url(public_url: str) -> None:
    parts = urlsplit(public_url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        fail(f"--public-url {public_url!r} is not a base URL like http://boot.example.net:8080")


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
    from provision.app import make_app
    from provision.check import check
    from provision.service import Settings
    from provision.store import Store

    with clean_errors():
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
        for f, what in ((tls_cert, "TLS certificate"), (tls_key, "TLS key"), (client_ca, "client CA")):
            if f is not None:
                check_input(f, what)  # a FIFO would hang uvicorn while it loads the certificate
        log_level = parse_log_level(log_level)
        if public_url is not None:
            _check_public_url(public_url)
        host, port = parse_listen(listen)
        also = []
        mtls_ports = set()
        if write_listen:
            whost, wport = parse_listen(write_listen, "--write-listen")
            if wport == port:
                fail("--write-listen must use another port than --listen")
            also.append(Listener(whost, wport, client_ca=client_ca))
            mtls_ports.add(wport)
        settings = Settings(data=data, assets=assets, public_url=public_url, allow=_networks(allow or []),
                            write_token=read_token(write_token_file, "write token") if write_token_file else None,
                            mtls_ports=mtls_ports)
        web = make_app(settings)
        # A previous server killed mid-write leaves a temporary beside the file it was replacing.
        Store(data).recover()
        rep = check(data, assets)
        for f in rep.findings:
            print(f"{f.level}: {f.where}: {f.message}", file=sys.stderr)
        run_server(web, host, port, log_level=log_level, access_log=access_log, ssl_certfile=tls_cert,
                   ssl_keyfile=tls_key, also=also, loggers=["obelisk.provision"])


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
    with clean_errors():
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
