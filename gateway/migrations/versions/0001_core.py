"""Core tables: lists, members, roles, messages, contents, work, outbound, failures, journal.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _queue_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("due_at", sa.Double, nullable=False),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        sa.Column("lease_until", sa.Double, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "lists",
        sa.Column("id", Id, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("subject_prefix", sa.String(100), nullable=False),
        sa.Column("archive_url", sa.String(500), nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_lists"),
        sa.UniqueConstraint("name", "domain", name="uq_lists_name_domain"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_table(
        "members",
        sa.Column("id", Id, primary_key=True),
        sa.Column("list_id", Id, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_members"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_members_list_id_lists"),
        sa.UniqueConstraint("list_id", "address", name="uq_members_list_id_address"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_index("ix_members_list_id_mode_id", "members", ["list_id", "mode", "id"])
    op.create_table(
        "roles",
        sa.Column("id", Id, primary_key=True),
        sa.Column("list_id", Id, nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_roles"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_roles_list_id_lists"),
        sa.UniqueConstraint("list_id", "address", "role", name="uq_roles_list_id_address_role"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_table(
        "messages",
        sa.Column("id", Id, primary_key=True),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("mail_from", sa.String(320), nullable=False),
        sa.Column("rcpt_tos", sa.Text, nullable=False),
        sa.Column("peer", sa.String(100), nullable=False),
        sa.Column("helo", sa.String(255), nullable=False),
        sa.Column("protocol", sa.String(8), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("message_id", sa.String(998), nullable=True),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_table(
        "contents",
        sa.Column("id", Id, primary_key=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_contents"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_table(
        "work",
        sa.Column("id", Id, primary_key=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("message_id", Id, nullable=True),
        sa.Column("list_id", Id, nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("detail", sa.String(500), nullable=True),
        sa.Column("cursor", sa.BigInteger, nullable=True),
        sa.Column("content_id", Id, nullable=True),
        *_queue_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_work"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name="fk_work_message_id_messages"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="SET NULL",
                                name="fk_work_list_id_lists"),
        sa.ForeignKeyConstraint(["content_id"], ["contents.id"],
                                name="fk_work_content_id_contents"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_index("ix_work_stage_state_due_at", "work", ["stage", "state", "due_at"])
    op.create_table(
        "outbound",
        sa.Column("id", Id, primary_key=True),
        sa.Column("content_id", Id, nullable=False),
        sa.Column("list_id", Id, nullable=True),
        sa.Column("message_id", Id, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("envelope_from", sa.String(320), nullable=False),
        sa.Column("recipients", sa.Text, nullable=False),
        sa.Column("rcpt_count", sa.Integer, nullable=False),
        sa.Column("tries", sa.Integer, nullable=False),
        sa.Column("first_try_at", sa.Double, nullable=True),
        *_queue_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_outbound"),
        sa.ForeignKeyConstraint(["content_id"], ["contents.id"],
                                name="fk_outbound_content_id_contents"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="SET NULL",
                                name="fk_outbound_list_id_lists"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name="fk_outbound_message_id_messages"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_index("ix_outbound_state_due_at", "outbound", ["state", "due_at"])
    op.create_index("ix_outbound_content_id", "outbound", ["content_id"])
    op.create_table(
        "delivery_failures",
        sa.Column("id", Id, primary_key=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("list_id", Id, nullable=True),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("code", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("permanent", sa.Boolean, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_failures"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="CASCADE",
                                name="fk_delivery_failures_list_id_lists"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_index("ix_delivery_failures_list_id_address", "delivery_failures",
                    ["list_id", "address"])
    op.create_table(
        "journal",
        sa.Column("id", Id, primary_key=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("message_id", Id, nullable=True),
        sa.Column("list_id", Id, nullable=True),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_journal"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"],
                                name="fk_journal_message_id_messages"),
        sa.ForeignKeyConstraint(["list_id"], ["lists.id"], ondelete="SET NULL",
                                name="fk_journal_list_id_lists"),
        sqlite_autoincrement=True,  # ids are never reused: see gateway/schema.py
    )
    op.create_index("ix_journal_message_id", "journal", ["message_id"])


def downgrade() -> None:
    for table in ("journal", "delivery_failures", "outbound", "work", "contents", "messages",
                  "roles", "members", "lists"):
        op.drop_table(table)
