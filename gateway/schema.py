"""The store's tables. Alembic migrations under ``gateway/migrations`` build the same."""

from __future__ import annotations

import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import false as sa_false
from sqlalchemy import true as sa_true

# SQLite only auto-numbers an INTEGER PRIMARY KEY; PostgreSQL gets 64 bits. Every table
# is created with sqlite_autoincrement: SQLite would otherwise hand a deleted row's id to
# the next row, and an id must name one thing forever (queue ids in logs, cached contents).
Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})


class State(enum.Enum):
    """Where a queue row is: waiting, being worked on under a lease, or parked."""

    READY = "ready"
    CLAIMED = "claimed"
    PARKED = "parked"


class Mode(enum.Enum):
    """How a member receives the list's mail."""

    REGULAR = "regular"
    DIGEST_MIME = "digest-mime"
    DIGEST_PLAIN = "digest-plain"
    DIGEST_HTML = "digest-html"
    NOMAIL = "nomail"


class RoleName(enum.Enum):
    """Who runs a list, besides its members."""

    OWNER = "owner"
    MODERATOR = "moderator"


lists = Table(
    "lists", metadata,
    Column("id", Id, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("domain", String(253), nullable=False),
    Column("display_name", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("subject_prefix", String(100), nullable=False),
    Column("archive_url", String(500), nullable=True),
    Column("created_at", Double, nullable=False),
    Column("emergency", Boolean, nullable=False, server_default=sa_false()),
    # Per-member links (RFC 8058 one-click) mean one SMTP transaction per member.
    Column("personalize", Boolean, nullable=False, server_default=sa_true()),
    Column("digest_schedule", String(100), nullable=False, server_default="0 7 * * *"),
    Column("digest_timezone", String(64), nullable=False, server_default="UTC"),
    Column("digest_max_posts", Integer, nullable=False, server_default="50"),
    Column("digest_max_bytes", Integer, nullable=False, server_default="1000000"),
    Column("digest_next_at", Double, nullable=True),
    # When the poster's domain publishes DMARC p=reject/quarantine: "rewrite" From to the
    # list, "wrap" the post as an attachment, or "none" (RFC 7960).
    Column("dmarc_mitigation", String(8), nullable=False, server_default="rewrite"),
    UniqueConstraint("name", "domain"),
    sqlite_autoincrement=True,
)

members = Table(
    "members", metadata,
    Column("id", Id, primary_key=True),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("address", String(320), nullable=False),
    Column("display_name", String(200), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", Double, nullable=False),
    # Bounce scoring (as GNU Mailman): hard bounces count 1, soft 0.5, one per day;
    # a stale score starts over; past the threshold delivery is disabled.
    Column("bounce_score", Double, nullable=False, server_default="0"),
    Column("bounce_last_at", Double, nullable=True),
    Column("disabled_at", Double, nullable=True),
    Column("disabled_reason", String(200), nullable=True),
    Column("probe_sent_at", Double, nullable=True),
    UniqueConstraint("list_id", "address"),
    Index(None, "list_id", "mode", "id"),
    sqlite_autoincrement=True,
)

roles = Table(
    "roles", metadata,
    Column("id", Id, primary_key=True),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("address", String(320), nullable=False),
    Column("role", String(16), nullable=False),
    UniqueConstraint("list_id", "address", "role"),
    sqlite_autoincrement=True,
)

# One row per accepted SMTP/LMTP transaction: the raw bytes exactly as received.
messages = Table(
    "messages", metadata,
    Column("id", Id, primary_key=True),
    Column("received_at", Double, nullable=False),
    Column("mail_from", String(320), nullable=False),
    Column("rcpt_tos", Text, nullable=False),
    Column("peer", String(100), nullable=False),
    Column("helo", String(255), nullable=False),
    Column("protocol", String(8), nullable=False),
    Column("size", Integer, nullable=False),
    Column("message_id", String(998), nullable=True),
    Column("raw", LargeBinary, nullable=False),
    sqlite_autoincrement=True,
)

# Decorated bytes to send, shared by all the outbound rows of one post, notice or digest.
contents = Table(
    "contents", metadata,
    Column("id", Id, primary_key=True),
    Column("created_at", Double, nullable=False),
    Column("data", LargeBinary, nullable=False),
    # How the post as received authenticated (JSON), for the ARC set each copy gets.
    Column("auth", Text, nullable=True),
    sqlite_autoincrement=True,
)


def _queue_columns() -> list[Column[object]]:
    """The columns every queue table has: state, lease, attempts, schedule."""
    return [
        Column("state", String(8), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("due_at", Double, nullable=False),
        Column("lease_owner", String(100), nullable=True),
        Column("lease_until", Double, nullable=True),
        Column("last_error", Text, nullable=True),
        Column("created_at", Double, nullable=False),
        Column("updated_at", Double, nullable=False),
    ]


# Work for the stages before delivery: one row per (message, recipient address).
work = Table(
    "work", metadata,
    Column("id", Id, primary_key=True),
    Column("stage", String(16), nullable=False),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=True),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="SET NULL"), nullable=True),
    Column("role", String(16), nullable=False),
    Column("address", String(320), nullable=False),
    Column("detail", String(500), nullable=True),
    Column("cursor", BigInteger, nullable=True),
    Column("content_id", Id, ForeignKey("contents.id"), nullable=True),
    *_queue_columns(),
    Index(None, "stage", "state", "due_at"),
    # Deleting a content checks that no row points to it (outgoing.drop_unused_content,
    # and the foreign keys): by index, not by reading every row of a backlog.
    Index(None, "content_id"),
    sqlite_autoincrement=True,
)

# Mail to hand to the smarthost: one row per SMTP transaction (a recipient batch).
outbound = Table(
    "outbound", metadata,
    Column("id", Id, primary_key=True),
    Column("content_id", Id, ForeignKey("contents.id"), nullable=False),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="SET NULL"), nullable=True),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=True),
    Column("kind", String(16), nullable=False),
    Column("envelope_from", String(320), nullable=False),
    Column("recipients", Text, nullable=False),
    Column("rcpt_count", Integer, nullable=False),
    # Each recipient gets their own copy, with the content's placeholder replaced by
    # their member token; recipients are then "address member_id" lines.
    Column("personalize", Boolean, nullable=False, server_default=sa_false()),
    Column("tries", Integer, nullable=False),
    Column("first_try_at", Double, nullable=True),
    *_queue_columns(),
    Index(None, "state", "due_at"),
    Index(None, "content_id"),
    sqlite_autoincrement=True,
)

# Recipients the smarthost refused: the raw material of bounce handling.
delivery_failures = Table(
    "delivery_failures", metadata,
    Column("id", Id, primary_key=True),
    Column("at", Double, nullable=False),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=True),
    Column("address", String(320), nullable=False),
    Column("code", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("permanent", Boolean, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("processed", Boolean, nullable=False, server_default=sa_false()),
    Index(None, "list_id", "address"),
    Index(None, "processed"),
    sqlite_autoincrement=True,
)

# What happened to each message at each stage, for `queue show` and audits.
journal = Table(
    "journal", metadata,
    Column("id", Id, primary_key=True),
    Column("at", Double, nullable=False),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=True),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="SET NULL"), nullable=True),
    Column("stage", String(16), nullable=False),
    Column("event", String(32), nullable=False),
    Column("detail", Text, nullable=False),
    Index(None, "message_id"),
    Index(None, "list_id", "event"),
    sqlite_autoincrement=True,
)

class HeldState(enum.Enum):
    """Where a held post stands. Only HELD can change, and only once."""

    HELD = "held"
    APPROVED = "approved"
    REJECTED = "rejected"
    DISCARDED = "discarded"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"


# Posts waiting for a moderator, with every reason the chain collected.
held = Table(
    "held", metadata,
    Column("id", Id, primary_key=True),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=False),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("poster", String(320), nullable=False),
    Column("subject", String(500), nullable=False),
    Column("reasons", Text, nullable=False),
    Column("promo_score", Double, nullable=True),
    Column("notify_poster", Boolean, nullable=False),
    Column("state", String(12), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("reminded_at", Double, nullable=True),
    Column("decided_at", Double, nullable=True),
    Column("decided_by", String(320), nullable=True),
    Column("note", Text, nullable=True),
    Index(None, "list_id", "state"),
    Index(None, "state", "expires_at"),
    sqlite_autoincrement=True,
)

# Capabilities sent by mail (LIST-confirm+TOKEN@): only their SHA-256 is stored.
tokens = Table(
    "tokens", metadata,
    Column("id", Id, primary_key=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("held_id", Id, ForeignKey("held.id", ondelete="CASCADE"), nullable=True),
    Column("address", String(320), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("used_at", Double, nullable=True),
    Column("used_by", String(320), nullable=True),
    sqlite_autoincrement=True,
)

# What moderators decided about a sender on a list: trusted, banned, posts approved.
senders = Table(
    "senders", metadata,
    Column("id", Id, primary_key=True),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("address", String(320), nullable=False),
    Column("trusted", Boolean, nullable=False),
    Column("banned", Boolean, nullable=False),
    Column("approved", Integer, nullable=False),
    Column("rejected", Integer, nullable=False),
    Column("updated_at", Double, nullable=False),
    UniqueConstraint("list_id", "address"),
    sqlite_autoincrement=True,
)

# Each list's own learning on top of the shipped promotional model.
list_models = Table(
    "list_models", metadata,
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True),
    Column("model", Text, nullable=False),
    Column("decisions", Integer, nullable=False),
    Column("updated_at", Double, nullable=False),
)

class BatchState(enum.Enum):
    """A digest batch collects posts while open; closed, it is sent once."""

    OPEN = "open"
    CLOSED = "closed"
    SENT = "sent"


digest_batches = Table(
    "digest_batches", metadata,
    Column("id", Id, primary_key=True),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("state", String(8), nullable=False),
    Column("volume", Integer, nullable=True),
    Column("number", Integer, nullable=True),
    Column("posts", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("opened_at", Double, nullable=False),
    Column("closed_at", Double, nullable=True),
    Column("sent_at", Double, nullable=True),
    # The issue rendered once per format, with the member placeholder in its links.
    Column("mime_content_id", Id, ForeignKey("contents.id", ondelete="SET NULL"), nullable=True),
    Column("plain_content_id", Id, ForeignKey("contents.id", ondelete="SET NULL"),
           nullable=True),
    Column("html_content_id", Id, ForeignKey("contents.id", ondelete="SET NULL"), nullable=True),
    UniqueConstraint("list_id", "volume", "number"),
    Index(None, "list_id", "state"),
    Index(None, "mime_content_id"),
    Index(None, "plain_content_id"),
    Index(None, "html_content_id"),
    # At most one open batch per list, even with several gateways adding posts at once.
    Index("uq_digest_batches_one_open", "list_id", unique=True,
          sqlite_where=text("state = 'open'"), postgresql_where=text("state = 'open'")),
    sqlite_autoincrement=True,
)

digest_entries = Table(
    "digest_entries", metadata,
    Column("id", Id, primary_key=True),
    Column("batch_id", Id, ForeignKey("digest_batches.id", ondelete="CASCADE"), nullable=False),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=False),
    Column("added_at", Double, nullable=False),
    UniqueConstraint("batch_id", "message_id"),
    sqlite_autoincrement=True,
)

# Every bounce attributed to a member: from a DSN, a VERP address, or the smarthost's 5xx.
bounce_events = Table(
    "bounce_events", metadata,
    Column("id", Id, primary_key=True),
    Column("at", Double, nullable=False),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("address", String(320), nullable=False),
    Column("permanent", Boolean, nullable=False),
    Column("source", String(8), nullable=False),  # "dsn", "verp", "smtp", "probe"
    Column("counted", Boolean, nullable=False),  # False: same day as the last counted one
    Column("detail", Text, nullable=False),
    Index(None, "list_id", "address"),
    sqlite_autoincrement=True,
)

QUEUE_TABLES = {"work": work, "outbound": outbound}
