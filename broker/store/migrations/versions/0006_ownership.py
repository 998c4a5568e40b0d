"""ownership: how a session was opened, run identities, shared tasks, approvers' persons

Revision ID: 0006_ownership
Revises: 0004_minting_lifecycle

Sessions record where they may be used (``via``: api or console) and the run their ID token was
issued to; tasks record that run, whether their scope shares them across the requester's
sessions, and the requester's persons; approvals record the approver's persons.

Sessions that are still live when this runs keep working where they were opened: a session whose
``broker.session.start`` event says ``broker.session.via = console`` becomes a console session,
every other one an API session.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006_ownership"
down_revision = "0004_minting_lifecycle"
branch_labels = None
depends_on = None


def _attributes(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _mark_console_sessions() -> None:
    """Live sessions opened by the console sign-in become ``console`` sessions."""
    conn = op.get_bind()
    sessions = sa.table(
        "sessions",
        sa.column("id"),
        sa.column("via"),
        sa.column("ended_at"),
        sa.column("expires_at"),
    )
    events = sa.table(
        "audit_events", sa.column("session_id"), sa.column("name"), sa.column("attributes")
    )
    live = sa.select(sessions.c.id).where(
        sessions.c.ended_at.is_(None), sessions.c.expires_at > time.time()
    )
    rows = conn.execute(
        sa.select(events.c.session_id, events.c.attributes).where(
            events.c.name == "broker.session.start", events.c.session_id.in_(live)
        )
    )
    console = [
        sid for sid, attrs in rows if _attributes(attrs).get("broker.session.via") == "console"
    ]
    for start in range(0, len(console), 500):
        conn.execute(
            sa.update(sessions)
            .where(sessions.c.id.in_(console[start : start + 500]))
            .values(via="console")
        )


def upgrade() -> None:
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("via", sa.String(length=16), nullable=False, server_default="api")
        )
        batch_op.add_column(sa.Column("run_identity", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("persons", sa.JSON(), nullable=True))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("run_identity", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("share", sa.String(length=16), nullable=False, server_default="session")
        )
        batch_op.add_column(sa.Column("requester_persons", sa.JSON(), nullable=True))
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("persons", sa.JSON(), nullable=True))
    _mark_console_sessions()


def downgrade() -> None:
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_column("persons")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("requester_persons")
        batch_op.drop_column("share")
        batch_op.drop_column("run_identity")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("persons")
        batch_op.drop_column("run_identity")
        batch_op.drop_column("via")
