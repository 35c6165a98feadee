"""Where outbound mail goes: the smarthost over SMTP, or a local outbox folder.

The outbox is what a new install uses before it has a smarthost: one ``.eml``
file per recipient copy, written maildir-style (``tmp/`` then rename into
``new/``, fsync'd), with ``Return-Path`` and ``Delivered-To`` as a local
delivery would add them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

from gateway.config import DeliveryConfig, parse_smarthost
from gateway.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from gateway.smtpclient import Envelope, Outcome, Settings, SMTPClient


class Transport(Protocol):
    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> Outcome: ...

    async def send_many(self, items: Sequence[Envelope]) -> list[Outcome | DeliveryError]: ...

    async def close(self) -> None: ...

    def describe(self) -> str: ...


class SMTPTransport:
    """A pool of connections to the smarthost, reused across transactions."""

    def __init__(self, settings: Settings, *, size: int) -> None:
        self.settings = settings
        self._idle: list[tuple[float, SMTPClient]] = []  # (back in the pool at, connection)
        self._slots = asyncio.Semaphore(size)

    def describe(self) -> str:
        return f"smarthost {self.settings.host}:{self.settings.port}"

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[SMTPClient]:
        """A connection from the pool (or a new one), back in the pool afterwards unless
        something other than a 5xx went wrong on it."""
        async with self._slots:
            client = self._fresh() or SMTPClient(self.settings)
            try:
                yield client
            except PermanentDeliveryError:
                self._keep(client)  # a 5xx ends the transaction, not the connection
                raise
            except BaseException:
                await client.close()
                raise
            self._keep(client)

    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> Outcome:
        async with self._client() as client:
            return await client.send(mail_from, recipients, data)

    async def send_many(self, items: Sequence[Envelope]) -> list[Outcome | DeliveryError]:
        """Many transactions on one connection (see SMTPClient.send_many)."""
        try:
            async with self._client() as client:
                return await client.send_many(items)
        except TransientDeliveryError as exc:  # could not even connect
            return [exc] * len(items)

    def _fresh(self) -> SMTPClient | None:
        """The pool's most recently used connection, unless it has been idle for
        ``reuse_idle`` seconds or more; the stale ones are dropped on the way (see
        ``SMTPClient.abandon``)."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            since, client = self._idle.pop()
            if now - since < self.settings.reuse_idle:
                return client
            client.abandon()
        return None

    def _keep(self, client: SMTPClient) -> None:
        if client.connected:
            self._idle.append((asyncio.get_running_loop().time(), client))

    async def close(self) -> None:
        """QUIT the fresh connections; drop the stale ones (see ``_fresh``)."""
        fresh = []
        while (client := self._fresh()) is not None:
            fresh.append(client)
        await asyncio.gather(*(c.quit() for c in fresh), return_exceptions=True)


class OutboxTransport:
    """Writes each recipient's copy to ``<outbox>/new/*.eml``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seq = itertools.count()
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")

    def describe(self) -> str:
        return f"outbox folder {self.root / 'new'}"

    async def send(self, mail_from: str, recipients: Sequence[str], data: bytes) -> Outcome:
        try:
            await asyncio.to_thread(self._write_all, mail_from, list(recipients), data)
        except OSError as exc:
            raise TransientDeliveryError(451, f"cannot write to the outbox: {exc}") from exc
        return Outcome({}, f"written to {self.root / 'new'}")

    async def send_many(self, items: Sequence[Envelope]) -> list[Outcome | DeliveryError]:
        results: list[Outcome | DeliveryError] = []
        for mail_from, recipients, data in items:
            try:
                results.append(await self.send(mail_from, recipients, data))
            except TransientDeliveryError as exc:
                results.append(exc)
        return results

    def _write_all(self, mail_from: str, recipients: list[str], data: bytes) -> None:
        tmp, new = self.root / "tmp", self.root / "new"
        tmp.mkdir(parents=True, exist_ok=True)
        new.mkdir(parents=True, exist_ok=True)
        for rcpt in recipients:
            name = f"{time.time():.6f}.P{os.getpid()}Q{next(self._seq)}.{self._host}.eml"
            head = f"Return-Path: <{mail_from}>\r\nDelivered-To: {rcpt}\r\n".encode()
            path = tmp / name
            with open(path, "wb") as f:
                f.write(head + data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(path, new / name)
        fd = os.open(new, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def close(self) -> None:
        return None


def build(config: DeliveryConfig, *, hostname: str) -> Transport:
    if not config.smarthost:
        return OutboxTransport(config.outbox)
    host = parse_smarthost(config.smarthost)
    settings = Settings(
        host=host.host, port=host.port, helo=config.helo_name or hostname,
        timeout=config.timeout, implicit_tls=host.implicit_tls, starttls=config.starttls,
        username=config.username, password=config.password,
    )
    return SMTPTransport(settings, size=config.connections)
