"""publish queue of the archive: one row per accepted batch instead of one per event

A batch of 500 events queued as 500 rows costs 500 index entries on insert and 500 index
lookups and dead tuples on delete; as one row holding the 500 sequence numbers it costs one.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"

# Queued events carried over from the per-event queue, this many to a row.
_CHUNK = 1000


def upgrade() -> None:
    op.create_table(
        "event_pending_batches",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("seqs", postgresql.ARRAY(sa.BigInteger), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_event_pending_batches"),
        sa.CheckConstraint("n = cardinality(seqs) AND n > 0", name="ck_event_pending_batches_n"),
    )
    op.execute(
        f"""
        INSERT INTO event_pending_batches (n, seqs)
        SELECT count(*), array_agg(seq ORDER BY seq)
        FROM (SELECT seq, (row_number() OVER (ORDER BY seq) - 1) / {_CHUNK} AS chunk FROM event_pending) q
        GROUP BY chunk ORDER BY chunk
        """
    )
    op.drop_table("event_pending")


def downgrade() -> None:
    op.create_table(
        "event_pending",
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_event_pending"),
    )
    op.execute("INSERT INTO event_pending (seq) SELECT DISTINCT unnest(seqs) FROM event_pending_batches")
    op.drop_table("event_pending_batches")
