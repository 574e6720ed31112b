"""facts, profiles, segments, memberships, size history, feature statistics

Profiles are derived from facts (purchases, items, refunds, trait facts, deliveries) so that
duplicates, late and out-of-order events give the same profile: a fact is stored once by its
natural key and the profile is recomputed from all facts of the customer.
"""

from alembic import op

revision = "0002"
down_revision = "0001"

DDL = r"""
CREATE TABLE purchases (
    customer_id     text NOT NULL,
    order_id        text NOT NULL,
    message_id      text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    local_date      date NOT NULL,
    local_dow       smallint NOT NULL,
    local_hour      smallint NOT NULL,
    total           numeric(20,4) NOT NULL,
    gross           numeric(24,4) NOT NULL,
    discount        numeric(24,4) NOT NULL,
    cost            numeric(24,4),
    discounted      boolean NOT NULL,
    refunded_amount numeric(24,4) NOT NULL DEFAULT 0,
    CONSTRAINT pk_purchases PRIMARY KEY (customer_id, order_id)
);

CREATE TABLE purchase_items (
    customer_id  text NOT NULL,
    order_id     text NOT NULL,
    line         int NOT NULL,
    sku          text NOT NULL,
    name         text,
    category     text,
    size         text,
    color        text,
    quantity     numeric(20,4) NOT NULL,
    amount       numeric(24,4) NOT NULL,
    refunded_qty numeric(20,4) NOT NULL DEFAULT 0,
    occurred_at  timestamptz NOT NULL,
    local_date   date NOT NULL,
    local_dow    smallint NOT NULL,
    CONSTRAINT pk_purchase_items PRIMARY KEY (customer_id, order_id, line)
);
CREATE INDEX ix_purchase_items_customer_time ON purchase_items (customer_id, occurred_at);
CREATE INDEX ix_purchase_items_category_time ON purchase_items (category, occurred_at);

CREATE TABLE refunds (
    customer_id text NOT NULL,
    refund_id   text NOT NULL,
    order_id    text NOT NULL,
    amount      numeric(20,4) NOT NULL,
    occurred_at timestamptz NOT NULL,
    items       jsonb,
    CONSTRAINT pk_refunds PRIMARY KEY (customer_id, refund_id)
);

CREATE TABLE trait_facts (
    customer_id text NOT NULL,
    field       text NOT NULL,
    value       jsonb,
    occurred_at timestamptz NOT NULL,
    message_id  text NOT NULL,
    CONSTRAINT pk_trait_facts PRIMARY KEY (customer_id, field)
);

CREATE TABLE identities (
    anonymous_id text NOT NULL,
    customer_id  text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    CONSTRAINT pk_identities PRIMARY KEY (anonymous_id)
);

CREATE TABLE delivery_facts (
    message_id  text NOT NULL,
    status      text NOT NULL,
    customer_id text NOT NULL,
    channel     text,
    occurred_at timestamptz NOT NULL,
    CONSTRAINT pk_delivery_facts PRIMARY KEY (message_id, status)
);
CREATE INDEX ix_delivery_facts_customer ON delivery_facts (customer_id);

CREATE TABLE profiles (
    customer_id             text NOT NULL,
    traits                  jsonb NOT NULL DEFAULT '{}'::jsonb,
    consents                jsonb NOT NULL DEFAULT '{}'::jsonb,
    acquisition_channel     text,
    first_purchase_at       timestamptz,
    last_purchase_at        timestamptz,
    orders                  int NOT NULL DEFAULT 0,
    revenue                 numeric(24,4) NOT NULL DEFAULT 0,
    margin                  numeric(24,4) NOT NULL DEFAULT 0,
    avg_check               numeric(24,4),
    discount_share          double precision,
    discounted_orders_share double precision,
    discount_affinity       text,
    top_categories          jsonb NOT NULL DEFAULT '[]'::jsonb,
    favourite_category      text,
    favourite_product       jsonb,
    favourite_size          text,
    favourite_color         text,
    dow_counts              int[] NOT NULL DEFAULT '{0,0,0,0,0,0,0}',
    favourite_dow           smallint,
    favourite_hour          smallint,
    cadence_days            double precision,
    predicted_next_purchase timestamptz,
    lifecycle               text NOT NULL DEFAULT 'prospect',
    rfm_r                   smallint,
    rfm_f                   smallint,
    rfm_m                   smallint,
    rfm_group               text,
    value_tier              text,
    engagement              jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_feedback_rating    smallint,
    last_feedback_topic     text,
    last_feedback_at        timestamptz,
    updated_at              timestamptz NOT NULL,
    CONSTRAINT pk_profiles PRIMARY KEY (customer_id)
);

CREATE TABLE feature_stats (
    key        text NOT NULL,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT pk_feature_stats PRIMARY KEY (key)
);

CREATE TABLE segments (
    id          text NOT NULL,
    key         text NOT NULL,
    name        text NOT NULL,
    description text,
    rule        jsonb NOT NULL,
    builtin     boolean NOT NULL DEFAULT false,
    version     int NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    CONSTRAINT pk_segments PRIMARY KEY (id),
    CONSTRAINT uq_segments_key UNIQUE (key)
);

CREATE TABLE memberships (
    segment_id  text NOT NULL REFERENCES segments (id) ON DELETE CASCADE,
    customer_id text NOT NULL,
    entered_at  timestamptz NOT NULL,
    CONSTRAINT pk_memberships PRIMARY KEY (segment_id, customer_id)
);
CREATE INDEX ix_memberships_customer ON memberships (customer_id);

CREATE TABLE membership_log (
    id          bigint GENERATED BY DEFAULT AS IDENTITY,
    segment_id  text NOT NULL,
    customer_id text NOT NULL,
    change      text NOT NULL,
    at          timestamptz NOT NULL,
    CONSTRAINT pk_membership_log PRIMARY KEY (id)
);
CREATE INDEX ix_membership_log_segment ON membership_log (segment_id, at);

CREATE TABLE segment_sizes (
    segment_id text NOT NULL REFERENCES segments (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL,
    size       bigint NOT NULL,
    CONSTRAINT pk_segment_sizes PRIMARY KEY (segment_id, at)
);

-- Lifecycle by recency against the customer's own rhythm (cadence, at least a month).
CREATE FUNCTION seg_lifecycle(orders int, first_at timestamptz, last_at timestamptz, cadence double precision, now timestamptz)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN coalesce(orders, 0) = 0 OR last_at IS NULL THEN 'prospect'
        WHEN extract(epoch FROM now - last_at) / 86400 <= greatest(1.5 * coalesce(cadence, 30), 30) THEN
            CASE WHEN extract(epoch FROM now - first_at) / 86400 <= 30 THEN 'new' ELSE 'active' END
        WHEN extract(epoch FROM now - last_at) / 86400 <= greatest(3 * coalesce(cadence, 30), 60) THEN 'at_risk'
        WHEN extract(epoch FROM now - last_at) / 86400 <= greatest(6 * coalesce(cadence, 30), 180) THEN 'lapsed'
        ELSE 'lost'
    END
$$;

-- Who was lost: a regular (3+ orders), a new customer who came twice, or a one-off buyer.
CREATE FUNCTION seg_churn_kind(lifecycle text, orders int)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN lifecycle NOT IN ('lapsed', 'lost') THEN NULL
        WHEN orders >= 3 THEN 'regular'
        WHEN orders = 2 THEN 'new'
        ELSE 'one_off'
    END
$$;

-- A score 1..5 from four ascending cut points (higher value, higher score unless reversed).
CREATE FUNCTION seg_quintile(v double precision, cuts double precision[], reversed boolean)
RETURNS smallint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v IS NULL OR cuts IS NULL THEN NULL
                WHEN reversed THEN (5 - (SELECT count(*) FROM unnest(cuts) c WHERE v > c))::smallint
                ELSE (1 + (SELECT count(*) FROM unnest(cuts) c WHERE v > c))::smallint END
$$;

CREATE FUNCTION seg_rfm_group(r smallint, f smallint, m smallint)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN r IS NULL THEN NULL
        WHEN r >= 4 AND f >= 4 THEN 'champions'
        WHEN r >= 3 AND f >= 3 THEN 'loyal'
        WHEN r >= 4 AND f <= 2 THEN 'new_or_promising'
        WHEN r <= 2 AND f >= 4 THEN 'cant_lose'
        WHEN r <= 2 AND f >= 2 THEN 'at_risk'
        WHEN r <= 2 THEN 'hibernating'
        ELSE 'needs_attention'
    END
$$;
"""


def _statements(sql: str) -> list[str]:
    """Split on semicolons outside dollar-quoted function bodies (asyncpg runs one command at a time)."""
    out, buf = [], ""
    for part in sql.split(";"):
        buf = f"{buf};{part}" if buf else part
        if buf.count("$$") % 2 == 0:
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    return out


def upgrade() -> None:
    for statement in _statements(DDL):
        op.execute(statement)


def downgrade() -> None:
    for fn in (
        "seg_rfm_group(smallint, smallint, smallint)",
        "seg_quintile(double precision, double precision[], boolean)",
        "seg_churn_kind(text, int)",
        "seg_lifecycle(int, timestamptz, timestamptz, double precision, timestamptz)",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS {fn}")
    for table in (
        "segment_sizes",
        "membership_log",
        "memberships",
        "segments",
        "feature_stats",
        "profiles",
        "delivery_facts",
        "identities",
        "trait_facts",
        "refunds",
        "purchase_items",
        "purchases",
    ):
        op.drop_table(table)
