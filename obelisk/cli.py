"""Root command: mounts each package's typer app; nothing else."""

from __future__ import annotations

import typer

from bootloader.cli import app as boot_app
from builder.cli import image_app, key_app

app = typer.Typer(
    name="obelisk",
    help="Build signed A/B OS images, update hosts atomically, coordinate reboots.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(image_app, name="image")
app.add_typer(key_app, name="key")
app.add_typer(boot_app, name="boot")


def main() -> None:
    app()
