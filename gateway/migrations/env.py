"""Alembic environment: runs migrations on the engine the Store hands in."""

from __future__ import annotations

from alembic import context

from gateway.schema import metadata

target_metadata = metadata

engine = context.config.attributes["engine"]
with engine.connect().execution_options(listgate_write=True) as connection:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
