"""The fleet schema at the newest revision, as SQLAlchemy Core tables (the store's queries use these).

The migrations under ``migrations/versions`` build the same tables step by step; a test checks that
a database migrated from empty matches this file. Times are epoch seconds (float): the same in
SQLite and PostgreSQL, no time-zone conversions, and trivially injected by tests.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

MACHINE_ID_LEN = 64   # Flatcar sends 32 hex digits; Nebraska allows 50; room for a braced UUID
NAME_LEN = 64         # group, channel and track names
VERSION_LEN = 64
TEXT_LEN = 1024       # reason texts are cut to this before they are stored

# One row per host that ever checked in (until pruned).
instances = sa.Table(
    "instances", metadata,
    sa.Column("machine_id", sa.String(MACHINE_ID_LEN), primary_key=True),
    sa.Column("group_name", sa.String(NAME_LEN), nullable=False, index=True),  # the Omaha track
    sa.Column("app_id", sa.String(NAME_LEN), nullable=False, server_default=""),
    sa.Column("version", sa.String(VERSION_LEN), nullable=False, server_default=""),
    sa.Column("arch", sa.String(32), nullable=False, server_default=""),
    sa.Column("alias", sa.String(NAME_LEN), nullable=False, server_default=""),
    sa.Column("oem", sa.String(NAME_LEN), nullable=False, server_default=""),
    sa.Column("boot_id", sa.String(MACHINE_ID_LEN), nullable=False, server_default=""),
    sa.Column("ip", sa.String(64), nullable=False, server_default=""),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_checkin", sa.Float, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False, server_default="checking", index=True),
    sa.Column("error_code", sa.Integer, nullable=True),
    sa.Column("reason", sa.String(TEXT_LEN), nullable=False, server_default=""),  # the host's error text
    sa.Column("target_version", sa.String(VERSION_LEN), nullable=False, server_default=""),  # last granted
    sa.Column("note", sa.String(TEXT_LEN), nullable=False, server_default=""),  # last policy answer
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Bounded history per instance (the store deletes the oldest past its limit).
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("machine_id", sa.String(MACHINE_ID_LEN), sa.ForeignKey("instances.machine_id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("event_type", sa.Integer, nullable=False),
    sa.Column("event_result", sa.Integer, nullable=False),
    sa.Column("error_code", sa.Integer, nullable=True),
    sa.Column("previous_version", sa.String(VERSION_LEN), nullable=True),
    sa.Column("version", sa.String(VERSION_LEN), nullable=False, server_default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(TEXT_LEN), nullable=False, server_default=""),
    sa.Index("ix_events_machine_id_id", "machine_id", "id"),
)

# A channel is a release line: the version it points at (NULL = the newest in the release folders).
channels = sa.Table(
    "channels", metadata,
    sa.Column("name", sa.String(NAME_LEN), primary_key=True),
    sa.Column("version", sa.String(VERSION_LEN), nullable=True),
    sa.Column("floors", sa.Text, nullable=False, server_default="[]"),  # JSON list of mandatory versions
    sa.Column("updated_at", sa.Float, nullable=False),
)

# A group is an Omaha track; it follows one channel under one rollout policy (JSON, see policy.Policy).
groups = sa.Table(
    "groups", metadata,
    sa.Column("name", sa.String(NAME_LEN), primary_key=True),
    sa.Column("channel", sa.String(NAME_LEN), nullable=False),
    sa.Column("policy", sa.Text, nullable=False, server_default="{}"),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# When the server first saw a release: the clock soak time and waves run from.
releases = sa.Table(
    "releases", metadata,
    sa.Column("app_id", sa.String(NAME_LEN), primary_key=True),
    sa.Column("version", sa.String(VERSION_LEN), primary_key=True),
    sa.Column("published_at", sa.Float, nullable=False),
)

# Per group: operator switches, the halt and its reason; `seq` is the row every grant locks.
rollout_state = sa.Table(
    "rollout_state", metadata,
    sa.Column("group_name", sa.String(NAME_LEN), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("halted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("halt_reason", sa.String(TEXT_LEN), nullable=False, server_default=""),
    sa.Column("halted_at", sa.Float, nullable=True),
    # The halt counts only attempts finished after this (an operator's resume starts a fresh count).
    sa.Column("failures_since", sa.Float, nullable=False, server_default="0"),
    sa.Column("seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Every update started (granted), and how it ended: the rate limit counts these, the halt reads them.
attempts = sa.Table(
    "attempts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("group_name", sa.String(NAME_LEN), nullable=False),
    sa.Column("machine_id", sa.String(MACHINE_ID_LEN), nullable=False, index=True),
    sa.Column("from_version", sa.String(VERSION_LEN), nullable=False),
    sa.Column("version", sa.String(VERSION_LEN), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False, server_default="pending"),  # success failed timeout
    sa.Column("error_code", sa.Integer, nullable=True),
    sa.Column("reason", sa.String(TEXT_LEN), nullable=False, server_default=""),
    sa.Index("ix_attempts_group_started", "group_name", "started_at"),
)
