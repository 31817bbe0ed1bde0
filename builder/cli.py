"""`obelisk image` and `obelisk key`: parse, call, print."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from obelisk.errors import clean_errors
from update_engine import signing

console = Console(stderr=True)

image_app = typer.Typer(help="Build, verify, inspect and test OS images.", no_args_is_help=True)
key_app = typer.Typer(help="Manage Ed25519 signing keys.", no_args_is_help=True)


@key_app.command("generate")
def key_generate(
    directory: Path = typer.Argument(..., help="Where to write obelisk.key (0600) and obelisk.pub"),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair"),
) -> None:
    """Make a signing key pair: DIR/obelisk.key (private, 0600) and DIR/obelisk.pub."""
    with clean_errors(signing.SigningError, OSError):
        priv, pub = signing.generate_keypair(directory, overwrite=force)
    kid = signing.load_public_key(pub).key_id
    print(f"private key: {priv}\npublic key:  {pub}\nkey id:      {kid}")
