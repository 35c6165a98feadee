"""Nothing accepted is lost: SIGKILL the daemon process and restart it; fill its disk."""

from __future__ import annotations

import collections
import email
import resource
import smtplib
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway import lists
from gateway.schema import State, messages, outbound, work
from gateway.store import Store
from tests.conftest import LIST, MEMBERS
from tests.support import (
    CORE_POLICY,
    GatewayProcess,
    Sink,
    free_port,
    post,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow


def queue_counts(store: Store) -> tuple[int, int, int]:
    """(work rows, outbound rows, parked rows)"""
    with store.read() as conn:
        w = conn.execute(sa.select(sa.func.count()).select_from(work)).scalar_one()
        o = conn.execute(sa.select(sa.func.count()).select_from(outbound)).scalar_one()
        parked = sum(conn.execute(sa.select(sa.func.count()).select_from(t).where(
            t.c.state == State.PARKED.value)).scalar_one() for t in (work, outbound))
    return w, o, parked


def copies_by_message(sink: Sink) -> collections.Counter[tuple[str, str]]:
    """(Message-ID, recipient) -> how many copies the sink got."""
    counter: collections.Counter[tuple[str, str]] = collections.Counter()
    for rcpt, data in sink.handler.copies():
        mid = email.message_from_bytes(data)["Message-ID"]
        counter[(mid, rcpt)] += 1
    return counter


def daemon_config(tmp: Path, sink: Sink, store_url: str, smtp_port: int,
                  sections: str = "") -> Path:
    return write_config(tmp, smarthost=sink.url, store_url=store_url,
                        listen=[f"smtp://127.0.0.1:{smtp_port}"],
                        extra='retry_initial = "1s"\nretry_max = "2s"', sections=sections,
                        policy=CORE_POLICY)


def send_posts(port: int, count: int, prefix: str) -> list[str]:
    """Send posts, return the Message-IDs of those that got a 250."""
    accepted = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for i in range(count):
            mid = f"<{prefix}.{i}@example.net>"
            client.sendmail(MEMBERS[0], LIST, post(MEMBERS[0], LIST, f"post {i}", message_id=mid))
            accepted.append(mid)
    return accepted


@pytest.fixture
def process_store(store: Store) -> Store:
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0)
        for address in MEMBERS:
            lists.add_member(conn, lst, address, now=0.0)
    return store


def test_durability_sigkill_right_after_250_loses_nothing_duplicates_nothing(
        tmp_path: Path, process_store: Store, store_url: str) -> None:
    # The smarthost is down while posts are accepted and the daemon is killed, so
    # nothing can have reached it: after the restart every post must arrive exactly once.
    sink = Sink()
    port = free_port()
    gw = GatewayProcess(daemon_config(tmp_path / "gw", sink, store_url, port)).start(port)
    accepted = send_posts(port, 25, "kill")
    gw.kill()
    assert queue_counts(process_store)[0] + queue_counts(process_store)[1] > 0

    sink.start()
    try:
        gw.start(port)
        wait_until(lambda: queue_counts(process_store)[:2] == (0, 0), timeout=60,
                   what="the queue to drain after restart")
        copies = copies_by_message(sink)
        gw.terminate()
    finally:
        sink.stop()
    expected = {(mid, rcpt) for mid in accepted for rcpt in MEMBERS}
    assert set(copies) == expected
    assert max(copies.values()) == 1
    assert queue_counts(process_store)[2] == 0


def test_durability_sigkill_while_delivering_loses_nothing(
        tmp_path: Path, process_store: Store, store_url: str, sink: Sink) -> None:
    # With the smarthost up, a kill can land after the sink took a transaction and
    # before the daemon recorded it: that transaction is sent again (as with any MTA).
    # Everything must arrive; duplicates are bounded by what can be in flight at once.
    port = free_port()
    gw = GatewayProcess(daemon_config(tmp_path / "gw", sink, store_url, port)).start(port)
    accepted = send_posts(port, 40, "flight")
    gw.kill()
    gw.start(port)
    wait_until(lambda: queue_counts(process_store)[:2] == (0, 0), timeout=60,
               what="the queue to drain after restart")
    gw.terminate()
    copies = copies_by_message(sink)
    expected = {(mid, rcpt) for mid in accepted for rcpt in MEMBERS}
    assert set(copies) == expected
    duplicates = sum(n - 1 for n in copies.values())
    in_flight_rows = 4 * 4  # [delivery] connections x the feeder's claim-ahead factor
    assert duplicates <= in_flight_rows * len(MEMBERS)
    assert queue_counts(process_store)[2] == 0


def test_durability_sigkill_mid_fanout_resumes_at_the_cursor(
        tmp_path: Path, store: Store, store_url: str) -> None:
    big = "big@example.org"
    members = [f"m{i:05d}@example.net" for i in range(3000)]
    with store.write() as conn:
        lst = lists.create(conn, big, now=0.0)
        lists.add_members(conn, lst, [(m, "", lists.Mode.REGULAR) for m in members], now=0.0)
    sink = Sink()  # down: nothing leaves before the kill
    port = free_port()
    # small chunks, so that the kill lands between two of them
    gw = GatewayProcess(daemon_config(tmp_path / "gw", sink, store_url, port,
                                      sections="[fanout]\nchunk = 100")).start(port)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(members[0], big, post(members[0], big, "to everyone",
                                               message_id="<fan@example.net>"))

    def queued() -> int:
        with store.read() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(
                sa.func.sum(outbound.c.rcpt_count), 0))).scalar_one())

    wait_until(lambda: queued() > 0, timeout=30, what="fanout to begin")
    gw.kill()
    partial = queued()
    sink.start()
    try:
        gw.start(port)
        wait_until(lambda: queue_counts(store)[:2] == (0, 0), timeout=120,
                   what="fanout and delivery to finish after restart")
        gw.terminate()
        copies = copies_by_message(sink)
    finally:
        sink.stop()
    assert sorted(r for _mid, r in copies) == sorted(members)
    assert max(copies.values()) == 1
    assert partial > 0  # the kill did land after fanout began


def test_durability_store_write_failure_answers_451_then_recovers(
        tmp_path: Path, process_store: Store, store_url: str, sink: Sink) -> None:
    if not store_url.startswith("sqlite"):
        pytest.skip("the write limit is a property of the daemon's own files (SQLite)")
    port = free_port()
    gw = GatewayProcess(daemon_config(tmp_path / "gw", sink, store_url, port)).start(port)
    assert gw.proc is not None
    send_posts(port, 1, "before")
    # Delivered first: a stage's commit must not be the one that meets the limit.
    wait_until(lambda: sink.handler.count() == len(MEMBERS)
               and queue_counts(process_store)[:2] == (0, 0), timeout=30, what="first post")
    db = Path(store_url.removeprefix("sqlite:///"))
    limit = max(p.stat().st_size for p in db.parent.glob(db.name + "*")) + 4096
    # The daemon may not grow any file past this: the next big commit fails (EFBIG).
    hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))
    big = post(MEMBERS[0], LIST, "big", "x" * 76 + "\r\n") + (b"y" * 76 + b"\r\n") * 20000
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(MEMBERS[0], LIST, big)
    assert info.value.smtp_code == 451
    assert info.value.smtp_error.decode().startswith("4.3.0")
    with process_store.read() as conn:
        stored = conn.execute(sa.select(sa.func.count()).select_from(messages)).scalar_one()
    assert stored == 1  # only the first post: nothing half-written

    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        assert client.sendmail(MEMBERS[0], LIST, big) == {}
    wait_until(lambda: queue_counts(process_store)[:2] == (0, 0), timeout=30, what="delivery")
    gw.terminate()
    assert sink.handler.count() == 2 * len(MEMBERS)


def claimed_outbound(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(outbound).where(
            outbound.c.state == State.CLAIMED.value)).scalar_one())


def copy_taken_while_nothing_can_be_written(tmp_path: Path, store: Store, store_url: str,
                                            sink: Sink, *, lease: float
                                            ) -> tuple[GatewayProcess, int]:
    """A daemon whose one post's copy the sink took while the daemon could write no
    file (its first tries to record the outcome have failed); the limit still on."""
    config = daemon_config(tmp_path / "gw", sink, store_url, port := free_port())
    config.write_text(config.read_text().replace('lease = "30s"', f'lease = "{lease:.0f}s"'))
    gw = GatewayProcess(config).start(port)
    assert gw.proc is not None
    sink.handler.data_gate.clear()
    send_posts(port, 1, "limited")
    wait_until(lambda: claimed_outbound(store) == 1, timeout=30,
               what="delivery to claim the copy")
    time.sleep(0.5)  # into its transaction with the sink, held at DATA
    hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (1, hard))  # no file write works
    sink.handler.data_gate.set()
    wait_until(lambda: sink.handler.count() == len(MEMBERS), timeout=30, what="the copy")
    time.sleep(1.0)  # the first tries to record its outcome fail
    assert claimed_outbound(store) == 1
    return gw, port


def test_durability_outcomes_the_store_refuses_are_recorded_when_it_is_back_not_sent_again(
        tmp_path: Path, process_store: Store, store_url: str, sink: Sink) -> None:
    # The smarthost takes a copy while the daemon can write nothing (a full disk): the
    # outcome waits in memory, its lease kept, and is recorded once writes work again.
    # Sent again after the lease instead, every member would get the post twice.
    if not store_url.startswith("sqlite"):
        pytest.skip("the write limit is a property of the daemon's own files (SQLite)")
    lease = 6.0
    gw, _port = copy_taken_while_nothing_can_be_written(tmp_path, process_store, store_url, sink,
                                                 lease=lease)
    assert gw.proc is not None
    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    wait_until(lambda: queue_counts(process_store)[:2] == (0, 0), timeout=30, what="the record")
    time.sleep(lease + 1)  # past the lease the copy was sent under
    gw.terminate()
    assert sink.handler.count() == len(MEMBERS)  # (its log lines then were not written)


def test_durability_stop_while_the_store_refuses_outcomes_ends_and_loses_nothing(
        tmp_path: Path, process_store: Store, store_url: str, sink: Sink) -> None:
    # Stopping ends the tries: the daemon exits; the row is still claimed by a process
    # that is gone, so the next start frees it and sends the copy again (what any MTA
    # does with a transaction it could not record).
    if not store_url.startswith("sqlite"):
        pytest.skip("the write limit is a property of the daemon's own files (SQLite)")
    gw, port = copy_taken_while_nothing_can_be_written(tmp_path, process_store, store_url, sink,
                                                 lease=30)
    assert gw.proc is not None
    gw.proc.terminate()
    gw.proc.wait(20)
    assert claimed_outbound(process_store) == 1
    gw.start(port)
    wait_until(lambda: queue_counts(process_store)[:2] == (0, 0), timeout=30,
               what="the copy to be sent again after the restart")
    gw.terminate()
    assert sorted(r for r, _data in sink.handler.copies()) == sorted(MEMBERS * 2)
