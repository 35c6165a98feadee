"""The journal: one record, and one log line, per thing that happens to a message."""

from __future__ import annotations

import logging

from sqlalchemy.engine import Connection

from gateway.routing import Stage
from gateway.schema import journal

# Built once: building a statement costs several times what running it does.
_INSERT = journal.insert()


def record(conn: Connection, *, now: float, stage: Stage, event: str, message_id: int | None,
           list_id: int | None, detail: str, log_message_id: str | None = None) -> None:
    conn.execute(_INSERT, {"at": now, "stage": stage.value, "event": event,
                           "message_id": message_id, "list_id": list_id,
                           "detail": detail[:4000]})
    logging.getLogger(f"gateway.{stage.value}").info(
        "%s queue_id=%s list_id=%s message_id=%s: %s",
        event, message_id, list_id, log_message_id or "-", detail)
