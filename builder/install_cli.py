"""`obelisk install RELEASE|URL --disk /dev/sdX`: thin: parse, call, print (logic in builder.install)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TransferSpeedColumn

from builder import install
from obelisk.errors import clean_errors

# A group whose callback is the command, so that `obelisk install RELEASE --disk X` needs no sub-command name.
app = typer.Typer(context_settings={"allow_interspersed_args": True}, subcommand_metavar="",
                  help="Write a signed release's disk image onto a bare-metal disk (like flatcar-install).")


@app.callback(invoke_without_command=True)
def install_cmd(
    source: str = typer.Argument(..., metavar="RELEASE|URL", help="Release folder (out/<name>/<version>) or its "
                                 "http(s) URL."),
    disk: Path = typer.Option(..., "--disk", help="Block device to install to (everything on it is lost)."),
    config: Path | None = typer.Option(None, "--config", help="cloud-config, Ignition or Butane file for the first "
                                       "boot, put in the OEM partition."),
    key: Path | None = typer.Option(None, "--key", help="Public key the release must be signed with (default: the "
                                    "development key)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and say what would be done; write "
                                 "nothing."),
    force: bool = typer.Option(False, "--force", help="Install onto a disk in use, a regular file or one with other "
                               "sector sizes (each override is printed)."),
) -> None:
    """Verify the release and the config, inspect the disk, then stream the image, move the backup GPT to the
    disk's end and put the config in OEM."""
    err = Console(stderr=True)
    with clean_errors():
        p = install.plan(source, disk, config=config, key=key, force=force)
        for line in p.lines():
            if line.startswith("override"):
                print(f"warning: {line}", file=sys.stderr)
            elif dry_run:
                print(("would " if not line.startswith(("release", "target")) else "") + line)
        if dry_run:
            print("dry run: nothing was written")
            return
        prog = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
                        TransferSpeedColumn(), console=err)
        task: list[int] = []

        def progress(n: int, total: int) -> None:
            if not task:  # only once bytes flow, so a refusal prints nothing but its error line
                prog.start()
                task.append(prog.add_task(f"writing {disk}", total=total))
            prog.update(task[0], completed=n)

        try:
            done = install.run(p, progress=progress)
        finally:
            prog.stop()
    for line in done:
        print(line)
    print(f"installed {p.release.name} {p.release.version} on {disk}")
