"""Claiming work under a lease, and what happens when it ends: done, failed, parked.

The same operations serve every queue table (``work`` and ``outbound``). A claim
is one statement: ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)`` on
PostgreSQL; on SQLite the write transaction holds the database lock instead.
A row whose lease expired is claimable again; a row that failed, or whose lease
expired, ``max_attempts`` times in a row is parked: kept, visible, never deleted.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql.dml import ReturningDelete, ReturningUpdate

from gateway.schema import State
from gateway.store import Store


@dataclass(frozen=True)
class Claimer:
    """Who claims, for how long, and how often work may fail before it is parked."""

    owner: str
    lease: float
    max_attempts: int


def worker_identity() -> str:
    """``host:pid:start`` — unique per process, and checkable on this host after a crash."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22 (starttime) comes after the parenthesised command name.
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def _owner_is_dead(owner: str) -> bool:
    """True if ``owner`` names a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start not in ("0", _start_ticks(pid))


def recover_dead_leases(conn: Connection, table: sa.Table, *, now: float) -> int:
    """Expire at once the leases held by dead processes of this host.

    Other hosts' leases are left to expire on their own: we cannot tell if they live.
    """
    rows = conn.execute(
        sa.select(table.c.lease_owner).where(table.c.state == State.CLAIMED.value).distinct()
    ).scalars().all()
    dead = [owner for owner in rows if owner and _owner_is_dead(owner)]
    if not dead:
        return 0
    result = conn.execute(
        sa.update(table)
        .where(table.c.state == State.CLAIMED.value, table.c.lease_owner.in_(dead))
        .values(lease_until=0.0)  # long expired: claimable at once, whatever the clock says
    )
    return result.rowcount


def take(store: Store, table: sa.Table, claimer: Claimer, *, now: float, limit: int,
         stage: str | None = None, roles: Sequence[str] = ()) -> list[Row[tuple[object, ...]]]:
    """:func:`claim` in a write transaction of its own, opened only when a read finds a
    row to claim. A stage claims again after every round that found work, and mostly
    finds none: on SQLite an empty claim would still wait for, and hold, the one writer
    that intake's commit (a client waiting for its 250) needs."""
    statements = _claiming(table, stage, tuple(roles))
    with store.read() as conn:
        if conn.execute(statements.due, {"now": now}).first() is None:
            return []
    with store.write() as conn:
        return claim(conn, table, claimer, now=now, limit=limit, stage=stage, roles=roles)


def claim(conn: Connection, table: sa.Table, claimer: Claimer, *, now: float, limit: int,
          stage: str | None = None, roles: Sequence[str] = ()) -> list[Row[tuple[object, ...]]]:
    """Claim up to ``limit`` due rows (of ``stage`` and ``roles``, if given), oldest first;
    park those that keep dying."""
    statements = _claiming(table, stage, tuple(roles))
    conn.execute(statements.park, {
        "now": now, "max_attempts": claimer.max_attempts,
        "note": f" [parked: its lease expired {claimer.max_attempts} times; "
                "the process working on it died or hung]"})
    rows = conn.execute(statements.claim, {
        "now": now, "limit": limit, "owner": claimer.owner,
        "until": now + claimer.lease}).all()
    return sorted(rows, key=lambda r: r.id)


@dataclass(frozen=True)
class _Claiming:
    due: sa.Select[tuple[int]]
    park: sa.Update
    claim: ReturningUpdate[tuple[object, ...]]


@functools.cache
def _claiming(table: sa.Table, stage: str | None, roles: tuple[str, ...]) -> _Claiming:
    """The statements of :func:`take` and :func:`claim` for one queue, built once: building
    a statement costs several times what running it does."""
    c = table.c
    now: sa.BindParameter[float] = sa.bindparam("now")
    where = [*([c.stage == stage] if stage is not None else []),
             *([c.role.in_(roles)] if roles else [])]
    expired = sa.and_(c.state == State.CLAIMED.value, c.lease_until < now)
    due = sa.or_(sa.and_(c.state == State.READY.value, c.due_at <= now), expired)
    pick = (
        sa.select(c.id).where(due, *where).order_by(c.due_at, c.id)
        .limit(sa.bindparam("limit")).with_for_update(skip_locked=True).scalar_subquery()
    )
    return _Claiming(
        due=sa.select(c.id).where(due, *where).limit(1),
        park=sa.update(table)
        .where(expired, c.attempts >= sa.bindparam("max_attempts"), *where)
        .values(state=State.PARKED.value, lease_owner=None, lease_until=None, updated_at=now,
                last_error=sa.func.coalesce(c.last_error, "") + sa.bindparam("note")),
        claim=sa.update(table).where(c.id.in_(pick))
        .values(state=State.CLAIMED.value, lease_owner=sa.bindparam("owner"),
                lease_until=sa.bindparam("until"), attempts=c.attempts + 1, updated_at=now)
        .returning(*c),
    )


def owned(table: sa.Table, row_id: int, claimer: Claimer) -> sa.ColumnElement[bool]:
    """The condition that the row is still ours: our lease was not lost to another."""
    return sa.and_(table.c.id == row_id, held_by(table, claimer))


def held_by(table: sa.Table, claimer: Claimer) -> sa.ColumnElement[bool]:
    """The condition that a row is claimed under ``claimer``'s lease."""
    return _held(table, claimer.owner)


def _held(table: sa.Table, owner: str | sa.BindParameter[str]) -> sa.ColumnElement[bool]:
    return sa.and_(table.c.state == State.CLAIMED.value, table.c.lease_owner == owner)


def complete(conn: Connection, table: sa.Table, row_id: int, claimer: Claimer) -> bool:
    """Delete a finished row; False if the lease had been lost (someone else has it)."""
    return conn.execute(_completing(table).one,
                        {"id": row_id, "owner": claimer.owner}).rowcount == 1


def complete_many(conn: Connection, table: sa.Table, row_ids: Iterable[int],
                  claimer: Claimer) -> set[int]:
    """Delete finished rows in one statement; the ids deleted (the others' leases had
    been lost)."""
    ids = list(row_ids)
    if not ids:
        return set()
    deleted = conn.execute(_completing(table).many, {"ids": ids, "owner": claimer.owner})
    return {row.id for row in deleted}


@dataclass(frozen=True)
class _Completing:
    one: sa.Delete
    many: ReturningDelete[tuple[int]]


@functools.cache
def _completing(table: sa.Table) -> _Completing:
    c = table.c
    held = _held(table, sa.bindparam("owner"))
    return _Completing(
        one=sa.delete(table).where(c.id == sa.bindparam("id"), held),
        many=sa.delete(table).where(c.id.in_(sa.bindparam("ids", expanding=True)), held)
        .returning(c.id))


def renew(conn: Connection, table: sa.Table, ids: Iterable[int], claimer: Claimer, *,
          now: float) -> int:
    ids = list(ids)
    if not ids:
        return 0
    return conn.execute(
        sa.update(table)
        .where(table.c.id.in_(ids), held_by(table, claimer))
        .values(lease_until=now + claimer.lease, updated_at=now)
    ).rowcount


def fail(conn: Connection, table: sa.Table, row_id: int, claimer: Claimer, *, now: float,
         error: str, retry_delay: float) -> State:
    """Record a failure: retry later with backoff, or park after ``max_attempts``."""
    row = conn.execute(sa.select(table.c.attempts).where(owned(table, row_id, claimer))).first()
    if row is None:
        return State.CLAIMED
    if row.attempts >= claimer.max_attempts:
        state, due = State.PARKED, now
        error = f"{error} [parked after {row.attempts} failed attempts]"
    else:
        state, due = State.READY, now + retry_delay * 2 ** (row.attempts - 1)
    conn.execute(
        sa.update(table).where(table.c.id == row_id)
        .values(state=state.value, due_at=due, lease_owner=None, lease_until=None,
                last_error=error[:4000], updated_at=now)
    )
    return state


def hand_back(store: Store, table: sa.Table, claimer: Claimer, *, now: float,
              stage: str) -> int:
    """Make ``stage``'s rows that ``claimer`` still holds claimable now; how many.

    For a stage's worker after a round that raised: whatever that round had claimed
    and not finished is no one's work any more, and would otherwise wait out its
    lease (a minute) once the store is back. Only the worker of a stage may call
    this, between rounds, as it holds no row then. The claim counted an attempt: a
    row whose attempts are used up is parked, as :func:`fail` would."""
    c = table.c
    mine = sa.and_(_held(table, claimer.owner), c.stage == stage)
    with store.write() as conn:
        conn.execute(
            sa.update(table).where(mine, c.attempts >= claimer.max_attempts)
            .values(state=State.PARKED.value, lease_owner=None, lease_until=None,
                    updated_at=now, last_error=sa.func.coalesce(c.last_error, "")
                    + f" [parked after {claimer.max_attempts} attempts that failed "
                    "mid-round]"))
        return conn.execute(
            sa.update(table).where(mine)
            .values(state=State.READY.value, due_at=now, lease_owner=None, lease_until=None,
                    updated_at=now)
        ).rowcount


def release(conn: Connection, table: sa.Table, row_id: int, claimer: Claimer, *, now: float,
            due_at: float, note: str | None = None, **values: object) -> bool:
    """Hand a row back as ready (at ``due_at``), not counting it as a failure."""
    return conn.execute(
        sa.update(table).where(owned(table, row_id, claimer))
        .values(state=State.READY.value, due_at=due_at, attempts=0, lease_owner=None,
                lease_until=None, updated_at=now, last_error=note, **values)
    ).rowcount == 1


def park(conn: Connection, table: sa.Table, row_id: int, *, now: float, why: str) -> bool:
    """Park a row by hand (`listgate queue park`)."""
    return conn.execute(
        sa.update(table).where(table.c.id == row_id)
        .values(state=State.PARKED.value, lease_owner=None, lease_until=None, updated_at=now,
                last_error=why)
    ).rowcount == 1


def retry(conn: Connection, table: sa.Table, row_id: int, *, now: float) -> bool:
    """Make a parked (or waiting) row due now, with a fresh attempt count."""
    return conn.execute(
        sa.update(table)
        .where(table.c.id == row_id, table.c.state != State.CLAIMED.value)
        .values(state=State.READY.value, attempts=0, due_at=now, updated_at=now)
    ).rowcount == 1
