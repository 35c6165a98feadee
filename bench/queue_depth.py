"""How much work a Listgate store still has queued: the bench adapter's idle test.

    queue_depth.py STORE_URL                print pending / waiting / parked row counts
    queue_depth.py STORE_URL --wait SECS    return once nothing is pending (twice in a row)

"Pending" rows are the ones the gateway is working on or will work on now: claimed
rows, ready rows that are due, and posts in the intake spool. Rows waiting for a
retry later (a deferred delivery, a failed stage) are "waiting", like Mailman's retry
queue, and parked rows are set aside for the operator: neither keeps the gateway busy.
SQLite stores are read with the standard library (read-only, cheap to start);
PostgreSQL through SQLAlchemy from Listgate's venv.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# A retry scheduled this close to now is about to be worked on: count it as pending.
DUE_SLACK = 2.0
POLL = 0.1

QUERY = """
SELECT '{table}', state, CASE WHEN state = 'ready' AND due_at > {soon} THEN 1 ELSE 0 END,
       count(*)
FROM {table} GROUP BY state, CASE WHEN state = 'ready' AND due_at > {soon} THEN 1 ELSE 0 END
"""


@dataclass(frozen=True)
class Depth:
    pending: int
    waiting: int
    parked: int
    by_table: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        tables = " ".join(f"{name}={n}" for name, n in self.by_table)
        return (f"pending {self.pending} ({tables}) waiting {self.waiting} "
                f"parked {self.parked}")


Rows = list[tuple[str, str, int, int]]


def sqlite_reader(url: str) -> Callable[[str], Rows]:
    path = url.removeprefix("sqlite:///")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def read(sql: str) -> Rows:
        return [(str(t), str(s), int(later), int(n)) for t, s, later, n in conn.execute(sql)]
    return read


def sqlalchemy_reader(url: str) -> Callable[[str], Rows]:
    import sqlalchemy as sa

    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    engine = sa.create_engine(url, pool_size=1)

    def read(sql: str) -> Rows:
        with engine.connect() as conn:
            return [(str(t), str(s), int(later), int(n))
                    for t, s, later, n in conn.execute(sa.text(sql))]
    return read


def spool_reader(url: str) -> Callable[[], int]:
    """Posts in the intake spool of a SQLite store (``<db>-spool``, written when intake
    has a process of its own): taken in, not yet in the store's queues."""
    path = url.removeprefix("sqlite:///") + "-spool"

    def count() -> int:
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        except sqlite3.OperationalError:
            return 0  # no spool file (yet)
        try:
            return int(conn.execute("SELECT count(*) FROM posts").fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # not made yet
        finally:
            conn.close()
    return count


def depth(read: Callable[[str], Rows], spooled: Callable[[], int] = lambda: 0) -> Depth:
    soon = time.time() + DUE_SLACK
    rows: Rows = []
    for table in ("work", "outbound"):
        rows += read(QUERY.format(table=table, soon=soon))
    pending = {"spool": spooled(), "work": 0, "outbound": 0}
    waiting = parked = 0
    for table, state, later, n in rows:
        if state == "parked":
            parked += n
        elif later:
            waiting += n
        else:
            pending[table] += n
    return Depth(sum(pending.values()), waiting, parked, tuple(pending.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the store URL (sqlite:////path or postgresql+psycopg://...)")
    p.add_argument("--wait", type=float, metavar="SECS",
                   help="return 0 once nothing is pending twice in a row, 1 after SECS")
    a = p.parse_args(argv)
    sqlite = a.url.startswith("sqlite:")
    read = sqlite_reader(a.url) if sqlite else sqlalchemy_reader(a.url)
    spooled = spool_reader(a.url) if sqlite else (lambda: 0)
    if a.wait is None:
        print(depth(read, spooled).describe())
        return 0
    deadline = time.monotonic() + a.wait
    zeros = 0
    while True:
        d = depth(read, spooled)
        zeros = zeros + 1 if d.pending == 0 else 0
        if zeros >= 2:
            return 0
        if time.monotonic() >= deadline:
            print(f"queue_depth: still busy after {a.wait:.0f}s: {d.describe()}",
                  file=sys.stderr)
            return 1
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main())
