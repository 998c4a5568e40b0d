"""backend hardening: the issue-time bounds of each per-session kill-switch entry; an index
for the credentials of a backend that may still be valid

Revision ID: 0007_backend_hardening
Revises: 0009_github
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_backend_hardening"
down_revision = "0009_github"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("kill_switches", sa.Column("issued_from", sa.Float(), nullable=True))
    op.add_column("kill_switches", sa.Column("issued_until", sa.Float(), nullable=True))
    op.create_index(
        "ix_credentials_backend_expiry", "credentials", ["backend", "expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_credentials_backend_expiry", table_name="credentials")
    with op.batch_alter_table("kill_switches") as batch:
        batch.drop_column("issued_until")
        batch.drop_column("issued_from")
