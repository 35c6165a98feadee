"""The intake stage: SMTP and LMTP listeners that validate, store, then reply.

RCPT is checked against the route table with no database I/O (an in-memory
directory of lists); unknown addresses get 550 5.1.1 before any data is sent.
After DATA, the raw bytes and the list addresses they go to are committed, several
sessions' messages per transaction (group commit), and only then does the client
get its 250: to the intake spool (``gateway.spool``) when intake has a process of its
own on SQLite, else to the store itself. A store failure gets 451 4.3.0: the client
keeps the message.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
import weakref
from collections.abc import Callable
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway import headers as h
from gateway import replies
from gateway.clock import Clock
from gateway.config import IntakeConfig
from gateway.errors import StoreError
from gateway.message import split
from gateway.routing import Hit, Miss, Role, Router, Stage
from gateway.spool import Post, Spool, Target, insert_posts
from gateway.store import Store

log = logging.getLogger(__name__)

# Per-session command budgets. A client past one gets aiosmtpd's "421 4.7.0 <CMD> sent
# too many times" and is disconnected, so nobody keeps a connection forever with NOOPs
# (each valid command restarts the timeout) or harvests addresses with endless RCPTs.
# 1000 transactions per connection is Exim's smtp_accept_max_per_connection.
MAX_TRANSACTIONS = 1000
MAX_OTHER_COMMANDS = 100  # EHLO, NOOP, VRFY, HELP, ... per session
# Errors (4xx/5xx replies) a client may make before it is disconnected; a delivered
# message starts the count again (Postfix's smtpd_hard_error_limit).
MAX_ERRORS = 20
# The largest header section taken (no real message comes near: the largest in the
# shared corpus, a parser torture test, has 210 KB). Past it: 552, nothing stored.
MAX_HEADER_SIZE = 256 * 1024

# A RCPT for no known list re-reads the lists first, at most this often (seconds): a
# list created a moment ago is served at once, and a harvester's guesses cost one
# small read a second.
MISS_REFRESH = 1.0

# Replies of the limits above (the rest are in gateway.replies).
BAD_SENDER = ("553 5.1.7 <{address}>: the sender must be a whole address (local@domain), "
              "or <> for a bounce")
HEADER_TOO_BIG = "552 5.3.4 Message header too big: this gateway takes at most {limit} bytes"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors in this session; closing the connection"
TIMED_OUT = "421 4.4.2 Timeout exceeded; closing the connection"
CLOSING = "421 4.3.2 Connection closing; the message was not stored"


def command_budgets(max_recipients: int) -> dict[str, int]:
    """aiosmtpd's ``command_call_limit``: how often each command may come in one session."""
    return {"MAIL": MAX_TRANSACTIONS, "RSET": MAX_TRANSACTIONS, "DATA": MAX_TRANSACTIONS,
            "RCPT": MAX_TRANSACTIONS * max_recipients, "*": MAX_OTHER_COMMANDS}


class IntakeWriter:
    """Commits posts in batches: every session waiting at the same moment shares one
    transaction (and one fsync), and each gets its reply only after the commit.

    With a ``spool`` the commit is to the intake spool (``gateway.spool``), which only
    intake writes; without, to the store."""

    def __init__(self, store: Store, *, clock: Clock, batch: int,
                 on_commit: Callable[[set[Stage]], None], spool: Spool | None = None) -> None:
        self.store = store
        self.spool = spool
        self.clock = clock
        self.batch = batch
        self.on_commit = on_commit
        self.accepted = 0  # messages committed (answered 250) since start, for /metrics
        self._pending: list[tuple[Post, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()

    async def submit(self, post: Post) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((post, future))
        self._wake.set()
        return await future

    async def run(self, stopping: asyncio.Event) -> None:
        """Commit until ``stopping`` is set and nothing is waiting."""
        committer = _Committer(asyncio.get_running_loop(), self._commit)
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await self._run(stopping, stop, committer)
        finally:
            committer.stop()

    async def _run(self, stopping: asyncio.Event, stop: asyncio.Future[Any],
                   committer: _Committer) -> None:
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
                    ids = await committer.commit([p for p, _f in batch])
                except Exception as exc:  # every waiting session answers 451, none 250
                    if not isinstance(exc, StoreError):
                        log.exception("storing %d messages failed", len(batch))
                    for _post, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.accepted += len(ids)
                stages = {Stage.INTAKE} if self.spool is not None else \
                    {stage for p, _f in batch for stage in p.stages()}
                for (_post, future), qid in zip(batch, ids, strict=False):
                    if not future.done():
                        future.set_result(qid)
                self.on_commit(stages)

    def _commit(self, posts: list[Post]) -> list[int]:
        if self.spool is not None:
            ids = self.spool.append(posts)
        else:
            with self.store.write(first=True) as conn:
                ids = insert_posts(conn, posts, self.clock.now())
        for p, qid in zip(posts, ids, strict=False):
            log.info("accepted queue_id=%s from=<%s> to=%s size=%d message_id=%s peer=%s",
                     qid, printable(p.mail_from), ",".join(_loggable(t) for t in p.targets),
                     len(p.raw), printable(p.message_id or "-"), p.peer)
        return ids


class _Committer:
    """The thread that commits intake's batches, one at a time.

    One long-lived thread, handed each batch through a queue and answering through
    ``call_soon_threadsafe``: ``asyncio.to_thread`` per batch cost intake a tenth of
    its interpreter time in executor futures and their chaining."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 commit: Callable[[list[Post]], list[int]]) -> None:
        self._loop = loop
        self._commit = commit
        self._batches: queue.SimpleQueue[tuple[list[Post], asyncio.Future[list[int]]] | None] \
            = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="intake-commit", daemon=True)
        self._thread.start()

    def commit(self, posts: list[Post]) -> asyncio.Future[list[int]]:
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._batches.put((posts, future))
        return future

    def stop(self) -> None:
        """Let the thread end once the batch it holds, if any, is committed."""
        self._batches.put(None)

    def _work(self) -> None:
        while (job := self._batches.get()) is not None:
            posts, future = job
            try:
                ids = self._commit(posts)
            except BaseException as exc:  # answered on the loop: every session gets 451
                self._settle(future, None, exc)
            else:
                self._settle(future, ids, None)

    def _settle(self, future: asyncio.Future[list[int]], ids: list[int] | None,
                error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(ids or [])
        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed: nobody waits for this batch any more
            pass


class IntakeHandler:
    """The aiosmtpd handler: RCPT checks routes, DATA stores and replies."""

    def __init__(self, router: Router, writer: IntakeWriter, *, clock: Clock,
                 config: IntakeConfig, refresh: Callable[[], None] | None = None) -> None:
        self.router = router
        self.writer = writer
        self.clock = clock
        self.config = config
        # The directory's refresh: a list created a moment ago (by the CLI, by another
        # gateway) is not in the router's snapshot until the next periodic refresh.
        self._refresh = refresh
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = float("-inf")
        self._hits: weakref.WeakKeyDictionary[Envelope, list[Hit]] = weakref.WeakKeyDictionary()
        # aiosmtpd logs some of a client's text with %s (an unrecognised command, an
        # address): escape it there too.
        aiosmtpd_log = logging.getLogger("mail.log")
        if not any(isinstance(f, PrintableArgs) for f in aiosmtpd_log.filters):
            aiosmtpd_log.addFilter(PrintableArgs())

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # aiosmtpd takes "MAIL FROM:<bob>": a return path a smarthost would complete with
        # its own domain, sending our notices to a stranger there.
        if address != "<>":
            local, at, domain = address.rpartition("@")
            if not (at and local and domain):
                return BAD_SENDER.format(address=printable(address))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.OK_SENDER

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        hits = self._hits.setdefault(envelope, [])
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        found = await self._resolve(address)
        if not isinstance(found, Hit):
            log.info("refused rcpt=<%s> from=<%s> peer=%s: %s", printable(address),
                     printable(envelope.mail_from or ""), _peer(session), printable(found.reason))
            return replies.UNKNOWN_ADDRESS.format(address=printable(address))
        if all(hit.address.lower() != address.lower() for hit in hits):
            hits.append(found)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.OK_RECIPIENT

    async def _resolve(self, address: str) -> Hit | Miss:
        """The route of ``address``. Before a miss becomes a 550 (the sender's MTA gives
        the message up), the lists are read again: at most once a MISS_REFRESH, all the
        sessions that miss meanwhile waiting for the same read."""
        found = self.router.resolve(address)
        if isinstance(found, Hit) or self._refresh is None:
            return found
        now = asyncio.get_running_loop().time()
        if self._refreshing is None or (self._refreshing.done()
                                        and now - self._refreshed_at >= MISS_REFRESH):
            self._refreshed_at = now
            self._refreshing = asyncio.ensure_future(asyncio.to_thread(self._refresh))
        try:
            await asyncio.shield(self._refreshing)
        except Exception as exc:  # the snapshot in hand stays; this address is refused
            log.warning("re-reading the lists for rcpt=<%s> failed: %s", printable(address),
                        exc)
            return found
        return self.router.resolve(address)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        hits = tuple(self._hits.get(envelope, ()))
        lmtp = isinstance(server, LMTP)
        raw = envelope.original_content or b""
        if server.transport is None or server.transport.is_closing():
            # The session was ended (timeout, too many errors) while commands it had
            # pipelined were still being read: store nothing the client was not told of.
            return CLOSING
        if not raw.strip():
            return _per_recipient(replies.EMPTY_MESSAGE, envelope, lmtp)
        parts = split(raw)
        if len(raw) - len(parts.body) > MAX_HEADER_SIZE:
            log.info("refused a message from=<%s> peer=%s: header of %d bytes",
                     printable(envelope.mail_from or ""), _peer(session),
                     len(raw) - len(parts.body))
            return _per_recipient(HEADER_TOO_BIG.format(limit=MAX_HEADER_SIZE), envelope, lmtp)
        post = Post(
            raw=raw, mail_from=_return_path(envelope.mail_from), peer=_peer(session),
            targets=tuple(Target(hit.route.stage.value, hit.mailing_list.id,
                                 hit.route.role.value, hit.address, hit.detail) for hit in hits),
            helo=session.host_name or "", protocol="lmtp" if lmtp else "smtp",
            received_at=self.clock.now(), message_id=parts.get(h.MESSAGE_ID),
        )
        try:
            qid = await self.writer.submit(post)
        except StoreError as exc:
            log.error("store failure, answering 451: from=<%s> to=%s: %s",
                      printable(post.mail_from), printable(",".join(envelope.rcpt_tos)), exc)
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


def _loggable(target: Target) -> str:
    """A recipient for the log: a confirmation token is a capability until it is used,
    so only its first characters are shown."""
    if target.role != Role.CONFIRM.value:
        return target.address
    local, _at, domain = target.address.rpartition("@")
    base, plus, token = local.partition("+")
    return f"{base}{plus}{token[:6]}...@{domain}" if plus else target.address


def printable(text: str) -> str:
    """``text`` with control characters and other non-printing ones escaped, for replies
    and logs: what a client sends never reaches a terminal or a log line raw."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class PrintableArgs(logging.Filter):
    """Escapes the text arguments of a log record with :func:`printable`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(a) if isinstance(a, str) else a for a in record.args)
        return True


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
    codes on its own replies, a longer line limit, connection caps, an error limit."""

    limiter: ConnectionLimiter
    line_limit: int
    _client_ip: str | None = None
    _errors: int = 0

    def _rewrite(self, status: Any) -> Any:
        if isinstance(status, str) and status in replies.REWRITES:
            return replies.REWRITES[status].format(
                limit=getattr(self, "data_size_limit", 0), line_limit=self.line_limit)
        return status


# Replies that are not the client's fault, or that close the session anyway: a
# recipient past the limit (RFC 5321 says send it again later), our store failing.
_NOT_ERRORS = (replies.TOO_MANY_RECIPIENTS[:9], replies.STORE_FAILED[:9], "421")


# A path as nearly every client writes it: <dot-atom@domain>, then blanks and the rest.
# For these the standard library's RFC 5322 parser (aiosmtpd's, which also builds a
# typing.Protocol class on each call) gives the same address and rest; anything else
# (quoted local parts, comments, <>, a bare address) still goes to it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN_PATH = re.compile(
    rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*)>[ \t]*((?:[^ \t(].*)?)", re.S)


class IntakeSMTP(_Limits, SMTP):
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address of a MAIL or RCPT argument and the rest of it, as aiosmtpd's own
        parser gives them, several times faster for the usual <local@domain> path."""
        plain = _PLAIN_PATH.fullmatch(arg)
        if plain is None:
            return super()._getaddr(arg)
        address, rest = plain.groups()
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def __init__(self, handler: IntakeHandler, *, limiter: ConnectionLimiter, line_limit: int,
                 **kwargs: Any) -> None:
        self.limiter = limiter
        self.line_limit = line_limit
        self.line_length_limit = line_limit  # read by SMTP.__init__ for its stream limit
        kwargs.setdefault("command_call_limit", command_budgets(handler.config.max_recipients))
        super().__init__(handler, **kwargs)

    async def push(self, status: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # said goodbye already: nothing pipelined after that is answered
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else str(status)
        # Replies may quote what the client sent (a command, an address): never raw.
        text = "\r\n".join(printable(line) for line in self._rewrite(text).split("\r\n"))
        await super().push(text)
        if text.startswith(replies.OK):
            self._errors = 0  # a message was taken: this is a working client
        elif text[:1] in ("4", "5") and not text.startswith(_NOT_ERRORS):
            self._errors += 1
            if self._errors >= MAX_ERRORS and self.transport is not None \
                    and not self.transport.is_closing():
                log.warning("closing the session of %s after %d errors", self._client_ip,
                            self._errors)
                await super().push(TOO_MANY_ERRORS)
                self.transport.close()

    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The session's idle deadline, moved on by every command. aiosmtpd cancels and
        schedules a timer each time; this moves the deadline, and the one timer, when it
        fires before it, waits on."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._on_deadline)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        # aiosmtpd closes a timed-out session without a word; say why first.
        if self.transport is not None and not self.transport.is_closing():
            log.info("closing the session of %s: timeout", self._client_ip)
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(TIMED_OUT.encode("ascii") + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

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
