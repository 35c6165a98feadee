"""The store, its schema and migrations, and the queue's claim/lease/park protocol.

Every test runs on SQLite and on PostgreSQL (the ``store`` fixture). Time comes
from a ManualClock: the queue takes ``now`` as an argument, never reads a clock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway import outgoing, queue
from gateway.clock import ManualClock
from gateway.errors import SchemaOutdated, StoreError, StoreUnavailable
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.schema import QUEUE_TABLES, State, contents, lists, metadata, outbound, work
from gateway.store import (
    SCHEMA_REVISION,
    Store,
    doorbell_path,
    normalise_url,
    sibling_path,
    write_lock_path,
)
from gateway.worker import Progress, Wakeups, run_stage
from tests.helpers_unit import add_rows
from tests.support import REPO

LEASE = 30.0
MAX_ATTEMPTS = 3


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def claimer(name: str = "worker-a") -> Claimer:
    # Names that are not host:pid:start, so recover_dead_leases never touches them.
    return Claimer(owner=name, lease=LEASE, max_attempts=MAX_ATTEMPTS)


def row(store: Store, table: sa.Table, row_id: int) -> sa.Row[tuple[object, ...]] | None:
    with store.read() as conn:
        return conn.execute(sa.select(table).where(table.c.id == row_id)).first()


def claim(store: Store, table: sa.Table, who: Claimer, now: float,
          limit: int = 100) -> list[int]:
    with store.write() as conn:
        return [r.id for r in queue.claim(conn, table, who, now=now, limit=limit)]


@contextmanager
def writer_held(store: Store) -> Iterator[None]:
    """Another thread holds a write transaction (on SQLite, the one writer) inside the block."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.write() as conn:
            conn.execute(contents.insert().values(created_at=1.0, data=b"held"))
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        yield
    finally:
        release.set()
        holder.join(30)


def add(store: Store, table: sa.Table, count: int, *, due_at: float) -> list[int]:
    with store.write() as conn:
        return sorted(add_rows(conn, table, count, due_at=due_at))


# -- schema ---------------------------------------------------------------------------

def test_store_migration_builds_exactly_the_schema(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        diff = compare_metadata(context, metadata)
    assert diff == []
    with store.read() as conn:
        names = set(sa.inspect(conn).get_table_names())
    assert set(metadata.tables) <= names


def test_store_dropping_unused_content_reads_no_table_whole(store: Store) -> None:
    """After each delivery, content that nothing needs any more is deleted. Its checks
    (the statement's, and on SQLite the foreign keys') must go by index: a scan of
    ``work`` made each delete cost 7.9 ms with 100,000 rows queued (33 us by index)."""
    with store.write() as conn:
        compiled = outgoing.DROP_UNUSED_CONTENT.compile(dialect=conn.dialect)
        values = compiled.construct_params({"content_id": 1})
        args = tuple(values[k] for k in compiled.positiontup or ()) if compiled.positional \
            else values
        if store.is_sqlite:
            plan = [str(r[3]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}",
                                                            args)]
            scans = [step for step in plan if step.startswith("SCAN ")]
        else:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = [str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN {compiled}", args)]
            scans = [step for step in plan if "Seq Scan" in step]
    assert any("work" in step for step in plan), plan
    assert scans == [], plan


def test_store_upgrade_is_idempotent(store: Store) -> None:
    current, head = store.revisions()
    assert current == head
    store.upgrade()
    assert store.revisions() == (head, head)
    store.check_schema()


def test_store_schema_revision_is_the_newest_migration(store: Store) -> None:
    """The daemon checks the store against SCHEMA_REVISION without Alembic: it must be
    the head Alembic finds in gateway/migrations, and read the same revision."""
    current, head = store.revisions()
    assert head == SCHEMA_REVISION
    assert store.revision() == current == head


def test_store_check_schema_refuses_an_older_revision(store: Store) -> None:
    with store.write() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0003'"))
    with pytest.raises(SchemaOutdated) as info:
        store.check_schema()
    assert f"is at revision 0003, this Listgate needs {SCHEMA_REVISION}" in str(info.value)
    assert "listgate db upgrade" in str(info.value)


def test_store_check_schema_on_an_empty_database_says_what_to_run(store_url: str) -> None:
    empty = Store(store_url, clock=ManualClock())
    try:
        current, head = empty.revisions()
        assert current is None and head
        with pytest.raises(SchemaOutdated) as info:
            empty.check_schema()
        message = str(info.value)
        assert "listgate db upgrade" in message
        assert "none (empty)" in message
        assert head in message
        empty.upgrade()
        empty.check_schema()
    finally:
        empty.dispose()


def test_store_ids_are_never_reused(store: Store, clock: ManualClock) -> None:
    """A deleted row's id must not name a new row (cached contents, queue ids in logs)."""
    with store.write() as conn:
        first = conn.execute(contents.insert().values(created_at=clock.now(), data=b"old")
                             .returning(contents.c.id)).scalar_one()
        conn.execute(sa.delete(contents).where(contents.c.id == first))
    with store.write() as conn:
        second = conn.execute(contents.insert().values(created_at=clock.now(), data=b"new")
                              .returning(contents.c.id)).scalar_one()
    assert second > first


def test_store_write_rolls_back_on_error(store: Store, clock: ManualClock) -> None:
    with pytest.raises(RuntimeError), store.write() as conn:
        add_rows(conn, work, 3, due_at=clock.now())
        raise RuntimeError("half way")
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(work)).scalar_one() == 0


def test_store_database_errors_become_store_errors(store: Store, clock: ManualClock) -> None:
    values = dict(name="x", domain="example.org", display_name="X", description="",
                  subject_prefix="", archive_url=None, created_at=clock.now())
    with store.write() as conn:
        conn.execute(lists.insert().values(**values))
    with pytest.raises(StoreError), store.write() as conn:
        conn.execute(lists.insert().values(**values))


@pytest.mark.parametrize("url", ["postgresql+psycopg://postgres@127.0.0.1/listgate",
                                 "postgresql+psycopg://postgres@127.0.0.1:5432/var/lib/x.db"])
def test_store_files_beside_the_database_exist_only_for_sqlite(url: str) -> None:
    # A PostgreSQL database's name is no path here: no spool, lock file or doorbell
    # in the working directory named after it.
    assert sibling_path(url, "-spool") is None
    assert write_lock_path(url) is None
    assert doorbell_path(url) is None
    assert sibling_path("sqlite:////var/lib/x.db", "-spool") == Path("/var/lib/x.db-spool")


def test_store_refuses_in_memory_sqlite() -> None:
    with pytest.raises(StoreError, match="in-memory"):
        Store("sqlite:///:memory:", clock=ManualClock())


@pytest.mark.parametrize("url, expected", [
    ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
    ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
    ("postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ("sqlite:////var/lib/x.db", "sqlite:////var/lib/x.db"),
])
def test_store_normalise_url(url: str, expected: str) -> None:
    assert normalise_url(url) == expected


# -- claim -------------------------------------------------------------------------

def test_store_claim_takes_due_rows_oldest_first(store: Store, clock: ManualClock) -> None:
    table = work
    t0 = clock.now()
    [late] = add(store, table, 1, due_at=t0 - 1)
    [oldest] = add(store, table, 1, due_at=t0 - 10)
    [middle] = add(store, table, 1, due_at=t0 - 5)
    [future] = add(store, table, 1, due_at=t0 + 60)
    a = claimer()
    assert claim(store, table, a, t0, limit=2) == sorted([oldest, middle])
    assert claim(store, table, a, t0, limit=10) == [late]
    assert claim(store, table, a, t0, limit=10) == []
    with store.write() as conn:
        for rid in (oldest, middle, late):
            assert queue.complete(conn, table, rid, a)
    clock.advance(59)
    assert claim(store, table, a, clock.now()) == []
    clock.advance(1)
    assert claim(store, table, a, clock.now()) == [future]


def test_store_claim_marks_rows_as_ours(store: Store, clock: ManualClock) -> None:
    ids = add(store, work, 2, due_at=clock.now())
    with store.write() as conn:
        rows = queue.claim(conn, work, claimer(), now=clock.now(), limit=5)
    assert [r.id for r in rows] == ids
    for r in rows:
        assert r.state == State.CLAIMED.value
        assert r.lease_owner == "worker-a"
        assert r.lease_until == clock.now() + LEASE
        assert r.attempts == 1
    stored = row(store, work, ids[0])
    assert stored is not None and stored.state == State.CLAIMED.value


def test_store_claim_respects_extra_conditions(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    with store.write() as conn:
        mod = add_rows(conn, work, 2, due_at=now, stage="moderation")
        fan = add_rows(conn, work, 2, due_at=now, stage="fanout")
        got = queue.claim(conn, work, claimer(), now=now, limit=10, stage="fanout")
    assert sorted(r.id for r in got) == sorted(fan)
    assert claim(store, work, claimer(), now) == sorted(mod)


def test_store_parallel_claimers_never_share_a_row(store: Store, clock: ManualClock) -> None:
    total, threads, batch = 500, 4, 7
    table = outbound
    all_ids = set(add(store, table, total, due_at=clock.now()))
    now = clock.now()
    start = threading.Barrier(threads)
    # On PostgreSQL the first claims overlap for sure: every thread holds its claim
    # transaction open until all have claimed (SKIP LOCKED keeps them apart). SQLite
    # serialises writers, so there the threads only race.
    overlap = threading.Barrier(threads) if not store.is_sqlite else None
    got: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def work_loop(i: int) -> None:
        me = claimer(f"worker-{i}")
        try:
            start.wait(10)
            first = True
            while True:
                with store.write() as conn:
                    ids = [r.id for r in queue.claim(conn, table, me, now=now, limit=batch)]
                    if first and overlap is not None:
                        overlap.wait(30)
                first = False
                if not ids:
                    return
                assert len(ids) <= batch
                got[i].extend(ids)
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    workers = [threading.Thread(target=work_loop, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors, errors
    claimed = [i for ids in got for i in ids]
    assert len(claimed) == len(set(claimed)), "a row was claimed twice"
    assert set(claimed) == all_ids
    if overlap is not None:
        assert all(ids for ids in got), [len(ids) for ids in got]
    with store.read() as conn:
        owners = dict(conn.execute(sa.select(table.c.id, table.c.lease_owner)).all())
    for i, ids in enumerate(got):
        assert all(owners[r] == f"worker-{i}" for r in ids)


# -- leases ---------------------------------------------------------------------------

def test_store_expired_lease_makes_the_row_claimable_again(store: Store,
                                                           clock: ManualClock) -> None:
    [rid] = add(store, work, 1, due_at=clock.now())
    a, b = claimer("worker-a"), claimer("worker-b")
    assert claim(store, work, a, clock.now()) == [rid]
    clock.advance(LEASE - 1)
    assert claim(store, work, b, clock.now()) == []
    clock.advance(2)
    assert claim(store, work, b, clock.now()) == [rid]
    r = row(store, work, rid)
    assert r is not None
    assert (r.lease_owner, r.attempts, r.state) == ("worker-b", 2, State.CLAIMED.value)


def test_store_a_lost_lease_cannot_finish_the_row(store: Store, clock: ManualClock) -> None:
    [rid] = add(store, outbound, 1, due_at=clock.now())
    a, b = claimer("worker-a"), claimer("worker-b")
    claim(store, outbound, a, clock.now())
    clock.advance(LEASE + 1)
    claim(store, outbound, b, clock.now())
    now = clock.now()
    with store.write() as conn:
        assert queue.complete(conn, outbound, rid, a) is False
        assert queue.release(conn, outbound, rid, a, now=now, due_at=now) is False
        assert queue.renew(conn, outbound, [rid], a, now=now) == 0
        assert queue.fail(conn, outbound, rid, a, now=now, error="late",
                          retry_delay=1) is State.CLAIMED
    r = row(store, outbound, rid)
    assert r is not None
    assert (r.state, r.lease_owner, r.last_error) == (State.CLAIMED.value, "worker-b", None)
    with store.write() as conn:
        assert queue.complete(conn, outbound, rid, b) is True
    assert row(store, outbound, rid) is None


def test_store_renew_extends_only_our_leases(store: Store, clock: ManualClock) -> None:
    ours = add(store, work, 2, due_at=clock.now())
    [theirs] = add(store, work, 1, due_at=clock.now() + 1)
    a, b = claimer("worker-a"), claimer("worker-b")
    claim(store, work, a, clock.now())
    clock.advance(1)
    claim(store, work, b, clock.now())
    clock.advance(LEASE - 5)
    with store.write() as conn:
        assert queue.renew(conn, work, [*ours, theirs], a, now=clock.now()) == 2
        assert queue.renew(conn, work, [], a, now=clock.now()) == 0
    clock.advance(10)  # past the first lease, inside the renewed one
    assert claim(store, work, claimer("worker-c"), clock.now()) == [theirs]


def test_store_lease_that_keeps_expiring_is_parked_at_the_next_claim(
        store: Store, clock: ManualClock) -> None:
    [rid] = add(store, work, 1, due_at=clock.now())
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert claim(store, work, claimer(f"dies-{attempt}"), clock.now()) == [rid]
        clock.advance(LEASE + 1)
    assert claim(store, work, claimer("survivor"), clock.now()) == []
    r = row(store, work, rid)
    assert r is not None
    assert r.state == State.PARKED.value
    assert r.lease_owner is None and r.lease_until is None
    assert f"its lease expired {MAX_ATTEMPTS} times" in (r.last_error or "")
    clock.advance(86400)
    assert claim(store, work, claimer("survivor"), clock.now()) == []


def test_store_hand_back_frees_a_stages_own_claims_at_once_and_parks_the_spent(
        store: Store, clock: ManualClock) -> None:
    a, b = claimer("worker-a"), claimer("worker-b")
    now = clock.now()
    with store.write() as conn:
        ours = add_rows(conn, work, 2, due_at=now, stage="moderation")
        [other_stage] = add_rows(conn, work, 1, due_at=now, stage="fanout")
    for stage in ("moderation", "fanout"):
        assert len(queue.take(store, work, a, now=now, limit=10, stage=stage)) > 0
    with store.write() as conn:
        [theirs] = add_rows(conn, work, 1, due_at=now, stage="moderation")
        [spent] = add_rows(conn, work, 1, due_at=now, stage="moderation",
                           attempts=MAX_ATTEMPTS - 1)
    assert [r.id for r in queue.take(store, work, b, now=now, limit=1,
                                     stage="moderation")] == [theirs]
    assert [r.id for r in queue.take(store, work, a, now=now, limit=1,
                                     stage="moderation")] == [spent]
    clock.advance(5)

    assert queue.hand_back(store, work, a, now=clock.now(), stage="moderation") == 2
    for rid in ours:
        r = row(store, work, rid)
        assert r is not None
        # Claimable now, not when the lease ends; the claim's attempt still counts.
        assert (r.state, r.due_at, r.lease_owner, r.attempts) == (
            State.READY.value, clock.now(), None, 1)
    r = row(store, work, spent)
    assert r is not None and (r.state, r.lease_owner) == (State.PARKED.value, None)
    assert f"parked after {MAX_ATTEMPTS} attempts" in (r.last_error or "")
    for rid, owner in ((other_stage, "worker-a"), (theirs, "worker-b")):
        r = row(store, work, rid)
        assert r is not None and (r.state, r.lease_owner) == (State.CLAIMED.value, owner)
    assert sorted(r.id for r in queue.take(store, work, b, now=clock.now(), limit=10,
                                           stage="moderation")) == ours
    assert queue.hand_back(store, work, a, now=clock.now(), stage="moderation") == 0


def test_store_stage_round_that_raises_gets_its_rows_back_before_their_leases_end(
        store: Store, clock: ManualClock) -> None:
    # A round claims, then the store fails it (a full disk at the outcome's commit):
    # the next round, as soon as the store takes writes, finds the same row claimable
    # although the clock has not moved past its lease.
    with store.write() as conn:
        [rid] = add_rows(conn, work, 1, due_at=clock.now(), stage="moderation")
    a = claimer()
    rounds: list[list[int]] = []

    def run_once(progress: Progress) -> Progress:
        ids = [r.id for r in queue.take(store, work, a, now=clock.now(), limit=10,
                                        stage="moderation")]
        rounds.append(ids)
        if len(rounds) == 1:
            raise StoreUnavailable("disk I/O error")
        with store.write() as conn:
            queue.complete_many(conn, work, ids, a)
        stopping.set()
        return progress

    async def run() -> None:
        await asyncio.wait_for(run_stage(
            Stage.MODERATION, run_once, Wakeups(asyncio.get_running_loop()),
            poll_interval=0.01, stopping=stopping,
            hand_back=lambda: queue.hand_back(store, work, a, now=clock.now(),
                                              stage="moderation")), timeout=10)

    stopping = asyncio.Event()
    asyncio.run(run())
    assert rounds == [[rid], [rid]]
    assert row(store, work, rid) is None


def test_store_take_claims_due_rows_and_parks_like_claim(store: Store,
                                                         clock: ManualClock) -> None:
    now = clock.now()
    with store.write() as conn:
        mod = add_rows(conn, work, 2, due_at=now, stage="moderation")
        add_rows(conn, work, 1, due_at=now + 3600, stage="fanout")
        [dying] = add_rows(conn, work, 1, due_at=now, stage="fanout")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        got = queue.take(store, work, claimer(f"dies-{attempt}"), now=clock.now(), limit=10,
                         stage="fanout")
        assert [r.id for r in got] == [dying]
        clock.advance(LEASE + 1)
    # Its lease expired again: the read finds it due, the claim parks it.
    assert queue.take(store, work, claimer(), now=clock.now(), limit=10, stage="fanout") == []
    parked = row(store, work, dying)
    assert parked is not None and parked.state == State.PARKED.value
    assert sorted(r.id for r in queue.take(store, work, claimer(), now=clock.now(),
                                           limit=10)) == sorted(mod)


def test_store_take_with_nothing_due_waits_for_no_writer(store: Store,
                                                        clock: ManualClock) -> None:
    if not store.is_sqlite:
        pytest.skip("PostgreSQL has row locks, not one writer at a time")
    add(store, work, 1, due_at=clock.now() + 60)
    result: list[object] = []
    taker = threading.Thread(target=lambda: result.append(
        queue.take(store, work, claimer(), now=clock.now(), limit=10)))
    with writer_held(store):
        taker.start()
        taker.join(5)
        assert result == [[]], "an empty take waited for the writer"
    taker.join()


# -- fail, complete, release, park, retry ------------------------------------------------------

def test_store_fail_backs_off_then_parks_keeping_the_error(store: Store,
                                                           clock: ManualClock) -> None:
    [rid] = add(store, outbound, 1, due_at=clock.now())
    a = claimer()
    delay = 10.0
    dues = []
    for attempt in range(1, MAX_ATTEMPTS):
        assert claim(store, outbound, a, clock.now()) == [rid]
        with store.write() as conn:
            state = queue.fail(conn, outbound, rid, a, now=clock.now(),
                               error=f"boom {attempt}", retry_delay=delay)
        assert state is State.READY
        r = row(store, outbound, rid)
        assert r is not None
        assert r.state == State.READY.value and r.lease_owner is None
        assert r.last_error == f"boom {attempt}"
        backoff = r.due_at - clock.now()
        assert backoff == delay * 2 ** (attempt - 1)
        dues.append(backoff)
        clock.advance(backoff - 1)
        assert claim(store, outbound, a, clock.now()) == []  # not due yet
        clock.advance(1)
    assert dues == sorted(dues) and dues[0] < dues[-1]
    assert claim(store, outbound, a, clock.now()) == [rid]
    with store.write() as conn:
        state = queue.fail(conn, outbound, rid, a, now=clock.now(),
                           error="the last straw", retry_delay=delay)
    assert state is State.PARKED
    r = row(store, outbound, rid)
    assert r is not None
    assert r.state == State.PARKED.value
    assert r.attempts == MAX_ATTEMPTS
    assert "the last straw" in (r.last_error or "")
    assert f"parked after {MAX_ATTEMPTS} failed attempts" in (r.last_error or "")
    clock.advance(86400)
    assert claim(store, outbound, a, clock.now()) == []


def test_store_fail_keeps_long_errors_bounded(store: Store, clock: ManualClock) -> None:
    [rid] = add(store, work, 1, due_at=clock.now())
    a = claimer()
    claim(store, work, a, clock.now())
    with store.write() as conn:
        queue.fail(conn, work, rid, a, now=clock.now(), error="x" * 10_000, retry_delay=1)
    r = row(store, work, rid)
    assert r is not None and len(r.last_error or "") == 4000


def test_store_complete_deletes_the_row(store: Store, clock: ManualClock) -> None:
    ids = add(store, work, 2, due_at=clock.now())
    a = claimer()
    claim(store, work, a, clock.now())
    with store.write() as conn:
        assert queue.complete(conn, work, ids[0], a) is True
        assert queue.complete(conn, work, ids[0], a) is False
    assert row(store, work, ids[0]) is None
    assert row(store, work, ids[1]) is not None


def test_store_release_hands_the_row_back_without_counting_a_failure(
        store: Store, clock: ManualClock) -> None:
    [rid] = add(store, outbound, 1, due_at=clock.now())
    a = claimer()
    claim(store, outbound, a, clock.now())
    later = clock.now() + 120
    with store.write() as conn:
        assert queue.release(conn, outbound, rid, a, now=clock.now(), due_at=later,
                             note="2 recipients deferred", tries=1,
                             recipients="bob@example.net", rcpt_count=1) is True
    r = row(store, outbound, rid)
    assert r is not None
    assert (r.state, r.attempts, r.due_at, r.lease_owner) == (State.READY.value, 0, later, None)
    assert (r.last_error, r.tries, r.recipients, r.rcpt_count) == (
        "2 recipients deferred", 1, "bob@example.net", 1)
    assert claim(store, outbound, a, clock.now()) == []
    clock.advance(120)
    assert claim(store, outbound, a, clock.now()) == [rid]


def test_store_park_by_hand(store: Store, clock: ManualClock) -> None:
    [rid] = add(store, work, 1, due_at=clock.now())
    with store.write() as conn:
        assert queue.park(conn, work, rid, now=clock.now(), why="poison") is True
        assert queue.park(conn, work, 999_999, now=clock.now(), why="x") is False
    r = row(store, work, rid)
    assert r is not None and (r.state, r.last_error) == (State.PARKED.value, "poison")
    assert claim(store, work, claimer(), clock.now() + 86400) == []


def test_store_retry_unparks_with_a_fresh_attempt_count(store: Store,
                                                        clock: ManualClock) -> None:
    [rid] = add(store, work, 1, due_at=clock.now())
    a = claimer()
    for _ in range(MAX_ATTEMPTS):
        claim(store, work, a, clock.now())
        with store.write() as conn:
            queue.fail(conn, work, rid, a, now=clock.now(), error="bad", retry_delay=0)
    r = row(store, work, rid)
    assert r is not None and r.state == State.PARKED.value
    clock.advance(5)
    with store.write() as conn:
        assert queue.retry(conn, work, rid, now=clock.now()) is True
        assert queue.retry(conn, work, 999_999, now=clock.now()) is False
    r = row(store, work, rid)
    assert r is not None
    assert (r.state, r.attempts, r.due_at) == (State.READY.value, 0, clock.now())
    assert r.last_error == "bad [parked after 3 failed attempts]"  # kept for the record
    assert claim(store, work, a, clock.now()) == [rid]
    with store.write() as conn:
        assert queue.retry(conn, work, rid, now=clock.now()) is False  # in flight


def test_store_retry_makes_a_waiting_row_due_now(store: Store, clock: ManualClock) -> None:
    [rid] = add(store, outbound, 1, due_at=clock.now() + 3600)
    with store.write() as conn:
        assert queue.retry(conn, outbound, rid, now=clock.now()) is True
    assert claim(store, outbound, claimer(), clock.now()) == [rid]


# -- crashed workers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def dead_identity() -> Iterator[str]:
    """The worker identity of a process of this host that has exited."""
    proc = subprocess.run(
        [sys.executable, "-c", "from gateway.queue import worker_identity; "
                               "print(worker_identity())"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    identity = proc.stdout.strip()
    host, pid, start = identity.split(":")
    assert host == socket.gethostname() and int(pid) != os.getpid() and start != "0"
    yield identity


def test_store_recover_dead_leases_frees_a_dead_processs_rows(
        store: Store, clock: ManualClock, dead_identity: str) -> None:
    for table in QUEUE_TABLES.values():
        recover_in(store, clock, dead_identity, table)


def recover_in(store: Store, clock: ManualClock, dead_identity: str, table: sa.Table) -> None:
    host = socket.gethostname()
    owners = {
        "dead": dead_identity,
        "alive": queue.worker_identity(),  # this very process
        "other-host": f"not-{host}:1:12345",
        "pid-reused": f"{host}:{os.getpid()}:1",  # our pid, another process's start time
        "opaque": "worker-a",
    }
    ids = {}
    for what, owner in owners.items():
        [ids[what]] = add(store, table, 1, due_at=clock.now())
        claim(store, table, Claimer(owner, LEASE, MAX_ATTEMPTS), clock.now())
    now = clock.now()
    with store.write() as conn:
        freed = queue.recover_dead_leases(conn, table, now=now)
    assert freed == 2
    clock.advance(0.001)
    taken = claim(store, table, claimer("recoverer"), clock.now())
    assert sorted(taken) == sorted([ids["dead"], ids["pid-reused"]])
    for what in ("alive", "other-host", "opaque"):
        r = row(store, table, ids[what])
        assert r is not None
        assert (r.state, r.lease_owner) == (State.CLAIMED.value, owners[what]), what
        assert r.lease_until == now + LEASE
    with store.write() as conn:
        assert queue.recover_dead_leases(conn, table, now=clock.now()) == 0


def test_store_worker_identity_names_this_process() -> None:
    host, pid, start = queue.worker_identity().split(":")
    assert host == socket.gethostname()
    assert int(pid) == os.getpid()
    assert start.isdigit() and start != "0"


def test_store_sqlite_writers_of_one_process_take_turns(store: Store) -> None:
    """Many threads writing at once: every write lands, none fails with "locked"."""
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(20):
                with store.write() as conn:
                    conn.execute(contents.insert().values(created_at=float(n * 100 + i),
                                                          data=b"x"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(contents)).scalar_one() == 160


def test_store_sqlite_writer_waiting_too_long_is_told_so(store: Store,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if not store.is_sqlite:
        pytest.skip("PostgreSQL has row locks, not one writer at a time")
    monkeypatch.setattr("gateway.store.SQLITE_BUSY_TIMEOUT", 0.2)
    with writer_held(store), pytest.raises(StoreUnavailable, match="locked"):
        with store.write() as conn:
            conn.execute(contents.insert().values(created_at=2.0, data=b"late"))
    with store.write() as conn:  # its turn comes once the other is done
        conn.execute(contents.insert().values(created_at=3.0, data=b"after"))
    with store.read() as conn:
        assert sorted(conn.execute(sa.select(contents.c.data)).scalars()) == [b"after", b"held"]


# A process that takes the SQLite write lock's flock, says so, and keeps it until killed.
FLOCK_HOLDER = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")


def test_store_sqlite_writers_of_other_processes_queue_on_the_lock_file(store: Store) -> None:
    """Another process's writer holds the flock: ours waits in the kernel (not in
    SQLite's busy handler), and goes the moment that process dies, even by SIGKILL."""
    if not store.is_sqlite:
        pytest.skip("PostgreSQL needs no cross-process writer lock")
    lock_file = write_lock_path(store.url)
    assert lock_file is not None and lock_file.exists()
    with subprocess.Popen([sys.executable, "-c", FLOCK_HOLDER, str(lock_file)],
                          stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            done = threading.Event()

            def write() -> None:
                with store.write() as conn:
                    conn.execute(contents.insert().values(created_at=1.0, data=b"queued"))
                done.set()

            writer = threading.Thread(target=write)
            writer.start()
            assert not done.wait(0.5)  # SQLite's lock is free: only the flock holds it back
            holder.kill()
            assert done.wait(10)
            writer.join(10)
        finally:
            holder.kill()
    with store.read() as conn:
        assert list(conn.execute(sa.select(contents.c.data)).scalars()) == [b"queued"]


def test_store_sqlite_write_lock_is_released_after_commit_and_on_error(store: Store) -> None:
    if not store.is_sqlite:
        pytest.skip("PostgreSQL needs no cross-process writer lock")
    lock_file = write_lock_path(store.url)
    assert lock_file is not None

    def free() -> bool:
        with open(lock_file) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
            return True

    with store.write() as conn:
        conn.execute(contents.insert().values(created_at=1.0, data=b"x"))
        assert not free()
    assert free()
    with pytest.raises(RuntimeError):
        with store.write() as conn:
            assert not free()
            raise RuntimeError("rolled back")
    assert free()


def test_store_sqlite_writes_first_store_goes_before_waiting_writers(store: Store) -> None:
    """Intake's store (``writes_first``) waiting for the lock holds the gate: a writer of
    another process that comes meanwhile waits until intake has had its turn."""
    if not store.is_sqlite:
        pytest.skip("PostgreSQL needs no cross-process writer lock")
    intake = Store(store.url, clock=store.clock, pool_size=2, writes_first=True)
    lock_file = write_lock_path(store.url)
    order: list[bytes] = []
    try:
        with subprocess.Popen([sys.executable, "-c", FLOCK_HOLDER, str(lock_file)],
                              stdout=subprocess.PIPE) as holder:
            try:
                assert holder.stdout is not None and holder.stdout.readline() == b"held\n"

                def write(into: Store, data: bytes) -> None:
                    with into.write() as conn:
                        conn.execute(contents.insert().values(created_at=1.0, data=data))
                        order.append(data)

                first = threading.Thread(target=write, args=(intake, b"intake"))
                first.start()
                time.sleep(0.2)  # intake is waiting for the lock, holding the gate
                second = threading.Thread(target=write, args=(store, b"stage"))
                second.start()
                time.sleep(0.2)
                assert order == []
                holder.kill()
                first.join(10)
                second.join(10)
            finally:
                holder.kill()
    finally:
        intake.dispose()
    assert order == [b"intake", b"stage"]


def test_store_sqlite_a_first_writer_goes_before_those_already_waiting(store: Store) -> None:
    # Intake's commit (a client waits for its 250) overtakes the stages queued before it.
    if not store.is_sqlite:
        pytest.skip("PostgreSQL has row locks, not one writer at a time")
    holding, release = threading.Event(), threading.Event()
    order: list[str] = []

    def write(name: str, *, first: bool = False, hold: bool = False) -> None:
        with store.write(first=first) as conn:
            conn.execute(contents.insert().values(created_at=1.0, data=name.encode()))
            order.append(name)
            if hold:
                holding.set()
                release.wait(10)

    holder = threading.Thread(target=write, args=("holder",), kwargs={"hold": True})
    holder.start()
    assert holding.wait(10)
    stages = [threading.Thread(target=write, args=(f"stage{i}",)) for i in range(3)]
    for t in stages:
        t.start()
    time.sleep(0.2)  # the stages are queued
    intake = threading.Thread(target=write, args=("intake",), kwargs={"first": True})
    intake.start()
    time.sleep(0.2)
    release.set()
    for t in [holder, intake, *stages]:
        t.join(10)
    assert order[:2] == ["holder", "intake"] and sorted(order[2:]) == ["stage0", "stage1",
                                                                       "stage2"]
