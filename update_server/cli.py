"""`obelisk update serve`: parse the options, build the catalog and the app, run it (the root CLI
mounts this command into `obelisk update`)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from obelisk.errors import clean_errors
from obelisk.serving import parse_listen, read_token, run_server, shown_address


def serve(
    releases_dir: Path = typer.Argument(..., help="the --out folder of 'obelisk image build' (<name>/<version>/)"),
    listen: str = typer.Option("127.0.0.1:8080", help="HOST:PORT"),
    groups: Path | None = typer.Option(None, help='TOML: \\[groups] name = "version" (default: newest for all)'),
    events: Path | None = typer.Option(None, help="append every reported event to this JSONL file "
                                                  "(rotated to FILE.1 at 64 MiB)"),
    public_url: str | None = typer.Option(None, help="base URL hosts reach this server at (default: request's)"),
    poll_interval: int | None = typer.Option(None, help="PollInterval (s) to tell hosts"),
    admin_token_file: Path | None = typer.Option(None, help="open GET /v1/events to clients sending this "
                                                            "bearer token (off without it)"),
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
        web = make_app(catalog, events=EventLog(events), public_url=public_url, poll_interval=poll_interval,
                       admin_token=admin_token)
        print(f"serving {len(rels)} release(s) from {releases_dir} at http://{shown_address(host, port)}/v1/update/",
              flush=True)
        run_server(web, host, port, log_level="warning")
