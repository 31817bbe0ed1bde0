"""`obelisk lock serve`: parse the options, build the FleetLock app over etcd, run it (mounted by
update_engine.reboot.cli)."""

from __future__ import annotations

import typer

from obelisk.errors import clean_errors, fail
from obelisk.lock_conf import GROUP_RE
from obelisk.serving import parse_listen, run_server
from obelisk.windows import parse_duration


def serve(
    etcd: str = typer.Option(..., "--etcd", help="etcd URLs, comma-separated"),
    listen: str = typer.Option("127.0.0.1:3333", "--listen", help="HOST:PORT to serve FleetLock on"),
    groups: list[str] = typer.Option(["default=1"], "--group", help="GROUP=SLOTS served (repeatable)"),
    cafile: str = typer.Option(None, "--cafile", help="CA certificate to trust for etcd TLS"),
    certfile: str = typer.Option(None, "--certfile", help="client certificate for etcd TLS"),
    keyfile: str = typer.Option(None, "--keyfile", help="client key for etcd TLS"),
    stale_after: str = typer.Option(None, "--stale-after", help="reclaim slots held longer than this"),
) -> None:
    """Run a FleetLock server (Zincati's fleet_lock strategy, obelisk's fleetlock) over the etcd semaphore."""
    from fleetlock_server.app import MAX_GROUP, make_app
    from update_engine.reboot.semaphore import EtcdEndpoints

    with clean_errors():
        host, port = parse_listen(listen)
        served: dict[str, int] = {}
        for g in groups:
            name, _, n = g.partition("=")
            if not GROUP_RE.fullmatch(name) or len(name) > MAX_GROUP or (n and not (n.isascii() and n.isdigit())):
                fail(f"bad --group {g!r}: expected NAME=SLOTS, e.g. default=2 (NAME: letters, digits, '.' and '-', "
                     f"at most {MAX_GROUP})")
            served[name] = int(n or 1)
        if bool(certfile) != bool(keyfile):
            fail("--certfile and --keyfile go together: give both or neither")
        stale = parse_duration(stale_after) if stale_after else None
        endpoints = EtcdEndpoints(etcd, cafile=cafile, certfile=certfile, keyfile=keyfile)
        for u in endpoints.urls:
            endpoints._make(u)  # validate URLs before binding the port
        web = make_app(endpoints, served, stale_after=stale)
        run_server(web, host, port, log_level="info", loggers=["obelisk.fleetlock"])
