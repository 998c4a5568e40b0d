"""Persistence: SQLAlchemy Core tables, repositories and Alembic migrations.

SQLite (WAL) is the embedded default; PostgreSQL is the store for several replicas.
"""

from sqlalchemy import Connection as Tx

from broker.store.database import Database

__all__ = ["Database", "Tx"]
