"""coupon codes and their redemptions"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0003"
down_revision = "0002"

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(20, 4)


def upgrade() -> None:
    op.create_table(
        "coupons",
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("campaign_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("value", MONEY, nullable=True),
        sa.Column("multiplier", MONEY, nullable=True),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("target_skus", ARRAY(sa.Text()), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("target_category", sa.Text(), nullable=True),
        sa.Column("min_basket", MONEY, nullable=True),
        sa.Column("min_quantity", sa.Integer(), nullable=True),
        sa.Column("max_uses", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("max_uses_per_customer", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("valid_from", TS, nullable=False),
        sa.Column("valid_until", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("code", name="pk_coupons"),
        sa.UniqueConstraint("message_id", name="uq_coupons_message_id"),
        sa.CheckConstraint("uses >= 0 AND uses <= max_uses", name="ck_coupons_uses_within_max"),
    )
    op.create_index("ix_coupons_customer_id_created_at", "coupons", ["customer_id", "created_at"])
    op.create_table(
        "coupon_redemptions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("campaign_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("discount", MONEY, nullable=False),
        sa.Column("order_total", MONEY, nullable=True),
        sa.Column("applies_to", JSONB(), server_default=sa.text("'[]'"), nullable=False),
        sa.Column("redeemed_at", TS, nullable=False),
        sa.Column("rolled_back_at", TS, nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_coupon_redemptions"),
        sa.UniqueConstraint("code", "order_id", name="uq_coupon_redemptions_code_order_id"),
        sa.CheckConstraint("source IN ('api', 'event')", name="ck_coupon_redemptions_source_known"),
    )
    op.create_index("ix_coupon_redemptions_order_id", "coupon_redemptions", ["order_id"])
    op.create_index(
        "ix_coupon_redemptions_campaign_id_customer_id", "coupon_redemptions", ["campaign_id", "customer_id"]
    )


def downgrade() -> None:
    op.drop_table("coupon_redemptions")
    op.drop_table("coupons")
