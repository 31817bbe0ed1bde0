"""`obelisk lock`: locksmithctl's commands against the etcd semaphore.

Connection settings come from the flags, else from lock.conf (/etc/obelisk/lock.conf over
/usr/share/obelisk/lock.conf, or --config FILE). `obelisk lock serve` (the FleetLock server) is
fleetlock_server/cli.py's command, mounted into this group by the root CLI (obelisk/cli.py), so
the host's lock commands never load the server (starlette, uvicorn).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from obelisk.errors import clean_errors
from obelisk.inputs import check_input
from obelisk.lock_conf import GROUP_RE, LockConfig, LockConfigError, load
from obelisk.windows import parse_duration

from .endpoints import EtcdEndpoints
from .errors import LockError
from .identity import host_id
from .limits import check_slots
from .semaphore import EtcdSemaphore

app = typer.Typer(help="Reboot lock (etcd semaphore, Airlock-compatible) and FleetLock server.", no_args_is_help=True)

EndpointOpt = typer.Option(None, "--endpoint", help="etcd URLs, comma-separated (default: ENDPOINT in lock.conf)")
GroupOpt = typer.Option(None, "--group", help="reboot group (default: GROUP in lock.conf, else 'default')")
CaOpt = typer.Option(None, "--cafile", help="CA certificate to trust for etcd TLS")
CertOpt = typer.Option(None, "--certfile", help="client certificate for etcd TLS")
KeyOpt = typer.Option(None, "--keyfile", help="client key for etcd TLS")
ConfigOpt = typer.Option(None, "--config", help="read this lock.conf instead of /etc/obelisk/lock.conf")
StaleOpt = typer.Option(None, "--stale-after", help="holders older than this may be reclaimed (default: STALE_AFTER)")


def _conf(config: Path | None) -> LockConfig:
    if config is not None:
        check_input(config, "lock config")  # a FIFO would block the read for ever
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
    with clean_errors():
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
    with clean_errors():
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
    with clean_errors():
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
    with clean_errors():
        check_slots(slots)  # before connecting: a bad count needs no etcd to refuse
        sem = _semaphore(endpoint, group, cafile, certfile, keyfile, config)
        old, new = sem.set_max(slots)
    print(f"Old: {old}\nNew: {new}")
