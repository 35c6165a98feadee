"""End to end over real sockets: SMTP/LMTP in, the stages, the sink as smarthost."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiosmtpd.smtp import Envelope, Session

from gateway import lists
from gateway.clock import ManualClock, SystemClock
from gateway.config import load
from gateway.dsn import signed_verp
from gateway.intake import MISS_REFRESH, IntakeHandler, IntakeWriter
from gateway.schema import Mode, journal, work
from gateway.signing import LinkSigner
from gateway.stages import Stages
from gateway.store import Store
from gateway.tally import Tally
from gateway.worker import Progress, Wakeups
from tests.conftest import LIST, MEMBERS
from tests.support import Sink, gateway, post, wait_until, write_config


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def events(store: Store, event: str) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(sa.select(journal.c.detail).where(journal.c.event == event))
                    .scalars())


def test_gateway_member_post_reaches_every_regular_member_decorated(
        config_path: Path, sink: Sink) -> None:
    with gateway(config_path) as gw:
        gw.send(MEMBERS[1], LIST, post(MEMBERS[1], LIST, "Hello everyone", "First post.\n"))
        copies = sink.wait_for(len(MEMBERS))
    assert sorted(r for r, _d in copies) == sorted(MEMBERS)
    received = sink.handler.messages
    # Each member's copy has its own return path, naming them (VERP) with a tag that
    # only the gateway's key makes.
    key = LinkSigner.from_file(load(config_path).web.secret_file)
    assert sorted(m.mail_from for m in received) == sorted(
        signed_verp("discuss", "example.org", a, key) for a in MEMBERS)
    assert all(re.fullmatch(rf"discuss-bounces\+{re.escape(a.replace('@', '='))}"
                            r"\+[a-z2-7]{12}@example\.org", m.mail_from)
               for a in MEMBERS for m in received if a in m.rcpt_tos)
    msg = parse(copies[0][1])
    assert msg["List-Id"] == '"Discuss" <discuss.example.org>'
    assert msg["List-Post"] == "<mailto:discuss@example.org>"
    assert msg["List-Help"] == "<mailto:discuss-request@example.org?subject=help>"
    assert msg["List-Subscribe"] == "<mailto:discuss-join@example.org>"
    one_click = re.fullmatch(r"<(http://127\.0\.0\.1:\d+/l/\d+/u/\d+-[a-z2-7]{32})>, "
                             r"<mailto:discuss-leave@example\.org>", str(msg["List-Unsubscribe"]))
    assert one_click is not None, msg["List-Unsubscribe"]
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Subject"] == "[Discuss] Hello everyone"
    assert msg["Precedence"] == "list"
    assert "by lists.test (Listgate) with ESMTP" in msg["Received"]
    body = msg.get_content()
    assert body.startswith("First post.")
    assert "Discuss mailing list -- discuss@example.org" in body
    assert one_click.group(1) in body  # the footer links to the same personal page


def test_gateway_lmtp_post_gets_a_reply_per_recipient(config_path: Path, sink: Sink) -> None:
    with gateway(config_path) as gw, gw.lmtp() as client:
        client.ehlo()  # smtplib.LMTP sends LHLO
        assert client.mail(MEMBERS[0])[0] == 250
        assert client.rcpt(LIST)[0] == 250
        assert client.rcpt("discuss-owner@example.org")[0] == 250
        # RFC 2033: after DATA, one reply per accepted recipient (smtplib reads only one).
        first = client.data(post(MEMBERS[0], LIST, "Over LMTP"))
        second = client.getreply()
        assert first[0] == second[0] == 250
        assert first[1].startswith(b"2.0.0 OK queued as")
        # 3 members get the post, 1 owner gets the -owner copy
        copies = sink.wait_for(len(MEMBERS) + 1)
    assert len(copies) == len(MEMBERS) + 1


def test_gateway_only_regular_enabled_members_get_posts(config_path: Path, sink: Sink,
                                                        store: Store) -> None:
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        lists.add_member(conn, lst, "digest@example.net", now=0, mode=Mode.DIGEST_MIME)
        lists.add_member(conn, lst, "quiet@example.net", now=0, mode=Mode.NOMAIL)
    with gateway(config_path) as gw:
        gw.send(MEMBERS[0], LIST, post(MEMBERS[0], LIST, "Regular only"))
        copies = sink.wait_for(len(MEMBERS))
        wait_until(lambda: bool(events(store, "fanned-out")), what="fanout")
    assert sorted(r for r, _ in copies) == sorted(MEMBERS)


def test_gateway_non_member_post_is_rejected_with_a_notice(config_path: Path, sink: Sink,
                                                           store: Store) -> None:
    stranger = "stranger@example.com"
    with gateway(config_path) as gw:
        gw.send(stranger, LIST, post(stranger, LIST, "Buy now"))
        copies = sink.wait_for(1)
        wait_until(lambda: bool(events(store, "reject")), what="the reject record")
    assert [r for r, _ in copies] == [stranger]
    notice = parse(copies[0][1])
    assert notice["Subject"] == "Your message to discuss@example.org was rejected"
    assert notice["Auto-Submitted"] == "auto-replied"
    assert "stranger@example.com is not a member of discuss@example.org" in notice.get_content()
    assert sink.handler.messages[0].mail_from == "discuss-bounces@example.org"


@pytest.mark.parametrize("headers, sender", [
    ("Precedence: bulk\r\n", "news@example.com"),
    ("List-Id: <other.example.com>\r\n", "someone@example.com"),
    ("", "mailer-daemon@example.com"),
    ("", ""),
])
def test_gateway_non_member_rejection_never_backscatters(config_path: Path, sink: Sink,
                                                         store: Store, headers: str,
                                                         sender: str) -> None:
    with gateway(config_path) as gw:
        gw.send(sender, LIST, post(sender or "x@example.com", LIST, "Offer", extra_headers=headers))
        wait_until(lambda: bool(events(store, "notice-suppressed")), what="suppression record")
    assert sink.handler.count() == 0
    assert "no rejection notice" in events(store, "notice-suppressed")[0]


@pytest.mark.parametrize("headers", [
    "List-Id: Discuss <discuss.example.org>\r\n",
    "X-Loop: discuss@example.org\r\n",
    "Auto-Submitted: auto-replied\r\n",
])
def test_gateway_loops_are_discarded_and_recorded(config_path: Path, sink: Sink, store: Store,
                                                  headers: str) -> None:
    with gateway(config_path) as gw:
        gw.send(MEMBERS[0], LIST, post(MEMBERS[0], LIST, "Loop?", extra_headers=headers))
        wait_until(lambda: bool(events(store, "discard")), what="the discard record")
    assert sink.handler.count() == 0


def test_gateway_owner_mail_is_forwarded_to_owners(config_path: Path, sink: Sink) -> None:
    with gateway(config_path) as gw:
        gw.send("someone@example.com", "discuss-owner@example.org",
                post("someone@example.com", "discuss-owner@example.org", "A question"))
        copies = sink.wait_for(1)
    assert [r for r, _ in copies] == [MEMBERS[0]]
    msg = parse(copies[0][1])
    assert msg["X-Loop"] == "discuss-owner@example.org"
    assert msg["Subject"] == "A question"


def test_gateway_mail_to_a_bounces_address_is_read_by_the_bounces_stage(
        config_path: Path, store: Store, sink: Sink) -> None:
    # Stored for the bounces stage, which reads it: a person's mail to a member's VERP
    # address is no bounce, so it is recorded as such, scores nobody and gets no answer.
    address = "discuss-bounces+bob=example.net@example.org"
    with gateway(config_path) as gw:
        gw.send(MEMBERS[1], address, post(MEMBERS[1], address, "subscribe"))
        wait_until(lambda: bool(events(store, "bounce-ignored")), what="the bounces stage")
    with store.read() as conn:
        stored = conn.execute(sa.select(journal.c.stage, journal.c.event)
                              .where(journal.c.event.startswith("bounce"))).all()
        left = conn.execute(sa.select(work.c.id)).all()
        bob = lists.find_member(conn, lists.get(conn, LIST).id, [MEMBERS[1]])
    assert [(r.stage, r.event) for r in stored] == [("bounces", "bounce-ignored")]
    assert "not a bounce" in events(store, "bounce-ignored")[0]
    assert left == [] and sink.handler.count() == 0
    assert bob is not None and bob.enabled and bob.bounce_score == 0


def test_gateway_refuses_unknown_addresses_and_relaying_at_rcpt(config_path: Path) -> None:
    with gateway(config_path) as gw, gw.smtp() as client:
        client.ehlo()
        client.mail(MEMBERS[0])
        for address in ("nosuchlist@example.org", "discuss@elsewhere.example",
                        "discuss-confirm@example.org", "user%other.example@example.org",
                        '"user@elsewhere.example"@example.org', "user!elsewhere@example.org",
                        "@relay.example:discuss@example.org"):
            code, text = client.rcpt(address)
            assert code in (550, 553), (address, code, text)
        # Needless quotes do not change a mailbox (RFC 5321 4.1.2): this is the list.
        assert client.rcpt('"discuss"@example.org')[0] == 250
        code, text = client.rcpt("nosuchlist@example.org")
        assert text.decode().startswith("5.1.1")


def test_gateway_advertises_and_enforces_size(config_path: Path) -> None:
    with gateway(config_path) as gw:
        limit = gw.config.intake.max_message_size
        with gw.smtp() as client:
            client.ehlo()
            assert client.has_extn("size") and int(client.esmtp_features["size"]) == limit
            code, text = client.mail(MEMBERS[0], [f"SIZE={limit + 1}"])
            assert code == 552 and text.decode().startswith("5.3.4")
        with gw.smtp() as client:
            # A client that does not declare SIZE is stopped at the end of DATA.
            big = post(MEMBERS[0], LIST, "big") + (b"y" * 998 + b"\r\n") * (limit // 1000 + 10)
            client.ehlo()
            assert client.mail(MEMBERS[0])[0] == 250
            assert client.rcpt(LIST)[0] == 250
            code, text = client.data(big)
            assert code == 552 and text.decode().startswith("5.3.4"), (code, text)


def test_gateway_caps_recipients_per_message(config_path: Path) -> None:
    with gateway(config_path) as gw, gw.smtp() as client:
        client.ehlo()
        client.mail(MEMBERS[0])
        limit = gw.config.intake.max_recipients
        for _ in range(limit):
            assert client.rcpt(LIST)[0] == 250
        code, text = client.rcpt(LIST)
        assert code == 452 and text.decode().startswith("4.5.3")


def test_gateway_empty_message_gets_a_clear_error(config_path: Path) -> None:
    with gateway(config_path) as gw, gw.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(MEMBERS[0], LIST, b"\r\n")
        assert info.value.smtp_code == 554


def test_gateway_new_list_is_routable_at_once_without_restart(config_path: Path, store: Store,
                                                              sink: Sink) -> None:
    """A RCPT the snapshot of lists does not know re-reads the lists before its 550: a
    list created a moment ago takes its first post, not a bounce."""
    with gateway(config_path) as gw:
        with gw.smtp() as client:  # an unknown list is refused, as ever
            client.ehlo()
            client.mail(MEMBERS[0])
            assert client.rcpt("fresh@example.org")[0] == 550
        time.sleep(MISS_REFRESH)  # the re-read after that miss is no longer recent
        with store.write() as conn:
            lst = lists.create(conn, "fresh@example.org", now=0)
            lists.add_member(conn, lst, MEMBERS[0], now=0)
        gw.send(MEMBERS[0], "fresh@example.org", post(MEMBERS[0], "fresh@example.org", "hi"))
        sink.wait_for(1)


def test_gateway_unknown_recipients_re_read_the_lists_at_most_once_a_second(
        store: Store) -> None:
    """A harvester's guesses cost one read of the lists a second, however many come."""
    with store.write() as conn:
        lists.create(conn, "known@example.org", now=0)
    directory = lists.Directory(store)
    directory.refresh()
    reads: list[float] = []

    def refresh() -> None:
        reads.append(time.monotonic())
        directory.refresh()

    config = load(None).intake
    writer = IntakeWriter(store, clock=SystemClock(), batch=10, on_commit=lambda stages: None)
    handler = IntakeHandler(directory.router(), writer, clock=SystemClock(), config=config,
                            refresh=refresh)

    async def guesses(n: int) -> list[str]:
        replies = []
        for i in range(n):
            envelope = Envelope()
            envelope.mail_from = MEMBERS[0]
            replies.append(await handler.handle_RCPT(None, Session(asyncio.get_running_loop()),
                                                     envelope, f"guess{i}@example.org", []))
        return replies

    async def run() -> tuple[list[str], list[str]]:
        burst = await asyncio.gather(*(guesses(20) for _ in range(5)))
        await asyncio.sleep(MISS_REFRESH)
        return [r for replies in burst for r in replies], await guesses(5)

    first, later = asyncio.run(run())
    assert len(first) == 100 and all(r.startswith("550") for r in first + later)
    assert len(reads) == 2  # one for the burst, one after a second had passed
    assert reads[1] - reads[0] >= MISS_REFRESH
    # A list that exists is found with no read at all.
    found = asyncio.run(handler.handle_RCPT(None, Session(None), Envelope(),
                                            "known@example.org", []))
    assert found.startswith("250"), found
    assert len(reads) == 2


def test_gateway_without_smarthost_writes_each_copy_to_the_outbox(tmp_path: Path,
                                                                  config_path: Path) -> None:
    text = config_path.read_text().replace('smarthost = "smtp://', 'smarthost = "" # smtp://')
    config_path.write_text(text)
    with gateway(config_path) as gw:
        gw.send(MEMBERS[0], LIST, post(MEMBERS[0], LIST, "To the outbox"))
        outbox = config_path.parent / "outbox" / "new"
        wait_until(lambda: outbox.is_dir() and len(list(outbox.iterdir())) == len(MEMBERS),
                   what="outbox files")
    files = sorted(outbox.iterdir())
    assert all(f.suffix == ".eml" for f in files)
    delivered_to = sorted(parse(f.read_bytes())["Delivered-To"] for f in files)
    assert delivered_to == sorted(MEMBERS)
    assert not list((config_path.parent / "outbox" / "tmp").iterdir())
    _ = SystemClock


@pytest.mark.parametrize("stopped", [False, True])
def test_stages_start_no_periodic_run_once_the_daemon_stops(tmp_path: Path,
                                                             stopped: bool) -> None:
    """A periodic run that the scheduler handed to the event loop just before the daemon
    was asked to stop does not start: its thread would use the store being closed."""
    stages = Stages(load(write_config(tmp_path)), clock=ManualClock(), tally=Tally())
    ran: list[int] = []

    def job(progress: Progress) -> Progress:
        ran.append(1)
        return progress

    async def handed_over() -> None:
        wakeups = Wakeups(asyncio.get_running_loop())
        if stopped:
            stages.stop_scheduling()
        await stages._periodic(job, wakeups)
        await stages.finish()

    asyncio.run(handed_over())
    assert ran == ([] if stopped else [1])
