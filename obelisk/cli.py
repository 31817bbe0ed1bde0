"""Root command: mounts each package's typer app; nothing else."""

from __future__ import annotations

import typer

from bootloader.cli import app as boot_app
from builder.cli import image_app, key_app
from cloudconfig.cli import app as cloudconfig_app
from update_engine.cli import app as update_app
from update_engine.reboot.cli import app as lock_app

app = typer.Typer(
    name="obelisk",
    help="Build signed A/B OS images, update hosts atomically, coordinate reboots.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(image_app, name="image")
app.add_typer(key_app, name="key")
app.add_typer(boot_app, name="boot")
app.add_typer(update_app, name="update")
app.add_typer(lock_app, name="lock")
app.add_typer(cloudconfig_app, name="cloudconfig")


def main() -> None:
    app()
