"""Alembic scripts for the fleet schema; applied programmatically by update_server.db.store (no alembic.ini)."""
