"""Update-engine fixtures live in ue_helpers.py (a plain module, so tests can import its helpers too)."""

from ue_helpers import fake_server, host, raw_server, serve, ue_argv, world  # noqa: F401
