"""Instances, their events, channels, groups and the releases the server has seen.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("machine_id", sa.String(64), primary_key=True),
        sa.Column("group_name", sa.String(64), nullable=False),
        sa.Column("app_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("version", sa.String(64), nullable=False, server_default=""),
        sa.Column("arch", sa.String(32), nullable=False, server_default=""),
        sa.Column("alias", sa.String(64), nullable=False, server_default=""),
        sa.Column("oem", sa.String(64), nullable=False, server_default=""),
        sa.Column("boot_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("ip", sa.String(64), nullable=False, server_default=""),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_checkin", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="checking"),
        sa.Column("error_code", sa.Integer, nullable=True),
        sa.Column("reason", sa.String(1024), nullable=False, server_default=""),
        sa.Column("target_version", sa.String(64), nullable=False, server_default=""),
        sa.Column("note", sa.String(1024), nullable=False, server_default=""),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_instances_group_name", "instances", ["group_name"])
    op.create_index("ix_instances_last_checkin", "instances", ["last_checkin"])
    op.create_index("ix_instances_status", "instances", ["status"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(64), sa.ForeignKey("instances.machine_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("event_type", sa.Integer, nullable=False),
        sa.Column("event_result", sa.Integer, nullable=False),
        sa.Column("error_code", sa.Integer, nullable=True),
        sa.Column("previous_version", sa.String(64), nullable=True),
        sa.Column("version", sa.String(64), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False, server_default=""),
    )
    op.create_index("ix_events_machine_id_id", "events", ["machine_id", "id"])
    op.create_table(
        "channels",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("floors", sa.Text, nullable=False, server_default="[]"),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "groups",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("policy", sa.Text, nullable=False, server_default="{}"),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "releases",
        sa.Column("app_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("published_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for name in ("releases", "groups", "channels", "events", "instances"):
        op.drop_table(name)
