"""The one error root, and how every CLI turns an expected error into one line and an exit code.

Every error obelisk expects (bad input, a refused operation, a missing tool, an unreachable
server) is an :class:`ObeliskError` subclass with a unique name per area. It carries the message
(one line naming the problem), an optional hint (what to do) and the exit code a CLI returns.
Bugs (``TypeError``, ``KeyError``, a stray ``OSError`` from our own code) are *not* caught by the
CLIs, so they still show a traceback and get fixed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, NoReturn

import typer

# Exit code for bad input (usage, malformed files, refused operations).
EXIT_BAD_INPUT = 2
# Exit code for an operation that was valid but failed (a tool, a server, a check).
EXIT_FAILED = 1


class ObeliskError(Exception):
    """An expected failure: ``str()`` is one line fit for the user.

    ``hint`` says what to do (printed after the message when it is not already part of it);
    ``exit_code`` is what a CLI exits with. Subclasses set class defaults for both.
    """

    exit_code: ClassVar[int] = EXIT_BAD_INPUT
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str = "", *, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint
        if exit_code is not None:
            self.exit_code = exit_code  # type: ignore[misc]

    def __str__(self) -> str:
        msg = self.message or (str(self.args[0]) if self.args else type(self).__name__)
        if self.hint and self.hint not in msg:
            return f"{msg}: {self.hint}"
        return msg


@contextmanager
def clean_errors(*kinds: type[BaseException], code: int | None = None) -> Iterator[None]:
    """Print ``error: <message>`` and exit for every :class:`ObeliskError` (and any extra ``kinds``).

    The exit code is ``code`` when given, else the error's own ``exit_code`` (2 for other kinds).
    """
    catch = (ObeliskError, *kinds)
    try:
        yield
    except catch as exc:
        print(f"error: {exc}", file=sys.stderr)
        own = exc.exit_code if isinstance(exc, ObeliskError) else EXIT_BAD_INPUT
        raise typer.Exit(own if code is None else code) from None


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)
