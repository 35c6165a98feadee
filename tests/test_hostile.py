"""Slow and hostile SMTP clients against the real daemon: the limits hold, and a
well-behaved client is served all the while.

One gateway serves the whole module (one per test would cost more than the tests),
with small limits set in its configuration file. Abusive clients speak raw bytes over
their own sockets from 127.0.0.1; the well-behaved one is smtplib from 127.0.0.2, and
must see its post accepted and delivered to every member while the abuse goes on.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway import intake, lists
from gateway.authentication import Resolver
from gateway.clock import SystemClock
from gateway.message import split
from gateway.schema import RoleName, State, messages, outbound, work
from gateway.store import Store
from tests.support import (
    CORE_POLICY,
    RunningGateway,
    Sink,
    gateway,
    post,
    wait_until,
    write_config,
)

LIST = "discuss@example.org"
OWNER = "owner@example.net"
MEMBERS = ("alice@example.net", "bob@example.net", "carol@example.net")
POSTER = MEMBERS[1]

TIMEOUT = 2.0
PER_IP = 4
TOTAL = 8
MAX_RECIPIENTS = 100
MAX_LINE = 4096
LIMITS = f"""timeout = "{TIMEOUT:g}s"
max_connections = {TOTAL}
max_connections_per_ip = {PER_IP}
max_recipients = {MAX_RECIPIENTS}
max_line_length = {MAX_LINE}
"""

ABUSER = "127.0.0.1"
GOOD = "127.0.0.2"
THIRD = "127.0.0.3"


# -- the site: one daemon, one list, a sink ---------------------------------------------

@dataclass
class Site:
    """A running gateway, its store, and the sink standing in for the smarthost."""

    gw: RunningGateway
    sink: Sink
    store: Store
    config_path: Path

    @property
    def port(self) -> int:
        return self.gw.port("smtp")


def default_lists(conn: Connection) -> None:
    lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
    for address in MEMBERS:
        lists.add_member(conn, lst, address, now=0.0)
    lists.add_role(conn, lst, OWNER, RoleName.OWNER)


@contextmanager
def open_site(directory: Path, *, intake_lines: str = "", sections: str = "",
              setup: Callable[[Connection], None] = default_lists,
              before_start: Callable[[Path], None] | None = None,
              resolver: Resolver | None = None) -> Iterator[Site]:
    """A store on SQLite with the lists ``setup`` makes, a sink, and the daemon with
    ``intake_lines`` added to its [intake] section."""
    url = f"sqlite:///{directory / 'store.db'}"
    store = Store(url, clock=SystemClock())
    store.upgrade()
    with store.write() as conn:
        setup(conn)
    sink = Sink().start()
    path = write_config(directory / "gw", smarthost=sink.url, store_url=url,
                        policy=CORE_POLICY, sections=sections)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('hostname = "lists.test"\n',
                                 f'hostname = "lists.test"\n{intake_lines}'), encoding="utf-8")
    if before_start is not None:
        before_start(path.parent)
    try:
        with gateway(path, resolver=resolver) as gw:
            yield Site(gw, sink, store, path)
    finally:
        sink.stop()
        store.dispose()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with open_site(tmp_path_factory.mktemp("hostile"), intake_lines=LIMITS) as running:
        assert running.gw.config.intake.timeout == TIMEOUT  # the file's limits are in force
        yield running


# -- clients ----------------------------------------------------------------------------

class RawClient:
    """An SMTP client that sends exactly the bytes it is given and reads replies as they
    come: the tool of a hostile or broken client."""

    def __init__(self, port: int, *, source: str = ABUSER, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self._buffer = b""
        self.greeting = self.reply()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """The next complete reply (the last line of a multi-line one), "" at end of stream."""
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
                if line[3:4] == b"-":
                    continue
                return line.decode("latin-1")
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return ""
            self._buffer += chunk

    def replies(self, count: int) -> list[str]:
        return [self.reply() for _ in range(count)]

    def rest(self) -> list[str]:
        """Every reply until the server closes the connection (within the socket timeout)."""
        out = []
        while (line := self.reply()) != "":
            out.append(line)
        return out

    def command(self, line: bytes) -> str:
        self.send(line + b"\r\n")
        return self.reply()


def greeting(port: int, source: str) -> str:
    with RawClient(port, source=source) as client:
        return client.greeting


def good_post(site: Site, *, source: str = GOOD) -> str:
    """A well-behaved client posts to the list; returns the post's Message-ID once
    every member has their copy."""
    mid = f"<good.{uuid.uuid4().hex}@example.net>"
    with smtplib.SMTP("127.0.0.1", site.port, timeout=30, source_address=(source, 0)) as client:
        refused = client.sendmail(POSTER, [LIST], post(POSTER, LIST, "Still served?",
                                                       message_id=mid))
    assert refused == {}
    wait_delivered(site, mid)
    return mid


def wait_delivered(site: Site, mid: str, to: tuple[str, ...] = MEMBERS) -> None:
    def copies() -> list[str]:
        return sorted(r for r, data in site.sink.handler.copies() if mid.encode() in data)
    wait_until(lambda: copies() == sorted(to), timeout=20,
               what=f"{mid} delivered to {', '.join(to)} (have {copies()})")


def last_id(site: Site) -> int:
    with site.store.read() as conn:
        return int(conn.execute(sa.select(sa.func.max(messages.c.id))).scalar_one() or 0)


def stored_since(site: Site, since: int) -> list[bytes]:
    """The raw bytes of every message stored after id ``since``, in order."""
    with site.store.read() as conn:
        return list(conn.execute(sa.select(messages.c.raw).where(messages.c.id > since)
                                 .order_by(messages.c.id)).scalars())


def message_ids(raws: list[bytes]) -> list[str]:
    return [split(raw).get("Message-ID") or "" for raw in raws]


def settled(store: Store) -> bool:
    """No work or outbound row is waiting or being worked on."""
    busy = (State.READY.value, State.CLAIMED.value)
    with store.read() as conn:
        return all(conn.execute(sa.select(sa.func.count()).select_from(t)
                                .where(t.c.state.in_(busy))).scalar_one() == 0
                   for t in (work, outbound))


def parked(store: Store) -> list[str]:
    with store.read() as conn:
        return [f"{t.name} {row.id}: {row.last_error}" for t in (work, outbound)
                for row in conn.execute(sa.select(t.c.id, t.c.last_error)
                                        .where(t.c.state == State.PARKED.value))]


def transaction(mid: str, *, to: str = LIST, mail_from: str = POSTER) -> bytes:
    """One whole SMTP transaction as a pipelining client writes it."""
    return (f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{to}>\r\nDATA\r\n".encode()
            + post(mail_from, to, f"Pipelined {mid}", message_id=mid) + b".\r\n")


def fill(site: Site, source: str, count: int) -> list[RawClient]:
    """``count`` idle sessions from ``source``, each greeted with 220 (sessions of the
    previous test may take a moment to be let go)."""
    clients: list[RawClient] = []

    def opened() -> bool:
        for client in clients:
            client.close()
        clients.clear()
        for _ in range(count):
            clients.append(RawClient(site.port, source=source))
        if all(c.greeting.startswith("220 ") for c in clients):
            return True
        time.sleep(0.05)
        return False

    wait_until(opened, timeout=10, what=f"{count} sessions from {source}")
    return clients


# -- many idle connections ----------------------------------------------------------------

def test_intake_per_ip_cap_refuses_the_next_and_serves_others(site: Site) -> None:
    idle = fill(site, ABUSER, PER_IP)
    try:
        refused = greeting(site.port, ABUSER)
        assert refused.startswith("421 4.7.0"), refused
        assert [c.command(b"NOOP") for c in idle] == ["250 OK"] * PER_IP  # undisturbed
        good_post(site, source=GOOD)
    finally:
        for client in idle:
            client.close()


def test_intake_total_cap_refuses_everyone_until_a_session_ends(site: Site) -> None:
    idle = fill(site, ABUSER, PER_IP) + fill(site, THIRD, TOTAL - PER_IP)
    try:
        refused = greeting(site.port, GOOD)
        assert refused.startswith("421 4.7.0"), refused
        # Two leave: one slot for the probe below, one for the post (whenever the
        # probe's own slot is let go).
        idle.pop().close()
        idle.pop().close()
        wait_until(lambda: greeting(site.port, GOOD).startswith("220 "), timeout=10,
                   what="a free slot")
        good_post(site, source=GOOD)
    finally:
        for client in idle:
            client.close()


def test_intake_idle_sessions_are_cut_at_the_timeout_and_free_their_slots(site: Site) -> None:
    idle = fill(site, ABUSER, PER_IP)
    started = time.monotonic()
    try:
        good_post(site, source=GOOD)
        ends = [c.rest() for c in idle]
        waited = time.monotonic() - started
    finally:
        for client in idle:
            client.close()
    assert all(end and end[-1].startswith("421 4.4.2") for end in ends), ends
    assert TIMEOUT - 0.5 < waited < TIMEOUT + 3
    assert greeting(site.port, ABUSER).startswith("220 ")


def test_intake_each_command_moves_the_idle_deadline_on(site: Site) -> None:
    """A session that keeps talking outlives the timeout (each command restarts it, the
    timer set for the first deadline waits on); once quiet, it is cut a timeout later."""
    with RawClient(site.port, source=GOOD) as client:
        assert client.command(b"EHLO busy.example").startswith("250")
        started = time.monotonic()
        while time.monotonic() - started < 2.5 * TIMEOUT:
            time.sleep(TIMEOUT / 4)
            assert client.command(b"NOOP").startswith("250"), "cut while it was talking"
        quiet = time.monotonic()
        end = client.rest()
        waited = time.monotonic() - quiet
    assert end[-1].startswith("421 4.4.2"), end
    assert TIMEOUT - 0.5 < waited < TIMEOUT + 3


# -- slowloris ----------------------------------------------------------------------------

def dribble(client: RawClient, data: bytes, *, every: float = 0.1) -> threading.Thread:
    """Send ``data`` one byte at a time until it is sent or the server hangs up."""
    def run() -> None:
        for byte in data:
            try:
                client.send(bytes([byte]))
            except OSError:
                return
            time.sleep(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("opening, dribbled", [
    (b"EHLO slow.example\r\nMAIL FROM:<bob@example.net>\r\nRCPT TO:<discuss@example.org>\r\n"
     b"DATA\r\n", b"Subject: never ends\r\n\r\n" + b"x" * 200),
    (b"EHLO slow.example\r\n", b"MAIL FROM:<bob@example.net> " + b" " * 200),
], ids=["data", "command"])
def test_intake_slowloris_is_cut_at_the_timeout_and_stores_nothing(
        site: Site, opening: bytes, dribbled: bytes) -> None:
    before = last_id(site)
    with RawClient(site.port) as slow:
        slow.send(opening)
        started = time.monotonic()
        thread = dribble(slow, dribbled)
        good = good_post(site, source=GOOD)  # served while the slow client dribbles
        end = slow.rest()
        waited = time.monotonic() - started
        thread.join(5)
    assert end[-1].startswith("421 4.4.2"), end
    assert waited < TIMEOUT + 3, "the dribbling client kept its session past the timeout"
    assert message_ids(stored_since(site, before)) == [good]


# -- long lines, huge headers, many recipients ----------------------------------------------

def data_session(body: bytes) -> bytes:
    return (b"EHLO x.example\r\nMAIL FROM:<bob@example.net>\r\nRCPT TO:<discuss@example.org>\r\n"
            b"DATA\r\n" + body + b".\r\n")


@pytest.mark.parametrize("body, expected", [
    (post(POSTER, LIST, "long line", "a" * (MAX_LINE + 10) + "\r\n"), "500 5.5.2"),
    # A 1 MB header field, folded into lines of a legal length...
    (b"X-Huge: " + b"\r\n ".join([b"w" * 900] * 1150) + b"\r\n" + post(POSTER, LIST, "huge"),
     "552 5.3.4"),
    # ... or on one line.
    (b"X-Huge: " + b"w" * 1_000_000 + b"\r\n" + post(POSTER, LIST, "huge"), "500 5.5.2"),
], ids=["line", "folded-1MB-header", "1MB-header-line"])
def test_intake_oversized_lines_and_headers_are_refused_and_the_session_goes_on(
        site: Site, body: bytes, expected: str) -> None:
    before = last_id(site)
    with RawClient(site.port) as client:
        client.send(data_session(body))
        answers = client.replies(5)
        assert [a[:3] for a in answers[:4]] == ["250", "250", "250", "354"]
        assert answers[4].startswith(expected), answers[4]
        assert client.command(b"NOOP") == "250 OK"  # the session is still usable
        good = good_post(site, source=GOOD)
    assert message_ids(stored_since(site, before)) == [good]


def test_intake_header_under_the_limit_is_taken_and_delivered_intact(site: Site) -> None:
    field = b"X-Large: " + b"\r\n ".join([b"v" * 900] * 200)  # 180 KB, under 256 KiB
    mid = f"<large.{uuid.uuid4().hex}@example.net>"
    with RawClient(site.port) as client:
        client.send(data_session(field + b"\r\n" + post(POSTER, LIST, "large", message_id=mid)))
        assert client.replies(5)[-1].startswith("250 2.0.0")
    wait_delivered(site, mid)
    copy = next(data for _r, data in site.sink.handler.copies() if mid.encode() in data)
    assert split(copy).get("X-Large") == split(field + b"\r\n\r\n").get("X-Large")


def test_intake_10000_recipients_take_the_first_max_recipients_and_deliver_once(
        site: Site) -> None:
    mid = f"<many.{uuid.uuid4().hex}@example.net>"
    before = last_id(site)
    with RawClient(site.port, timeout=30) as client:
        client.send(b"EHLO many.example\r\nMAIL FROM:<bob@example.net>\r\n"
                    + b"RCPT TO:<discuss@example.org>\r\n" * 10_000 + b"DATA\r\n"
                    + post(POSTER, LIST, "ten thousand", message_id=mid) + b".\r\nQUIT\r\n")
        good = good_post(site, source=GOOD)
        answers = client.rest()
    assert answers[:2] == ["250 HELP", "250 2.1.0 OK"]
    rcpts = answers[2:10_002]
    assert rcpts[:MAX_RECIPIENTS] == ["250 2.1.5 OK"] * MAX_RECIPIENTS
    assert {r[:9] for r in rcpts[MAX_RECIPIENTS:]} == {"452 4.5.3"}
    assert answers[10_002].startswith("354")
    assert answers[10_003].startswith("250 2.0.0 OK queued as")
    assert answers[10_004:] == ["221 Bye"]
    assert sorted(message_ids(stored_since(site, before))) == sorted([good, mid])
    wait_delivered(site, mid)  # one copy per member, not one per accepted RCPT


def test_intake_many_refused_recipients_end_the_session(site: Site) -> None:
    """An address harvester: after MAX_ERRORS refusals the session is closed."""
    with RawClient(site.port) as client:
        client.send(b"EHLO harvest.example\r\nMAIL FROM:<x@example.com>\r\n"
                    + b"".join(f"RCPT TO:<user{i}@example.org>\r\n".encode()
                               for i in range(200)))
        good_post(site, source=GOOD)
        answers = client.rest()
    assert answers[:2] == ["250 HELP", "250 2.1.0 OK"]
    refusals = answers[2:-1]
    assert len(refusals) == intake.MAX_ERRORS
    assert all(r.startswith("550 5.1.1") for r in refusals)
    assert answers[-1] == intake.TOO_MANY_ERRORS


def test_intake_a_message_pipelined_past_the_error_limit_is_not_stored(site: Site) -> None:
    """The session is closed at the last error while a whole transaction it pipelined
    is already in the server's buffer: the client was told 421, so nothing is stored."""
    mid = f"<late.{uuid.uuid4().hex}@example.net>"
    before = last_id(site)
    bad = b"".join(f"RCPT TO:<nobody{i}@example.org>\r\n".encode()
                   for i in range(intake.MAX_ERRORS))
    with RawClient(site.port) as client:
        client.send(b"EHLO late.example\r\n"
                    + transaction(mid).replace(b"RCPT", bad + b"RCPT", 1) + b"QUIT\r\n")
        answers = client.rest()
    assert answers[:2] == ["250 HELP", "250 2.1.0 OK"]
    assert all(a.startswith("550 5.1.1") for a in answers[2:-1])
    assert len(answers) == intake.MAX_ERRORS + 3 and answers[-1] == intake.TOO_MANY_ERRORS
    good = good_post(site, source=GOOD)
    assert message_ids(stored_since(site, before)) == [good]


def test_intake_errors_are_forgiven_after_a_delivered_message(site: Site) -> None:
    """A front MTA reusing one connection for many messages, some to unknown
    addresses, is not cut off: a message taken starts the error count again."""
    burst = intake.MAX_ERRORS - 2
    bad = b"".join(f"RCPT TO:<nobody{i}@example.org>\r\n".encode() for i in range(burst))
    mids = [f"<front.{i}.{uuid.uuid4().hex}@example.net>" for i in range(3)]
    with RawClient(site.port) as client:
        client.send(b"EHLO front.example\r\n"
                    + b"".join(transaction(mid).replace(b"RCPT", bad + b"RCPT", 1)
                               for mid in mids) + b"QUIT\r\n")
        answers = client.rest()
    assert answers[-1] == "221 Bye"
    assert sum(a.startswith("250 2.0.0 OK queued") for a in answers) == len(mids)
    assert sum(a.startswith("550 5.1.1") for a in answers) == burst * len(mids)


def test_intake_command_budget_ends_an_endless_session(site: Site) -> None:
    with RawClient(site.port) as client:
        client.send(b"EHLO noop.example\r\n" + b"NOOP\r\n" * (intake.MAX_OTHER_COMMANDS + 50))
        good_post(site, source=GOOD)
        answers = client.rest()
    assert answers[1:-1] == ["250 OK"] * intake.MAX_OTHER_COMMANDS
    assert answers[-1].startswith("421 4.7.0 NOOP sent too many times")


# -- pipelining abuse -------------------------------------------------------------------

def test_intake_a_whole_session_in_one_write_gets_its_replies_in_order(site: Site) -> None:
    mid = f"<oneshot.{uuid.uuid4().hex}@example.net>"
    before = last_id(site)
    with RawClient(site.port) as client:
        client.send(b"EHLO oneshot.example\r\n" + transaction(mid) + b"QUIT\r\n")
        answers = client.rest()
    assert [a[:9] for a in answers] == ["250 HELP", "250 2.1.0", "250 2.1.5", "354 End d",
                                        "250 2.0.0", "221 Bye"]
    assert message_ids(stored_since(site, before)) == [mid]
    wait_delivered(site, mid)


def test_intake_many_transactions_in_one_write_are_kept_apart(site: Site) -> None:
    mids = [f"<burst.{i}.{uuid.uuid4().hex}@example.net>" for i in range(25)]
    before = last_id(site)
    with RawClient(site.port) as client:
        client.send(b"EHLO burst.example\r\n" + b"".join(transaction(m) for m in mids)
                    + b"QUIT\r\n")
        good = good_post(site, source=GOOD)
        answers = client.rest()
    assert answers[0] == "250 HELP" and answers[-1] == "221 Bye"
    per_message = [answers[1 + 4 * i:5 + 4 * i] for i in range(len(mids))]
    assert all([a[:9] for a in four] == ["250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0"]
               for four in per_message), per_message
    # Each "queued as N" names the row that holds exactly that transaction's message.
    queued = [int(four[3].rsplit(" ", 1)[1]) for four in per_message]
    with site.store.read() as conn:
        by_id = dict(conn.execute(sa.select(messages.c.id, messages.c.raw)
                                  .where(messages.c.id > before)).all())
    assert [split(by_id[q]).get("Message-ID") for q in queued] == mids
    assert sorted(message_ids(list(by_id.values()))) == sorted([*mids, good])


def test_intake_garbage_after_the_dot_is_answered_and_not_stored(site: Site) -> None:
    mid = f"<garbage.{uuid.uuid4().hex}@example.net>"
    before = last_id(site)
    with RawClient(site.port) as client:
        client.send(b"EHLO g.example\r\n" + transaction(mid)
                    + b"this is not a command\r\n\x00\x01\x02\r\n\xff\xfe\r\nQUIT\r\n")
        answers = client.rest()
    assert [a[:3] for a in answers] == ["250", "250", "250", "354", "250",
                                        "500", "500", "500", "221"]
    raws = stored_since(site, before)
    assert message_ids(raws) == [mid]
    assert b"not a command" not in raws[0]


def test_intake_pipelined_body_after_a_refused_data_is_not_taken_as_mail(site: Site) -> None:
    """A client that writes its body without waiting for 354: when the DATA is refused
    its body lines are read as commands, which end the session, and store nothing."""
    before = last_id(site)
    body = post(POSTER, LIST, "refused", "line one\r\nline two\r\nline three\r\n" * 5)
    with RawClient(site.port) as client:
        client.send(b"EHLO p.example\r\nMAIL FROM:<bob@example.net>\r\n"
                    b"RCPT TO:<nolist@example.org>\r\nDATA\r\n" + body + b".\r\nQUIT\r\n")
        answers = client.rest()
    assert answers[2].startswith("550 5.1.1") and answers[3].startswith("503")
    assert answers[-1].startswith(("502 5.5.1", "421 4.7.0")), answers
    assert stored_since(site, before) == []


@pytest.mark.parametrize("smuggle", [b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\n.\n"],
                         ids=["lf-dot-crlf", "cr-dot-crlf", "crlf-dot-lf", "lf-dot-lf"])
def test_intake_smtp_smuggling_ends_no_message_early(site: Site, smuggle: bytes) -> None:
    """A bare LF or CR around the dot is not the end of DATA: the "smuggled" second
    transaction stays text in the first message, at intake and at the sink."""
    mid = f"<smuggle.{uuid.uuid4().hex}@example.net>"
    inner = f"<inner.{uuid.uuid4().hex}@example.net>"
    before = last_id(site)
    payload = (post(POSTER, LIST, "outer", "Hello.\r\n", message_id=mid)
               + smuggle + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<discuss@example.org>\r\n"
               b"DATA\r\n" + post("evil@example.com", LIST, "smuggled", message_id=inner))
    with RawClient(site.port) as client:
        client.send(b"EHLO s.example\r\nMAIL FROM:<bob@example.net>\r\n"
                    b"RCPT TO:<discuss@example.org>\r\nDATA\r\n" + payload + b".\r\nQUIT\r\n")
        answers = client.rest()
    assert [a[:3] for a in answers] == ["250", "250", "250", "354", "250", "221"]
    raws = stored_since(site, before)
    assert message_ids(raws) == [mid] and inner.encode() in raws[0]
    wait_delivered(site, mid)
    assert not [m for m in site.sink.handler.messages if m.mail_from == "evil@example.com"]


# -- protocol errors ----------------------------------------------------------------------

@pytest.mark.parametrize("lines, codes", [
    ([b"MAIL FROM:<bob@example.net>", b"RCPT TO:<discuss@example.org>", b"DATA"],
     ["503", "503", "503"]),
    ([b"EHLO x", b"RCPT TO:<discuss@example.org>", b"DATA"], ["250", "503", "503"]),
    ([b"HELO", b"EHLO", b"MAIL", b"MAIL TO:<bob@example.net>"], ["501", "501", "503", "503"]),
    ([b"EHLO x", b"MAIL FROM:bob", b"MAIL FROM:<bob@example.net> SIZE=abc", b"RCPT TO:",
      b"MAIL FROM:<bob@example.net>", b"MAIL FROM:<bob@example.net>", b"RCPT TO:<>"],
     ["250", "553", "501", "503", "250", "503", "550"]),
    ([b"EHLO x", b"MAIL FROM:<bob@example.net>", b"RCPT TO:<disc\x00uss@example.org>",
      b"MA\x00IL FROM:<a@b.example>"], ["250", "250", "550", "500"]),
    ([b"EHLO \xc3\xa9t\xc3\xa9", b"\xff\xfe", b"EHLO x", b"MAIL FROM:<b\xc3\xb6b@example.net>",
      b"MAIL FROM:<bob@example.net>", b"RCPT TO:<discuss@ex\xd0\xb0mple.org>"],
     ["500", "500", "250", "500", "250", "500"]),
], ids=["before-helo", "before-mail", "bad-helo", "bad-syntax", "nul", "8bit"])
def test_intake_protocol_errors_get_clear_replies_and_store_nothing(
        site: Site, lines: list[bytes], codes: list[str]) -> None:
    before = last_id(site)
    with RawClient(site.port) as client:
        answers = [client.command(line) for line in lines]
        assert [a[:3] for a in answers] == codes, answers
        assert all("\x00" not in a and a.isascii() and a[3:4] == " " for a in answers)
        assert client.command(b"QUIT") == "221 Bye"
    assert stored_since(site, before) == []


def test_intake_client_text_is_escaped_in_replies_and_logs(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """Control characters a client sends (a terminal escape, a bare CR that would
    overwrite a log line) come back and go to the log escaped, never raw."""
    caplog.set_level(logging.INFO, logger="gateway.intake")
    caplog.set_level(logging.INFO, logger="mail.log")
    with RawClient(site.port) as client:
        answers = [client.command(line) for line in (
            b"EHLO x", b"NOOP\x1b[2J\rforged: line", b"MAIL FROM:<bob@example.net>",
            b"RCPT TO:<x\x1b@example.org>", b"RCPT TO:<y\x7f@example.org>")]
        assert client.command(b"QUIT") == "221 Bye"
    assert [a[:3] for a in answers] == ["250", "500", "250", "550", "550"], answers
    assert "\\x1b[2J\\x0dFORGED" in answers[1]
    assert "<x\\x1b@example.org>" in answers[3] and "<y\\x7f@example.org>" in answers[4]
    logged = [r.getMessage() for r in caplog.records
              if r.name in ("gateway.intake", "mail.log")]
    assert any("unrecognised: NOOP\\x1b[2J\\x0dFORGED" in m for m in logged), logged
    assert any("refused rcpt=<x\\x1b@example.org>" in m for m in logged), logged
    assert not [m for m in logged if re.search(r"[\x00-\x1f\x7f]", m)]


@pytest.mark.parametrize("cut", [b"", b"Subject: half\r\n", b"Subject: half\r\n\r\nbody\r\n.",
                                 b"Subject: half\r\n\r\nbody\r\n.\r"],
                         ids=["nothing", "header", "dot-without-eol", "dot-cr"])
def test_intake_unfinished_data_then_disconnect_stores_nothing(site: Site, cut: bytes) -> None:
    before = last_id(site)
    with RawClient(site.port) as client:
        client.send(b"EHLO x\r\nMAIL FROM:<bob@example.net>\r\nRCPT TO:<discuss@example.org>\r\n"
                    b"DATA\r\n" + cut)
        assert client.replies(4)[-1].startswith("354")
    good = good_post(site, source=GOOD)
    assert message_ids(stored_since(site, before)) == [good]


def test_intake_hostile_sessions_leave_no_parked_work(site: Site) -> None:
    """Run last: everything the module's sessions stored was handled without a crash."""
    wait_until(lambda: settled(site.store), timeout=30, what="the stages to finish")
    assert parked(site.store) == []
