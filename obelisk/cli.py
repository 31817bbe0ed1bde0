"""Root command: mounts each package's typer app; nothing else.

Only the sub-app a command names is imported (`obelisk boot ...` loads bootloader.cli alone), so
commands that run at boot start fast; `obelisk --help` loads them all to list them. A server
package owns its `serve` command; it is mounted here into the host CLI's group (`update serve`,
`lock serve`), so host code never imports a server. A package left out of an installation (a
host image carries no builder or provisioning server) is left out of the commands too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import typer

# sub-command -> (module, attribute of its typer app)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "image": ("builder.cli", "image_app"),
    "key": ("obelisk.keycli", "key_app"),  # hosts run `key verify` too
    "boot": ("bootloader.cli", "app"),
    "update": ("update_engine.cli", "app"),
    "lock": ("update_engine.reboot.cli", "app"),
    "cloudconfig": ("cloudconfig.cli", "app"),
    "provision": ("provision.cli", "app"),
    "fleet": ("fleet.cli", "app"),
    "install": ("builder.install_cli", "app"),  # `obelisk install RELEASE --disk /dev/sdX` (bare metal)
}

# sub-command -> (command name, module, function): commands a server package adds to a host group.
SERVER_COMMANDS: dict[str, tuple[str, str, str]] = {
    "update": ("serve", "update_server.cli", "serve"),
    "lock": ("serve", "fleetlock_server.cli", "serve"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is absent
        return False


def _words(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-")]


def build_app(argv: list[str]) -> typer.Typer:
    app = typer.Typer(
        name="obelisk",
        help="Build signed A/B OS images, update hosts atomically, coordinate reboots.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    words = _words(argv)
    first = words[0] if words else None
    names = [first] if first in SUBCOMMANDS else list(SUBCOMMANDS)
    for name in names:
        module, attr = SUBCOMMANDS[name]
        if not _installed(module):
            continue
        sub = importlib.import_module(module)
        group: typer.Typer = getattr(sub, attr)
        extra = SERVER_COMMANDS.get(name)
        # The server's module is imported only when its command runs or help lists the group's commands.
        if extra and _installed(extra[1]) and (len(words) < 2 or words[1] == extra[0]) and not _has_command(
                group, extra[0]):
            group.command(extra[0])(getattr(importlib.import_module(extra[1]), extra[2]))
        app.add_typer(group, name=name)
    return app


def _has_command(group: typer.Typer, name: str) -> bool:
    return any((c.name or getattr(c.callback, "__name__", "")) == name for c in group.registered_commands)


def main() -> None:
    build_app(sys.argv[1:])()
