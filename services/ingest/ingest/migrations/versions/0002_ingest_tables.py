"""api keys, accepted-event archive and its publish queue"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.String(32)), nullable=False),
        sa.Column("rate_limit_per_s", sa.Float, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_table(
        "events",
        sa.Column("seq", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("customer_key", sa.Text, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_events"),
        sa.UniqueConstraint("source", "event_id", name="uq_events_source_event_id"),
    )
    # BRIN: both times grow with the insert order, so block ranges answer replay's range scans
    # at a fraction of a btree's cost on the hot insert path.
    op.create_index("ix_events_received_at", "events", ["received_at"], postgresql_using="brin")
    op.create_index("ix_events_occurred_at", "events", ["occurred_at"], postgresql_using="brin")
    op.create_table(
        "event_pending",
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_event_pending"),
    )


def downgrade() -> None:
    op.drop_table("event_pending")
    op.drop_index("ix_events_occurred_at", table_name="events")
    op.drop_index("ix_events_received_at", table_name="events")
    op.drop_table("events")
    op.drop_table("api_keys")
