"""loyalty_redeem(): a new redemption applied in one statement (one round trip instead of five)

The function does what loyalty.redemptions.redeem does for a new redemption on an existing account with
spendable points, with the same rules: lock the account row, take the oldest spendable lots first
(expires_at, earned_at, id in code-point order), write the redemption, its lots, one immutable ledger entry,
the new balance and the `points.redeemed` outbox message, all in the caller's transaction. Every other case
(unknown account, nothing spendable, an id that exists: replay or 409) returns no row and changes nothing,
and the caller takes the general path in Python.
"""

from importlib import resources

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # The function's text as this migration first wrote it, kept as a frozen file beside the current one.
    op.execute((resources.files("loyalty") / "sql" / "loyalty_redeem_0003.sql").read_text(encoding="utf-8"))


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION loyalty_redeem(text, text, text, numeric, numeric, numeric, numeric, text, text, timestamptz, "
        "text, text, text)"
    )
