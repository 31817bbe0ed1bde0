"""Root command: mounts each package's typer app; nothing else.

Only the sub-app a command names is imported (`obelisk boot ...` loads bootloader.cli alone), so
commands that run at boot start fast; `obelisk --help` loads them all to list them.
"""

from __future__ import annotations

import importlib
import sys

import typer

# sub-command -> (module, attribute of its typer app, help shown in `obelisk --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "image": ("builder.cli", "image_app"),
    "key": ("builder.cli", "key_app"),
    "boot": ("bootloader.cli", "app"),
    "update": ("update_engine.cli", "app"),
    "lock": ("update_engine.reboot.cli", "app"),
    "cloudconfig": ("cloudconfig.cli", "app"),
    "provision": ("provision.cli", "app"),
}


def build_app(argv: list[str]) -> typer.Typer:
    app = typer.Typer(
        name="obelisk",
        help="Build signed A/B OS images, update hosts atomically, coordinate reboots.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    first = next((a for a in argv if not a.startswith("-")), None)
    names = [first] if first in SUBCOMMANDS else list(SUBCOMMANDS)
    for name in names:
        module, attr = SUBCOMMANDS[name]
        app.add_typer(getattr(importlib.import_module(module), attr), name=name)
    return app


def main() -> None:
    build_app(sys.argv[1:])()
