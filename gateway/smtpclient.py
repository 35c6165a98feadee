"""A small ESMTP client for the smarthost, with command pipelining (RFC 2920).

aiosmtplib (5.1.3) sends RCPT commands one round trip at a time and cannot
pipeline (its protocol drops replies that arrive before they are awaited): on
loopback it moved ~9,000 recipients/s where a pipelined envelope moved
~360,000. A list gateway lives on large envelopes, so this client writes
MAIL, every RCPT and DATA in one go and then reads the replies in order.
It falls back to one command at a time when the server does not offer PIPELINING.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError

log = logging.getLogger(__name__)

_LINE_LIMIT = 8192


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def error(self, context: str) -> TransientDeliveryError | PermanentDeliveryError:
        cls = PermanentDeliveryError if self.code >= 500 else TransientDeliveryError
        return cls(self.code, f"{context}: {self.text}")


@dataclass(frozen=True)
class Outcome:
    """A finished transaction: the recipients the server refused, and its final reply."""

    refused: dict[str, Reply] = field(default_factory=dict)
    reply: str = ""


# (envelope sender, recipients, message) of one transaction
Envelope = tuple[str, Sequence[str], bytes]


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    helo: str
    timeout: float
    implicit_tls: bool = False
    starttls: str = "opportunistic"  # or "required", "never"
    username: str = ""
    password: str = ""
    tls_context: ssl.SSLContext | None = None
    # Seconds a connection may sit unused and still be used again (Postfix's
    # smtp_connection_cache_time_limit, 2 s). The server ends a session idle past its
    # own timeout, and a firewall may drop one silently: reusing such a connection
    # fails the delivery (or waits out `timeout`) where a new one would have worked.
    reuse_idle: float = 2.0


MAX_LINE = 998  # RFC 5321 4.5.3.1.6, not counting CRLF


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload: CRLF line endings, no line over 998 octets, leading dots
    doubled, ending in CRLF.CRLF. Linear in the size of the message."""
    lines = data.split(b"\n")
    crlf = data.count(b"\r\n")
    if not crlf == len(lines) - 1 == data.count(b"\r"):
        # Bare LFs (or CRs) to mend: the usual case, CRLF throughout, skips the substitution.
        data = re.sub(rb"\r?\n", b"\r\n", data)
        lines = data.split(b"\n")
    if max(map(len, lines)) > MAX_LINE + 1 or len(lines[-1]) > MAX_LINE:  # (+ CR)
        data = b"\r\n".join(_break(line) for line in data.split(b"\r\n"))
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _break(line: bytes) -> bytes:
    """Break an over-long line as Postfix's smtp_line_length_limit does: insert CRLF SPACE,
    which keeps header fields intact (a folded line) and does least harm to MIME bodies."""
    if len(line) <= MAX_LINE:
        return line
    pieces = [line[:MAX_LINE]]
    pieces += [b" " + line[i:i + MAX_LINE - 1] for i in range(MAX_LINE, len(line), MAX_LINE - 1)]
    return b"\r\n".join(pieces)


@functools.cache
def _default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class SMTPClient:
    """One connection to the smarthost. Not safe for concurrent use: one transaction at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.extensions: dict[str, str] = {}
        self._buffer = bytearray()
        # Single-line replies already parsed, by their bytes: a large envelope's RCPT
        # replies are mostly the same line, parsed once instead of a hundred times.
        self._parsed: dict[bytes, Reply] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        s = self.settings
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(s.host, s.port, limit=_LINE_LIMIT,
                                        ssl=self._tls() if s.implicit_tls else None),
                s.timeout)
        except (OSError, TimeoutError) as exc:
            raise TransientDeliveryError(421, f"cannot connect to smarthost {s.host}:{s.port}: "
                                              f"{exc or type(exc).__name__}") from exc
        greeting = await self._read()
        if greeting.code != 220:
            await self.close()
            raise greeting.error("smarthost greeting")
        await self._ehlo()
        if "STARTTLS" in self.extensions and s.starttls != "never" and not s.implicit_tls:
            await self._starttls()
        elif s.starttls == "required" and not s.implicit_tls:
            await self.close()
            raise TransientDeliveryError(421, "smarthost does not offer STARTTLS, "
                                              "and [delivery] starttls = \"required\"")
        if s.username:
            await self._auth()

    async def _ehlo(self) -> None:
        reply = await self._command(f"EHLO {self.settings.helo}")
        if reply.code != 250:
            reply = await self._command(f"HELO {self.settings.helo}")
            if reply.code != 250:
                await self.close()
                raise reply.error("HELO")
            self.extensions = {}
            return
        self.extensions = {}
        for line in reply.text.splitlines()[1:]:
            keyword, _, params = line.strip().partition(" ")
            self.extensions[keyword.upper()] = params

    async def _starttls(self) -> None:
        reply = await self._command("STARTTLS")
        if reply.code != 220:
            if self.settings.starttls == "required":
                await self.close()
                raise reply.error("STARTTLS")
            return
        assert self._writer is not None
        context = self._tls()
        try:
            await asyncio.wait_for(self._writer.start_tls(context,
                                                          server_hostname=self.settings.host),
                                   self.settings.timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            await self.close()
            raise TransientDeliveryError(
                421, f"TLS handshake with smarthost failed: {exc}") from exc
        await self._ehlo()

    async def _auth(self) -> None:
        s = self.settings
        tls = self._writer is not None and self._writer.get_extra_info("sslcontext") is not None
        if not tls and s.host not in ("127.0.0.1", "::1", "localhost"):
            await self.close()
            raise PermanentDeliveryError(530, "refusing to send the smarthost password "
                                              "over a connection without TLS")
        token = base64.b64encode(f"\0{s.username}\0{s.password}".encode()).decode("ascii")
        reply = await self._command(f"AUTH PLAIN {token}", log_as="AUTH PLAIN ****")
        if reply.code != 235:
            await self.close()
            raise reply.error("smarthost authentication")

    def _tls(self) -> ssl.SSLContext:
        # Built only when TLS is used: loading the CA store takes tens of milliseconds.
        return self.settings.tls_context or _default_tls_context()

    @property
    def size_limit(self) -> int | None:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> Outcome:
        """One transaction. Raises for a failure of the whole transaction; per-recipient
        refusals are in the outcome."""
        result = (await self.send_many([(mail_from, recipients, data)]))[0]
        if isinstance(result, DeliveryError):
            raise result
        return result

    async def send_many(self, items: Sequence[Envelope]) -> list[Outcome | DeliveryError]:
        """Several transactions on this connection, each one's outcome or error in order.

        With PIPELINING, a message's content and its final dot go out in the same write
        as the next transaction's MAIL, RCPTs and DATA (RFC 2920 3.1 allows message
        content to start a group): one round trip per message, however many there are.
        A lost connection fails everything not yet finished as temporary.
        """
        if not self.connected:
            await self.connect()
        if "PIPELINING" not in self.extensions:
            return [await self._lockstep_one(*item) for item in items]
        results: list[Outcome | DeliveryError | None] = [None] * len(items)
        prefix = b""              # what precedes the next group: a content, or RSET
        owner: int | None = None  # the item whose content (and final reply) that is
        refused_of: dict[int, dict[str, Reply]] = {}
        try:
            for i, (mail_from, recipients, data) in enumerate(items):
                if (too_big := self._too_big(data)) is not None:
                    results[i] = too_big
                    continue
                commands = self._envelope(mail_from, recipients, data)
                self._write(prefix + "".join(c + "\r\n" for c in commands).encode("utf-8"))
                replies = await self._replies(len(commands) + (1 if prefix else 0))
                if prefix:
                    self._settle(results, owner, replies.pop(0), refused_of)
                mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
                refused = {r: reply for r, reply in zip(recipients, rcpt_replies, strict=True)
                           if not reply.ok}
                if not mail_reply.ok:
                    results[i] = mail_reply.error(f"MAIL FROM:<{mail_from}>")
                elif len(refused) == len(recipients):
                    results[i] = Outcome(refused, "all recipients refused")
                elif data_reply.code != 354:
                    results[i] = data_reply.error("DATA")
                else:
                    prefix, owner, refused_of[i] = dot_stuff(data), i, refused
                    continue
                prefix, owner = b"RSET\r\n", None  # leave the failed transaction
            if prefix:
                self._write(prefix)
                self._settle(results, owner, (await self._replies(1))[0], refused_of)
        except TransientDeliveryError as exc:
            await self.close()  # in an unknown state: never reuse it
            return [r if r is not None else exc for r in results]
        return [r if r is not None else TransientDeliveryError(421, "not sent")
                for r in results]

    def _too_big(self, data: bytes) -> PermanentDeliveryError | None:
        limit = self.size_limit
        if limit is not None and len(data) > limit:
            return PermanentDeliveryError(552, f"message of {len(data)} bytes exceeds the "
                                               f"smarthost's SIZE limit of {limit}")
        return None

    def _envelope(self, mail_from: str, recipients: Sequence[str], data: bytes) -> list[str]:
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(data)}")
        if "8BITMIME" in self.extensions and not data.isascii():
            params.append("BODY=8BITMIME")
        return [" ".join([f"MAIL FROM:<{mail_from}>", *params]),
                *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]

    @staticmethod
    def _settle(results: list[Outcome | DeliveryError | None], owner: int | None,
                reply: Reply, refused_of: dict[int, dict[str, Reply]]) -> None:
        """The reply to what preceded a group: a content's final reply, or RSET's."""
        if owner is None:
            if not reply.ok:
                raise TransientDeliveryError(reply.code, f"RSET refused: {reply.text}")
            return
        results[owner] = Outcome(refused_of.pop(owner), reply.text) if reply.ok \
            else reply.error("end of DATA")

    async def _lockstep_one(self, mail_from: str, recipients: Sequence[str],
                            data: bytes) -> Outcome | DeliveryError:
        """One transaction, one command at a time, for servers without PIPELINING."""
        try:
            if (too_big := self._too_big(data)) is not None:
                return too_big
            mail, *rcpts, data_command = self._envelope(mail_from, recipients, data)
            mail_reply = await self._command(mail)
            if not mail_reply.ok:
                await self._reset()
                return mail_reply.error(f"MAIL FROM:<{mail_from}>")
            replies = [await self._command(r) for r in rcpts]
            refused = {r: reply for r, reply in zip(recipients, replies, strict=True)
                       if not reply.ok}
            if len(refused) == len(recipients):
                await self._reset()
                return Outcome(refused, "all recipients refused")
            data_reply = await self._command(data_command)
            if data_reply.code != 354:
                await self._reset()
                return data_reply.error("DATA")
            self._write(dot_stuff(data))
            final = await self._read()
            return Outcome(refused, final.text) if final.ok else final.error("end of DATA")
        except TransientDeliveryError as exc:
            return exc

    async def _reset(self) -> None:
        reply = await self._command("RSET")
        if not reply.ok:
            await self.close()

    async def quit(self) -> None:
        if self.connected:
            try:
                await self._command("QUIT")
            except TransientDeliveryError:
                pass
        await self.close()

    def abandon(self) -> None:
        """Drop the connection at once, without a word or a TLS goodbye: for one the
        server may have left, which would keep a polite close waiting."""
        writer, self._writer, self._reader = self._writer, None, None
        self._buffer.clear()
        if writer is not None:
            writer.transport.abort()

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        self._buffer.clear()
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    # -- the wire -----------------------------------------------------------------

    async def _command(self, line: str, *, log_as: str | None = None) -> Reply:
        log.debug("C: %s", log_as or line)
        self._write(line.encode("utf-8") + b"\r\n")
        return await self._read()

    def _write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise TransientDeliveryError(421, "connection to smarthost lost")
        self._writer.write(data)

    async def _read(self) -> Reply:
        return (await self._replies(1))[0]

    async def _replies(self, count: int) -> list[Reply]:
        """The next ``count`` replies, under one timeout for them all. Replies are parsed
        from what arrives in bulk: a pipelined group's replies often come in one packet."""
        if self._reader is None or self._writer is None:
            raise TransientDeliveryError(421, "connection to smarthost lost")
        replies: list[Reply] = []
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self._writer.drain()
                while len(replies) < count:
                    reply = self._parse_reply()
                    if reply is not None:
                        replies.append(reply)
                        continue
                    data = await self._reader.read(65536)
                    if not data:
                        raise ConnectionError("smarthost closed the connection")
                    self._buffer += data
                    if len(self._buffer) > _LINE_LIMIT * 64:
                        raise ConnectionError("smarthost sent an endless reply")
        except (OSError, TimeoutError, ValueError) as exc:
            await self.close()
            raise TransientDeliveryError(
                421, f"smarthost connection failed: {exc or type(exc).__name__}") from exc
        return replies

    def _parse_reply(self) -> Reply | None:
        """One complete (possibly multi-line) reply off the front of the buffer, or None."""
        end = self._buffer.find(b"\n")
        if end == -1:
            return None
        if self._buffer[3:4] != b"-":  # a single-line reply, the usual case
            raw = bytes(self._buffer[:end + 1])
            reply = self._parsed.get(raw)
            if reply is None:
                reply = _reply([_reply_line(raw)])
                if len(self._parsed) < _PARSED_KEPT:
                    self._parsed[raw] = reply
            del self._buffer[:end + 1]
            return reply
        lines = []
        pos = 0
        while True:
            end = self._buffer.find(b"\n", pos)
            if end == -1:
                return None
            line = _reply_line(self._buffer[pos:end])
            pos = end + 1
            lines.append(line)
            if line[3:4] != "-":
                del self._buffer[:pos]
                return _reply(lines)


_PARSED_KEPT = 64


def _reply_line(data: bytes | bytearray) -> str:
    line = bytes(data).rstrip(b"\r\n").decode("utf-8", "replace")
    if len(line) < 3 or not line[:3].isdigit():
        raise ValueError(f"smarthost sent a malformed reply: {line[:100]!r}")
    return line


def _reply(lines: list[str]) -> Reply:
    return Reply(int(lines[-1][:3]), "\n".join(line[4:] for line in lines))
