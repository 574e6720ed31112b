"""an index of messages by campaign, for GET /v1/campaigns/{id}/messages (a campaign's messages by
channel and state, read by the demo's report and the console)"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index(
        "ix_messages_campaign",
        "messages",
        ["campaign_id"],
        postgresql_where="campaign_id IS NOT NULL",
    )


def downgrade() -> None:
    op.drop_index("ix_messages_campaign", table_name="messages")
