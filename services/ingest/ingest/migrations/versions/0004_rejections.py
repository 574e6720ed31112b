"""rejected messages of the Segment-compatible routes, with their reasons

A Segment SDK reads only the status of its batch; a message of an accepted batch that fails our
validation is kept here (and shown by GET /v1/rejections) instead of vanishing.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "rejections",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("api", sa.String(16), nullable=False),
        sa.Column("message_id", sa.Text, nullable=True),
        sa.Column("type", sa.Text, nullable=True),
        sa.Column("event", sa.Text, nullable=True),
        sa.Column("reasons", sa.LargeBinary, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rejections"),
    )
    op.create_index("ix_rejections_source_id", "rejections", ["source", "id"])
    op.create_index("ix_rejections_received_at", "rejections", ["received_at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_table("rejections")
