"""an index of decisions by campaign in id order, for GET /v1/campaigns/{id}/decisions (a campaign's
decisions page by page: the audience and its arms, for an export, the demo's report and the tests)"""

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_index("ix_decisions_campaign_id_id", "decisions", ["campaign_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_decisions_campaign_id_id", table_name="decisions")
