"""Moderation: held posts, confirmation tokens, sender standing, learned models, emergency.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # A plain ADD COLUMN: a batch (copy-and-rename) rebuild on SQLite would lose
    # the table's AUTOINCREMENT.
    op.add_column("lists", sa.Column("emergency", sa.Boolean, nullable=False,
                                     server_default=sa.false()))
    op.create_table(
        "held",
        sa.Column("id", Id, primary_key=True),
        sa.Column("message_id", Id, nullable=False),
        sa.Column("list_id", Id, nullable=False),
        sa.Column("poster", sa.String(320), nullable=False),
        sa.Column("subject", sa.String(500), nullable=False),
        sa.Column("reasons", sa.Text, nullable=False),
        sa.Column("promo_score", sa.Double, nullable=True),
        sa.Column("notify_poster", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("reminded_at", sa.Double, nullable=True),
        sa.Column("decided_at", sa.Double, nullable=True),
        sa.Column("decided_by", sa.String(320), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_held"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name="fk_held_message_id_messages"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_held_list_id_lists"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_held_list_id_state", "held", ["list_id", "state"])
    op.create_index("ix_held_state_expires_at", "held", ["state", "expires_at"])
    op.create_table(
        "tokens",
        sa.Column("id", Id, primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("list_id", Id, nullable=False),
        sa.Column("held_id", Id, nullable=True),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("used_at", sa.Double, nullable=True),
        sa.Column("used_by", sa.String(320), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("digest", name="uq_tokens_digest"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_tokens_list_id_lists"),
        sa.ForeignKeyConstraint(["held_id"], ["held.id"], ondelete="CASCADE",
                                name="fk_tokens_held_id_held"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "senders",
        sa.Column("id", Id, primary_key=True),
        sa.Column("list_id", Id, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("trusted", sa.Boolean, nullable=False),
        sa.Column("banned", sa.Boolean, nullable=False),
        sa.Column("approved", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_senders"),
        sa.UniqueConstraint("list_id", "address", name="uq_senders_list_id_address"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_senders_list_id_lists"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "list_models",
        sa.Column("list_id", Id, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("decisions", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("list_id", name="pk_list_models"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_list_models_list_id_lists"),
    )


def downgrade() -> None:
    for table in ("list_models", "senders", "tokens", "held"):
        op.drop_table(table)
    op.drop_column("lists", "emergency")
