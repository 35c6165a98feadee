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

from gateway.errors import PermanentDeliveryError, TransientDeliveryError

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


MAX_LINE = 998  # RFC 5321 4.5.3.1.6, not counting CRLF


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload: CRLF line endings, no line over 998 octets, leading dots
    doubled, ending in CRLF.CRLF. Linear in the size of the message."""
    data = re.sub(rb"\r?\n", b"\r\n", data)
    lines = data.split(b"\r\n")
    if any(len(line) > MAX_LINE for line in lines):
        data = b"\r\n".join(_break(line) for line in lines)
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
        if not self.connected:
            await self.connect()
        limit = self.size_limit
        if limit is not None and len(data) > limit:
            raise PermanentDeliveryError(552, f"message of {len(data)} bytes exceeds the "
                                              f"smarthost's SIZE limit of {limit}")
        payload = dot_stuff(data)
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(data)}")
        if "8BITMIME" in self.extensions and not data.isascii():
            params.append("BODY=8BITMIME")
        mail = " ".join([f"MAIL FROM:<{mail_from}>", *params])
        rcpts = [f"RCPT TO:<{r}>" for r in recipients]
        if "PIPELINING" in self.extensions:
            replies = await self._pipeline([mail, *rcpts, "DATA"])
        else:
            replies = await self._lockstep(mail, rcpts)
        mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        if not mail_reply.ok:
            await self._reset()
            raise mail_reply.error(f"MAIL FROM:<{mail_from}>")
        refused = {r: reply for r, reply in zip(recipients, rcpt_replies, strict=True)
                   if not reply.ok}
        if len(refused) == len(recipients):
            await self._reset()
            return Outcome(refused, "all recipients refused")
        if data_reply.code != 354:
            await self._reset()
            raise data_reply.error("DATA")
        self._write(payload)
        final = await self._read()
        if not final.ok:
            raise final.error("end of DATA")
        return Outcome(refused, final.text)

    async def _pipeline(self, commands: list[str]) -> list[Reply]:
        self._write("".join(c + "\r\n" for c in commands).encode("utf-8"))
        return [await self._read() for _ in commands]

    async def _lockstep(self, mail: str, rcpts: list[str]) -> list[Reply]:
        mail_reply = await self._command(mail)
        if not mail_reply.ok:
            return [mail_reply, *[Reply(503, "not sent")] * len(rcpts), Reply(503, "not sent")]
        replies = [await self._command(r) for r in rcpts]
        if not any(r.ok for r in replies):
            return [mail_reply, *replies, Reply(503, "no valid recipients")]
        return [mail_reply, *replies, await self._command("DATA")]

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

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
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
        if self._reader is None or self._writer is None:
            raise TransientDeliveryError(421, "connection to smarthost lost")
        lines = []
        try:
            await asyncio.wait_for(self._writer.drain(), self.settings.timeout)
            while True:
                raw = await asyncio.wait_for(self._reader.readline(), self.settings.timeout)
                if not raw.endswith(b"\n"):
                    raise ConnectionError("smarthost closed the connection")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if len(line) < 3 or not line[:3].isdigit():
                    raise ConnectionError(f"smarthost sent a malformed reply: {line[:100]!r}")
                lines.append(line[4:])
                if line[3:4] != "-":
                    return Reply(int(line[:3]), "\n".join(lines))
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            await self.close()
            raise TransientDeliveryError(
                421, f"smarthost connection failed: {exc or type(exc).__name__}") from exc
