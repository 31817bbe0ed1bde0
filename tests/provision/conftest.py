"""Provisioning fixtures live in prov_helpers.py (a plain module, so tests can import its helpers too)."""

from prov_helpers import data, serve  # noqa: F401
