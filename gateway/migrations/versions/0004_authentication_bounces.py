"""Authentication and bounces: DMARC mitigation per list, ARC results on contents,
bounce scores on members, bounce events, processed delivery failures.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Plain ADD COLUMNs: a batch rebuild on SQLite would lose the tables' AUTOINCREMENT.
MEMBER_COLUMNS = (
    sa.Column("bounce_score", sa.Double, nullable=False, server_default="0"),
    sa.Column("bounce_last_at", sa.Double, nullable=True),
    sa.Column("disabled_at", sa.Double, nullable=True),
    sa.Column("disabled_reason", sa.String(200), nullable=True),
    sa.Column("probe_sent_at", sa.Double, nullable=True),
)


def upgrade() -> None:
    op.add_column("lists", sa.Column("dmarc_mitigation", sa.String(8), nullable=False,
                                     server_default="rewrite"))
    for column in MEMBER_COLUMNS:
        op.add_column("members", column)
    op.add_column("contents", sa.Column("auth", sa.Text, nullable=True))
    op.add_column("delivery_failures", sa.Column("processed", sa.Boolean, nullable=False,
                                                 server_default=sa.false()))
    op.create_index("ix_delivery_failures_processed", "delivery_failures", ["processed"])
    op.create_table(
        "bounce_events",
        sa.Column("id", Id, primary_key=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("list_id", Id, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("permanent", sa.Boolean, nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("counted", sa.Boolean, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bounce_events"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_bounce_events_list_id_lists"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_bounce_events_list_id_address", "bounce_events", ["list_id", "address"])


def downgrade() -> None:
    op.drop_table("bounce_events")
    op.drop_index("ix_delivery_failures_processed", "delivery_failures")
    op.drop_column("delivery_failures", "processed")
    op.drop_column("contents", "auth")
    for column in reversed(MEMBER_COLUMNS):
        op.drop_column("members", column.name)
    op.drop_column("lists", "dmarc_mitigation")
