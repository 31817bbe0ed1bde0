"""`obelisk lock`: locksmithctl's commands against the etcd semaphore, and the FleetLock server.

Connection settings come from the flags, else from lock.conf (/etc/obelisk/lock.conf over
/usr/share/obelisk/lock.conf, or --config FILE).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from obelisk.errors import clean_errors, fail
from obelisk.lock_conf import GROUP_RE, LockConfig, LockConfigError, load
from obelisk.windows import WindowError, parse_duration

from .identity import IdentityError, host_id
from .semaphore import EtcdEndpoints, EtcdSemaphore, LockError

app = typer.Typer(help="Reboot lock (etcd semaphore, Airlock-compatible) and FleetLock server.", no_args_is_help=True)
ERRORS = (LockError, LockConfigError, IdentityError, WindowError)

EndpointOpt = typer.Option(None, "--endpoint", help="etcd URLs, comma-separated (default: ENDPOINT in lock.conf)")
GroupOpt = typer.Option(None, "--group", help="reboot group (default: GROUP in lock.conf, else 'default')")
CaOpt = typer.Option(None, "--cafile", help="CA certificate to trust for etcd TLS")
CertOpt = typer.Option(None, "--certfile", help="client certificate for etcd TLS")
KeyOpt = typer.Option(None, "--keyfile", help="client key for etcd TLS")
ConfigOpt = typer.Option(None, "--config", help="read this lock.conf instead of /etc/obelisk/lock.conf")
StaleOpt = typer.Option(None, "--stale-after", help="holders older than this may be reclaimed (default: STALE_AFTER)")


def _conf(config: Path | None) -> LockConfig:
    if config is not None:
        try:
            text = config.read_text()
        except OSError as exc:
            raise LockConfigError(f"cannot read {config}: {exc.strerror}") from None
        return LockConfig.parse(text, str(config))
    return load()


def _semaphore(endpoint: str | None, group: str | None, cafile: str | None, certfile: str | None,
               keyfile: str | None, config: Path | None, stale_after: str | None = None) -> EtcdSemaphore:
    conf = _conf(config)
    urls = endpoint or ",".join(conf.endpoint)
    if not urls:
        raise LockError("no etcd endpoint: pass --endpoint http://HOST:2379[,...] or set ENDPOINT in lock.conf")
    group = group or conf.group
    if not GROUP_RE.match(group):
        raise LockError(f"bad group {group!r}: use letters, digits, '.' and '-' only")
    certfile, keyfile = certfile or conf.certfile, keyfile or conf.keyfile
    if bool(certfile) != bool(keyfile):
        raise LockError("--certfile and --keyfile go together: give both or neither")
    stale = parse_duration(stale_after) if stale_after else conf.stale_after
    endpoints = EtcdEndpoints(urls, cafile=cafile or conf.cafile, certfile=certfile, keyfile=keyfile)
    return EtcdSemaphore(endpoints, group, stale_after=stale)


@app.command()
def status(
    endpoint: str = EndpointOpt, group: str = GroupOpt, cafile: str = CaOpt, certfile: str = CertOpt,
    keyfile: str = KeyOpt, config: Path = ConfigOpt, stale_after: str = StaleOpt,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Slots, holders (with when they took the slot) and recent reclaims of a group."""
    with clean_errors(*ERRORS):
        sem = _semaphore(endpoint, group, cafile, certfile, keyfile, config, stale_after)
        doc = sem.read().to_json(datetime.now(UTC), sem.stale_after)
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    console = Console()
    if not doc["initialized"]:
        console.print(f"group {doc['group']}: no semaphore yet ({doc['key']}); the first lock creates it with 1 slot")
        return
    console.print(f"group {doc['group']}: {doc['available']} of {doc['total_slots']} slot(s) available")
    if doc["holders"]:
        table = Table("holder", "taken", "held", "stale")
        for h in doc["holders"]:
            held = f"{h['held_seconds']:.0f}s" if h["held_seconds"] is not None else "?"
            table.add_row(h["id"], h["taken"] or "unknown (taken through Airlock)", held, "yes" if h["stale"] else "")
        console.print(table)
    for r in doc["reclaims"][-5:]:
        console.print(f"reclaimed: {r.get('id')} (held since {r.get('taken')}) "
                      f"at {r.get('reclaimed')} by {r.get('by')}")


@app.command("lock")
def lock_cmd(
    id: str = typer.Option(None, "--id", help="holder id (default: this host's app-specific id)"),
    endpoint: str = EndpointOpt, group: str = GroupOpt, cafile: str = CaOpt, certfile: str = CertOpt,
    keyfile: str = KeyOpt, config: Path = ConfigOpt, stale_after: str = StaleOpt,
) -> None:
    """Take a slot (re-entrant: taking it again as the same id succeeds)."""
    with clean_errors(*ERRORS):
        sem = _semaphore(endpoint, group, cafile, certfile, keyfile, config, stale_after)
        holder = id or host_id()
        state = sem.lock(holder)
    print(f"locked: {holder} holds a slot of group {sem.group} ({state.free} of {state.total_slots} left)")


@app.command()
def unlock(
    id: str = typer.Option(None, "--id", help="holder id (default: this host's app-specific id)"),
    endpoint: str = EndpointOpt, group: str = GroupOpt, cafile: str = CaOpt, certfile: str = CertOpt,
    keyfile: str = KeyOpt, config: Path = ConfigOpt,
) -> None:
    """Give back a slot (an operator may release any holder's slot with --id)."""
    with clean_errors(*ERRORS):
        sem = _semaphore(endpoint, group, cafile, certfile, keyfile, config)
        holder = id or host_id()
        released = sem.unlock(holder)
    if released:
        logging.getLogger("obelisk.reboot.lock").warning("slot of %s in group %s released by hand", holder, sem.group)
        print(f"unlocked: {holder} no longer holds a slot of group {sem.group}")
    else:
        print(f"{holder} held no slot of group {sem.group}: nothing to do")


@app.command("set-max")
def set_max(
    slots: int = typer.Argument(..., help="how many hosts of the group may reboot at once"),
    endpoint: str = EndpointOpt, group: str = GroupOpt, cafile: str = CaOpt, certfile: str = CertOpt,
    keyfile: str = KeyOpt, config: Path = ConfigOpt,
) -> None:
    """Set the group's slot count (creates the semaphore if needed). Prints Old/New like locksmithctl."""
    with clean_errors(*ERRORS):
        if slots < 0:
            fail(f"slot count must be 0 or more, not {slots}")
        sem = _semaphore(endpoint, group, cafile, certfile, keyfile, config)
        old, new = sem.set_max(slots)
    print(f"Old: {old}\nNew: {new}")


@app.command()
def serve(
    etcd: str = typer.Option(..., "--etcd", help="etcd URLs, comma-separated"),
    listen: str = typer.Option("127.0.0.1:3333", "--listen", help="HOST:PORT to serve FleetLock on"),
    groups: list[str] = typer.Option(["default=1"], "--group", help="GROUP=SLOTS served (repeatable)"),
    cafile: str = CaOpt, certfile: str = CertOpt, keyfile: str = KeyOpt,
    stale_after: str = typer.Option(None, "--stale-after", help="reclaim slots held longer than this"),
) -> None:
    """Run a FleetLock server (Zincati's fleet_lock strategy, obelisk's fleetlock) over the etcd semaphore."""
    import uvicorn

    from fleetlock_server.app import make_app

    with clean_errors(*ERRORS):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            fail(f"bad --listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:3333")
        served: dict[str, int] = {}
        for g in groups:
            name, _, n = g.partition("=")
            if not GROUP_RE.match(name) or (n and not n.isdigit()):
                fail(f"bad --group {g!r}: expected NAME=SLOTS, e.g. default=2")
            served[name] = int(n or 1)
        if bool(certfile) != bool(keyfile):
            fail("--certfile and --keyfile go together: give both or neither")
        stale = parse_duration(stale_after) if stale_after else None
        endpoints = EtcdEndpoints(etcd, cafile=cafile, certfile=certfile, keyfile=keyfile)
        for u in endpoints.urls:
            endpoints._make(u)  # validate URLs before binding the port
        web = make_app(endpoints, served, stale_after=stale)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    uvicorn.run(web, host=host.strip("[]"), port=int(port), log_level="info")
