"""audit use ingestion: records already ingested, and each source's read position

Revision ID: 0002_audit_ingest
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_audit_ingest"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_ingested",
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("record_id", sa.String(length=256), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("source", "record_id", name=op.f("pk_audit_ingested")),
    )
    op.create_index(op.f("ix_audit_ingested_seen_at"), "audit_ingested", ["seen_at"], unique=False)
    op.create_table(
        "audit_ingest_cursors",
        sa.Column("source", sa.String(length=512), nullable=False),
        sa.Column("position", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_audit_ingest_cursors")),
    )


def downgrade() -> None:
    op.drop_table("audit_ingest_cursors")
    op.drop_index(op.f("ix_audit_ingested_seen_at"), table_name="audit_ingested")
    op.drop_table("audit_ingested")
