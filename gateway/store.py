"""The store: one database behind SQLAlchemy, SQLite (WAL, synchronous=FULL) or PostgreSQL.

Stages hand work to each other only through it. A write transaction that has
returned has been committed and, on SQLite, fsync'd: that is what a 250 rests on.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from gateway.clock import Clock
from gateway.errors import SchemaOutdated, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The newest revision in gateway/migrations, which the daemon checks the store against
# at start without loading Alembic (~11 MB a process); a test holds the two together.
SCHEMA_REVISION = "0005"
# How long a SQLite writer waits for its turn before the store counts as unavailable.
SQLITE_BUSY_TIMEOUT = 30


def normalise_url(url: str) -> str:
    """PostgreSQL URLs use psycopg 3 whatever driver they name."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class _Turn:
    """A lock whose ``first`` takers go before the others waiting for it."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._held = False
        self._first_waiting = 0

    def acquire(self, *, first: bool, timeout: float) -> bool:
        with self._cv:
            if first:
                self._first_waiting += 1
            try:
                if not self._cv.wait_for(
                        lambda: not self._held and (first or not self._first_waiting), timeout):
                    return False
            finally:
                if first:
                    self._first_waiting -= 1
            self._held = True
            return True

    def release(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()


class Store:
    """A database with transactions that either commit durably or raise StoreError."""

    def __init__(self, url: str, *, clock: Clock, pool_size: int = 8,
                 writes_first: bool = False) -> None:
        self.url = normalise_url(url)
        self.clock = clock
        self.engine = _engine(self.url, pool_size)
        # SQLite has one writer at a time, and a writer that finds the lock taken polls
        # for it, sleeping up to 100 ms between tries. The stages of one process queue
        # here instead, and the next starts the moment the last commits (a post's
        # latency went from ~40 ms to a few under load). Other processes (the workers
        # of `serve`, the CLI) queue behind the in-process turn on a flock of a file next
        # to the database: in the kernel, not in SQLite's busy handler. Correctness
        # never rests on the flock (SQLite's own lock does that); the kernel drops it
        # when its holder dies, however it dies.
        # A second file is a gate: a ``writes_first`` store (the intake worker, whose
        # clients wait for the commit) holds it while it waits for the lock, and the
        # other writers pass it before they wait; so a stage that has just committed
        # cannot take the lock straight back while intake is waiting for it.
        self._write_turn = _Turn() if self.is_sqlite else None
        self._writes_first = writes_first
        self._write_lock_fd = self._write_gate_fd = None
        if self.is_sqlite:
            self._write_lock_fd = _open_lock_file(self.url, "-writelock")
            self._write_gate_fd = _open_lock_file(self.url, "-writegate")

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def write(self, *, first: bool = False) -> Iterator[Connection]:
        """A write transaction: committed (and fsync'd) when the block ends without error.

        ``first``: a writer someone waits for (intake, whose client waits for the 250):
        on SQLite it goes before the other writers of this process that are waiting."""
        with self._turn(first), self._translate():
            with self.engine.connect().execution_options(listgate_write=True) as conn:
                with conn.begin():
                    yield conn

    @contextmanager
    def _turn(self, first: bool = False) -> Iterator[None]:
        if self._write_turn is None:
            yield
            return
        if not self._write_turn.acquire(first=first, timeout=SQLITE_BUSY_TIMEOUT):
            raise StoreUnavailable("database is locked: another write in this process took "
                                   f"longer than {SQLITE_BUSY_TIMEOUT}s")
        try:
            self._flock_turn()
            try:
                yield
            finally:
                if self._write_lock_fd is not None:
                    fcntl.flock(self._write_lock_fd, fcntl.LOCK_UN)
        finally:
            self._write_turn.release()

    def _flock_turn(self) -> None:
        lock, gate = self._write_lock_fd, self._write_gate_fd
        if lock is None:
            return
        if gate is None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        elif self._writes_first:
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction with a consistent snapshot."""
        with self._translate():
            with self.engine.connect() as conn:
                with conn.begin():
                    yield conn

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise StoreUnavailable(_describe(exc)) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise StoreUnavailable(_describe(exc)) from exc
            raise StoreError(_describe(exc)) from exc

    # -- schema ------------------------------------------------------------

    # Alembic is loaded only by what changes or reports on the schema (`listgate init`,
    # `listgate db`), not by the daemon.

    def _alembic(self) -> AlembicConfig:
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upgrade(self) -> None:
        """Bring the schema to the newest revision."""
        from alembic import command

        with self._translate():
            command.upgrade(self._alembic(), "head")

    def revisions(self) -> tuple[str | None, str]:
        """(the database's revision, the newest this code knows, as Alembic finds it)."""
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self._alembic()).get_current_head()
        assert head is not None
        return self.revision(), head

    def revision(self) -> str | None:
        """The database's revision (None: no schema yet), read without Alembic."""
        with self._translate(), self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def check_schema(self) -> None:
        current, head = self.revision(), SCHEMA_REVISION
        if current != head:
            raise SchemaOutdated(
                f"the database at {self.engine.url.render_as_string(hide_password=True)} is at "
                f"revision {current or 'none (empty)'}, this Listgate needs {head}: "
                "run `listgate db upgrade` (or `listgate init` for a new store)"
            )

    def dispose(self) -> None:
        self.engine.dispose()
        for fd in (self._write_lock_fd, self._write_gate_fd):
            if fd is not None:
                os.close(fd)
        self._write_lock_fd = self._write_gate_fd = None


def sibling_path(url: str, suffix: str) -> Path | None:
    """A file of ours next to a SQLite database: ``<db><suffix>``; None without a file
    (PostgreSQL's "database" is a name on a server, not a path here)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(f"{parsed.database}{suffix}")


def write_lock_path(url: str) -> Path | None:
    """The file whose flock orders SQLite writers across processes: ``<db>-writelock``
    (``<db>-writegate`` is the gate before it)."""
    return sibling_path(url, "-writelock")


def doorbell_path(url: str) -> Path | None:
    """Where the running gateway's doorbell is (``gateway.worker.Doorbell``): ``<db>-doorbell``
    next to a SQLite database; None for PostgreSQL (its clients wait for a poll)."""
    return sibling_path(url, "-doorbell")


def _open_lock_file(url: str, suffix: str) -> int | None:
    path = sibling_path(url, suffix)
    if path is None:
        return None
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    except OSError:
        pass
    try:  # a file made by another user: flock needs no write access
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("no cross-process write lock (%s): writers of other processes will "
                    "poll SQLite's lock instead", exc)
        return None


def _describe(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)


def _engine(url: str, pool_size: int) -> Engine:
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            raise StoreError("an in-memory SQLite store cannot be shared by stages; use a file")
        path = sa.engine.make_url(url).database
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, pool_size=pool_size, max_overflow=pool_size,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control from pysqlite so that BEGIN is ours to choose.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the lock up front: a deferred transaction that upgrades to a
    # write could fail with SQLITE_BUSY instead of waiting its turn.
    write = conn.get_execution_options().get("listgate_write", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
