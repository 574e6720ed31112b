"""campaigns, versions, customer cache, memberships, timers, decision log; bucket and condition functions"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"

TS = sa.DateTime(timezone=True)
MONEY = sa.Numeric(20, 4)

# The one definition of the control-group hash: a customer's bucket in [0, 1) under a salt
# (a campaign id, or the global control salt). Deterministic across processes and releases.
BUCKET_FN = """
CREATE FUNCTION offers_bucket(salt text, customer text) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT ('x' || substr(md5(salt || ':' || customer), 1, 8))::bit(32)::bigint / 4294967296.0
$$
"""

# Audience conditions on the profile digest: [{"field", "op", "value"}], all must hold; a missing
# field never matches (except for not_exists and !=).
MATCH_FN = """
CREATE FUNCTION offers_match(d jsonb, conds jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(bool_and(coalesce(CASE c ->> 'op'
      WHEN '=' THEN d -> (c ->> 'field') = c -> 'value'
      WHEN '!=' THEN d -> (c ->> 'field') IS DISTINCT FROM c -> 'value'
      WHEN '<' THEN (d ->> (c ->> 'field'))::numeric < (c ->> 'value')::numeric
      WHEN '<=' THEN (d ->> (c ->> 'field'))::numeric <= (c ->> 'value')::numeric
      WHEN '>' THEN (d ->> (c ->> 'field'))::numeric > (c ->> 'value')::numeric
      WHEN '>=' THEN (d ->> (c ->> 'field'))::numeric >= (c ->> 'value')::numeric
      WHEN 'in' THEN (c -> 'value') @> jsonb_build_array(d -> (c ->> 'field'))
      WHEN 'not_in' THEN NOT coalesce((c -> 'value') @> jsonb_build_array(d -> (c ->> 'field')), false)
      WHEN 'exists' THEN coalesce(d, '{}'::jsonb) ? (c ->> 'field') AND d -> (c ->> 'field') <> 'null'::jsonb
      WHEN 'not_exists' THEN NOT (coalesce(d, '{}'::jsonb) ? (c ->> 'field'))
    END, false)), true)
  FROM jsonb_array_elements(coalesce(conds, '[]'::jsonb)) c
$$
"""


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", JSONB(), nullable=False),
        sa.Column("trigger_kind", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("starts_at", TS, nullable=True),
        sa.Column("ends_at", TS, nullable=True),
        sa.Column("messages_sent", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("cost_spent", MONEY, server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("activated_at", TS, nullable=True),
        sa.Column("ended_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_campaigns"),
    )
    op.create_index("ix_campaigns_state", "campaigns", ["state"])
    op.create_table(
        "campaign_versions",
        sa.Column("campaign_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", JSONB(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "version", name="pk_campaign_versions"),
    )
    op.create_table(
        "customers",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("first_name", sa.Text(), nullable=True),
        sa.Column("timezone", sa.Text(), nullable=True),
        sa.Column("birth_date", sa.Date(), nullable=True),
        sa.Column("last_purchase_at", TS, nullable=True),
        sa.Column("purchases", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("digest", JSONB(), nullable=True),
        sa.Column("digest_at", TS, nullable=True),
        sa.Column("value_tier", sa.Text(), nullable=True),
        sa.Column("predicted_next_purchase", TS, nullable=True),
        sa.Column("margin", MONEY, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("customer_id", name="pk_customers"),
    )
    op.create_index("ix_customers_predicted_next_purchase", "customers", ["predicted_next_purchase"])
    op.create_index("ix_customers_last_purchase_at", "customers", ["last_purchase_at"])
    op.create_table(
        "customer_products",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("sku", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("category", sa.Text(), nullable=True),
        sa.Column("size", sa.Text(), nullable=True),
        sa.Column("color", sa.Text(), nullable=True),
        sa.Column("quantity", sa.Numeric(20, 4), nullable=False),
        sa.Column("last_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "sku", name="pk_customer_products"),
    )
    op.create_index("ix_customer_products_customer_id_category", "customer_products", ["customer_id", "category"])
    op.create_table(
        "memberships",
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("segment_key", sa.Text(), nullable=False),
        sa.Column("entered_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "segment_key", name="pk_memberships"),
    )
    op.create_index("ix_memberships_segment_key", "memberships", ["segment_key"])
    op.create_table(
        "timers",
        sa.Column("campaign_id", sa.Text(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("occurrence", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("due_at", TS, nullable=False),
        sa.Column("context", JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "customer_id", "occurrence", name="pk_timers"),
    )
    op.create_index("ix_timers_due_at", "timers", ["due_at"], postgresql_where=sa.text("state = 'waiting'"))
    op.create_index(
        "uq_timers_open",
        "timers",
        ["campaign_id", "customer_id"],
        unique=True,
        postgresql_where=sa.text("state = 'waiting'"),
    )
    op.create_index("ix_timers_customer_id", "timers", ["customer_id"], postgresql_where=sa.text("state = 'waiting'"))
    op.create_table(
        "decisions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("campaign_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.Text(), nullable=False),
        sa.Column("occurrence", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("cost", MONEY, nullable=True),
        sa.Column("variables", JSONB(), nullable=True),
        sa.Column("delivery_status", sa.Text(), nullable=True),
        sa.Column("delivery_reason", sa.Text(), nullable=True),
        sa.Column("delivery_channel", sa.Text(), nullable=True),
        sa.Column("delivery_cost", MONEY, nullable=True),
        sa.Column("delivery_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
        sa.UniqueConstraint("campaign_id", "customer_id", "occurrence", name="uq_decisions_occurrence"),
    )
    op.create_index("ix_decisions_customer_id_at", "decisions", ["customer_id", "at"])
    op.create_index(
        "ix_decisions_message_id", "decisions", ["message_id"], postgresql_where=sa.text("message_id IS NOT NULL")
    )
    op.create_index("ix_decisions_campaign_id_outcome", "decisions", ["campaign_id", "outcome"])
    op.execute(BUCKET_FN)
    op.execute(MATCH_FN)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS offers_match(jsonb, jsonb)")
    op.execute("DROP FUNCTION IF EXISTS offers_bucket(text, text)")
    for table in (
        "decisions",
        "timers",
        "memberships",
        "customer_products",
        "customers",
        "campaign_versions",
        "campaigns",
    ):
        op.drop_table(table)
