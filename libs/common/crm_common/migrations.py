"""Per-service Alembic: one migration folder inside each service package, run programmatically."""

from __future__ import annotations

import asyncio
from importlib import resources

import sqlalchemy as sa
from alembic import command, context, op
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import async_engine_from_config


def alembic_config(package: str, database_url: str) -> Config:
    """Alembic config for `<package>/migrations` against `database_url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files(package) / "migrations"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["package"] = package
    return cfg


def upgrade(package: str, database_url: str, revision: str = "head") -> None:
    """Migrate a service database to `revision` (synchronous; call in a thread from async code)."""
    command.upgrade(alembic_config(package, database_url), revision)


async def upgrade_async(package: str, database_url: str, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, package, database_url, revision)


def run_env(target_metadata: MetaData) -> None:
    """Body of every service's migrations/env.py: run migrations online over asyncpg."""
    config = context.config

    def do_run(connection: sa.Connection) -> None:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()

    async def run_async() -> None:
        engine = async_engine_from_config(
            config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
        )
        async with engine.connect() as connection:
            await connection.run_sync(do_run)
        await engine.dispose()

    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True
        )
        with context.begin_transaction():
            context.run_migrations()
    else:
        asyncio.run(run_async())


def create_runtime_tables() -> None:
    """Create the inbox and outbox tables (call from a service's first migration)."""
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.String(200), nullable=False),
        sa.Column("message_id", sa.String(300), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", name="pk_inbox"),
    )
    op.create_index("ix_inbox_processed_at", "inbox", ["processed_at"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("headers", postgresql.JSONB, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )


def add_outbox_sent_at() -> None:
    """Keep sent outbox rows for a window (crm_common.outbox): `sent_at` is NULL until the relay sent the row.

    The relay reads only unsent rows, in id order, through the partial index; sent rows stay until
    the retention sweep deletes them, so that `POST /v1/ops/republish` can send them again after a
    broker lost its data.
    """
    op.add_column("outbox", sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_outbox_unsent", "outbox", ["id"], postgresql_where=sa.text("sent_at IS NULL"))


def drop_outbox_sent_at() -> None:
    op.drop_index("ix_outbox_unsent", table_name="outbox")
    op.drop_column("outbox", "sent_at")


def drop_runtime_tables() -> None:
    op.drop_table("outbox")
    op.drop_table("inbox")
