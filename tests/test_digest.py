"""Digests end to end: batching, schedules, every mode, personal links, exactly once."""

from __future__ import annotations

import collections
import email
import email.policy
import re
import smtplib
from pathlib import Path

import mailparser
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gateway import lists
from gateway.cli import main
from gateway.clock import ManualClock
from gateway.schema import BatchState, Mode, RoleName, digest_batches
from gateway.schema import lists as lists_table
from gateway.signing import PLACEHOLDER, LinkSigner
from gateway.store import Store
from tests.conftest import LIST
from tests.support import (
    CORE_POLICY,
    GatewayProcess,
    Sink,
    as_sent,
    free_port,
    gateway,
    post,
    wait_until,
    write_config,
)

REGULAR = "reg@example.net"
BY_MODE = {Mode.DIGEST_MIME: "mime@example.net", Mode.DIGEST_PLAIN: "plain@example.net",
           Mode.DIGEST_HTML: "html@example.net", Mode.NOMAIL: "quiet@example.net"}
SUBJECT = "Discuss Digest, Vol 1, Issue 1"


@pytest.fixture
def digest_list(tmp_path: Path, sink: Sink, store: Store, store_url: str) -> Path:
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        lists.add_member(conn, lst, REGULAR, now=0.0)
        for mode, address in BY_MODE.items():
            lists.add_member(conn, lst, address, now=0.0, mode=mode)
        lists.add_role(conn, lst, REGULAR, RoleName.OWNER)
    return write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                        policy=CORE_POLICY, sections='[digest]\ntick = "100ms"')


def thread() -> list[bytes]:
    first = post(REGULAR, LIST, "Meetup in March?", "Shall we meet in March?\n",
                 message_id="<t1@example.net>")
    reply = post(REGULAR, LIST, "Re: Meetup in March?",
                 "> Shall we meet in March?\nYes, the 14th works.\n",
                 message_id="<t2@example.net>",
                 extra_headers="In-Reply-To: <t1@example.net>\r\nReferences: <t1@example.net>\r\n")
    other = post(REGULAR, LIST, "Book recommendations", "Anything on SMTP?\n",
                 message_id="<t3@example.net>")
    return [first, reply, other]


def to(sink: Sink, rcpt: str) -> list[bytes]:
    return [d for r, d in sink.handler.copies() if r == rcpt]


def cli(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    return result.exit_code, result.output


def batches(store: Store) -> list[tuple[str, int]]:
    with store.read() as conn:
        return [(r.state, r.posts) for r in conn.execute(
            sa.select(digest_batches).order_by(digest_batches.c.id))]


def test_digest_every_mode_gets_the_right_thing(digest_list: Path, sink: Sink,
                                                 store: Store) -> None:
    with gateway(digest_list) as gw:
        for data in thread():
            gw.send(REGULAR, LIST, data)
        sink.wait_for(3)  # the regular member's three copies
        wait_until(lambda: batches(store) == [("open", 3)], what="three posts in the batch")
        code, output = cli(digest_list, "digest", "send", LIST)
        assert code == 0, output
        sink.wait_for(6)
        wait_until(lambda: batches(store) == [("sent", 3)], what="the batch sent")
    assert len(to(sink, REGULAR)) == 3
    assert to(sink, BY_MODE[Mode.NOMAIL]) == []

    mime = email.message_from_bytes(to(sink, BY_MODE[Mode.DIGEST_MIME])[0],
                                    policy=email.policy.default)
    assert mime["Subject"] == SUBJECT
    assert mime.get_content_type() == "multipart/mixed"
    digest_part = next(p for p in mime.walk() if p.get_content_type() == "multipart/digest")
    enclosed = [p for p in digest_part.iter_parts() if p.get_content_type() == "message/rfc822"]
    assert len(enclosed) == 3
    parsed = mailparser.parse_from_bytes(to(sink, BY_MODE[Mode.DIGEST_MIME])[0])
    assert parsed.subject == SUBJECT

    plain = to(sink, BY_MODE[Mode.DIGEST_PLAIN])[0]
    text = email.message_from_bytes(plain, policy=email.policy.default).get_content()
    assert "-" * 70 in text and "-" * 30 in text  # RFC 1153 separators
    assert text.count("Message:") >= 3 or text.count("Subject:") >= 3
    assert "End of Discuss Digest" in text

    html = email.message_from_bytes(to(sink, BY_MODE[Mode.DIGEST_HTML])[0],
                                    policy=email.policy.default)
    page = html.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Meetup in March?" in page and "<script" not in page.lower()
    assert page.count("Book recommendations") >= 1
    assert mailparser.parse_from_bytes(to(sink, BY_MODE[Mode.DIGEST_HTML])[0]).subject == SUBJECT


def test_digest_send_rings_the_running_gateway_which_sends_at_once(
        tmp_path: Path, sink: Sink, store: Store, store_url: str) -> None:
    """`digest send` rings the doorbell of the gateway on the same SQLite store: with
    stages that poll once an hour, the issue goes out all the same. PostgreSQL has no
    doorbell, and the command says the issue waits for the next poll."""
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        lists.add_member(conn, lst, REGULAR, now=0.0)
        lists.add_member(conn, lst, BY_MODE[Mode.DIGEST_MIME], now=0.0, mode=Mode.DIGEST_MIME)
    config = write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                          policy=CORE_POLICY, poll_interval="1h")
    with gateway(config) as gw:
        gw.send(REGULAR, LIST, thread()[0])
        sink.wait_for(1)  # the regular member's copy: intake woke the stages
        wait_until(lambda: batches(store) == [("open", 1)], what="the post in the batch")
        code, output = cli(config, "digest", "send", LIST)
        assert code == 0, output
        if store.is_sqlite:
            assert "sends it now" in output
            sink.wait_for(2)
            assert len(to(sink, BY_MODE[Mode.DIGEST_MIME])) == 1
        else:
            assert "sends it at its next poll" in output


def test_digest_and_post_links_are_personal_and_verify(digest_list: Path, sink: Sink,
                                                       store: Store) -> None:
    with gateway(digest_list) as gw:
        gw.send(REGULAR, LIST, thread()[0])
        sink.wait_for(1)
        cli(digest_list, "digest", "send", LIST)
        sink.wait_for(4)
    signer = LinkSigner.from_file(digest_list.parent / "secret.key")
    with store.read() as conn:
        lst = lists.get(conn, LIST)
        members = {m.address: m for m in lists.iter_members(conn, lst)}
    seen = set()
    for rcpt, data in sink.handler.copies():
        assert PLACEHOLDER.encode() not in data
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = re.search(r"<(https?://[^>]+/u/([^>]+))>", str(msg["List-Unsubscribe"]))
        assert url is not None
        token = url.group(2)
        assert signer.verify(token, list_id=lst.id, member_id=members[rcpt].id, address=rcpt)
        seen.add(token)
    assert len(seen) == 4  # one regular, three digest members: each their own link


def test_digest_of_a_list_without_personal_links_is_one_copy_for_many(
        digest_list: Path, sink: Sink, store: Store) -> None:
    # As posts are, with personalisation off: the same bytes for every member of a
    # format, many members to a transaction, links to the list's own addresses.
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        for i in range(5):
            lists.add_member(conn, lst, f"plain{i}@example.org", now=0.0,
                             mode=Mode.DIGEST_PLAIN)
        conn.execute(sa.update(lists_table).where(lists_table.c.id == lst.id)
                     .values(personalize=False))
    with gateway(digest_list) as gw:
        gw.send(REGULAR, LIST, thread()[0])
        sink.wait_for(1)
        cli(digest_list, "digest", "send", LIST)
        sink.wait_for(9)  # one post, eight digest members
    plain = [m for m in sink.handler.messages if BY_MODE[Mode.DIGEST_PLAIN] in m.rcpt_tos]
    assert len(plain) == 1 and len(plain[0].rcpt_tos) == 6 and \
        plain[0].mail_from == "discuss-bounces@example.org"
    for m in sink.handler.messages:
        assert PLACEHOLDER.encode() not in m.data and b"/u/" not in m.data
    msg = email.message_from_bytes(plain[0].data, policy=email.policy.default)
    assert msg["List-Unsubscribe"] == "<mailto:discuss-leave@example.org>"
    assert msg["List-Unsubscribe-Post"] is None  # RFC 8058 one-click needs an HTTPS URI
    text = msg.get_content().replace("\r\n", "\n")
    assert "To unsubscribe, send an email to:\ndiscuss-leave@example.org" in text
    assert 'send "set regular" to:\ndiscuss-request@example.org' in text


def test_digest_batch_is_kept_only_while_the_list_has_digest_members(
        digest_list: Path, sink: Sink, store: Store) -> None:
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        for address in BY_MODE.values():
            lists.set_mode(conn, lst, address, Mode.REGULAR)
    with gateway(digest_list) as gw:
        gw.send(REGULAR, LIST, thread()[0])
        sink.wait_for(5)  # all five get it as it is sent
        assert batches(store) == []  # and no issue is gathered for nobody
        with store.write() as conn:
            lists.set_mode(conn, lists.get(conn, LIST), BY_MODE[Mode.DIGEST_MIME],
                           Mode.DIGEST_MIME)
        gw.send(REGULAR, LIST, thread()[1])
        wait_until(lambda: batches(store) == [("open", 1)], what="the second post batched")
        sink.wait_for(9)
    assert len(to(sink, BY_MODE[Mode.DIGEST_MIME])) == 1


def test_digest_a_posters_own_placeholder_is_defanged(digest_list: Path, sink: Sink) -> None:
    sneaky = post(REGULAR, LIST, "Look", f"<img src='https://evil.example/{PLACEHOLDER}'>\n")
    with gateway(digest_list) as gw:
        gw.send(REGULAR, LIST, sneaky)
        copy = sink.wait_for(1)[0][1]
    assert b"evil.example/(member-token-removed)" in copy


def test_digest_schedule_closes_and_a_missed_time_sends_once_at_start(
        digest_list: Path, sink: Sink, store: Store) -> None:
    clock = ManualClock(start=1_800_000_000.0)  # 2027-01-15 08:00 UTC
    with gateway(digest_list, clock=clock) as gw:
        gw.send(REGULAR, LIST, thread()[0])
        sink.wait_for(1)
        with store.read() as conn:
            wait_until(lambda: lists.get(conn, LIST).digest_next_at is not None,
                       what="the schedule to be set")
        clock.advance(86400)  # past the next 07:00
        wait_until(lambda: batches(store) == [("sent", 1)], what="the scheduled digest")
        gw.send(REGULAR, LIST, thread()[2])
        wait_until(lambda: batches(store) == [("sent", 1), ("open", 1)], what="a new batch")
    # The gateway is down when the next time comes and goes, twice over.
    clock.advance(3 * 86400)
    with gateway(digest_list, clock=clock):
        wait_until(lambda: batches(store) == [("sent", 1), ("sent", 1)], what="catch-up")
        wait_until(lambda: len(to(sink, BY_MODE[Mode.DIGEST_MIME])) == 2, what="2nd digest")
        with store.read() as conn:
            next_at = conn.execute(sa.select(lists_table.c.digest_next_at)).scalar_one()
    assert next_at > clock.now()  # once, and the schedule moves on to the future
    digests = [d for r, d in sink.handler.copies() if r == BY_MODE[Mode.DIGEST_MIME]]
    assert len(digests) == 2


def test_digest_size_threshold_closes_early_and_later_posts_go_in_the_next(
        digest_list: Path, sink: Sink, store: Store) -> None:
    assert cli(digest_list, "lists", "set", LIST, "--digest-max-posts", "2")[0] == 0
    with gateway(digest_list) as gw:
        for data in thread():
            gw.send(REGULAR, LIST, data)
        wait_until(lambda: batches(store) == [("sent", 2), ("open", 1)], what="an early issue")
        wait_until(lambda: bool(to(sink, BY_MODE[Mode.DIGEST_MIME])), what="the digest")
    issues = [email.message_from_bytes(d)["Subject"]
              for d in to(sink, BY_MODE[Mode.DIGEST_MIME])]
    assert issues == [SUBJECT]


def test_digest_preview_renders_without_sending(digest_list: Path, sink: Sink,
                                                store: Store) -> None:
    with gateway(digest_list) as gw:
        gw.send(REGULAR, LIST, thread()[0])
        sink.wait_for(1)
        wait_until(lambda: batches(store) == [("open", 1)], what="the post in the batch")
    for fmt in ("mime", "plain", "html"):
        code, output = cli(digest_list, "digest", "preview", LIST, "--format", fmt)
        assert code == 0 and "Meetup in March?" in output, output[:300]
    assert batches(store) == [("open", 1)]
    assert len(sink.handler.copies()) == 1


def test_digest_of_odd_corpus_posts_is_delivered(corpus: Path, digest_list: Path, sink: Sink,
                                                 store: Store) -> None:
    odd = sorted((corpus / "odd").glob("*.eml"))[::14]  # a spread of ~20 nasty posts
    accepted = 0
    with gateway(digest_list) as gw, gw.smtp() as client:
        for path in odd:
            try:
                client.sendmail(REGULAR, LIST, as_sent(path.read_bytes()))
                accepted += 1
            except smtplib.SMTPDataError:  # e.g. an empty file: refused with a clear 554
                client.rset()
        assert accepted >= len(odd) - 1  # only the empty file is refused
        wait_until(lambda: bool(batches(store)) and batches(store)[0][1] == accepted,
                   what="the accepted odd posts batched")
        assert cli(digest_list, "digest", "send", LIST)[0] == 0
        wait_until(lambda: all(to(sink, a) for m, a in BY_MODE.items() if m is not Mode.NOMAIL),
                   what="a digest for each digest member")
    for mode, address in BY_MODE.items():
        if mode is not Mode.NOMAIL:
            assert mailparser.parse_from_bytes(to(sink, address)[0]).subject.startswith(
                "Discuss Digest")


@pytest.mark.slow
def test_digest_killed_mid_send_sends_each_member_once(tmp_path: Path, store: Store,
                                                       store_url: str) -> None:
    members = [f"d{i:05d}@example.net" for i in range(2500)]
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        lists.add_members(conn, lst, [(m, "", Mode.DIGEST_PLAIN) for m in members], now=0.0)
        lists.add_member(conn, lst, REGULAR, now=0.0)
    sink = Sink()  # down while the digest is queued and the daemon killed
    port = free_port()
    config = write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                          listen=[f"smtp://127.0.0.1:{port}"], policy=CORE_POLICY,
                          extra='retry_initial = "1s"\nretry_max = "2s"',
                          sections='[digest]\nchunk = 100\ntick = "100ms"')
    gw = GatewayProcess(config).start(port)
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail(REGULAR, LIST, thread()[0])
    wait_until(lambda: batches(store) == [("open", 1)], what="the post batched")
    assert cli(config, "digest", "send", LIST)[0] == 0

    def queued_digests() -> int:
        with store.read() as conn:
            from gateway.schema import outbound
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(
                outbound.c.rcpt_count), 0)).where(outbound.c.kind == "digest")).scalar_one())

    wait_until(lambda: queued_digests() > 0, what="the digest to start going out")
    gw.kill()
    assert batches(store) == [("closed", 1)]  # killed before it was all queued
    sink.start()
    try:
        gw.start(port)
        wait_until(lambda: len([1 for r, _ in sink.handler.copies() if r in set(members)])
                   >= len(members), timeout=120, what="every digest member's copy")
        wait_until(lambda: batches(store) == [("sent", 1)], what="the batch marked sent")
        gw.terminate()
        counts = collections.Counter(r for r, _ in sink.handler.copies() if r != REGULAR)
    finally:
        sink.stop()
    assert set(counts) == set(members)
    assert max(counts.values()) == 1
    assert BatchState.SENT.value == "sent"
