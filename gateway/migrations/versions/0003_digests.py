"""Digests and personal links: digest settings per list, batches, entries, personalize.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Plain ADD COLUMNs: a batch rebuild on SQLite would lose the tables' AUTOINCREMENT.
LIST_COLUMNS = (
    sa.Column("personalize", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("digest_schedule", sa.String(100), nullable=False, server_default="0 7 * * *"),
    sa.Column("digest_timezone", sa.String(64), nullable=False, server_default="UTC"),
    sa.Column("digest_max_posts", sa.Integer, nullable=False, server_default="50"),
    sa.Column("digest_max_bytes", sa.Integer, nullable=False, server_default="1000000"),
    sa.Column("digest_next_at", sa.Double, nullable=True),
)


def upgrade() -> None:
    # The web endpoint looks up a member's own earlier one-click unsubscription.
    op.create_index("ix_journal_list_id_event", "journal", ["list_id", "event"])
    for column in LIST_COLUMNS:
        op.add_column("lists", column)
    op.add_column("outbound", sa.Column("personalize", sa.Boolean, nullable=False,
                                        server_default=sa.false()))
    op.create_table(
        "digest_batches",
        sa.Column("id", Id, primary_key=True),
        sa.Column("list_id", Id, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("volume", sa.Integer, nullable=True),
        sa.Column("number", sa.Integer, nullable=True),
        sa.Column("posts", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("opened_at", sa.Double, nullable=False),
        sa.Column("closed_at", sa.Double, nullable=True),
        sa.Column("sent_at", sa.Double, nullable=True),
        sa.Column("mime_content_id", Id, nullable=True),
        sa.Column("plain_content_id", Id, nullable=True),
        sa.Column("html_content_id", Id, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_digest_batches"),
        *(sa.ForeignKeyConstraint([f"{fmt}_content_id"], ["contents.id"], ondelete="SET NULL",
                                  name=f"fk_digest_batches_{fmt}_content_id_contents")
          for fmt in ("mime", "plain", "html")),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_digest_batches_list_id_lists"),
        sa.UniqueConstraint("list_id", "volume", "number",
                            name="uq_digest_batches_list_id_volume_number"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_digest_batches_list_id_state", "digest_batches", ["list_id", "state"])
    op.create_index("uq_digest_batches_one_open", "digest_batches", ["list_id"], unique=True,
                    sqlite_where=sa.text("state = 'open'"),
                    postgresql_where=sa.text("state = 'open'"))
    op.create_table(
        "digest_entries",
        sa.Column("id", Id, primary_key=True),
        sa.Column("batch_id", Id, nullable=False),
        sa.Column("message_id", Id, nullable=False),
        sa.Column("added_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_digest_entries"),
        sa.ForeignKeyConstraint(["batch_id"], ["digest_batches.id"], ondelete="CASCADE",
                                name="fk_digest_entries_batch_id_digest_batches"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name="fk_digest_entries_message_id_messages"),
        sa.UniqueConstraint("batch_id", "message_id",
                            name="uq_digest_entries_batch_id_message_id"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_index("ix_journal_list_id_event", "journal")
    op.drop_table("digest_entries")
    op.drop_table("digest_batches")
    op.drop_column("outbound", "personalize")
    for column in reversed(LIST_COLUMNS):
        op.drop_column("lists", column.name)
