"""`obelisk boot`: the A/B slot commands (parse, call, print)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Show and change A/B slot state in the GPT.", no_args_is_help=True)
