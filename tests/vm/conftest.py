"""VM fixtures live in pxeboot.py (a plain module, so tests can import its helpers too)."""

from pxeboot import release  # noqa: F401
