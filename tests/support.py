"""Test helpers: a real SMTP sink, the real daemon on loopback, and SMTP clients."""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from gateway.authentication import Resolver
from gateway.clock import Clock, SystemClock
from gateway.config import Config, load
from gateway.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent


def _corpus() -> Path:
    """The shared mail corpus: $LISTGATE_TEST_CORPUS, else ../shared/corpus next to the
    checkout, else the team machines' /work/shared/corpus (a clone made elsewhere, as CI
    may make one, still finds it). Tests that need it skip, saying so, when it is absent."""
    if os.environ.get("LISTGATE_TEST_CORPUS"):
        return Path(os.environ["LISTGATE_TEST_CORPUS"])
    beside = REPO.parent / "shared" / "corpus"
    if beside.is_dir():
        return beside
    return Path("/work/shared/corpus")


CORPUS = _corpus()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0,
               what: str = "condition") -> None:
    """Wait for something that happens asynchronously (not for a schedule)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


def _opened(event: threading.Event) -> threading.Event:
    event.set()
    return event


@dataclass
class SinkHandler:
    """Records what it accepts; replies can be scripted per recipient or per transaction."""

    messages: list[Received] = field(default_factory=list)
    sessions: int = 0  # EHLOs: the connections clients opened (and began)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    mail_reply: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Cleared, the reply to DATA waits until it is set again (a transaction in flight).
    data_gate: threading.Event = field(default_factory=lambda: _opened(threading.Event()))

    async def handle_EHLO(self, server: SMTP, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.sessions += 1
        # aiosmtpd reads commands one at a time from its stream, so it handles
        # pipelined clients; advertise it so our client's pipelining is exercised.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(self, server: SMTP, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        if not self.data_gate.is_set():
            await asyncio.to_thread(self.data_gate.wait, 30.0)
        if self.data_reply:
            return self.data_reply
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content))
        return "250 2.0.0 Ok: queued"

    def copies(self) -> list[tuple[str, bytes]]:
        """(recipient, data) for every recipient copy received."""
        with self.lock:
            return [(r, m.data) for m in self.messages for r in m.rcpt_tos]

    def count(self) -> int:
        return len(self.copies())


class Sink:
    """A real SMTP server on loopback standing in for the smarthost."""

    def __init__(self, port: int | None = None, *, timeout: float = 300) -> None:
        self.port = port or free_port()
        self.handler = SinkHandler()
        self.timeout = timeout  # idle seconds before it says 421 and hangs up, as MTAs do
        self._controller: Controller | None = None

    def start(self) -> Sink:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                      data_size_limit=50 * 1024 * 1024, timeout=self.timeout)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def wait_for(self, copies: int, timeout: float = 30.0) -> list[tuple[str, bytes]]:
        wait_until(lambda: self.handler.count() >= copies, timeout,
                   f"{copies} copies at the sink (have {self.handler.count()})")
        return self.handler.copies()


CORE_POLICY = """
[[chain]]
rule = "loop"
action = "discard"

[[chain]]
rule = "non-member"
action = "reject"
"""


def write_config(directory: Path, *, smarthost: str = "", listen: list[str] | None = None,
                 extra: str = "", store_url: str | None = None,
                 sections: str = "", policy: str | None = None,
                 poll_interval: str = "200ms") -> Path:
    """A configuration for tests. ``extra`` holds more [delivery] lines (a key given
    there replaces the default below); ``sections`` is appended as more tables;
    ``policy``, if given, becomes the default policy (else the shipped one is used).
    With a ``poll_interval`` of an hour, whatever a test sees done within its wait was
    woken, not polled for."""
    directory.mkdir(parents=True, exist_ok=True)
    if policy is not None:
        (directory / "policies").mkdir(exist_ok=True)
        (directory / "policies" / "default.toml").write_text(policy, encoding="utf-8")
        sections = f'[paths]\npolicies = "policies"\n\n{sections}'

    listen = listen or ["smtp://127.0.0.1:0", "lmtp://127.0.0.1:0"]
    listen_toml = ", ".join(f'"{u}"' for u in listen)
    delivery = {"smarthost": f'"{smarthost}"', "outbox": '"outbox"',
                "retry_initial": '"60s"', "connections": "4"}
    for line in extra.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            delivery[key.strip()] = value.strip()
    delivery_toml = "\n".join(f"{k} = {v}" for k, v in delivery.items())
    if "[web]" not in sections:
        sections = f'[web]\nlisten = "http://127.0.0.1:0"\n\n{sections}'
    text = f"""
[store]
url = "{store_url or 'sqlite:///listgate.db'}"

[intake]
listen = [{listen_toml}]
hostname = "lists.test"

[queue]
poll_interval = "{poll_interval}"
lease = "30s"
retry_delay = "1s"

[delivery]
{delivery_toml}

{sections}
"""
    path = directory / "listgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


class RunningGateway:
    """The real daemon, in this process, on its own event loop thread."""

    def __init__(self, config: Config, *, clock: Clock | None = None,
                 resolver: Resolver | None = None) -> None:
        self.config = config
        # No test reaches the network: by default DNS answers NXDOMAIN for everything.
        self.daemon = Daemon(config, clock=clock or SystemClock(),
                             resolver=resolver or Resolver(records={}))
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> RunningGateway:
        def main() -> None:
            try:
                asyncio.run(self.daemon.run(ready=self._ready.set))
            except BaseException as exc:  # surfaced to the test by start()/stop()
                self._error = exc
                self._ready.set()

        self._thread = threading.Thread(target=main, name="listgate-daemon", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self.daemon.stop()
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "daemon did not stop"
        if self._error is not None:
            raise self._error

    def port(self, protocol: str = "smtp") -> int:
        return next(b.port for b in self.daemon.bound if b.protocol == protocol)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port("smtp"), timeout=30)

    def lmtp(self) -> smtplib.LMTP:
        return smtplib.LMTP("127.0.0.1", self.port("lmtp"), timeout=30)

    def send(self, mail_from: str, rcpts: list[str] | str, data: bytes | str) -> dict[str, Any]:
        with self.smtp() as client:
            return client.sendmail(mail_from, rcpts, data)


@contextmanager
def gateway(config_path: Path, *, clock: Clock | None = None, resolver: Resolver | None = None,
            **overrides: Any) -> Iterator[RunningGateway]:
    config = load(config_path)
    if overrides:
        config = replace(config, **overrides)
    running = RunningGateway(config, clock=clock, resolver=resolver).start()
    try:
        yield running
    finally:
        running.stop()


def as_sent(data: bytes) -> bytes:
    """Bytes as a real SMTP client sends them: every line ending CRLF (smtplib does this
    for str messages only; a file read as bytes keeps its bare LFs or CRs)."""
    return re.sub(rb"\r\n|\n|\r", b"\r\n", data)


def post(sender: str, to: str, subject: str, body: str = "Hello.\n", *,
         extra_headers: str = "", message_id: str | None = None) -> bytes:
    mid = message_id or f"<{time.time_ns()}.{os.getpid()}@example.net>"
    text = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
            f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n{extra_headers}\r\n{body}")
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


class GatewayProcess:
    """The daemon as its own process, for tests that kill it."""

    # Every daemon started, so that one a failed test left running is stopped in its
    # teardown (conftest) and not found still running by a later test's collector.
    started: ClassVar[list[subprocess.Popen[bytes]]] = []

    @classmethod
    def reap(cls) -> None:
        """Kill those still running; called after each test."""
        while cls.started:
            proc = cls.started.pop()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_path.parent / "daemon.log"

    def start(self, smtp_port: int, *, preexec: Callable[[], None] | None = None) -> GatewayProcess:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", str(self.config_path), "serve"],
                stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=preexec)
        self.started.append(self.proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", smtp_port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("daemon did not start listening")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(60)
