"""The pipelining SMTP client and the transports, against a real SMTP server on loopback."""

from __future__ import annotations

import asyncio
import email
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.config import DeliveryConfig
from gateway.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from gateway.smtpclient import MAX_LINE, Outcome, Settings, SMTPClient, dot_stuff
from gateway.transport import OutboxTransport, SMTPTransport, build
from tests.helpers_unit import SizedSink
from tests.support import Sink, SinkHandler, free_port, post

T = TypeVar("T")
SENDER = "discuss-bounces@example.org"
MESSAGE = post("alice@example.net", "discuss@example.org", "Hello", "Body text.\n")


def settings(port: int, **kw: object) -> Settings:
    return Settings(host="127.0.0.1", port=port, helo="lists.test", timeout=10,
                    starttls="never", **kw)  # type: ignore[arg-type]


def with_client(sink: Sink, action: Callable[[SMTPClient], Awaitable[T]]) -> T:
    async def main() -> T:
        client = SMTPClient(settings(sink.port))
        try:
            return await action(client)
        finally:
            await client.quit()
    return asyncio.run(main())


def send(sink: Sink, recipients: Sequence[str], data: bytes = MESSAGE) -> Outcome:
    return with_client(sink, lambda c: c.send(SENDER, recipients, data))


def test_smtpclient_pipelined_transaction_reaches_many_recipients(sink: Sink) -> None:
    recipients = [f"member{i}@example.net" for i in range(300)]

    async def action(client: SMTPClient) -> Outcome:
        await client.connect()
        assert "PIPELINING" in client.extensions
        assert client.size_limit == 50 * 1024 * 1024
        return await client.send(SENDER, recipients, MESSAGE)

    outcome = with_client(sink, action)
    assert outcome.refused == {}
    assert "queued" in outcome.reply
    [received] = sink.handler.messages
    assert received.mail_from == SENDER
    assert received.rcpt_tos == recipients
    assert received.data == MESSAGE


def test_smtpclient_per_recipient_refusals_come_back_in_the_outcome(sink: Sink) -> None:
    sink.handler.rcpt_replies.update({
        "busy@example.net": "450 4.2.1 Mailbox busy",
        "gone@example.net": "550 5.1.1 No such user",
        "full@example.net": "452 4.2.2 Over quota",
    })
    recipients = ["alice@example.net", "busy@example.net", "gone@example.net",
                  "bob@example.net", "full@example.net"]
    outcome = send(sink, recipients)
    assert {a: (r.code, r.text) for a, r in outcome.refused.items()} == {
        "busy@example.net": (450, "4.2.1 Mailbox busy"),
        "gone@example.net": (550, "5.1.1 No such user"),
        "full@example.net": (452, "4.2.2 Over quota"),
    }
    assert not any(r.ok for r in outcome.refused.values())
    [received] = sink.handler.messages
    assert received.rcpt_tos == ["alice@example.net", "bob@example.net"]


def test_smtpclient_all_recipients_refused_sends_no_data(sink: Sink) -> None:
    sink.handler.rcpt_replies.update({"a@example.net": "550 5.1.1 No",
                                      "b@example.net": "451 4.3.0 Later"})

    async def action(client: SMTPClient) -> tuple[Outcome, Outcome]:
        refused = await client.send(SENDER, ["a@example.net", "b@example.net"], MESSAGE)
        # The connection was reset and is still good for the next transaction.
        assert client.connected
        ok = await client.send(SENDER, ["c@example.net"], MESSAGE)
        return refused, ok

    refused, ok = with_client(sink, action)
    assert refused.reply == "all recipients refused"
    assert {a: r.code for a, r in refused.refused.items()} == {"a@example.net": 550,
                                                               "b@example.net": 451}
    assert ok.refused == {}
    assert [m.rcpt_tos for m in sink.handler.messages] == [["c@example.net"]]


def test_smtpclient_send_many_gives_each_transaction_its_own_outcome(sink: Sink) -> None:
    """Pipelined transactions back to back: a refusal of one leaves the others alone,
    and the outcomes come back in the order of the envelopes."""
    sink.handler.rcpt_replies.update({"gone@example.net": "550 5.1.1 No such user",
                                      "busy@example.net": "450 4.2.1 Mailbox busy"})
    addresses = ["m0@example.net", "gone@example.net", "m2@example.net",
                 "busy@example.net", "m4@example.net"]
    items = [(SENDER, [a], MESSAGE.replace(b"Body text.", f"For {a}.".encode()))
             for a in addresses]

    async def action(client: SMTPClient) -> list[Outcome | DeliveryError]:
        results = await client.send_many(items)
        assert client.connected  # still good for more
        return results

    results = with_client(sink, action)
    assert all(isinstance(r, Outcome) for r in results)
    refused = [{a: r.code for a, r in out.refused.items()} for out in results
               if isinstance(out, Outcome)]
    assert refused == [{}, {"gone@example.net": 550}, {}, {"busy@example.net": 450}, {}]
    got = {m.rcpt_tos[0]: m.data for m in sink.handler.messages}
    assert sorted(got) == ["m0@example.net", "m2@example.net", "m4@example.net"]
    assert all(f"For {a}.".encode() in data for a, data in got.items())


def test_smtpclient_send_many_content_refusal_is_that_transactions_only(sink: Sink) -> None:
    class Picky(SinkHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            if b"spam" in envelope.original_content:
                return "554 5.6.0 Content rejected"
            return await super().handle_DATA(server, session, envelope)

    sink.handler = Picky()
    sink.stop()
    sink.start()
    items = [(SENDER, ["a@example.net"], MESSAGE),
             (SENDER, ["b@example.net"], MESSAGE + b"spam\r\n"),
             (SENDER, ["c@example.net"], MESSAGE)]
    results = with_client(sink, lambda c: c.send_many(items))
    assert isinstance(results[0], Outcome) and isinstance(results[2], Outcome)
    assert isinstance(results[1], PermanentDeliveryError) and results[1].code == 554
    assert [m.rcpt_tos for m in sink.handler.messages] == [["a@example.net"], ["c@example.net"]]


def test_smtpclient_send_many_lost_connection_defers_the_unsent(sink: Sink) -> None:
    """The smarthost drops the connection in the middle: what it had accepted stays
    delivered, the rest fail as temporary (to be tried again), nothing is lost."""
    class Dropper(SinkHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            if len(self.messages) == 2:
                server.transport.close()
                return "421 4.3.0 going away"
            return await super().handle_DATA(server, session, envelope)

    sink.handler = Dropper()
    sink.stop()
    sink.start()
    items = [(SENDER, [f"m{i}@example.net"], MESSAGE) for i in range(5)]

    async def action(client: SMTPClient) -> list[Outcome | DeliveryError]:
        results = await client.send_many(items)
        assert not client.connected
        return results

    results = with_client(sink, action)
    assert [type(r).__name__ for r in results] == ["Outcome", "Outcome",
                                                   "TransientDeliveryError",
                                                   "TransientDeliveryError",
                                                   "TransientDeliveryError"]
    assert [m.rcpt_tos for m in sink.handler.messages] == [["m0@example.net"],
                                                           ["m1@example.net"]]


@pytest.mark.parametrize("reply, error, code", [
    ("550 5.7.1 Sender rejected", PermanentDeliveryError, 550),
    ("553 5.1.8 Bad sender address", PermanentDeliveryError, 553),
    ("451 4.3.0 Try again later", TransientDeliveryError, 451),
    ("421 4.7.0 Too busy", TransientDeliveryError, 421),
])
def test_smtpclient_mail_from_refused(sink: Sink, reply: str, error: type[Exception],
                                      code: int) -> None:
    sink.handler.mail_reply = reply
    with pytest.raises(error) as info:
        send(sink, ["alice@example.net"])
    assert isinstance(info.value, error)
    assert info.value.code == code  # type: ignore[attr-defined]
    assert f"MAIL FROM:<{SENDER}>" in str(info.value)
    assert reply[4:] in str(info.value)
    assert sink.handler.messages == []


@pytest.mark.parametrize("reply, error, code", [
    ("554 5.6.0 Message content rejected", PermanentDeliveryError, 554),
    ("552 5.3.4 Message too big", PermanentDeliveryError, 552),
    ("451 4.3.0 Queue full, try later", TransientDeliveryError, 451),
])
def test_smtpclient_end_of_data_refused(sink: Sink, reply: str, error: type[Exception],
                                        code: int) -> None:
    sink.handler.data_reply = reply
    with pytest.raises(error) as info:
        send(sink, ["alice@example.net", "bob@example.net"])
    assert info.value.code == code  # type: ignore[attr-defined]
    assert "end of DATA" in str(info.value)
    assert sink.handler.messages == []


def test_smtpclient_connection_refused_is_transient() -> None:
    port = free_port()  # nothing listens there

    async def main() -> None:
        client = SMTPClient(settings(port))
        await client.send(SENDER, ["alice@example.net"], MESSAGE)

    with pytest.raises(TransientDeliveryError) as info:
        asyncio.run(main())
    assert info.value.code == 421
    assert f"cannot connect to smarthost 127.0.0.1:{port}" in str(info.value)


def test_smtpclient_connection_reused_after_a_permanent_error(sink: Sink) -> None:
    async def action(client: SMTPClient) -> Outcome:
        sink.handler.mail_reply = "550 5.7.1 No"
        with pytest.raises(PermanentDeliveryError):
            await client.send(SENDER, ["alice@example.net"], MESSAGE)
        assert client.connected
        sink.handler.mail_reply = None
        return await client.send(SENDER, ["alice@example.net"], MESSAGE)

    assert with_client(sink, action).refused == {}
    assert len(sink.handler.messages) == 1


DOTTED = (b"Subject: dots\r\n\r\n.first line starts with a dot\r\n.\r\n..\r\n"
          b"...three\r\nmiddle . line\r\n. space\r\n.")


def test_smtpclient_dot_stuffing_round_trips(sink: Sink) -> None:
    send(sink, ["alice@example.net"], DOTTED)
    [received] = sink.handler.messages
    assert received.data == DOTTED + b"\r\n"


def test_smtpclient_message_starting_with_a_dot_round_trips(sink: Sink) -> None:
    data = b".X-Odd: a message whose very first byte is a dot\r\n\r\nbody\r\n"
    send(sink, ["alice@example.net"], data)
    assert sink.handler.messages[0].data == data


@pytest.mark.parametrize("data, stuffed", [
    (b"a\nb", b"a\r\nb\r\n.\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".a\n..b\nc.\n", b"..a\r\n...b\r\nc.\r\n.\r\n"),
    (b"x\n.\n", b"x\r\n..\r\n.\r\n"),
    (b"", b"\r\n.\r\n"),
])
def test_smtpclient_dot_stuff(data: bytes, stuffed: bytes) -> None:
    assert dot_stuff(data) == stuffed


def test_smtpclient_long_lines_are_broken_and_arrive_whole(sink: Sink) -> None:
    long_line = b"x" * 2500
    data = b"Subject: long\r\n\r\n" + long_line + b"\r\nshort\r\n"
    payload = dot_stuff(data)
    assert all(len(line) <= MAX_LINE for line in payload.split(b"\r\n"))
    send(sink, ["alice@example.net"], data)
    received = sink.handler.messages[0].data
    assert all(len(line) <= MAX_LINE for line in received.split(b"\r\n"))
    assert received.replace(b"\r\n ", b"") == data  # broken with CRLF SPACE, nothing lost


def test_smtpclient_refuses_messages_over_the_servers_size() -> None:
    limit = 64 * 1024
    small = SizedSink(limit).start()
    try:
        fits = b"Subject: fits\r\n\r\n" + (b"y" * 76 + b"\r\n") * (limit // 78 - 1)
        big = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * (limit // 78 + 1)
        assert len(fits) <= limit < len(big)

        async def action(client: SMTPClient) -> None:
            await client.connect()
            assert client.size_limit == limit
            await client.send(SENDER, ["alice@example.net"], fits)
            with pytest.raises(PermanentDeliveryError) as info:
                await client.send(SENDER, ["alice@example.net"], big)
            assert info.value.code == 552
            assert f"exceeds the smarthost's SIZE limit of {limit}" in str(info.value)

        with_client(small, action)
        assert [len(m.data) for m in small.handler.messages] == [len(fits)]
    finally:
        small.stop()


def test_smtpclient_dot_stuff_leaves_lines_at_the_limit_alone() -> None:
    # Lines of exactly 998 octets are legal and must go out untouched. (That this is
    # linear in the message size is measured, not asserted: see bench/.)
    data = b"Subject: wide\r\n\r\n" + (b"A" * MAX_LINE + b"\r\n") * 300
    assert dot_stuff(data) == data + b".\r\n"


def test_smtpclient_sends_8bit_and_utf8_bodies_unchanged(sink: Sink) -> None:
    data = "Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\nGrüße, 日本語\r\n".encode()
    send(sink, ["alice@example.net"], data)
    assert sink.handler.messages[0].data == data


# -- transports --------------------------------------------------------------------------

def test_smtpclient_transport_pool_sends_concurrently(sink: Sink) -> None:
    transport = SMTPTransport(settings(sink.port), size=2)

    async def main() -> list[Outcome]:
        try:
            return await asyncio.gather(*(
                transport.send(SENDER, [f"m{i}@example.net"], MESSAGE) for i in range(6)))
        finally:
            await transport.close()

    outcomes = asyncio.run(main())
    assert all(o.refused == {} for o in outcomes)
    assert sorted(r for r, _d in sink.handler.copies()) == sorted(
        f"m{i}@example.net" for i in range(6))
    assert transport.describe() == f"smarthost 127.0.0.1:{sink.port}"


def test_smtpclient_transport_survives_a_smarthost_restart(sink: Sink) -> None:
    transport = SMTPTransport(settings(sink.port), size=1)

    async def main() -> None:
        await transport.send(SENDER, ["a@example.net"], MESSAGE)
        sink.stop()
        with pytest.raises(TransientDeliveryError):
            await transport.send(SENDER, ["b@example.net"], MESSAGE)
        sink.start()
        await transport.send(SENDER, ["c@example.net"], MESSAGE)
        await transport.close()

    asyncio.run(main())
    assert [r for r, _d in sink.handler.copies()] == ["a@example.net", "c@example.net"]


def test_smtpclient_transport_reuses_a_connection_only_while_it_is_fresh() -> None:
    """An MTA hangs up on a session idle past its timeout (Postfix: 300 s, with a 421).
    A connection idle in the pool longer than ``reuse_idle`` is not used again: the next
    delivery opens a new one instead of failing on the dead one and waiting a retry."""
    sink = Sink(timeout=1.0).start()
    transport = SMTPTransport(settings(sink.port, reuse_idle=0.5), size=1)

    async def main() -> None:
        try:
            await transport.send(SENDER, ["a@example.net"], MESSAGE)
            await transport.send(SENDER, ["b@example.net"], MESSAGE)  # at once: reused
            await asyncio.sleep(1.5)  # the sink has said 421 and closed its end
            await transport.send(SENDER, ["c@example.net"], MESSAGE)
        finally:
            await transport.close()

    try:
        asyncio.run(main())
    finally:
        sink.stop()
    assert [r for r, _d in sink.handler.copies()] == [
        "a@example.net", "b@example.net", "c@example.net"]
    assert sink.handler.sessions == 2


def test_smtpclient_build_picks_the_transport(tmp_path: Path) -> None:
    smtp = build(DeliveryConfig(smarthost="smtp://127.0.0.1:2525", helo_name="gw.example"),
                 hostname="lists.test")
    assert isinstance(smtp, SMTPTransport)
    assert smtp.settings.helo == "gw.example"
    assert smtp.settings.port == 2525
    outbox = build(DeliveryConfig(smarthost="", outbox=tmp_path / "out"), hostname="lists.test")
    assert isinstance(outbox, OutboxTransport)


def test_smtpclient_outbox_writes_one_file_per_recipient(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path / "outbox")
    outcome = asyncio.run(transport.send(SENDER, ["a@example.net", "b@example.net"], MESSAGE))
    assert outcome.refused == {}
    files = sorted((tmp_path / "outbox" / "new").iterdir())
    assert len(files) == 2 and all(f.suffix == ".eml" for f in files)
    assert list((tmp_path / "outbox" / "tmp").iterdir()) == []
    delivered = []
    for f in files:
        msg = email.message_from_bytes(f.read_bytes())
        assert msg["Return-Path"] == f"<{SENDER}>"
        delivered.append(msg["Delivered-To"])
        assert f.read_bytes().endswith(MESSAGE)
    assert sorted(delivered) == ["a@example.net", "b@example.net"]
