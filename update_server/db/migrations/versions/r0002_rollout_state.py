"""Rollout state per group (pause, halt and its reason, the grant lock) and the attempts it counts.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout_state",
        sa.Column("group_name", sa.String(64), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("halted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("halt_reason", sa.String(1024), nullable=False, server_default=""),
        sa.Column("halted_at", sa.Float, nullable=True),
        sa.Column("failures_since", sa.Float, nullable=False, server_default="0"),
        sa.Column("seq", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("group_name", sa.String(64), nullable=False),
        sa.Column("machine_id", sa.String(64), nullable=False),
        sa.Column("from_version", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("error_code", sa.Integer, nullable=True),
        sa.Column("reason", sa.String(1024), nullable=False, server_default=""),
    )
    op.create_index("ix_attempts_group_started", "attempts", ["group_name", "started_at"])
    op.create_index("ix_attempts_machine_id", "attempts", ["machine_id"])
    # Groups that existed before this revision get their (unpaused, unhalted) state row.
    op.execute("INSERT INTO rollout_state (group_name, paused, halted, halt_reason, seq, updated_at) "
               "SELECT name, false, false, '', 0, updated_at FROM groups")


def downgrade() -> None:
    op.drop_table("attempts")
    op.drop_table("rollout_state")
