"""minting lifecycle: published signing keys, kill switches, shared reaper jobs

Revision ID: 0004_minting_lifecycle
Revises: 0003_scopes_approvals
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_minting_lifecycle"
down_revision = "0003_scopes_approvals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(length=64), nullable=False),
        sa.Column("alg", sa.String(length=16), nullable=False),
        sa.Column("jwk", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("signs_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_signing_keys")),
    )
    op.create_table(
        "kill_switches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=2048), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.Column("task_id", sa.String(length=40), nullable=True),
        sa.Column("credential_id", sa.String(length=40), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=1100), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("lifted_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kill_switches")),
    )
    op.create_index(
        "ix_kill_switches_target", "kill_switches", ["target", "expires_at"], unique=False
    )
    op.create_table(
        "reaper_jobs",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_run_at", sa.Float(), nullable=False),
        sa.Column("last_run_at", sa.Float(), nullable=True),
        sa.Column("last_owner", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_reaper_jobs")),
    )


def downgrade() -> None:
    op.drop_table("reaper_jobs")
    op.drop_index("ix_kill_switches_target", table_name="kill_switches")
    op.drop_table("kill_switches")
    op.drop_table("signing_keys")
