"""The digest stage: batching posts per list, closing batches on schedule or size, sending once.

Fanout adds every accepted post to its list's open batch (one open batch per
list, enforced by a unique index). A batch closes when it passes the list's
size threshold, or when the list's schedule (a cron expression in its time
zone, evaluated by APScheduler's CronTrigger) comes due; a due time missed
while the gateway was down closes the batch once at start-up. Closing is a
conditional UPDATE and queues one digest work row, so a batch is sent by one
worker, once, however many gateways share the store.

Sending renders the issue once per format (MIME, RFC 1153 plain, HTML) and then,
like fanout, reads digest members in chunks behind a cursor: each member is
queued exactly once, each gets their own copy with their own links.
"""

from __future__ import annotations

import datetime
import logging
import zoneinfo
from dataclasses import dataclass

import sqlalchemy as sa
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from gateway import digestformats, journal, lists, outgoing, queue
from gateway.clock import Clock
from gateway.errors import ConfigError, LeaseLost
from gateway.lists import MailingList
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.schema import (
    BatchState,
    Mode,
    State,
    contents,
    digest_batches,
    digest_entries,
    members,
    messages,
    work,
)
from gateway.schema import (
    lists as lists_table,
)
from gateway.signing import PLACEHOLDER
from gateway.store import Store
from gateway.templates import Templates
from gateway.worker import Progress

log = logging.getLogger(__name__)

FORMAT_OF_MODE = {Mode.DIGEST_MIME: "mime", Mode.DIGEST_PLAIN: "plain",
                  Mode.DIGEST_HTML: "html"}
DIGEST_MODES = tuple(m.value for m in FORMAT_OF_MODE)


def schedule(expression: str, timezone: str) -> CronTrigger:
    """A list's digest schedule; ConfigError if the expression or zone is not valid."""
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {timezone!r} (e.g. UTC, Europe/Berlin)") from None
    try:
        return CronTrigger.from_crontab(expression, timezone=zone)
    except ValueError as exc:
        raise ConfigError(f"digest schedule {expression!r} is not a cron expression "
                          f"(minute hour day month weekday, e.g. \"0 7 * * *\"): {exc}") from None


def next_due(lst: MailingList, now: float) -> float:
    trigger = schedule(lst.digest_schedule, lst.digest_timezone)
    after = datetime.datetime.fromtimestamp(now, datetime.UTC)
    fire = trigger.get_next_fire_time(None, after)
    assert fire is not None
    # CronTrigger may return `after` itself when it falls on the schedule: never "now" again.
    if fire.timestamp() <= now:
        fire = trigger.get_next_fire_time(fire, after + datetime.timedelta(seconds=1))
        assert fire is not None
    return float(fire.timestamp())


# -- batches (used by fanout, the scheduler and the CLI) ---------------------------------

def open_batch(conn: Connection, lst: MailingList, *, now: float) -> Row[tuple[object, ...]]:
    """The list's open batch, created if there is none."""
    q = sa.select(digest_batches).where(digest_batches.c.list_id == lst.id,
                                        digest_batches.c.state == BatchState.OPEN.value)
    row = conn.execute(q.with_for_update()).first()
    if row is not None:
        return row
    try:
        with conn.begin_nested():
            conn.execute(digest_batches.insert().values(
                list_id=lst.id, state=BatchState.OPEN.value, volume=None, number=None, posts=0,
                bytes=0, opened_at=now, closed_at=None, sent_at=None))
    except IntegrityError:  # another gateway opened it a moment ago
        pass
    return conn.execute(q.with_for_update()).one()


def _readers(list_id: int | sa.BindParameter[int]) -> sa.ColumnElement[bool]:
    """The condition for the list's members who get its digests."""
    return sa.and_(members.c.list_id == list_id, members.c.mode.in_(DIGEST_MODES),
                   members.c.enabled.is_(True))


# Run for every post to a list: built once (building costs more than running it).
_HAS_READERS = sa.select(members.c.id).where(_readers(sa.bindparam("list_id"))).limit(1)


def add_post(conn: Connection, lst: MailingList, *, message_id: int, size: int,
             now: float) -> bool:
    """Add an accepted post to the list's open batch; True if that closed the batch.

    Not while the list has no digest members: nobody would get the issue, and a member
    who switches to digests later had these posts one by one already.
    """
    if conn.execute(_HAS_READERS, {"list_id": lst.id}).first() is None:
        return False
    batch = open_batch(conn, lst, now=now)
    try:
        with conn.begin_nested():
            conn.execute(digest_entries.insert().values(batch_id=batch.id, message_id=message_id,
                                                        added_at=now))
    except IntegrityError:
        return False  # already in it (the fanout of this post was retried)
    conn.execute(sa.update(digest_batches).where(digest_batches.c.id == batch.id).values(
        posts=digest_batches.c.posts + 1, bytes=digest_batches.c.bytes + size))
    posts, size_now = batch.posts + 1, batch.bytes + size
    full = (lst.digest_max_posts and posts >= lst.digest_max_posts) or \
        (lst.digest_max_bytes and size_now >= lst.digest_max_bytes)
    if full:
        return close(conn, lst, now=now, why=f"size threshold ({posts} posts, {size_now} bytes)")
    return False


def close(conn: Connection, lst: MailingList, *, now: float, why: str) -> bool:
    """Close the list's open batch if it holds posts, numbering it and queueing its sending."""
    batch = conn.execute(sa.select(digest_batches).where(
        digest_batches.c.list_id == lst.id, digest_batches.c.state == BatchState.OPEN.value)
        .with_for_update()).first()
    if batch is None or batch.posts == 0:
        return False
    # Volume 1 is the year of the list's first issue; the issue number restarts each volume.
    zone = zoneinfo.ZoneInfo(lst.digest_timezone)
    year = datetime.datetime.fromtimestamp(now, zone).year
    first = conn.execute(sa.select(sa.func.min(digest_batches.c.closed_at)).where(
        digest_batches.c.list_id == lst.id)).scalar()
    first_year = datetime.datetime.fromtimestamp(first, zone).year if first else year
    volume = max(1, year - first_year + 1)
    last = conn.execute(sa.select(sa.func.max(digest_batches.c.number)).where(
        digest_batches.c.list_id == lst.id, digest_batches.c.volume == volume)).scalar()
    number = (last or 0) + 1
    closed = conn.execute(
        sa.update(digest_batches)
        .where(digest_batches.c.id == batch.id, digest_batches.c.state == BatchState.OPEN.value)
        .values(state=BatchState.CLOSED.value, closed_at=now, volume=volume, number=number)
    ).rowcount
    if closed != 1:
        return False
    conn.execute(work.insert().values(
        stage=Stage.DIGEST.value, message_id=None, list_id=lst.id, role="digest",
        address=lst.address, detail=str(batch.id), cursor=None, content_id=None,
        state=State.READY.value, attempts=0, due_at=now, lease_owner=None, lease_until=None,
        last_error=None, created_at=now, updated_at=now))
    journal.record(conn, now=now, stage=Stage.DIGEST, event="digest-closed", message_id=None,
                   list_id=lst.id, detail=f"{lst.address} Vol {volume}, Issue {number}: "
                                          f"{batch.posts} posts ({why})")
    return True


def issue_of(conn: Connection, lst: MailingList, batch: Row[tuple[object, ...]], *,
             now: float) -> digestformats.DigestIssue:
    rows = conn.execute(
        sa.select(messages.c.raw, messages.c.received_at)
        .join(digest_entries, digest_entries.c.message_id == messages.c.id)
        .where(digest_entries.c.batch_id == batch.id).order_by(digest_entries.c.id)).all()
    posts = tuple(digestformats.DigestPost(r.raw, r.received_at) for r in rows)
    return digestformats.DigestIssue(lst.identity, batch.volume or 0, batch.number or 0, posts,
                                     now)


@dataclass(frozen=True)
class Preview:
    data: bytes
    posts: int


def preview(conn: Connection, lst: MailingList, fmt: str, templates: Templates, *,
            public_url: str, now: float) -> Preview | None:
    """The open batch rendered as it would go out now, without sending or closing it."""
    batch = conn.execute(sa.select(digest_batches).where(
        digest_batches.c.list_id == lst.id,
        digest_batches.c.state == BatchState.OPEN.value)).first()
    if batch is None or batch.posts == 0:
        return None
    issue = issue_of(conn, lst, batch, now=now)
    data = digestformats.render(issue, fmt, templates, link_base=lst.links_base(public_url))
    return Preview(data, len(issue.posts))


# -- the stage --------------------------------------------------------------------------

class Digest:
    stage = Stage.DIGEST

    def __init__(self, store: Store, *, clock: Clock, claimer: Claimer, templates: Templates,
                 public_url: str, chunk: int, retry_delay: float, batch: int = 2) -> None:
        self.store = store
        self.clock = clock
        self.claimer = claimer
        self.templates = templates
        self.public_url = public_url
        self.chunk = chunk
        self.retry_delay = retry_delay
        self.batch = batch

    def tick(self, progress: Progress | None = None) -> Progress:
        """Close the batches whose scheduled time has come (once, whoever runs this)."""
        progress = progress or Progress()
        now = self.clock.now()
        with self.store.read() as conn:
            due = [lst for lst in lists.all_lists(conn)
                   if lst.digest_next_at is None or lst.digest_next_at <= now]
        for lst in due:
            try:
                following = next_due(lst, now)
            except ConfigError as exc:
                log.error("%s: %s", lst.address, exc)
                continue
            with self.store.write() as conn:
                won = conn.execute(
                    sa.update(lists_table).where(
                        lists_table.c.id == lst.id,
                        lists_table.c.digest_next_at.is_(None)
                        if lst.digest_next_at is None
                        else lists_table.c.digest_next_at == lst.digest_next_at)
                    .values(digest_next_at=following)).rowcount == 1
                # The first time only sets the schedule; a due time closes the batch.
                if won and lst.digest_next_at is not None and \
                        close(conn, lst, now=now, why="scheduled"):
                    progress.worked += 1
                    progress.woke(Stage.DIGEST)
        return progress

    def run_once(self, progress: Progress | None = None) -> Progress:
        progress = progress or Progress()
        rows = queue.take(self.store, work, self.claimer, now=self.clock.now(),
                          limit=self.batch, stage=self.stage.value)
        progress.worked += len(rows)
        for row in rows:
            try:
                self._send(row, progress)
            except LeaseLost:
                log.warning("lease lost on digest work row %s; another worker has it", row.id)
            except Exception as exc:  # one bad batch must not stop the others
                log.exception("sending digest work row %s failed", row.id)
                with self.store.write() as conn:
                    queue.fail(conn, work, row.id, self.claimer, now=self.clock.now(),
                               error=f"{type(exc).__name__}: {exc}", retry_delay=self.retry_delay)
        return progress

    def _send(self, row: Row[tuple[object, ...]], progress: Progress) -> None:
        batch_id = int(str(row.detail))
        with self.store.read() as conn:
            lst = lists.by_id(conn, row.list_id) if row.list_id is not None else None
            batch = conn.execute(sa.select(digest_batches)
                                 .where(digest_batches.c.id == batch_id)).first()
        if lst is None or batch is None:
            with self.store.write() as conn:
                if not queue.complete(conn, work, row.id, self.claimer):
                    raise LeaseLost(f"work row {row.id}")
            return
        # As for posts: each member's own copy, with their links, where the list has
        # personal links; else one copy for all, sent to many members at a time.
        contents, personal = self._rendered(row, lst, batch,
                                            lst.links_base(self.public_url))
        cursor = row.cursor or 0
        queued = 0
        while True:
            now = self.clock.now()
            with self.store.write() as conn:
                chunk = conn.execute(
                    sa.select(members.c.id, members.c.address, members.c.mode)
                    .where(_readers(lst.id), members.c.id > cursor)
                    .order_by(members.c.id).limit(self.chunk)).all()
                by_format: dict[str, list[str]] = {}
                for m in chunk:
                    by_format.setdefault(FORMAT_OF_MODE[Mode(m.mode)], []).append(
                        f"{m.address} {m.id}" if personal else m.address)
                for fmt, recipients in by_format.items():
                    outgoing.enqueue(conn, content_id=contents[fmt],
                                     envelope_from=lst.identity.address("bounces"),
                                     recipients=recipients, kind=outgoing.Kind.DIGEST,
                                     list_id=lst.id, message_id=None, now=now, batch=100,
                                     personalize=personal)
                queued += len(chunk)
                if len(chunk) < self.chunk:
                    if not queue.complete(conn, work, row.id, self.claimer):
                        raise LeaseLost(f"work row {row.id}")
                    conn.execute(sa.update(digest_batches).where(digest_batches.c.id == batch.id)
                                 .values(state=BatchState.SENT.value, sent_at=now))
                    for content_id in contents.values():
                        outgoing.drop_unused_content(conn, content_id)
                    journal.record(conn, now=now, stage=self.stage, event="digest-sent",
                                   message_id=None, list_id=lst.id,
                                   detail=f"{lst.address} Vol {batch.volume}, Issue "
                                          f"{batch.number}: queued for {queued} digest members"
                                          + (" (resumed)" if row.cursor else ""))
                    progress.woke(Stage.DELIVERY)
                    return
                cursor = chunk[-1].id
                moved = conn.execute(
                    sa.update(work).where(queue.owned(work, row.id, self.claimer))
                    .values(cursor=cursor, lease_until=now + self.claimer.lease, updated_at=now)
                ).rowcount
                if moved != 1:
                    raise LeaseLost(f"work row {row.id}")
            progress.woke(Stage.DELIVERY)

    def _rendered(self, row: Row[tuple[object, ...]], lst: MailingList,
                  batch: Row[tuple[object, ...]], links: str | None) -> tuple[dict[str, int],
                                                                             bool]:
        """The issue's three formats as stored contents, rendered on first need only, and
        whether they carry each member's links (as rendered: a batch resumed after the
        list's setting changed goes out as it was made)."""
        if batch.mime_content_id is not None:
            with self.store.read() as conn:
                data = conn.execute(sa.select(contents.c.data).where(
                    contents.c.id == batch.plain_content_id)).scalar_one()
            return ({"mime": batch.mime_content_id, "plain": batch.plain_content_id,
                     "html": batch.html_content_id}, PLACEHOLDER.encode("ascii") in data)
        now = self.clock.now()
        with self.store.read() as conn:
            issue = issue_of(conn, lst, batch, now=now)
        rendered = {fmt: digestformats.render(issue, fmt, self.templates, link_base=links)
                    for fmt in digestformats.FORMATS}
        with self.store.write() as conn:
            ids = {fmt: outgoing.add_content(conn, data, now=now)
                   for fmt, data in rendered.items()}
            conn.execute(sa.update(digest_batches).where(digest_batches.c.id == batch.id).values(
                mime_content_id=ids["mime"], plain_content_id=ids["plain"],
                html_content_id=ids["html"]))
            if conn.execute(sa.update(work).where(queue.owned(work, row.id, self.claimer))
                            .values(updated_at=now)).rowcount != 1:
                raise LeaseLost(f"work row {row.id}")
        return ids, links is not None
