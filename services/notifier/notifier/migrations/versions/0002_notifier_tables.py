"""contacts, templates, messages, delivery attempts and message events"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "contacts",
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("email", sa.String(320)),
        sa.Column("phone", sa.String(16)),
        sa.Column("push_tokens", postgresql.JSONB, server_default="[]", nullable=False),
        sa.Column("first_name", sa.String(256)),
        sa.Column("last_name", sa.String(256)),
        sa.Column("timezone", sa.String(64)),
        sa.Column("locale", sa.String(35)),
        sa.Column("preferred_channel", sa.String(8)),
        sa.Column("consent_email", sa.Boolean),
        sa.Column("consent_sms", sa.Boolean),
        sa.Column("consent_push", sa.Boolean),
        sa.Column("consent_email_at", TS),
        sa.Column("consent_sms_at", TS),
        sa.Column("consent_push_at", TS),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", name="pk_contacts"),
    )
    op.create_table(
        "templates",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(8), nullable=False),
        sa.Column("locale", sa.String(35), nullable=False),
        sa.Column("subject", sa.Text),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("html", sa.Text),
        sa.Column("variables", postgresql.JSONB, nullable=False),
        sa.Column("sample", postgresql.JSONB, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_templates"),
        sa.UniqueConstraint("key", "channel", "locale", name="uq_templates_key_channel_locale"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("template", sa.String(128), nullable=False),
        sa.Column("requested_channel", sa.String(8)),
        sa.Column("channel", sa.String(8)),
        sa.Column("locale", sa.String(35)),
        sa.Column("variables", postgresql.JSONB, nullable=False),
        sa.Column("campaign_id", sa.String(128)),
        sa.Column("offer_id", sa.String(128)),
        sa.Column("source_service", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("not_before", TS),
        sa.Column("expires_at", TS),
        sa.Column("next_attempt_at", TS),
        sa.Column("lease_until", TS),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("provider", sa.String(16)),
        sa.Column("provider_message_id", sa.String(256)),
        sa.Column("cost", sa.Numeric(18, 4)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("sent_at", TS),
        sa.Column("delivered_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
    )
    op.create_index("ix_messages_customer_created", "messages", ["customer_id", "created_at"])
    op.create_index(
        "ix_messages_due",
        "messages",
        ["next_attempt_at"],
        postgresql_where=sa.text("state IN ('pending','deferred','queued','retrying')"),
    )
    op.create_index("ix_messages_provider_message_id", "messages", ["provider_message_id"])
    op.create_index(
        "ix_messages_sending",
        "messages",
        ["lease_until"],
        postgresql_where=sa.text("state = 'sending'"),
    )
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("tries", sa.Integer, nullable=False),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_attempts"),
    )
    op.create_index("ix_delivery_attempts_message_id", "delivery_attempts", ["message_id"])
    op.create_table(
        "message_events",
        sa.Column("id", sa.String(300), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("url", sa.Text),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_message_events"),
    )
    op.create_index("ix_message_events_message_id", "message_events", ["message_id"])


def downgrade() -> None:
    op.drop_table("message_events")
    op.drop_table("delivery_attempts")
    op.drop_table("messages")
    op.drop_table("templates")
    op.drop_table("contacts")
