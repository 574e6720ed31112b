"""default templates for the transactional and loyalty messages other services request

Loyalty asks for `points_expiring` (transactional) and `loyalty_goal_offer` (marketing); without a
template such a message would fail with `template_not_found`. These English defaults can be edited
or replaced through the templates API; an existing template for the same slot is never touched.
"""

import json
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"

EXPIRING_VARS = ["points", "amount", "expires_on"]
EXPIRING_SAMPLE = {"points": "250.00", "amount": "2.50", "expires_on": "2026-07-01"}
GOAL_VARS = ["purchases", "days", "reward_points", "reward_value", "due_date"]
GOAL_SAMPLE = {"purchases": 3, "days": 30, "reward_points": "300.00", "reward_value": "3.00", "due_date": "2026-07-01"}

DEFAULTS = [
    (
        "points_expiring",
        "email",
        "{{ points }} bonus points expire on {{ expires_on }}",
        "Hello,\n\n{{ points }} of your bonus points (worth {{ amount }}) expire on {{ expires_on }}.\n"
        "Use them on your next purchase.",
        EXPIRING_VARS,
        EXPIRING_SAMPLE,
    ),
    (
        "points_expiring",
        "sms",
        None,
        "{{ points }} bonus points (worth {{ amount }}) expire on {{ expires_on }}. Use them on your next purchase.",
        EXPIRING_VARS,
        EXPIRING_SAMPLE,
    ),
    (
        "points_expiring",
        "push",
        "Your points expire soon",
        "{{ points }} points (worth {{ amount }}) expire on {{ expires_on }}.",
        EXPIRING_VARS,
        EXPIRING_SAMPLE,
    ),
    (
        "loyalty_goal_offer",
        "email",
        "Earn {{ reward_points }} bonus points",
        "Hello,\n\nmake {{ purchases }} purchases in the next {{ days }} days (by {{ due_date }}) and earn "
        "{{ reward_points }} bonus points (worth {{ reward_value }}).",
        GOAL_VARS,
        GOAL_SAMPLE,
    ),
    (
        "loyalty_goal_offer",
        "sms",
        None,
        "{{ purchases }} purchases by {{ due_date }} earn you {{ reward_points }} bonus points (worth {{ reward_value }}).",
        GOAL_VARS,
        GOAL_SAMPLE,
    ),
    (
        "loyalty_goal_offer",
        "push",
        "A goal for you",
        "{{ purchases }} purchases by {{ due_date }}: {{ reward_points }} bonus points.",
        GOAL_VARS,
        GOAL_SAMPLE,
    ),
]


def upgrade() -> None:
    conn = op.get_bind()
    for key, channel, subject, body, variables, sample in DEFAULTS:
        conn.execute(
            sa.text(
                "INSERT INTO templates (id, key, channel, locale, subject, body, html, variables, sample, version,"
                " created_at, updated_at) VALUES (:id, :key, :channel, 'en', :subject, :body, NULL,"
                " CAST(:variables AS jsonb), CAST(:sample AS jsonb), 1, now(), now())"
                " ON CONFLICT (key, channel, locale) DO NOTHING"
            ),
            {
                "id": uuid.uuid4().hex,
                "key": key,
                "channel": channel,
                "subject": subject,
                "body": body,
                "variables": json.dumps(variables),
                "sample": json.dumps(sample),
            },
        )


def downgrade() -> None:
    op.execute(
        "DELETE FROM templates WHERE locale = 'en' AND version = 1 AND key IN ('points_expiring', 'loyalty_goal_offer')"
    )
