"""github: sealed revocation material on credentials (GitHub installation tokens)

Revision ID: 0009_github
Revises: 0006_ownership
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_github"
down_revision = "0006_ownership"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("sealed", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("sealed")
