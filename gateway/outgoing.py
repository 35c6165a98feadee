"""Putting mail on the outbound queue: content once, then one row per recipient batch."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.schema import BatchState, State, contents, digest_batches, outbound, work


class Kind(enum.Enum):
    """What an outbound message is; the delivery log and bounce handling tell them apart."""

    POST = "post"
    NOTICE = "notice"
    DIGEST = "digest"
    FORWARD = "forward"


# The statements of every post's way out, built once: building a statement costs
# several times what running it does.
_ADD_CONTENT = contents.insert().returning(contents.c.id)
_ENQUEUE = outbound.insert()
_unused: sa.BindParameter[int] = sa.bindparam("content_id")
DROP_UNUSED_CONTENT = sa.delete(contents).where(
    contents.c.id == _unused,
    ~sa.exists().where(outbound.c.content_id == _unused),
    ~sa.exists().where(work.c.content_id == _unused),
    ~sa.exists().where(digest_batches.c.state != BatchState.SENT.value,
                       sa.or_(digest_batches.c.mime_content_id == _unused,
                              digest_batches.c.plain_content_id == _unused,
                              digest_batches.c.html_content_id == _unused)),
)


def add_content(conn: Connection, data: bytes, *, now: float, auth: str | None = None) -> int:
    """Store content to send; ``auth`` is the post's authentication results (JSON), for
    the ARC set each copy gets."""
    return int(conn.execute(_ADD_CONTENT,
                            {"created_at": now, "data": data, "auth": auth}).scalar_one())


def enqueue(conn: Connection, *, content_id: int, envelope_from: str, recipients: Sequence[str],
            kind: Kind, list_id: int | None, message_id: int | None, now: float,
            batch: int, personalize: bool = False) -> int:
    """One outbound row per ``batch`` recipients; returns the number of rows.

    Personalised rows name each recipient as "address member_id": delivery sends each
    their own copy, the content's placeholder replaced by their member token.
    """
    rows = [
        {
            "content_id": content_id, "list_id": list_id, "message_id": message_id,
            "kind": kind.value, "envelope_from": envelope_from,
            "recipients": "\n".join(recipients[i:i + batch]),
            "rcpt_count": len(recipients[i:i + batch]), "tries": 0, "first_try_at": None,
            "personalize": personalize,
            "state": State.READY.value, "attempts": 0, "due_at": now, "lease_owner": None,
            "lease_until": None, "last_error": None, "created_at": now, "updated_at": now,
        }
        for i in range(0, len(recipients), batch)
    ]
    if rows:
        conn.execute(_ENQUEUE, rows)
    return len(rows)


def send(conn: Connection, data: bytes, *, envelope_from: str, recipients: Sequence[str],
         kind: Kind, list_id: int | None, message_id: int | None, now: float,
         batch: int = 100) -> int:
    """Queue one message for some recipients: the usual way to send a notice."""
    content_id = add_content(conn, data, now=now)
    return enqueue(conn, content_id=content_id, envelope_from=envelope_from,
                   recipients=recipients, kind=kind, list_id=list_id, message_id=message_id,
                   now=now, batch=batch)


def drop_unused_content(conn: Connection, content_id: int) -> None:
    """Delete content that no outbound row, no unfinished work and no digest batch still
    being sent needs (a sent batch just loses its pointer)."""
    conn.execute(DROP_UNUSED_CONTENT, {"content_id": content_id})
