"""scope templates and approvals: binding hashes, template versions, webhook outbox

Revision ID: 0003_scopes_approvals
Revises: 0002_audit_ingest
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_scopes_approvals"
down_revision = "0002_audit_ingest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decision_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("approvals_required", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("binding_hash", sa.String(length=64), nullable=True))
    op.create_table(
        "template_versions",
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("first_seen_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("hash", name=op.f("pk_template_versions")),
    )
    op.create_index(
        "ix_template_versions_name",
        "template_versions",
        ["name", "first_seen_at"],
        unique=False,
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("webhook", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=40), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("delivered_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["state", "next_attempt_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_template_versions_name", table_name="template_versions")
    op.drop_table("template_versions")
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_column("binding_hash")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("approvals_required")
        batch_op.drop_column("decision_hash")
