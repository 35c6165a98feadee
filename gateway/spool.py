"""The intake spool: when intake has a process of its own (``[daemon] processes`` >= 2)
on SQLite, a post is committed to a database file of its own before its 250, and
the stages move it into the store afterwards.

SQLite has one writer per file. With intake committing into the store, each post's
250 waited behind the stages' transactions (a fan-out, a delivery's record), which
take the store's writer several times per post. The spool is written by intake
alone, so its commit (one transaction and one fsync for every session waiting at
that moment) waits for nobody. The importer, a stage like the others, moves spooled
posts into ``messages`` and ``work`` a batch per transaction, then deletes them
from the spool.

Nothing is lost or doubled between the two files:

- a post is in the spool, fsync'd (WAL, synchronous=FULL), before its 250;
- an import commits the store's rows first, then deletes the spool's. A crash in
  between leaves a post in both, and the next import finds its row in the store (same
  id, same arrival) and only deletes it from the spool;
- the spool numbers posts from above the store's highest message id, and a post keeps
  its number in the store, so the 250's "queued as N" and every later log line name
  the same N. Should a row have that id already and be another message (something
  wrote ``messages`` behind intake's back), the post gets a new id, and a warning.

PostgreSQL has no single writer: intake commits there directly (``insert_posts``).
Nor does a single process use the spool: its stages' threads hold the interpreter
while intake waits anyway, and the spool would only add a copy of every post. It
imports what a spool file holds, though (left by a run with several processes).
The spool is ``<database>-spool`` next to the store's file.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.clock import Clock
from gateway.errors import StoreError, StoreUnavailable
from gateway.routing import Stage
from gateway.schema import State, messages, work
from gateway.store import SQLITE_BUSY_TIMEOUT, Store, sibling_path
from gateway.worker import Progress

log = logging.getLogger(__name__)

SUFFIX = "-spool"
# Posts moved per store transaction: enough to make the import cheap per post, few
# enough that the store's writer is not held for long.
IMPORT_BATCH = 64
# Posts the importer forgets between two checkpoints of the spool's log (see Spool):
# about 2 pages of log a post, so the log stays near 4 MB.
RESTART_EVERY = 512
# Seconds a checkpoint waits for intake's commit in progress and for readers.
CHECKPOINT_WAIT = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    mail_from TEXT NOT NULL,
    targets TEXT NOT NULL,
    peer TEXT NOT NULL,
    helo TEXT NOT NULL,
    protocol TEXT NOT NULL,
    message_id TEXT,
    raw BLOB NOT NULL
)
"""
_COLUMNS = "received_at, mail_from, targets, peer, helo, protocol, message_id, raw"


@dataclass(frozen=True)
class Target:
    """One work row a post makes: a list address it was sent to, and its stage."""

    stage: str
    list_id: int
    role: str
    address: str
    detail: str | None


@dataclass(frozen=True)
class Post:
    """What intake keeps of a message it takes: its ``messages`` row and its targets."""

    received_at: float
    mail_from: str
    targets: tuple[Target, ...]
    peer: str
    helo: str
    protocol: str
    message_id: str | None
    raw: bytes

    def message_row(self) -> dict[str, Any]:
        return {"received_at": self.received_at, "mail_from": self.mail_from,
                "rcpt_tos": "\n".join(t.address for t in self.targets), "peer": self.peer,
                "helo": self.helo[:255], "protocol": self.protocol, "size": len(self.raw),
                "message_id": (self.message_id or None) and self.message_id[:998],
                "raw": self.raw}

    def stages(self) -> set[Stage]:
        return {Stage(t.stage) for t in self.targets}


def work_rows(post: Post, qid: int, now: float) -> list[dict[str, Any]]:
    return [{"stage": t.stage, "message_id": qid, "list_id": t.list_id, "role": t.role,
             "address": t.address, "detail": t.detail, "cursor": None, "content_id": None,
             "state": State.READY.value, "attempts": 0, "due_at": now, "lease_owner": None,
             "lease_until": None, "last_error": None, "created_at": now, "updated_at": now}
            for t in post.targets]


# One INSERT ... VALUES (...), (...) RETURNING for a batch, ids in the batch's order.
_INSERT_MESSAGES = messages.insert().returning(messages.c.id, sort_by_parameter_order=True)


def insert_posts(conn: Connection, posts: Sequence[Post], now: float,
                 ids: Sequence[int] | None = None) -> list[int]:
    """Store ``posts`` and their work rows, under ``ids`` if given (the spool's numbers),
    else under new ones; the ids, in order. Two statements per batch, however many
    posts: each statement costs more in SQLAlchemy than the rows and the fsync do."""
    if ids is None:
        ids = [int(qid) for qid in conn.execute(
            _INSERT_MESSAGES, [p.message_row() for p in posts]).scalars()]
    else:
        conn.execute(messages.insert(),
                     [dict(p.message_row(), id=qid) for p, qid in zip(posts, ids, strict=True)])
    rows = [row for p, qid in zip(posts, ids, strict=True) for row in work_rows(p, qid, now)]
    if rows:
        conn.execute(work.insert(), rows)
    return list(ids)


@dataclass(frozen=True)
class Spooled:
    seq: int
    post: Post


class Spool:
    """The spool file: posts appended by intake, read and deleted by the importer.

    One connection per process, used by one thread at a time (a lock): appends,
    reads and deletes are each a few hundred microseconds.

    Appends are fsync'd before their 250 (``synchronous=FULL``); deletions are not
    (``forget``): one lost in a crash leaves a post in both files, which the next
    import finds in the store and only deletes. So the importer holds the file's one
    write lock for microseconds, not an fsync, and intake's next append seldom waits
    behind it.

    Only the importer checkpoints the WAL (copies the log into the file, and an
    fsync), from ``forget``: intake never does in the middle of a commit its clients
    wait for. The importer does it every ``restart_every`` posts it forgets, as
    a RESTART checkpoint: the next append writes the log from its start again, over
    pages already on disk. Without it, under steady intake the log never starts over
    (a checkpoint cannot catch up with appends that never pause) and grows; an fsync
    of a file that grew also writes its new size through the file system's journal,
    which made every intake commit cost about twice the fsync (bench/README.md)."""

    def __init__(self, path: Path, *, restart_every: int = RESTART_EVERY) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._restart_every = restart_every
        self._forgotten = 0  # posts forgotten since the last checkpoint
        try:
            self._conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT,
                                         isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._synchronous = "FULL"
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # see the class
            self._conn.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the intake spool {path}: {exc}") from exc

    @classmethod
    def beside(cls, store: Store, *, create: bool = True) -> Spool | None:
        """The spool of a SQLite store (without ``create``, only if its file exists);
        None for PostgreSQL, which needs none."""
        path = spool_path(store.url)
        if path is None or not (create or path.exists()):
            return None
        return cls(path)

    def number_after(self, highest: int) -> None:
        """Number the next post above ``highest`` (the store's highest message id)."""
        with self._transaction() as conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'posts'").fetchone()
            if row is None:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('posts', ?)",
                             (highest,))
            elif row[0] < highest:
                conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'posts'",
                             (highest,))

    def append(self, posts: Sequence[Post]) -> list[int]:
        """Commit ``posts`` (one transaction, one fsync); their numbers, in order."""
        with self._transaction() as conn:
            return _insert(conn, posts)

    def oldest(self, limit: int) -> list[Spooled]:
        with self._lock, _translated(self.path):
            rows = self._conn.execute(f"SELECT seq, {_COLUMNS} FROM posts ORDER BY seq LIMIT ?",
                                      (limit,)).fetchall()
        return [Spooled(int(r[0]), _post(r[1:])) for r in rows]

    def forget(self, seqs: Iterable[int]) -> None:
        """Delete imported posts, without an fsync (see the class)."""
        numbers = [(seq,) for seq in seqs]
        with self._transaction(synchronous="NORMAL") as conn:
            conn.executemany("DELETE FROM posts WHERE seq = ?", numbers)
        self._forgotten += len(numbers)
        if self._forgotten >= self._restart_every:
            self._forgotten = 0
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the log into the file and start it over (see the class). It holds the
        file's write lock: intake's appends wait for it (a few milliseconds). Should a
        reader keep the log past ``CHECKPOINT_WAIT``, the log is copied as far as it can
        be, and starts over at a later checkpoint."""
        with self._lock, _translated(self.path):
            self._conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT * 1000:.0f}")
            try:
                busy, frames, copied = self._conn.execute(
                    "PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                self._conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
        if busy:
            log.info("spool checkpoint: %d of %d log pages copied; a reader kept the log "
                     "from starting over", copied, frames)

    def depth(self) -> int:
        with self._lock, _translated(self.path):
            return int(self._conn.execute("SELECT count(*) FROM posts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self, synchronous: str = "FULL") -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the lock; rolled back on any error.
        The commit fsyncs unless ``synchronous`` is "NORMAL"."""
        with self._lock, _translated(self.path):
            if self._synchronous != synchronous:
                self._conn.execute(f"PRAGMA synchronous={synchronous}")
                self._synchronous = synchronous
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                _rollback(self._conn)
                raise


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    """sqlite3's errors as the store's: a full disk or a locked file is a StoreError
    (intake answers 451, a stage tries again)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(f"the intake spool {path}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"the intake spool {path}: {exc}") from exc


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rolling back a spool transaction failed")


def _insert(conn: sqlite3.Connection, posts: Sequence[Post]) -> list[int]:
    """One INSERT for the batch, numbered on from the highest number yet given (the
    transaction is the file's only writer): a statement per post cost intake more
    interpreter time than the rows do."""
    if not posts:
        return []
    start = conn.execute(_NEXT_SEQ).fetchone()[0]
    seqs = list(range(start + 1, start + 1 + len(posts)))
    for at in range(0, len(posts), _ROWS_PER_INSERT):  # under SQLite's limit of parameters
        chunk = posts[at:at + _ROWS_PER_INSERT]
        values = [value for seq, p in zip(seqs[at:], chunk, strict=False)
                  for value in (seq, p.received_at, p.mail_from, _targets_json(p.targets),
                                p.peer, p.helo, p.protocol, p.message_id, p.raw)]
        conn.execute(_insert_statement(len(chunk)), values)
    return seqs


_ROWS_PER_INSERT = 100
# AUTOINCREMENT keeps sqlite_sequence at or above every number ever given (no row yet:
# no post was ever appended).
_NEXT_SEQ = "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'posts'), 0)"


@functools.cache  # rows <= _ROWS_PER_INSERT
def _insert_statement(rows: int) -> str:
    one = "(" + ", ".join("?" * (_COLUMNS.count(",") + 2)) + ")"  # seq and _COLUMNS
    return f"INSERT INTO posts (seq, {_COLUMNS}) VALUES " + ", ".join([one] * rows)


@functools.lru_cache(maxsize=4096)
def _targets_json(targets: tuple[Target, ...]) -> str:
    """The targets column; the same few lists' targets come again and again."""
    return json.dumps([[t.stage, t.list_id, t.role, t.address, t.detail] for t in targets])


def _post(row: Sequence[Any]) -> Post:
    received_at, mail_from, targets, peer, helo, protocol, message_id, raw = row
    return Post(received_at=float(received_at), mail_from=str(mail_from),
                targets=tuple(Target(str(s), int(lid), str(role), str(addr),
                                     None if detail is None else str(detail))
                              for s, lid, role, addr, detail in json.loads(targets)),
                peer=str(peer), helo=str(helo), protocol=str(protocol),
                message_id=None if message_id is None else str(message_id), raw=bytes(raw))


def spool_path(url: str) -> Path | None:
    return sibling_path(url, SUFFIX)


def spooled(store: Store) -> int:
    """Posts in the spool of ``store``, read without writing anything (0 if none)."""
    path = spool_path(store.url)
    if path is None or not path.exists():
        return 0
    with _translated(path):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT)
        try:
            return int(conn.execute("SELECT count(*) FROM posts").fetchone()[0])
        finally:
            conn.close()


def highest_message_id(store: Store) -> int:
    """The highest id ``messages`` has handed out (deleted rows included)."""
    with store.read() as conn:
        used = conn.execute(sa.text(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'")).scalar()
        top = conn.execute(sa.select(sa.func.max(messages.c.id))).scalar()
    return max(int(used or 0), int(top or 0))


class Importer:
    """The stage that moves spooled posts into the store (see the module's docstring)."""

    def __init__(self, store: Store, spool: Spool, *, clock: Clock,
                 batch: int = IMPORT_BATCH) -> None:
        self.store = store
        self.spool = spool
        self.clock = clock
        self.batch = batch

    def run_once(self, progress: Progress) -> Progress:
        spooled = self.spool.oldest(self.batch)
        if not spooled:
            return progress
        with self.store.write() as conn:
            self._import(conn, spooled)
        # The next stages start now, while the spool (another file, another lock) forgets
        # the posts: its fsync is not on their way to the members.
        progress.worked += len(spooled)
        progress.woke(*{stage for s in spooled for stage in s.post.stages()})
        self.spool.forget(s.seq for s in spooled)
        return progress

    def _import(self, conn: Connection, spooled: Sequence[Spooled]) -> None:
        now = self.clock.now()
        there = {int(r.id): r for r in conn.execute(
            sa.select(messages.c.id, messages.c.received_at, messages.c.size,
                      messages.c.mail_from)
            .where(messages.c.id.in_([s.seq for s in spooled])))}
        fresh: list[Spooled] = []
        for s in spooled:
            row = there.get(s.seq)
            if row is None:
                fresh.append(s)
            elif (row.received_at, row.size, row.mail_from) == (
                    s.post.received_at, len(s.post.raw), s.post.mail_from):
                log.info("queue_id=%s was imported before the spool forgot it", s.seq)
            else:
                qid = insert_posts(conn, [s.post], now)[0]
                log.warning("queue_id=%s is another message's id in the store; the post "
                            "spooled under it is queue_id=%s", s.seq, qid)
        if fresh:
            insert_posts(conn, [s.post for s in fresh], now, ids=[s.seq for s in fresh])
