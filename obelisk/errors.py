"""How every CLI turns an expected error into one line on stderr and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

# Exit code for bad input (usage, malformed files, refused operations).
EXIT_BAD_INPUT = 2


@contextmanager
def clean_errors(*kinds: type[BaseException], code: int = EXIT_BAD_INPUT) -> Iterator[None]:
    """Print ``error: <message>`` and exit ``code`` for the listed exception kinds."""
    try:
        yield
    except kinds as exc:  # type: ignore[misc]
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(code) from None


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)
