"""Indexes on the columns that point to a content: deleting a content that nothing
needs any more (after each delivery) no longer reads the whole work queue and every
digest issue, once in the query and again in the foreign-key checks.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_work_content_id", "work", "content_id"),
    ("ix_digest_batches_mime_content_id", "digest_batches", "mime_content_id"),
    ("ix_digest_batches_plain_content_id", "digest_batches", "plain_content_id"),
    ("ix_digest_batches_html_content_id", "digest_batches", "html_content_id"),
)


def upgrade() -> None:
    for name, table, column in INDEXES:
        op.create_index(name, table, [column])


def downgrade() -> None:
    for name, table, _column in reversed(INDEXES):
        op.drop_index(name, table)
