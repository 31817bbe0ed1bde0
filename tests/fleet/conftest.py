"""Fleet fixtures live in fleet_helpers.py (a plain module, so tests can import its helpers too)."""

from fleet_helpers import db_url, pg_server, served, sqlite_template, store  # noqa: F401
