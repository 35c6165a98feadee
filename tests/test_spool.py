"""The intake spool of a SQLite store: posts committed before their 250, moved into the
store by the importer, neither lost nor doubled between the two files."""

from __future__ import annotations

import logging
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gateway import lists
from gateway.cli import main
from gateway.clock import ManualClock
from gateway.errors import StoreError
from gateway.routing import Stage
from gateway.schema import State, messages, work
from gateway.schema import lists as lists_table
from gateway.spool import (
    Importer,
    Post,
    Spool,
    Target,
    highest_message_id,
    spool_path,
    spooled,
)
from gateway.store import Store
from gateway.worker import Progress
from tests.conftest import LIST, MEMBERS
from tests.support import REPO, Sink, gateway, post, write_config


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sqlite_store(tmp_path: Path, clock: ManualClock) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'listgate.db'}", clock=clock)
    store.upgrade()
    with store.write() as conn:  # lists 1 and 2, which the posts' work rows name
        for n in (1, 2):
            lists.create(conn, f"list{n}@example.org", now=0.0, display_name=f"List {n}")
    return store


@pytest.fixture
def spool(sqlite_store: Store) -> Spool:
    found = Spool.beside(sqlite_store)
    assert found is not None
    return found


def a_post(n: int, *, lists: tuple[int, ...] = (1,), stage: str = "moderation") -> Post:
    return Post(received_at=1000.0 + n, mail_from=f"poster{n}@example.net",
                targets=tuple(Target(stage, lid, "post", f"list{lid}@example.org", None)
                              for lid in lists),
                peer=f"192.0.2.{n % 250}:25", helo="client.example", protocol="smtp",
                message_id=f"<post.{n}@example.net>",
                raw=f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())


def rows(store: Store) -> tuple[list[tuple[int, bytes]], list[tuple[str, int, int, str]]]:
    with store.read() as conn:
        kept = [(int(i), bytes(r)) for i, r in conn.execute(
            sa.select(messages.c.id, messages.c.raw).order_by(messages.c.id))]
        queued = [(str(s), int(m), int(lid), str(st)) for s, m, lid, st in conn.execute(
            sa.select(work.c.stage, work.c.message_id, work.c.list_id, work.c.state)
            .order_by(work.c.id))]
    return kept, queued


def test_spool_is_a_file_beside_a_sqlite_store_and_none_for_postgresql(
        sqlite_store: Store, tmp_path: Path) -> None:
    assert spool_path(sqlite_store.url) == tmp_path / "listgate.db-spool"
    postgres = Store("postgresql+psycopg://nobody@127.0.0.1:1/none", clock=ManualClock())
    assert Spool.beside(postgres) is None


def test_spool_numbers_posts_above_the_stores_highest_id_and_keeps_them_in_order(
        spool: Spool) -> None:
    spool.number_after(41)
    assert spool.append([a_post(1), a_post(2)]) == [42, 43]
    spool.number_after(10)  # never goes back
    assert spool.append([a_post(3)]) == [44]
    assert [(s.seq, s.post) for s in spool.oldest(10)] == [
        (42, a_post(1)), (43, a_post(2)), (44, a_post(3))]
    assert spool.depth() == 3


def test_spool_numbers_a_batch_larger_than_one_statement_in_order_and_never_reuses_one(
        spool: Spool) -> None:
    batch = [a_post(n, lists=(1, 2) if n % 3 else (1,)) for n in range(250)]
    assert spool.append(batch) == list(range(1, 251))  # a fresh spool starts at 1
    assert [(s.seq, s.post) for s in spool.oldest(300)] == list(enumerate(batch, start=1))
    spool.forget(range(1, 251))
    assert spool.append([a_post(7)]) == [251]  # the highest number gone, not given again


def test_importer_moves_posts_under_their_spool_numbers_with_their_work_rows(
        sqlite_store: Store, spool: Spool) -> None:
    spool.number_after(highest_message_id(sqlite_store))
    ids = spool.append([a_post(1), a_post(2, lists=(1, 2))])
    woken: list[Stage] = []
    progress = Importer(sqlite_store, spool, clock=ManualClock()).run_once(
        Progress(on_wake=lambda *stages: woken.extend(stages)))
    assert progress.worked == 2 and woken == [Stage.MODERATION]
    kept, queued = rows(sqlite_store)
    assert kept == [(ids[0], a_post(1).raw), (ids[1], a_post(2).raw)]
    assert queued == [("moderation", ids[0], 1, State.READY.value),
                      ("moderation", ids[1], 1, State.READY.value),
                      ("moderation", ids[1], 2, State.READY.value)]
    assert spool.depth() == 0
    # The next post is numbered on from there, also by a spool opened afresh.
    again = Spool.beside(sqlite_store)
    assert again is not None
    again.number_after(highest_message_id(sqlite_store))
    assert again.append([a_post(3)]) == [ids[1] + 1]


def synchronous(spool: Spool) -> int:
    """The spool connection's fsync setting: 2 FULL (each commit), 1 NORMAL (none)."""
    return int(spool._conn.execute("PRAGMA synchronous").fetchone()[0])


def test_spool_fsyncs_appends_and_not_what_the_importer_forgets(
        sqlite_store: Store, spool: Spool) -> None:
    """A post is on disk before its 250; a deletion lost in a crash only leaves a post
    in both files, which the next import finds (the test after the next)."""
    assert synchronous(spool) == 2
    ids = spool.append([a_post(1), a_post(2)])
    spool.forget(ids[:1])
    assert synchronous(spool) == 1
    more = spool.append([a_post(3)])  # fsync'd again, after a deletion that was not
    assert synchronous(spool) == 2
    assert [s.seq for s in spool.oldest(10)] == [ids[1], *more]


def spool_files(store: Store) -> tuple[Path, Path]:
    """The spool's database file and its log (WAL)."""
    path = spool_path(store.url)
    assert path is not None
    return path, path.with_name(path.name + "-wal")


def big_post(n: int) -> Post:
    return Post(**{**a_post(n).__dict__, "raw": b"x" * 20_000})  # 5 pages of log


def test_spool_checkpoints_only_on_the_importers_connection_every_so_many_posts(
        sqlite_store: Store) -> None:
    """Intake's commits never stop to copy the log into the file (and fsync it): its
    connection leaves the WAL alone. The importer checkpoints it every so many posts
    it forgets, and the log starts over: later appends write it in place, not longer."""
    intake = Spool.beside(sqlite_store)
    path, wal = spool_files(sqlite_store)
    importer = Spool(path, restart_every=100)
    assert intake is not None
    before = path.stat().st_size
    ids = [qid for _ in range(30) for qid in intake.append([big_post(0)] * 10)]  # ~6 MB
    assert wal.stat().st_size > 5_000_000
    assert path.stat().st_size == before  # nothing copied in: no checkpoint ran
    importer.forget(ids[:99])  # one short of a checkpoint: an ordinary commit, however big
    assert path.stat().st_size == before
    importer.forget(ids[99:100])
    assert path.stat().st_size > 5_000_000  # copied in
    longest = wal.stat().st_size
    for n in range(3):  # appends and imports go on; the log is written from its start
        more = [qid for _ in range(10) for qid in intake.append([big_post(n)] * 10)]
        importer.forget(more)
        assert wal.stat().st_size == longest
    assert [s.seq for s in importer.oldest(1)] == [ids[100]]
    assert importer.depth() == 200


def test_spool_checkpoint_that_a_reader_holds_up_copies_what_it_can_and_fails_nothing(
        sqlite_store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A reader in the log's way (``listgate queue`` counting the spool, say) keeps the
    log from starting over for a tenth of a second at most; the import carries on,
    intake's next append is taken, and a later checkpoint starts the log over."""
    intake = Spool.beside(sqlite_store)
    path, wal = spool_files(sqlite_store)
    importer = Spool(path, restart_every=10)
    assert intake is not None
    ids = intake.append([big_post(n) for n in range(20)])
    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM posts").fetchone() == (20,)
    caplog.set_level(logging.INFO, logger="gateway.spool")
    importer.forget(ids[:10])
    assert "a reader kept the log from starting over" in caplog.text
    grown = wal.stat().st_size
    later = intake.append([big_post(20)])
    assert wal.stat().st_size > grown  # appended after the old log, which stays
    reader.rollback()
    reader.close()
    caplog.clear()
    importer.forget(ids[10:])
    assert "a reader kept" not in caplog.text
    longest = wal.stat().st_size
    last = intake.append([big_post(21)])
    assert wal.stat().st_size == longest  # started over
    assert [s.seq for s in importer.oldest(10)] == later + last


def test_importer_takes_a_batch_at_a_time_oldest_first(
        sqlite_store: Store, spool: Spool) -> None:
    ids = spool.append([a_post(n) for n in range(5)])
    importer = Importer(sqlite_store, spool, clock=ManualClock(), batch=2)
    assert importer.run_once(Progress()).worked == 2
    assert [i for i, _raw in rows(sqlite_store)[0]] == ids[:2]
    assert [s.seq for s in spool.oldest(10)] == ids[2:]
    while importer.run_once(Progress()).worked:
        pass
    assert [i for i, _raw in rows(sqlite_store)[0]] == ids and spool.depth() == 0


def test_importer_after_a_crash_between_the_two_commits_imports_nothing_twice(
        sqlite_store: Store, spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    ids = spool.append([a_post(1), a_post(2)])
    importer = Importer(sqlite_store, spool, clock=ManualClock())
    # The store's commit of the first post, then a crash before the spool forgets it.
    with sqlite_store.write() as conn:
        importer._import(conn, spool.oldest(1))
    assert spool.depth() == 2
    caplog.set_level(logging.INFO, logger="gateway.spool")
    assert importer.run_once(Progress()).worked == 2
    kept, queued = rows(sqlite_store)
    assert [i for i, _raw in kept] == ids
    assert [m for _s, m, _l, _st in queued] == ids  # one work row each, not two
    assert spool.depth() == 0
    assert f"queue_id={ids[0]} was imported before the spool forgot it" in caplog.text


def test_importer_gives_a_post_a_new_id_when_another_message_has_its_number(
        sqlite_store: Store, spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    (seq,) = spool.append([a_post(1)])
    # Something wrote `messages` behind intake's back, under the very same id.
    other = a_post(99)
    with sqlite_store.write() as conn:
        conn.execute(messages.insert().values(id=seq, **other.message_row()))
    caplog.set_level(logging.WARNING, logger="gateway.spool")
    Importer(sqlite_store, spool, clock=ManualClock()).run_once(Progress())
    kept, queued = rows(sqlite_store)
    assert kept == [(seq, other.raw), (seq + 1, a_post(1).raw)]  # both kept
    assert [m for _s, m, _l, _st in queued] == [seq + 1]
    assert f"queue_id={seq} is another message's id in the store" in caplog.text
    assert spool.depth() == 0


def test_importer_leaves_the_spool_whole_when_the_store_refuses_the_batch(
        sqlite_store: Store, spool: Spool) -> None:
    spool.append([a_post(1), a_post(2)])
    with sqlite_store.write() as conn:  # the store refuses every work row
        conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON work "
                             "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    with pytest.raises(StoreError):
        Importer(sqlite_store, spool, clock=ManualClock()).run_once(Progress())
    assert rows(sqlite_store) == ([], [])  # nothing half-written in the store
    assert spool.depth() == 2  # and nothing forgotten in the spool


def test_spool_append_that_cannot_be_written_raises_and_keeps_what_was_there(
        spool: Spool) -> None:
    spool.append([a_post(1)])
    big = Post(**{**a_post(2).__dict__, "raw": b"x" * 2_000_000})
    limit = max(p.stat().st_size for p in spool.path.parent.glob(spool.path.name + "*")) + 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(StoreError, match="intake spool"):
            spool.append([a_post(3), big])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [s.post for s in spool.oldest(10)] == [a_post(1)]  # neither of the batch
    assert len(spool.append([a_post(4)])) == 1  # and the spool still works


def test_spool_counts_as_pending_for_the_bench_idle_check(
        sqlite_store: Store, spool: Spool) -> None:
    """bench/queue_depth.py (the bench's wait-idle) reads the spool with the standard
    library alone, and a spooled post keeps the gateway busy."""
    def depth() -> str:
        return subprocess.run([sys.executable, str(REPO / "bench" / "queue_depth.py"),
                               sqlite_store.url], capture_output=True, text=True, check=True,
                              timeout=60).stdout
    assert depth().startswith("pending 0 (spool=0 work=0 outbound=0)")
    spool.append([a_post(1)])
    assert depth().startswith("pending 1 (spool=1 work=0 outbound=0)")


def test_queue_ls_tells_of_posts_still_in_the_spool(
        tmp_path: Path, sqlite_store: Store, spool: Spool) -> None:
    config = write_config(tmp_path / "cli", store_url=sqlite_store.url)
    spool.append([a_post(1), a_post(2)])
    result = CliRunner().invoke(main, ["--config", str(config), "queue", "ls"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "the queue is empty" in result.output
    assert "2 post(s) taken in by intake, in its spool" in result.output
    assert spooled(sqlite_store) == 2


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_one_process_commits_to_the_store_and_makes_no_spool(
        config_path: Path, store: Store, sink: Sink) -> None:
    with gateway(config_path) as gw:
        gw.send(MEMBERS[0], LIST, post(MEMBERS[0], LIST, "Straight in"))
        sink.wait_for(len(MEMBERS))
    path = spool_path(store.url)
    assert path is not None and not path.exists()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_one_process_imports_what_a_spool_left_by_several_holds(
        config_path: Path, store: Store, sink: Sink) -> None:
    """A run with `processes = 2` stopped with posts in the spool; one process goes on."""
    left = Spool.beside(store)
    assert left is not None
    with store.read() as conn:
        list_id = conn.execute(sa.select(lists_table.c.id)).scalar_one()
    raw = post(MEMBERS[0], LIST, "Left in the spool", message_id="<left@example.net>")
    left.number_after(highest_message_id(store))
    (seq,) = left.append([Post(
        received_at=1.0, mail_from=MEMBERS[0], peer="127.0.0.1:1", helo="client.example",
        protocol="smtp", message_id="<left@example.net>", raw=raw,
        targets=(Target("moderation", list_id, "post", LIST, None),))])
    left.close()
    with gateway(config_path):
        copies = sink.wait_for(len(MEMBERS))
    assert all(b"<left@example.net>" in data for _rcpt, data in copies)
    assert spooled(store) == 0
    with store.read() as conn:
        assert conn.execute(sa.select(messages.c.message_id).where(messages.c.id == seq)
                            ).scalar_one() == "<left@example.net>"
