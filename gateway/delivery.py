"""The delivery stage: outbound rows go to the smarthost, several connections at once.

A feeder claims rows (leased), senders hand them to the transport, and a
recorder writes the outcomes back in batches (one transaction for many rows):

- accepted                  -> row deleted
- some recipients 4xx       -> row kept for just those, retried with exponential backoff
- some recipients 5xx       -> recorded in delivery_failures for bounce handling
- whole transaction 4xx or
  smarthost unreachable     -> retried with backoff until [delivery] lifetime, then failed
- whole transaction 5xx     -> every recipient recorded as failed
- an unexpected error       -> counted; parked after [queue] max_attempts

Outcomes the store cannot take (a full disk, a lost database server) are tried
again, their leases kept, until it can: a copy the smarthost has taken is not sent
again unless the gateway stops first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway import outgoing, queue
from gateway.authentication import AuthResults, SigningKeys, results_from_json, sign_and_seal
from gateway.clock import Clock
from gateway.config import DeliveryConfig
from gateway.dsn import signed_verp
from gateway.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SigningError,
    StoreUnavailable,
    TransientDeliveryError,
)
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.schema import contents, delivery_failures, outbound
from gateway.signing import LinkSigner, personalise
from gateway.smtpclient import Outcome, Reply
from gateway.store import Store
from gateway.tally import Tally
from gateway.transport import Transport
from gateway.worker import Wakeups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    id: int
    content_id: int
    kind: str
    list_id: int | None
    message_id: int | None
    envelope_from: str
    lines: tuple[str, ...]  # as stored: "address", or "address member_id" when personalised
    tries: int
    first_try_at: float | None
    personalize: bool = False

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(line.partition(" ")[0] for line in self.lines)

    def lines_for(self, addresses: Iterable[str]) -> list[str]:
        wanted = set(addresses)
        return [line for line in self.lines if line.partition(" ")[0] in wanted]


@dataclass(frozen=True)
class Result:
    job: Job
    started_at: float
    outcome: Outcome | None = None
    error: TransientDeliveryError | PermanentDeliveryError | None = None
    crash: str | None = None


@dataclass(frozen=True)
class Content:
    data: bytes
    auth: AuthResults | None  # how the post authenticated as received: for ARC sets
    signed: bytes | None = None  # the one signed copy, when every recipient gets the same


class ContentCache:
    """Recently sent contents, so a post fanned out in many batches is read once."""

    def __init__(self, limit_bytes: int = 64 * 1024 * 1024) -> None:
        self._items: OrderedDict[int, Content] = OrderedDict()
        self._size = 0
        self._limit = limit_bytes

    def get(self, content_id: int) -> Content | None:
        content = self._items.get(content_id)
        if content is not None:
            self._items.move_to_end(content_id)
        return content

    def put(self, content_id: int, content: Content) -> None:
        old = self._items.pop(content_id, None)
        if old is not None:
            self._size -= len(old.data) + len(old.signed or b"")
        self._items[content_id] = content
        self._size += len(content.data) + len(content.signed or b"")
        while self._size > self._limit and len(self._items) > 1:
            _id, gone = self._items.popitem(last=False)
            self._size -= len(gone.data) + len(gone.signed or b"")


# Built once: building a statement costs several times what running it does.
_CONTENTS = sa.select(contents.c.id, contents.c.data, contents.c.auth).where(
    contents.c.id.in_(sa.bindparam("ids", expanding=True)))

# Personal copies built and pipelined per round (see Delivery._send_each).
COPIES_AT_ONCE = 10
# Seconds between tries to record outcomes the store did not take: doubling from the
# first to the last.
RECORD_RETRY = (0.1, 5.0)


class Delivery:
    stage = Stage.DELIVERY

    def __init__(self, store: Store, transport: Transport, *, clock: Clock, claimer: Claimer,
                 config: DeliveryConfig, retry_delay: float,
                 link_signer: LinkSigner | None = None, keys: SigningKeys | None = None,
                 authserv_id: str = "", tally: Tally | None = None) -> None:
        # Recipients by outcome (delivered, deferred, failed) since start, for /metrics.
        self.tally = tally if tally is not None else Tally()
        self.link_signer = link_signer
        self.keys = keys
        self.authserv_id = authserv_id
        self.store = store
        self.transport = transport
        self.clock = clock
        self.claimer = claimer
        self.config = config
        self.retry_delay = retry_delay
        self.cache = ContentCache()
        self._held: dict[int, Job] = {}
        # Set when recorded outcomes free room under the feeder's cap: a full feeder
        # claims again at once instead of at the next poll (which capped a busy list at
        # [delivery] connections x 4 transactions per poll_interval).
        self._room = asyncio.Event()
        # Renewing leases and recording outcomes update the same rows; taking them in
        # turn keeps PostgreSQL from deadlocking the two transactions.
        self._row_writes = threading.Lock()

    async def run(self, wakeups: Wakeups, *, poll_interval: float, stopping: asyncio.Event,
                  grace: float = 30.0) -> None:
        jobs: asyncio.Queue[Job | None] = asyncio.Queue()
        results: asyncio.Queue[Result] = asyncio.Queue()
        senders = [asyncio.create_task(self._sender(jobs, results))
                   for _ in range(self.config.connections)]
        recorder = asyncio.create_task(self._recorder(results, stopping))
        renewer = asyncio.create_task(self._renewer())
        try:
            await self._feeder(jobs, wakeups, poll_interval=poll_interval, stopping=stopping)
        finally:
            # Let transactions in flight finish (cutting one off mid-DATA risks a
            # duplicate), record their outcomes, and hand back what never started.
            while not jobs.empty():
                jobs.get_nowait()
            for _ in senders:
                jobs.put_nowait(None)
            _done, slow = await asyncio.wait(senders, timeout=grace)
            for task in slow:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            await results.join()
            recorder.cancel()
            renewer.cancel()
            await asyncio.gather(recorder, renewer, return_exceptions=True)
            if self._held:
                await asyncio.to_thread(self._release, list(self._held.values()))
            await self.transport.close()

    # -- feeding -------------------------------------------------------------------

    async def _feeder(self, jobs: asyncio.Queue[Job | None], wakeups: Wakeups, *,
                      poll_interval: float, stopping: asyncio.Event) -> None:
        capacity = self.config.connections * 4
        while not stopping.is_set():
            self._room.clear()
            room = min(self.config.batch, capacity - len(self._held))
            claimed: list[Job] = []
            if room > 0:
                try:
                    claimed = await asyncio.to_thread(self._claim, room)
                except Exception:  # the stage loop is a process boundary
                    log.exception("delivery: claiming outbound rows failed; retrying")
            for job in claimed:
                self._held[job.id] = job
                jobs.put_nowait(job)
            if claimed and len(self._held) < capacity:
                continue
            waiter = asyncio.ensure_future(wakeups.wait(self.stage, poll_interval))
            stopper = asyncio.ensure_future(stopping.wait())
            waits = {waiter, stopper}
            if len(self._held) >= capacity:  # full: the next free slot is worth a claim
                waits.add(asyncio.ensure_future(self._room.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    def _claim(self, limit: int) -> list[Job]:
        rows = queue.take(self.store, outbound, self.claimer, now=self.clock.now(), limit=limit)
        if not rows:
            return []
        missing = sorted({r.content_id for r in rows if self.cache.get(r.content_id) is None})
        if missing:
            with self.store.read() as conn:
                for cid, data, auth in conn.execute(_CONTENTS, {"ids": missing}):
                    self.cache.put(cid, Content(data, results_from_json(auth) if auth else None))
        return [Job(r.id, r.content_id, r.kind, r.list_id, r.message_id, r.envelope_from,
                    tuple(r.recipients.split("\n")), r.tries, r.first_try_at, r.personalize)
                for r in rows]

    # -- sending ----------------------------------------------------------------------

    async def _sender(self, jobs: asyncio.Queue[Job | None],
                      results: asyncio.Queue[Result]) -> None:
        while True:
            job = await jobs.get()
            if job is None:
                return
            started = self.clock.now()
            content = self.cache.get(job.content_id)
            try:
                if content is None:
                    content = await asyncio.to_thread(self._load_content, job.content_id)
                if job.personalize:
                    outcome = await self._send_each(job, content)
                else:
                    if content.signed is None:
                        content = await asyncio.to_thread(self._sign_once, job, content)
                    assert content.signed is not None
                    outcome = await self.transport.send(job.envelope_from, job.recipients,
                                                        content.signed)
                result = Result(job, started, outcome=outcome)
            except (TransientDeliveryError, PermanentDeliveryError) as exc:
                result = Result(job, started, error=exc)
            except Exception as exc:  # recorded on the row; parked if it keeps happening
                log.exception("delivery of outbound row %s failed unexpectedly", job.id)
                result = Result(job, started, crash=f"{type(exc).__name__}: {exc}")
            results.put_nowait(result)

    def _sign(self, job: Job, content: Content, data: bytes) -> bytes:
        """DKIM-sign a copy with its list domain's key, with an ARC set for posts."""
        signer = self.keys.for_domain(job.envelope_from.rpartition("@")[2]) \
            if self.keys else None
        if signer is None:
            return data
        arc = (self.authserv_id, content.auth) \
            if content.auth is not None and job.kind == outgoing.Kind.POST.value else None
        try:
            return sign_and_seal(data, signer=signer, arc=arc)
        except SigningError as exc:
            log.warning("outbound=%s: not sealed (%s); DKIM-signed only", job.id, exc)
            return signer.sign(data)

    def _sign_once(self, job: Job, content: Content) -> Content:
        signed = Content(content.data, content.auth, self._sign(job, content, content.data))
        self.cache.put(job.content_id, signed)
        return signed

    def _copies(self, job: Job, content: Content,
                lines: Sequence[str]) -> list[tuple[str, str, bytes]]:
        """Each member's own copy: their links, their signature, their VERP return path
        (so that a bounce names them, with a tag that only we can write: a bounce to
        it counts). CPU work, done in a worker thread."""
        assert self.link_signer is not None and job.list_id is not None
        bounces, _, domain = job.envelope_from.partition("@")
        list_name = bounces.removesuffix("-bounces")
        copies = []
        for line in lines:
            address, _sep, member_id = line.partition(" ")
            token = self.link_signer.member_token(job.list_id, int(member_id), address)
            data = self._sign(job, content, personalise(content.data, token))
            copies.append((address, signed_verp(list_name, domain, address,
                                                self.link_signer), data))
        return copies

    async def _send_each(self, job: Job, content: Content) -> Outcome:
        """Personalised delivery: one transaction per member, each with their own links,
        all on one connection. A failure of a whole transaction is that member's."""
        if self.link_signer is None or job.list_id is None:
            raise TransientDeliveryError(451, "personal links need the web endpoint's key")
        refused: dict[str, Reply] = {}
        reply = ""
        # A few copies at a time: a row holds up to 100 members, and a digest's copy can
        # be hundreds of KB, so building them all first cost tens of MB per connection.
        for start in range(0, len(job.lines), COPIES_AT_ONCE):
            copies = await asyncio.to_thread(self._copies, job, content,
                                             job.lines[start:start + COPIES_AT_ONCE])
            results = await self.transport.send_many(
                [(envelope_from, [address], data) for address, envelope_from, data in copies])
            for (address, _envelope_from, _data), result in zip(copies, results, strict=True):
                if isinstance(result, DeliveryError):
                    refused[address] = Reply(result.code if result.code >= 400 else 451,
                                             result.text)
                else:
                    refused.update(result.refused)
                    if address not in result.refused:  # the reply to a copy it took
                        reply = result.reply
        return Outcome(refused, reply)

    def _load_content(self, content_id: int) -> Content:
        with self.store.read() as conn:
            row = conn.execute(sa.select(contents.c.data, contents.c.auth)
                               .where(contents.c.id == content_id)).one()
        content = Content(row.data, results_from_json(row.auth) if row.auth else None)
        self.cache.put(content_id, content)
        return content

    # -- recording ---------------------------------------------------------------------

    async def _recorder(self, results: asyncio.Queue[Result], stopping: asyncio.Event) -> None:
        while True:
            batch = [await results.get()]
            while not results.empty() and len(batch) < 256:
                batch.append(results.get_nowait())
            try:
                await self._record_until_stored(batch, stopping)
            except Exception:  # the rows' leases expire and they are sent again
                log.exception("delivery: recording %d outcomes failed", len(batch))
            finally:
                for r in batch:
                    self._held.pop(r.job.id, None)
                    results.task_done()
                self._room.set()

    async def _record_until_stored(self, batch: list[Result], stopping: asyncio.Event) -> None:
        """Record ``batch``; while the store is unavailable, try again (the renewer
        keeps the rows' leases meanwhile) until it is back or the gateway stops."""
        delay, longest = RECORD_RETRY
        while True:
            try:
                await asyncio.to_thread(self._record, batch)
                return
            except StoreUnavailable as exc:
                if stopping.is_set():
                    raise
                log.warning("delivery: the store did not take %d outcomes (%s); trying "
                            "again in %.1fs", len(batch), exc, delay)
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except TimeoutError:
                pass
            delay = min(longest, delay * 2)

    def _record(self, batch: Iterable[Result]) -> None:
        tally: Counter[str] = Counter()
        with self._row_writes, self.store.write() as conn:
            done = [r.job for r in batch if self._record_one(conn, r, tally)]
            deleted = queue.complete_many(conn, outbound, (job.id for job in done),
                                          self.claimer)
            for job in done:
                if job.id not in deleted:
                    log.warning("outbound row %s: lease lost before its outcome was "
                                "recorded; another worker may send it again", job.id)
            # Once per content, not per row: a post's rows finish together.
            for content_id in {job.content_id for job in done if job.id in deleted}:
                outgoing.drop_unused_content(conn, content_id)
        self.tally.add(tally)  # counted once the outcomes are on disk

    def _record_one(self, conn: Connection, r: Result, tally: Counter[str]) -> bool:
        """Record one outcome, counting recipients by outcome in ``tally``; True if the
        row is finished (for the caller to delete)."""
        job, now = r.job, self.clock.now()
        where = f"outbound={job.id} kind={job.kind} list_id={job.list_id} queue_id={job.message_id}"
        first_try = job.first_try_at or r.started_at
        if r.crash is not None:
            queue.fail(conn, outbound, job.id, self.claimer, now=now, error=r.crash,
                       retry_delay=self.retry_delay)
            return False
        if isinstance(r.error, PermanentDeliveryError):
            reply = Reply(r.error.code, r.error.text)
            self._failures(conn, job, {rcpt: reply for rcpt in job.recipients}, now)
            log.warning("failed %s rcpts=%d: %s", where, len(job.recipients), r.error)
            tally["failed"] += len(job.recipients)
            return True
        if r.error is not None:
            if now - first_try >= self.config.lifetime:
                reply = Reply(r.error.code, f"gave up after {self.config.lifetime:.0f}s: "
                                            f"{r.error.text}")
                self._failures(conn, job, {rcpt: reply for rcpt in job.recipients}, now)
                log.warning("expired %s rcpts=%d: %s", where, len(job.recipients), r.error)
                tally["failed"] += len(job.recipients)
                return True
            due = now + self._backoff(job.tries)
            queue.release(conn, outbound, job.id, self.claimer, now=now, due_at=due,
                          note=str(r.error), tries=job.tries + 1, first_try_at=first_try)
            log.info("deferred %s rcpts=%d until +%.0fs: %s", where, len(job.recipients),
                     due - now, r.error)
            tally["deferred"] += len(job.recipients)
            return False
        assert r.outcome is not None
        permanent = {a: rep for a, rep in r.outcome.refused.items() if rep.code >= 500}
        later = [a for a, rep in r.outcome.refused.items() if rep.code < 500]
        if permanent:
            self._failures(conn, job, permanent, now)
        delivered = len(job.recipients) - len(r.outcome.refused)
        tally["delivered"] += delivered
        tally["failed"] += len(permanent)
        if later and now - first_try < self.config.lifetime:
            due = now + self._backoff(job.tries)
            queue.release(conn, outbound, job.id, self.claimer, now=now, due_at=due,
                          note=f"{len(later)} recipients deferred: "
                               f"{r.outcome.refused[later[0]].code} "
                               f"{r.outcome.refused[later[0]].text}",
                          recipients="\n".join(job.lines_for(later)), rcpt_count=len(later),
                          tries=job.tries + 1, first_try_at=first_try)
            log.info("delivered %s rcpts=%d, deferred %d, failed %d", where, delivered,
                     len(later), len(permanent))
            tally["deferred"] += len(later)
            return False
        if later:
            self._failures(conn, job, {a: r.outcome.refused[a] for a in later}, now)
            tally["failed"] += len(later)
        first_line = r.outcome.reply.splitlines()[0] if r.outcome.reply else ""
        log.info("delivered %s rcpts=%d failed=%d: %s", where, delivered,
                 len(permanent) + len(later), first_line)
        return True

    def _failures(self, conn: Connection, job: Job, refused: dict[str, Reply], now: float) -> None:
        conn.execute(delivery_failures.insert(), [
            {"at": now, "list_id": job.list_id, "address": address, "code": reply.code,
             "text": reply.text[:2000], "permanent": reply.code >= 500, "kind": job.kind}
            for address, reply in refused.items()
        ])

    def _backoff(self, tries: int) -> float:
        return float(min(self.config.retry_max, self.config.retry_initial * 2 ** tries))

    def _release(self, jobs: list[Job]) -> None:
        now = self.clock.now()
        with self.store.write() as conn:
            for job in jobs:
                queue.release(conn, outbound, job.id, self.claimer, now=now, due_at=now)
                self._held.pop(job.id, None)

    async def _renewer(self) -> None:
        interval = max(1.0, self.claimer.lease / 3)
        while True:
            await asyncio.sleep(interval)
            ids = list(self._held)
            if ids:
                try:
                    await asyncio.to_thread(self._renew, ids)
                except Exception:  # leases then expire and rows are retried: logged, not fatal
                    log.exception("delivery: renewing %d leases failed", len(ids))

    def _renew(self, ids: list[int]) -> None:
        with self._row_writes, self.store.write() as conn:
            queue.renew(conn, outbound, ids, self.claimer, now=self.clock.now())
