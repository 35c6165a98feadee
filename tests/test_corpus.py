"""Real, odd mail over a real SMTP session: every message gets a clear answer and an end."""

from __future__ import annotations

import csv
import smtplib
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.schema import State, journal, outbound, work
from gateway.store import Store
from tests.conftest import LIST, MEMBERS
from tests.support import Sink, as_sent, gateway, wait_until

# What the moderation and fanout stages may end a post with.
TERMINAL = {"fanned-out", "discard", "reject", "dropped"}


def odd_files(corpus: Path) -> list[Path]:
    with open(corpus / "odd" / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        return [corpus / "odd" / row["file"] for row in csv.DictReader(f, delimiter="\t")]


def test_corpus_every_odd_message_is_answered_and_ends_somewhere(
        corpus: Path, config_path: Path, sink: Sink, store: Store) -> None:
    files = odd_files(corpus)
    assert len(files) > 200
    replies: dict[str, tuple[int, str]] = {}
    with gateway(config_path) as gw:
        with gw.smtp() as client:
            for path in files:
                # The envelope sender is a member, so moderation lets most through and
                # fanout decorates them: that is the path that has to survive odd MIME.
                try:
                    client.sendmail(MEMBERS[1], LIST, as_sent(path.read_bytes()))
                    replies[path.name] = (250, "")
                except smtplib.SMTPResponseException as exc:
                    replies[path.name] = (exc.smtp_code, exc.smtp_error.decode())
                    client.rset()

        def drained() -> bool:
            with store.read() as conn:
                left = conn.execute(sa.select(sa.func.count()).select_from(work)).scalar_one()
                left += conn.execute(sa.select(sa.func.count()).select_from(outbound)
                                     ).scalar_one()
            return left == 0

        wait_until(drained, timeout=120, what="every accepted message to be processed")

    refused = {name: r for name, r in replies.items() if r[0] != 250}
    # Only an empty message is refused (554 5.6.0, "nothing was sent"); whatever else
    # arrives is taken, however odd.
    for name, (code, text) in refused.items():
        assert (corpus / "odd" / name).read_bytes().strip() == b"", (name, code, text)
        assert code == 554 and text.startswith("5.6.0"), (name, code, text)
    accepted = len(replies) - len(refused)
    with store.read() as conn:
        ends = conn.execute(sa.select(journal.c.message_id, journal.c.event)).all()
        parked = conn.execute(sa.select(sa.func.count()).select_from(work).where(
            work.c.state == State.PARKED.value)).scalar_one()
    ended = {mid for mid, event in ends if event in TERMINAL}
    assert len(ended) == accepted  # every 250 reached an end, recorded in the journal
    assert parked == 0
    fanned_out = sum(1 for _mid, event in ends if event == "fanned-out")
    assert sink.handler.count() == fanned_out * len(MEMBERS)
    assert fanned_out > 0.9 * accepted


# Every address role but posts (above) and bounces (tests/test_bounces.py reads both
# corpora at the bounces addresses).
ROLE_ADDRESSES = ["discuss-request@example.org", "discuss-join@example.org",
                  "discuss-leave@example.org", "discuss-owner@example.org",
                  "discuss-confirm+" + "a" * 32 + "@example.org"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_corpus_every_odd_message_to_every_role_is_answered_and_ends_somewhere(
        corpus: Path, config_path: Path, sink: Sink, store: Store) -> None:
    """Commands, confirmations and owner mail read with the stdlib's parser and our
    own: whatever arrives at any role address gets a clear reply, is handled or
    recorded, and leaves nothing behind in the queue."""
    files = odd_files(corpus)
    accepted: list[tuple[str, str]] = []
    with gateway(config_path) as gw:
        for path in files:
            data = as_sent(path.read_bytes())
            with gw.smtp() as client:  # a session's transactions are capped at 1000
                for rcpt in ROLE_ADDRESSES:
                    try:
                        client.sendmail(MEMBERS[1], rcpt, data)
                        accepted.append((path.name, rcpt))
                    except smtplib.SMTPResponseException as exc:
                        assert data.strip() == b"", (path.name, rcpt, exc)
                        assert exc.smtp_code == 554, (path.name, rcpt, exc)
                        client.rset()

        def drained() -> bool:
            with store.read() as conn:
                return conn.execute(sa.select(sa.func.count()).select_from(work).where(
                    work.c.state != State.PARKED.value)).scalar_one() == 0

        wait_until(drained, timeout=180, what="every accepted message to be handled")
    with store.read() as conn:
        parked = conn.execute(sa.select(work.c.role, work.c.last_error).where(
            work.c.state == State.PARKED.value)).all()
        recorded = conn.execute(sa.select(sa.func.count(sa.distinct(journal.c.message_id)))
                                ).scalar_one()
    assert parked == []
    assert len(accepted) > 4 * len(files)
    assert recorded == len(accepted)  # each one's end is in the journal
