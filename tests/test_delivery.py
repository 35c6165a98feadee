"""The delivery stage through the real daemon: retries, failures, lifetime, batching.

Time is a ManualClock: a retry becomes due when the test advances the clock, and
the test then waits for the daemon to act on it (it never sleeps for a schedule).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway import lists
from gateway.clock import ManualClock
from gateway.config import Seconds, load
from gateway.schema import Mode, State, contents, delivery_failures, outbound
from gateway.store import Store
from tests.conftest import LIST, MEMBERS
from tests.support import Sink, gateway, post, wait_until

RETRY_INITIAL = 60.0  # [delivery] retry_initial in tests.support.write_config
ALICE, BOB, CAROL = MEMBERS


@pytest.fixture(autouse=True)
def bulk_delivery(config_path: Path, store: Store) -> None:
    """These tests are about SMTP transactions: the list in bulk mode, so that one
    transaction carries many recipients (per-member links would give each their own)."""
    with store.write() as conn:
        lists.update(conn, lists.get(conn, LIST), personalize=False)


def outbound_rows(store: Store) -> list[sa.Row[tuple[object, ...]]]:
    with store.read() as conn:
        return list(conn.execute(sa.select(outbound).order_by(outbound.c.id)).all())


def failures(store: Store) -> list[sa.Row[tuple[object, ...]]]:
    with store.read() as conn:
        return list(conn.execute(sa.select(delivery_failures)
                                 .order_by(delivery_failures.c.address)).all())


def waiting_row(store: Store, *, tries: int) -> sa.Row[tuple[object, ...]]:
    """Wait until the one outbound row is back in the queue after ``tries`` attempts."""
    def ready() -> bool:
        rows = outbound_rows(store)
        return (len(rows) == 1 and rows[0].state == State.READY.value
                and rows[0].tries == tries)
    wait_until(ready, what=f"the outbound row to wait for a retry after {tries} tries "
                           f"(rows: {outbound_rows(store)})")
    return outbound_rows(store)[0]


def queue_empty(store: Store) -> None:
    wait_until(lambda: not outbound_rows(store), what="the outbound queue to empty")


def reconfigure(config_path: Path, extra: str) -> Path:
    """The fixture's configuration with more [delivery] keys (everything else kept)."""
    text = config_path.read_text(encoding="utf-8")
    assert "\n[delivery]\n" in text
    config_path.write_text(text.replace("\n[delivery]\n", f"\n[delivery]\n{extra}\n", 1),
                           encoding="utf-8")
    return config_path


def test_delivery_one_recipient_deferred_the_others_delivered_now(
        config_path: Path, sink: Sink, store: Store) -> None:
    clock = ManualClock()
    sink.handler.rcpt_replies[BOB] = "451 4.2.0 Mailbox temporarily unavailable"
    with gateway(config_path, clock=clock) as gw:
        sent_at = clock.now()
        gw.send(ALICE, LIST, post(ALICE, LIST, "Deferred for one"))
        sink.wait_for(2)
        row = waiting_row(store, tries=1)
        assert sorted(r for r, _d in sink.handler.copies()) == [ALICE, CAROL]
        assert row.recipients == BOB and row.rcpt_count == 1
        assert row.due_at == sent_at + RETRY_INITIAL
        assert row.first_try_at == sent_at
        assert "451" in (row.last_error or "")
        sink.handler.rcpt_replies.clear()
        clock.advance(RETRY_INITIAL - 1)
        assert outbound_rows(store)[0].due_at > clock.now()  # not due yet
        clock.advance(1)
        copies = sink.wait_for(3)
        queue_empty(store)
    assert Counter(r for r, _d in copies) == Counter(MEMBERS)
    assert len(sink.handler.messages) == 2
    assert failures(store) == []
    # Every copy is the same decorated post.
    assert len({d for _r, d in copies}) == 1
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(contents)).scalar_one() == 0


def test_delivery_refused_recipient_is_recorded_and_not_retried(
        config_path: Path, sink: Sink, store: Store) -> None:
    clock = ManualClock()
    sink.handler.rcpt_replies[BOB] = "550 5.1.1 <bob@example.net>: Recipient address rejected"
    with gateway(config_path, clock=clock) as gw:
        gw.send(ALICE, LIST, post(ALICE, LIST, "Refused for one"))
        sink.wait_for(2)
        queue_empty(store)
        [failure] = failures(store)
    assert sorted(r for r, _d in sink.handler.copies()) == [ALICE, CAROL]
    assert failure.address == BOB
    assert failure.code == 550
    assert failure.permanent is True
    assert failure.kind == "post"
    assert "Recipient address rejected" in failure.text
    assert failure.at == clock.now()
    with store.read() as conn:
        lst = lists.get(conn, LIST)
    assert failure.list_id == lst.id


def test_delivery_personal_copies_log_the_reply_to_a_delivered_copy(
        config_path: Path, sink: Sink, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """One transaction per member: the "delivered" line quotes the smarthost's reply to
    a copy it took, not the refusal of whichever member came last."""
    with store.write() as conn:
        lists.update(conn, lists.get(conn, LIST), personalize=True)
    sink.handler.rcpt_replies[CAROL] = "550 5.1.1 <carol@example.net>: Recipient address rejected"
    caplog.set_level("INFO", logger="gateway.delivery")
    with gateway(config_path) as gw:
        gw.send(ALICE, LIST, post(ALICE, LIST, "Refused for the last one"))
        sink.wait_for(2)
        queue_empty(store)
    assert sorted(r for r, _d in sink.handler.copies()) == [ALICE, BOB]
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivered")]
    assert line.endswith("rcpts=2 failed=1: 2.0.0 Ok: queued"), line


def test_delivery_whole_transaction_deferred_then_delivered(
        config_path: Path, sink: Sink, store: Store) -> None:
    clock = ManualClock()
    sink.handler.data_reply = "451 4.3.0 Queue full, try again later"
    with gateway(config_path, clock=clock) as gw:
        sent_at = clock.now()
        gw.send(ALICE, LIST, post(ALICE, LIST, "Deferred for all"))
        row = waiting_row(store, tries=1)
        assert sink.handler.count() == 0
        assert sorted(row.recipients.split("\n")) == sorted(MEMBERS)
        assert row.due_at == sent_at + RETRY_INITIAL
        assert "451" in (row.last_error or "") and "Queue full" in (row.last_error or "")
        sink.handler.data_reply = None
        clock.advance(RETRY_INITIAL)
        copies = sink.wait_for(3)
        queue_empty(store)
    assert Counter(r for r, _d in copies) == Counter(MEMBERS)
    assert failures(store) == []


def test_delivery_mail_from_deferred_backs_off_exponentially(
        config_path: Path, sink: Sink, store: Store) -> None:
    clock = ManualClock()
    sink.handler.mail_reply = "421 4.7.0 Try again later"
    with gateway(config_path, clock=clock) as gw:
        gw.send(ALICE, LIST, post(ALICE, LIST, "Backing off"))
        row = waiting_row(store, tries=1)
        assert row.due_at == clock.now() + RETRY_INITIAL
        clock.advance(RETRY_INITIAL)
        row = waiting_row(store, tries=2)
        assert row.due_at == clock.now() + 2 * RETRY_INITIAL
        sink.handler.mail_reply = None
        clock.advance(2 * RETRY_INITIAL)
        sink.wait_for(3)
        queue_empty(store)
    assert sink.handler.count() == 3


def test_delivery_smarthost_down_then_up_delivers_everything_once(
        config_path: Path, sink: Sink, store: Store) -> None:
    clock = ManualClock()
    sink.stop()
    with gateway(config_path, clock=clock) as gw:
        gw.send(ALICE, LIST, post(ALICE, LIST, "While the smarthost is down"))
        row = waiting_row(store, tries=1)
        assert "cannot connect to smarthost" in (row.last_error or "")
        sink.start()  # the same port
        clock.advance(RETRY_INITIAL)
        copies = sink.wait_for(3)
        queue_empty(store)
    assert Counter(r for r, _d in copies) == Counter(MEMBERS)
    assert sink.handler.count() == 3
    assert failures(store) == []


def test_delivery_gives_up_after_its_lifetime(config_path: Path, sink: Sink,
                                              store: Store) -> None:
    lifetime = 2 * RETRY_INITIAL
    path = reconfigure(config_path, f'lifetime = "{lifetime:.0f}s"')
    clock = ManualClock()
    sink.handler.data_reply = "452 4.3.1 Insufficient system storage"
    with gateway(path, clock=clock) as gw:
        sent_at = clock.now()
        gw.send(ALICE, LIST, post(ALICE, LIST, "Never gets through"))
        waiting_row(store, tries=1)
        clock.advance(RETRY_INITIAL)  # 60 s after the first try: still within its lifetime
        row = waiting_row(store, tries=2)
        assert row.first_try_at == sent_at
        clock.advance(2 * RETRY_INITIAL)  # 180 s: past it
        queue_empty(store)
        found = failures(store)
    assert [f.address for f in found] == sorted(MEMBERS)
    for f in found:
        assert f.code == 452
        assert f.permanent is False
        assert f"gave up after {lifetime:.0f}s" in f.text
        assert "Insufficient system storage" in f.text
    assert sink.handler.count() == 0


def test_delivery_splits_large_lists_into_transactions(config_path: Path, sink: Sink,
                                                       store: Store) -> None:
    path = reconfigure(config_path, "max_recipients = 100")
    extra = [f"member{i:03d}@example.com" for i in range(250 - len(MEMBERS))]
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        lists.add_members(conn, lst, [(a, "", Mode.REGULAR) for a in extra], now=0.0)
    with gateway(path, clock=ManualClock()) as gw:
        gw.send(ALICE, LIST, post(ALICE, LIST, "To 250 members"))
        copies = sink.wait_for(250)
        queue_empty(store)
    assert Counter(r for r, _d in copies) == Counter(MEMBERS + extra)
    assert sorted(len(m.rcpt_tos) for m in sink.handler.messages) == [50, 100, 100]
    assert len({m.data for m in sink.handler.messages}) == 1


def test_delivery_keeps_claiming_while_outcomes_free_room(config_path: Path, sink: Sink,
                                                         store: Store) -> None:
    """More transactions than the feeder may hold at once ([delivery] connections x 4):
    each recorded outcome makes room for the next claim at once, not at the next poll
    of the queue (an hour away here)."""
    path = reconfigure(config_path, "max_recipients = 10")
    extra = [f"member{i:03d}@example.com" for i in range(200 - len(MEMBERS))]
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        lists.update(conn, lst, personalize=False)
        lists.add_members(conn, lst, [(a, "", Mode.REGULAR) for a in extra], now=0.0)
    config = load(path)
    with gateway(path, clock=ManualClock(), delivery=replace(config.delivery, connections=1),
                 queue=replace(config.queue, poll_interval=Seconds(3600))) as gw:
        gw.send(ALICE, LIST, post(ALICE, LIST, "To 200 members, 20 transactions"))
        copies = sink.wait_for(200)
        queue_empty(store)
    assert Counter(r for r, _d in copies) == Counter(MEMBERS + extra)
    assert len(sink.handler.messages) == 20  # five times what the feeder holds at once


def test_delivery_outcome_of_a_row_whose_lease_was_lost_leaves_it_to_its_owner(
        config_path: Path, sink: Sink, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    # While the copy is in flight, another worker takes the row over (as after a lease
    # expired): the outcome must not delete the row from under it.
    sink.handler.data_gate.clear()
    with gateway(config_path) as gw:
        gw.send(ALICE, LIST, post(ALICE, LIST, "Hello", "Hi.\n"))
        wait_until(lambda: [r.state for r in outbound_rows(store)] == [State.CLAIMED.value],
                   what="the copy in flight")
        with store.write() as conn:
            conn.execute(sa.update(outbound).values(lease_owner="elsewhere:1:1"))
        sink.handler.data_gate.set()
        sink.wait_for(3)
        wait_until(lambda: "lease lost before its outcome was recorded" in caplog.text,
                   what="the lost lease noticed")
    (row,) = outbound_rows(store)
    assert row.lease_owner == "elsewhere:1:1" and row.state == State.CLAIMED.value
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(contents)).scalar_one() == 1
