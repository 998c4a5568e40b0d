"""Alembic environment: migrations run against the URL given in the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from broker.store.schema import metadata

#: The advisory lock key that orders concurrent migrations on PostgreSQL ("broker" in ASCII).
MIGRATION_LOCK = 0x62726F6B6572

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url is not None

connectable = create_engine(url, poolclass=pool.NullPool)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas started together with `serve --migrate` take turns: the lock is held until
            # this transaction commits, and the next one then finds the schema already current.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
connectable.dispose()
