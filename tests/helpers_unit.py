"""Helpers for the unit tests: corpus files as parameters, stdlib parsing, queue rows, a sink."""

from __future__ import annotations

import email
import email.message
import email.policy
from collections.abc import Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from sqlalchemy.engine import Connection

from gateway.schema import State, contents, outbound, work
from tests.support import CORPUS, Sink

NO_CORPUS = f"the shared mail corpus is not at {CORPUS}; these tests need it"


def corpus_files(folder: str, *, known: Mapping[str, str] | None = None) -> list[Any]:
    """One pytest parameter per ``.eml`` file of a corpus folder, named by the file.

    ``known`` maps file names to the reason they are expected to fail today; those
    become strict xfails, so a fix shows up as an unexpected pass. With no corpus,
    a single parameter that skips and says why.
    """
    root = CORPUS / folder
    if not root.is_dir():
        return [pytest.param(None, id="no-corpus", marks=pytest.mark.skip(reason=NO_CORPUS))]
    known = known or {}
    params = []
    for path in sorted(root.glob("*.eml")):
        marks = ([pytest.mark.xfail(strict=True, reason=known[path.name])]
                 if path.name in known else [])
        params.append(pytest.param(path, id=path.name, marks=marks))
    return params


def parse_default(data: bytes) -> email.message.EmailMessage:
    """The stdlib's modern parse, as a member's mail client would read a message."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def add_rows(conn: Connection, table: sa.Table, count: int, *, due_at: float,
             created_at: float | None = None, **values: Any) -> list[int]:
    """Insert ``count`` ready queue rows (work or outbound) due at ``due_at``; their ids."""
    created = due_at if created_at is None else created_at
    base: dict[str, Any] = {
        "state": State.READY.value, "attempts": 0, "due_at": due_at, "lease_owner": None,
        "lease_until": None, "last_error": None, "created_at": created, "updated_at": created,
    }
    if table is work:
        base.update(stage="moderation", message_id=None, list_id=None, role="post",
                    address="discuss@example.org", detail=None, cursor=None, content_id=None)
    elif table is outbound:
        content_id = conn.execute(contents.insert().values(created_at=created, data=b"x")
                                  .returning(contents.c.id)).scalar_one()
        base.update(content_id=content_id, list_id=None, message_id=None, kind="post",
                    envelope_from="discuss-bounces@example.org",
                    recipients="alice@example.net", rcpt_count=1, tries=0, first_try_at=None)
    else:  # pragma: no cover - a test's mistake
        raise AssertionError(f"not a queue table: {table.name}")
    base.update(values)
    return list(conn.execute(table.insert().returning(table.c.id), [dict(base)] * count)
                .scalars())


class SizedSink(Sink):
    """The test sink advertising a smaller SIZE, so that limits are cheap to cross."""

    def __init__(self, size_limit: int, port: int | None = None) -> None:
        super().__init__(port)
        self.size_limit = size_limit

    def start(self) -> SizedSink:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                      data_size_limit=self.size_limit)
        self._controller.start()
        return self
