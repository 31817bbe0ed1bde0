"""`obelisk update serve`: parse the options, build the catalog and the app, run it (the root CLI
mounts this command into `obelisk update`).

Fleet state is on by default, in SQLite under a state folder (:func:`default_state_dir`);
`--database` puts it in PostgreSQL, `--no-state` turns it off (no tracking, no policy).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import typer

from obelisk.errors import ObeliskError, clean_errors
from obelisk.serving import parse_listen, read_token, run_server, shown_address


def serve(
    releases_dir: Path = typer.Argument(..., help="the --out folder of 'obelisk image build' (<name>/<version>/)"),
    listen: str = typer.Option("127.0.0.1:8080", help="HOST:PORT"),
    groups: Path | None = typer.Option(None, help='TOML: \\[groups] name = "version" (default: newest for all)'),
    events: Path | None = typer.Option(None, help="append every reported event to this JSONL file "
                                                  "(rotated to FILE.1 at 64 MiB)"),
    public_url: str | None = typer.Option(None, help="base URL hosts reach this server at (default: request's)"),
    poll_interval: int | None = typer.Option(None, help="PollInterval (s) to tell hosts"),
    admin_token_file: Path | None = typer.Option(None, help="open GET /v1/events and the fleet API (reads and "
                                                            "changes) to clients sending this bearer token"),
    state_dir: Path | None = typer.Option(None, help="fleet state in SQLite: DIR/fleet.sqlite (made if missing; "
                                                     "default $STATE_DIRECTORY, else $XDG_STATE_HOME/obelisk/"
                                                     "update-server, else ~/.local/state/obelisk/update-server)"),
    database: str | None = typer.Option(None, help="fleet state in PostgreSQL instead: postgresql://USER@HOST/DB "
                                                   "(replicas share it)"),
    no_state: bool = typer.Option(False, "--no-state", help="keep no fleet state: no instance tracking, no "
                                                            "rollout policy, no fleet API"),
    read_token_file: Path | None = typer.Option(None, help="bearer token for read-only use of the fleet API"),
    prune_after: str = typer.Option("90d", help="forget instances not seen for this long ('0' = never)"),
    lock_endpoint: str | None = typer.Option(None, help="show the reboot lock's holders in the console: "
                                                        "etcd:http://HOST:2379[,...] or fleetlock:http://HOST:PORT "
                                                        "(default $OBELISK_CONSOLE_LOCK_ENDPOINT)"),
) -> None:
    """Serve releases to hosts over Omaha at /v1/update/ (Nebraska-compatible), payloads with Range."""
    from update_server.app import EventLog, make_app
    from update_server.releases import Catalog, load_groups

    with clean_errors():
        host, port = parse_listen(listen)
        admin_token = read_token(admin_token_file, "admin token") if admin_token_file else None
        catalog = Catalog(releases_dir, load_groups(groups))
        rels = catalog.releases()
        for p in catalog.problems:
            print(f"warning: {p}", file=sys.stderr)
        if no_state and (state_dir is not None or database is not None):
            raise FleetOptionError("--no-state keeps no fleet state: leave out --state-dir and --database")
        if not no_state and database is None and state_dir is None:
            state_dir = default_state_dir()
        fleet = None if no_state else _fleet(catalog, state_dir, database, admin_token, read_token_file,
                                             prune_after, lock_endpoint)
        web = make_app(catalog, events=EventLog(events), public_url=public_url, poll_interval=poll_interval,
                       admin_token=admin_token, fleet=fleet)
        print(f"serving {len(rels)} release(s) from {releases_dir} at http://{shown_address(host, port)}/v1/update/",
              flush=True)
        if fleet is not None:
            print(f"fleet state: {fleet.store.describe()} (schema {fleet.store.revision()})", flush=True)
        else:
            print("fleet state: none (--no-state): no instance tracking, no rollout policy", flush=True)
        run_server(web, host, port, log_level="warning")


class FleetOptionError(ObeliskError):
    """The fleet-state options contradict each other."""


def default_state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where the SQLite fleet state lives without --state-dir: systemd's StateDirectory= (the first of
    $STATE_DIRECTORY), else $XDG_STATE_HOME/obelisk/update-server, else ~/.local/state/obelisk/update-server.
    Relative values are ignored, as the XDG base directory spec says."""
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    if first and os.path.isabs(first):
        return Path(first)
    xdg = env.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".local" / "state"
    return base / "obelisk" / "update-server"


def _fleet(catalog, state_dir: Path | None, database: str | None, admin_token: str | None,  # noqa: ANN001
           read_token_file: Path | None, prune_after: str, lock_endpoint: str | None = None):  # noqa: ANN202
    """The fleet state in --state-dir's SQLite file or --database (imported only then)."""
    from obelisk.windows import WindowError, parse_duration
    from update_server.db.store import FleetStoreError, Store, url_for
    from update_server.fleet_server import Fleet

    if state_dir is not None and database is not None:
        raise FleetStoreError("give --state-dir (SQLite) or --database (PostgreSQL), not both")
    try:
        prune = parse_duration(prune_after).total_seconds() if prune_after.strip() != "0" else None
    except WindowError as exc:
        raise FleetStoreError(f"--prune-after: {exc}") from None
    if state_dir is not None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FleetStoreError(f"--state-dir {state_dir}: cannot create it: {exc.strerror}") from None
    read = [read_token(read_token_file, "read token")] if read_token_file else []
    store = Store(url_for(database, state_dir))
    return Fleet(store, catalog, read_tokens=read, admin_tokens=[admin_token] if admin_token else [],
                 prune_after=prune, lock_endpoint=lock_endpoint)
