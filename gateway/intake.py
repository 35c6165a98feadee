"""The intake stage: SMTP and LMTP listeners that validate, store, then reply.

RCPT is checked against the route table with no database I/O (an in-memory
directory of lists); unknown addresses get 550 5.1.1 before any data is sent.
After DATA, the raw bytes and one work row per recipient are committed, several
sessions' messages per transaction (group commit), and only then does the
client get its 250. A store failure gets 451 4.3.0: the client keeps the message.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway import headers as h
from gateway import replies
from gateway.clock import Clock
from gateway.config import IntakeConfig
from gateway.errors import StoreError
from gateway.message import split
from gateway.routing import Hit, Router, Stage
from gateway.schema import State, messages, work
from gateway.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """A message received in full, not yet stored."""

    raw: bytes
    mail_from: str
    hits: tuple[Hit, ...]
    peer: str
    helo: str
    protocol: str
    received_at: float
    message_id: str | None


class IntakeWriter:
    """Commits arrivals in batches: every session waiting at the same moment shares
    one transaction (and one fsync), and each gets its reply only after the commit."""

    def __init__(self, store: Store, *, clock: Clock, batch: int,
                 on_commit: Callable[[set[Stage]], None]) -> None:
        self.store = store
        self.clock = clock
        self.batch = batch
        self.on_commit = on_commit
        self.accepted = 0  # messages committed (answered 250) since start, for /metrics
        self._pending: list[tuple[Arrival, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()

    async def submit(self, arrival: Arrival) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((arrival, future))
        self._wake.set()
        return await future

    async def run(self, stopping: asyncio.Event) -> None:
        """Commit until ``stopping`` is set and nothing is waiting."""
        stop = asyncio.ensure_future(stopping.wait())
        while True:
            if stopping.is_set() and not self._pending:
                return
            wake = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:self.batch], self._pending[self.batch:]
                try:
                    ids = await asyncio.to_thread(self._commit, [a for a, _f in batch])
                except Exception as exc:  # every waiting session answers 451, none 250
                    if not isinstance(exc, StoreError):
                        log.exception("storing %d messages failed", len(batch))
                    for _arrival, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.accepted += len(ids)
                stages = {hit.route.stage for a, _f in batch for hit in a.hits}
                for (_arrival, future), qid in zip(batch, ids, strict=False):
                    if not future.done():
                        future.set_result(qid)
                self.on_commit(stages)

    def _commit(self, arrivals: list[Arrival]) -> list[int]:
        now = self.clock.now()
        ids = []
        with self.store.write() as conn:
            for a in arrivals:
                qid = int(conn.execute(messages.insert().values(
                    received_at=a.received_at, mail_from=a.mail_from,
                    rcpt_tos="\n".join(hit.address for hit in a.hits), peer=a.peer,
                    helo=a.helo[:255], protocol=a.protocol, size=len(a.raw),
                    message_id=(a.message_id or None) and a.message_id[:998], raw=a.raw,
                ).returning(messages.c.id)).scalar_one())
                conn.execute(work.insert(), [{
                    "stage": hit.route.stage.value, "message_id": qid,
                    "list_id": hit.mailing_list.id, "role": hit.route.role.value,
                    "address": hit.address, "detail": hit.detail, "cursor": None,
                    "content_id": None, "state": State.READY.value, "attempts": 0,
                    "due_at": now, "lease_owner": None, "lease_until": None,
                    "last_error": None, "created_at": now, "updated_at": now,
                } for hit in a.hits])
                ids.append(qid)
        for a, qid in zip(arrivals, ids, strict=False):
            log.info("accepted queue_id=%s from=<%s> to=%s size=%d message_id=%s peer=%s",
                     qid, a.mail_from, ",".join(hit.address for hit in a.hits), len(a.raw),
                     a.message_id or "-", a.peer)
        return ids


class IntakeHandler:
    """The aiosmtpd handler: RCPT checks routes, DATA stores and replies."""

    def __init__(self, router: Router, writer: IntakeWriter, *, clock: Clock,
                 config: IntakeConfig) -> None:
        self.router = router
        self.writer = writer
        self.clock = clock
        self.config = config
        self._hits: weakref.WeakKeyDictionary[Envelope, list[Hit]] = weakref.WeakKeyDictionary()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        hits = self._hits.setdefault(envelope, [])
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        found = self.router.resolve(address)
        if not isinstance(found, Hit):
            log.info("refused rcpt=<%s> from=<%s> peer=%s: %s", address, envelope.mail_from,
                     _peer(session), found.reason)
            return replies.UNKNOWN_ADDRESS.format(address=address)
        if all(hit.address.lower() != address.lower() for hit in hits):
            hits.append(found)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.OK_RECIPIENT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        hits = tuple(self._hits.get(envelope, ()))
        lmtp = isinstance(server, LMTP)
        raw = envelope.original_content or b""
        if not raw.strip():
            return _per_recipient(replies.EMPTY_MESSAGE, envelope, lmtp)
        arrival = Arrival(
            raw=raw, mail_from=_return_path(envelope.mail_from), hits=hits, peer=_peer(session),
            helo=session.host_name or "", protocol="lmtp" if lmtp else "smtp",
            received_at=self.clock.now(), message_id=split(raw).get(h.MESSAGE_ID),
        )
        try:
            qid = await self.writer.submit(arrival)
        except StoreError as exc:
            log.error("store failure, answering 451: from=<%s> to=%s: %s", arrival.mail_from,
                      ",".join(envelope.rcpt_tos), exc)
            return _per_recipient(replies.STORE_FAILED, envelope, lmtp)
        except Exception:  # the reply to the client is a process boundary
            log.exception("storing a message failed, answering 451")
            return _per_recipient(replies.STORE_FAILED, envelope, lmtp)
        return _per_recipient(f"{replies.OK} queued as {qid}", envelope, lmtp)


def _return_path(mail_from: str | None) -> str:
    """The envelope sender without brackets; the null return path ``<>`` is ""."""
    value = (mail_from or "").strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value


def _per_recipient(reply: str, envelope: Envelope, lmtp: bool) -> str:
    """LMTP answers DATA once per recipient (RFC 2033 4.2); SMTP once."""
    if not lmtp:
        return reply
    return "\r\n".join(reply for _ in envelope.rcpt_tos)


def _peer(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return f"{peer[0]}:{peer[1]}" if len(peer) > 1 else str(peer[0])
    return str(peer or "unknown")


class ConnectionLimiter:
    """Caps on concurrent sessions, in total and per client address."""

    def __init__(self, *, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        if sum(self._by_ip.values()) >= self.total or self._by_ip.get(ip, 0) >= self.per_ip:
            return False
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1
        return True

    def leave(self, ip: str) -> None:
        left = self._by_ip.get(ip, 1) - 1
        if left > 0:
            self._by_ip[ip] = left
        else:
            self._by_ip.pop(ip, None)


class _Limits:
    """What the SMTP and LMTP protocol classes add to aiosmtpd's: enhanced status
    codes on its own replies, a longer line limit, and connection caps."""

    limiter: ConnectionLimiter
    line_limit: int
    _client_ip: str | None = None

    def _rewrite(self, status: Any) -> Any:
        if isinstance(status, str) and status in replies.REWRITES:
            return replies.REWRITES[status].format(
                limit=getattr(self, "data_size_limit", 0), line_limit=self.line_limit)
        return status


class IntakeSMTP(_Limits, SMTP):
    def __init__(self, handler: IntakeHandler, *, limiter: ConnectionLimiter, line_limit: int,
                 **kwargs: Any) -> None:
        self.limiter = limiter
        self.line_limit = line_limit
        self.line_length_limit = line_limit  # read by SMTP.__init__ for its stream limit
        super().__init__(handler, **kwargs)

    async def push(self, status: Any) -> None:
        await super().push(self._rewrite(status))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._client_ip is None and self.transport is None:
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if peer else "unknown"
            if not self.limiter.admit(ip):
                log.warning("refused connection from %s: too many connections", ip)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n")
                transport.close()
                return
            self._client_ip = ip
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._client_ip is None:
            return  # refused in connection_made: aiosmtpd never set up this session
        self.limiter.leave(self._client_ip)
        self._client_ip = ""
        super().connection_lost(error)


class IntakeLMTP(IntakeSMTP, LMTP):
    """LMTP (RFC 2033) for a front MTA such as Postfix: LHLO, and a reply per recipient."""
