"""Issue 7, security: each attack on the running gateway, over real sockets, changes nothing.

Every test runs the real daemon (SMTP on loopback, the sink as smarthost) and
asserts on what the sink received and what the store holds. What other modules
already prove is not repeated; each section names them. None of these
properties depends on the database, so they run on SQLite only.
"""

from __future__ import annotations

import email
import email.policy
import html.parser
import logging
import os
import re
import smtplib
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gateway import lists
from gateway.authentication import Resolver, keygen
from gateway.cli import main
from gateway.config import load
from gateway.errors import ConfigError
from gateway.schema import (
    Mode,
    RoleName,
    digest_batches,
    held,
    journal,
    messages,
    outbound,
    tokens,
    work,
)
from gateway.signing import LinkSigner
from gateway.store import Store
from tests.conftest import LIST, MEMBERS, NEWBIE, Keys, discussion_list
from tests.support import CORE_POLICY, RunningGateway, Sink, gateway, post, wait_until, write_config

OTHER_LIST = "other@example.org"
MODERATOR = "mod@mods.example"
STRANGER = "stranger@example.com"   # not a member: their posts are held (shipped policy)
NEWCOMER = "new@example.com"        # asks to join
VICTIM = "victim@example.net"       # an address an attacker names
ATTACKER = "mallory@evil.example"
EVIL = "evil@evil.example"          # the recipient header injection tries to add


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: these properties live above the store (see the module docstring)."""
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def secured(tmp_path: Path, sink: Sink, store: Store, store_url: str) -> Path:
    """discuss@ (three approved members, a newcomer, a moderator, an owner) and other@,
    under the shipped policy: non-members' and first posts are held."""
    discussion_list(store, roles={MODERATOR: RoleName.MODERATOR,
                                  MEMBERS[0]: RoleName.OWNER})
    with store.write() as conn:
        other = lists.create(conn, OTHER_LIST, now=0.0, display_name="Other")
        lists.add_member(conn, other, MEMBERS[1], now=0.0)
        lists.add_role(conn, other, MODERATOR, RoleName.MODERATOR)
    return write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url)


# -- helpers ------------------------------------------------------------------------------


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def mails(sink: Sink, rcpt: str) -> list[EmailMessage]:
    return [parse(d) for r, d in sink.handler.copies() if r == rcpt]


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    return " ".join(body.get_content().split())


def events(store: Store, *names: str) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(sa.select(journal.c.detail)
                                 .where(journal.c.event.in_(names))
                                 .order_by(journal.c.id)).scalars())


def rows(store: Store, table: sa.Table) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def mode_of(store: Store, list_address: str, address: str) -> Mode | None:
    with store.read() as conn:
        found = lists.find_member(conn, lists.get(conn, list_address).id, [address])
    return found.mode if found else None


def modes(store: Store, list_address: str = LIST) -> dict[str, Mode]:
    with store.read() as conn:
        return {m.address: m.mode for m in lists.iter_members(conn, lists.get(conn, list_address))}


def run(config: Path, keys: Keys,
        **records: list[str]) -> AbstractContextManager[RunningGateway]:
    """The daemon's context manager, with the test keys (and more TXT records) in DNS."""
    resolver = Resolver(records={**keys.resolver_records,
                                 **{name.replace("__", "."): v for name, v in records.items()}})
    return gateway(config, resolver=resolver)


def rcpt_reply(gw: RunningGateway, address: str) -> tuple[int, str]:
    """The reply to RCPT TO:<address> in a fresh session; sent as raw bytes, since
    smtplib will not send a non-ASCII address."""
    with gw.smtp() as client:
        client.ehlo()
        assert client.mail("alice@example.net")[0] == 250
        path = address if address.startswith("<") else f"<{address}>"
        client.send(b"RCPT TO:" + path.encode("utf-8") + b"\r\n")
        code, text = client.getreply()
    return code, text.decode("utf-8", "replace")


def header_block(data: bytes) -> list[bytes]:
    """The top-level header lines of a message, as sent."""
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# -- never an open relay ------------------------------------------------------------------
# test_routing.py proves the route table's answers (hits, misses and their reasons) and
# test_gateway.py a handful of refusals over SMTP; here every relay trick, over SMTP,
# must get 550 5.1.1 at RCPT and leave nothing in the store.

REFUSED_AT_RCPT = {
    "foreign domain": "bob@other.example",
    "a list's name at a foreign domain": "discuss@other.example",
    "our domain inside another": "discuss@example.org.other.example",
    "a subdomain of ours": "discuss@lists.example.org",
    "source route": "<@a.example:bob@b.example>",
    "source route through the list's domain": "<@example.org:bob@b.example>",
    "percent hack": "bob%other.example@example.org",
    "percent hack on the list's name": "discuss%other.example@example.org",
    "quoted local part holding an @": '"bob@other"@example.org',
    "quoted local part holding a %": '"bob%other.example"@example.org',
    "quoted list name with a route": '"discuss@other.example"@example.org',
    "bang path": "other.example!bob@example.org",
    "bang path through the list's name": "other.example!discuss@example.org",
    "punycode lookalike (Cyrillic e)": "discuss@xn--xample-2of.org",
    "punycode lookalike (a with diaeresis)": "discuss@xn--exmple-cua.org",
    "digit lookalike": "discuss@examp1e.org",
    "our domain under a foreign IDN TLD": "discuss@example.org.xn--p1ai",
    "trailing dot in the local part": "discuss.@example.org",
    "+detail on the post address": "discuss+detail@example.org",
    "+detail on -request": "discuss-request+x@example.org",
    "+detail on -owner": "discuss-owner+x@example.org",
    "+detail on -join": "discuss-join+x@example.org",
    "+detail on -leave": "discuss-leave+x@example.org",
    "a confirm token too short to be one": "discuss-confirm+short@example.org",
    "an unknown role": "discuss-admin@example.org",
}
# Refused by the SMTP parser before the route table sees them, as malformed (RFC 5321
# has no trailing dot in a Domain): a permanent refusal, never a relay.
MALFORMED_AT_RCPT = ["bob@other.example.", "discuss@example.org..", "discuss@other.example.",
                     "discuss@example.org."]
# A source route ending at a list: the SMTP parser drops the route, as RFC 5321
# (appendix C) tells a server to, and the mail is the list's own, never sent on.
ROUTED_TO_THE_LIST = ["<@a.example,@b.example:discuss@example.org>",
                      "<@a.example:discuss@example.org>"]
# Without SMTPUTF8 (not offered) a non-ASCII address cannot even be spoken.
UNICODE_LOOKALIKES = ["discuss@\u0435xample.org",      # Cyrillic e
                      "d\u0456scuss@example.org",      # Cyrillic i
                      "discuss@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org",  # fullwidth
                      "discuss@example\u3002org",       # ideographic full stop
                      "discuss@exa\u00admple.org",      # soft hyphen
                      "discuss@example.org\u200b"]      # zero-width space


def test_security_relay_tricks_get_550_at_rcpt_and_store_nothing(config_path: Path, sink: Sink,
                                                                 store: Store) -> None:
    with gateway(config_path) as gw:
        for what, address in REFUSED_AT_RCPT.items():
            code, text = rcpt_reply(gw, address)
            assert (code, text[:6]) == (550, "5.1.1 "), (what, address, code, text)
            assert "does not relay" in text
        for address in ROUTED_TO_THE_LIST:
            assert rcpt_reply(gw, address)[0] == 250, address
        for address in MALFORMED_AT_RCPT:
            code, text = rcpt_reply(gw, address)
            assert (code, text[:6]) == (553, "5.1.3 "), (address, code, text)
        for address in UNICODE_LOOKALIKES:
            code, text = rcpt_reply(gw, address)
            assert code == 500 and "ASCII" in text, (address, code, text)
        # Declaring SMTPUTF8 does not open that door: the extension is not offered.
        with gw.smtp() as client:
            client.ehlo()
            assert not client.has_extn("smtputf8")
            assert client.docmd("MAIL", "FROM:<alice@example.net> SMTPUTF8")[0] >= 500
        # A message whose recipients were all refused has nowhere to go.
        with gw.smtp() as client, pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail(MEMBERS[0], list(REFUSED_AT_RCPT.values())[:5],
                            post(MEMBERS[0], "bob@other.example", "relay me"))
    assert rows(store, messages) == 0 and rows(store, work) == 0
    assert sink.handler.messages == []


def test_security_relay_recipients_beside_a_real_list_get_no_copy(config_path: Path,
                                                                  sink: Sink,
                                                                  store: Store) -> None:
    smuggled = ["bob@other.example", "bob%other.example@example.org",
                '"bob@other.example"@example.org', "<@example.org:bob@other.example>"]
    with gateway(config_path) as gw, gw.smtp() as client:
        refused = client.sendmail(MEMBERS[1], [LIST, *smuggled],
                                  post(MEMBERS[1], LIST, "Ride along"))
        assert {a: (code, text[:6]) for a, (code, text) in refused.items()} == {
            a: (550, b"5.1.1 ") for a in smuggled}
        sink.wait_for(len(MEMBERS))
        wait_until(lambda: bool(events(store, "fanned-out")), what="fanout")
    with store.read() as conn:
        routed = set(conn.execute(sa.select(work.c.address)).scalars())
    assert routed <= {LIST}
    assert rows(store, messages) == 1
    assert sorted(r for r, _ in sink.handler.copies()) == sorted(MEMBERS)


def test_security_case_variants_of_a_real_list_still_route(config_path: Path,
                                                           sink: Sink) -> None:
    with gateway(config_path) as gw:
        assert gw.send(MEMBERS[1], "DISCUSS@EXAMPLE.ORG",
                       post(MEMBERS[1], "DISCUSS@EXAMPLE.ORG", "Shouted")) == {}
        assert gw.send(STRANGER, "Discuss-Owner@Example.Org",
                       post(STRANGER, "Discuss-Owner@Example.Org", "To the owner")) == {}
        for address in ("Discuss@Example.Org", "discuss-REQUEST@EXAMPLE.org",
                        '"discuss"@example.org'):
            assert rcpt_reply(gw, address)[0] == 250, address
        copies = sink.wait_for(len(MEMBERS) + 1)
    assert sorted(r for r, _ in copies) == sorted([*MEMBERS, MEMBERS[0]])


# -- no forged subscription or unsubscription ----------------------------------------------
# test_selfservice.py: double opt-in, a confirmation from another address refused, a
# replayed subscription confirmation, an unsigned "set" refused.
# test_moderation.py: hold tokens (forged, replayed, another list's, expired).


def test_security_forged_commands_change_nobodys_subscription(config_path: Path, sink: Sink,
                                                              store: Store, keys: Keys) -> None:
    request, leave = "discuss-request@example.org", "discuss-leave@example.org"
    owner, bob = MEMBERS[0], MEMBERS[1]
    before = modes(store)
    attempts = [
        # Commands naming someone else: arguments never choose the address.
        (ATTACKER, request,
         post(ATTACKER, request, "hi", f"subscribe {VICTIM}\nunsubscribe {bob}\n"
                                      f"set nomail {bob}\nset digest plain {bob}\n")),
        # bob's address forged, unsigned.
        (bob, request, post(bob, request, "bye", "unsubscribe\nset nomail\n")),
        (ATTACKER, leave, post(bob, leave, "bye")),
        # bob's address forged under a valid signature of the attacker's own domain.
        (bob, request, keys.evil.sign(post(bob, request, "prefs", "set digest html\n"))),
        (owner, request, keys.evil.sign(post(owner, request, "who", "who\n"))),
    ]
    answers = 7  # 2 to the attacker, 4 to bob (2 of them refusals), 1 refusal to the owner
    with run(config_path, keys) as gw:
        for envelope, to, data in attempts:
            gw.send(envelope, to, data)
        wait_until(lambda: len(events(store, "request", "request-ignored")) == len(attempts),
                   what="every request handled")
        sink.wait_for(answers)
        wait_until(lambda: rows(store, outbound) == 0, what="every answer delivered")
    assert modes(store) == before                       # nobody joined, left or changed
    assert mode_of(store, LIST, VICTIM) is None and mode_of(store, LIST, ATTACKER) is None
    assert mails(sink, VICTIM) == []
    # Confirmations went only to the address that would change, which alone can confirm.
    with store.read() as conn:
        asked = sorted(conn.execute(sa.select(tokens.c.address, tokens.c.kind)).all())
    assert asked == sorted([(ATTACKER, "subscribe"), (bob, "unsubscribe")])
    assert sink.handler.count() == answers
    assert any("could not be authenticated" in text_of(m) for m in mails(sink, bob))
    assert ["only the list's owners" in text_of(m) for m in mails(sink, owner)] == [True]
    assert not [m for r, m in sink.handler.copies() if b"members:" in m]  # no member list


def test_security_confirmation_tokens_are_bound_to_one_list_and_used_once(
        secured: Path, sink: Sink, store: Store, keys: Keys,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    request = "discuss-request@example.org"
    with run(secured, keys) as gw:
        gw.send(NEWCOMER, request, post(NEWCOMER, request, "subscribe", "subscribe\n"))
        wait_until(lambda: any(m["Reply-To"] for m in mails(sink, NEWCOMER)),
                   what="the confirmation request")
        confirm = next(str(m["Reply-To"]) for m in mails(sink, NEWCOMER) if m["Reply-To"])
        token = confirm.split("+", 1)[1].split("@", 1)[0]
        # The token at another list's confirm address: refused, and not used up.
        elsewhere = f"other-confirm+{token}@example.org"
        gw.send(NEWCOMER, elsewhere, post(NEWCOMER, elsewhere, "Re: confirm", "yes\n"))
        wait_until(lambda: bool(events(store, "confirm-refused")), what="the refusal")
        assert "no such token for this list" in events(store, "confirm-refused")[0]
        assert mode_of(store, OTHER_LIST, NEWCOMER) is None
        assert mode_of(store, LIST, NEWCOMER) is None
        # At its own list it works, once.
        gw.send(NEWCOMER, confirm, post(NEWCOMER, confirm, "Re: confirm", "yes\n"))
        wait_until(lambda: mode_of(store, LIST, NEWCOMER) is Mode.REGULAR, what="the join")
        assert mode_of(store, OTHER_LIST, NEWCOMER) is None
        # The daemon's log names the confirm address it took, never the whole token.
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gateway"))
        assert f"discuss-confirm+{token[:6]}...@example.org" in ours
        assert token not in ours

        # A leave confirmation replayed after the member came back does not remove them.
        leave = "discuss-leave@example.org"
        bob = MEMBERS[1]
        gw.send(bob, leave, post(bob, leave, "bye"))
        wait_until(lambda: any("leave" in str(m["Subject"]) for m in mails(sink, bob)),
                   what="the leave confirmation")
        bye = next(str(m["Reply-To"]) for m in mails(sink, bob) if "leave" in str(m["Subject"]))
        gw.send(bob, bye, post(bob, bye, "Re: confirm", "yes\n"))
        wait_until(lambda: mode_of(store, LIST, bob) is None, what="bob left")
        with store.write() as conn:  # as `listgate members add` would
            lists.add_member(conn, lists.get(conn, LIST), bob, now=1.0)
        confirmed = len(events(store, "confirmed"))
        gw.send(bob, bye, post(bob, bye, "Re: confirm", "yes\n"))
        wait_until(lambda: len(events(store, "confirmed")) == confirmed + 1, what="the replay")
    assert "already used" in events(store, "confirmed")[-1]
    assert mode_of(store, LIST, bob) is Mode.REGULAR
    assert mode_of(store, OTHER_LIST, bob) is Mode.REGULAR  # the other list never moved


# -- one-click links name one member -----------------------------------------------------
# test_web.py proves forged, cross-list, tampered, stale and replayed tokens against the
# web endpoint; here the link a member really received, on the running daemon.


def _one_click(url: str) -> int:
    request = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_security_a_members_one_click_link_cannot_be_turned_on_another(
        config_path: Path, sink: Sink, store: Store) -> None:
    alice, bob, carol = MEMBERS
    with store.read() as conn:
        lst = lists.get(conn, LIST)
        ids = {m.address: m.id for m in lists.iter_members(conn, lst)}
    with gateway(config_path) as gw:
        gw.send(carol, LIST, post(carol, LIST, "Links"))
        sink.wait_for(len(MEMBERS))
        header = str(mails(sink, alice)[0]["List-Unsubscribe"])
        found = re.search(r"<(http://[^/]+/l/(\d+)/u/(\d+)-([a-z2-7]{32}))>", header)
        assert found is not None, header
        url, list_id, member_id, mac = found.groups()
        assert int(member_id) == ids[alice]
        base = url.split("/l/", 1)[0]
        for forged in (f"{base}/l/{list_id}/u/{ids[bob]}-{mac}",        # bob's id, alice's MAC
                       f"{base}/l/{list_id}/u/{ids[carol]}-{mac}",
                       f"{base}/l/{list_id}/u/{ids[bob]}-{mac.upper()}",
                       f"{base}/l/{int(list_id) + 1}/u/{member_id}-{mac}"):
            assert _one_click(forged) == 404, forged
        assert modes(store) == {a: Mode.REGULAR for a in MEMBERS}
        assert _one_click(url) == 200
        assert _one_click(url) == 200   # RFC 8058: a replay is answered alike ...
    assert modes(store) == {bob: Mode.REGULAR, carol: Mode.REGULAR}  # ... and removes nobody


# -- no backscatter ------------------------------------------------------------------------
# test_gateway.py: no rejection notice for Precedence: bulk, a foreign List-Id,
# mailer-daemon or <>; test_selfservice.py: no -request answer for Precedence: bulk,
# Auto-Submitted: auto-generated, <> or mailer-daemon. Here the rest, and held posts.

ROBOTS = [  # (envelope sender, extra header fields)
    ("list@example.com", "Precedence: list\r\n"),
    ("junk@example.com", "Precedence: junk\r\n"),
    ("bulk@example.com", "Precedence: BULK\r\n"),
    ("vacation@example.com", "Auto-Submitted: auto-replied\r\n"),
    ("report@example.com", "Auto-Submitted: auto-generated\r\n"),
    ("digest@example.com", "List-Id: Somewhere else <else.example.com>\r\n"),
    ("MAILER-DAEMON@example.com", ""),
    ("", ""),
]


def _robot_post(sender: str, to: str, headers: str, subject: str, body: str = "Hi.\n") -> bytes:
    return post(sender or "nobody@example.com", to, subject, body, extra_headers=headers)


def test_security_held_posts_never_notify_a_robot_poster(secured: Path, sink: Sink,
                                                         store: Store, keys: Keys) -> None:
    with run(secured, keys) as gw:
        for i, (sender, headers) in enumerate(ROBOTS):
            gw.send(sender, LIST, _robot_post(sender, LIST, headers, f"robot {i}"))
        # A member's first post, sent as bulk mail, is held without a poster notice too.
        gw.send(NEWBIE, LIST, _robot_post(NEWBIE, LIST, "Precedence: bulk\r\n", "bulk newbie"))
        # The control: a person's post is held and they are told.
        gw.send(STRANGER, LIST, post(STRANGER, LIST, "a person"))
        sent = len(ROBOTS) + 2
        wait_until(lambda: len(events(store, "held", "discard")) == sent, what="every decision")
        wait_until(lambda: bool(mails(sink, STRANGER)), what="the control's notice")
        held_count = len(events(store, "held"))
        wait_until(lambda: len(mails(sink, MODERATOR)) == held_count, what="moderator notices")
        wait_until(lambda: rows(store, outbound) == 0, what="every notice delivered")
    assert [str(m["Subject"]) for m in mails(sink, STRANGER)] == [
        "Your post to discuss@example.org awaits a moderator"]
    posters = {s for s, _ in ROBOTS if s} | {NEWBIE, "nobody@example.com"}
    # Moderators (and owners, who moderate too) are told; of the posters, only the person.
    assert {r for r, _ in sink.handler.copies()} == {MODERATOR, MEMBERS[0], STRANGER}
    assert not posters & {r for r, _ in sink.handler.copies()}
    with store.read() as conn:
        notify = dict(conn.execute(sa.select(held.c.poster, held.c.notify_poster)).all())
    assert notify.pop(STRANGER) is True
    assert held_count >= 6 and not any(notify.values()), notify   # held, nobody told


def test_security_rejections_never_notify_a_robot(config_path: Path, sink: Sink,
                                                  store: Store) -> None:
    with gateway(config_path) as gw:
        for i, (sender, headers) in enumerate(ROBOTS):
            gw.send(sender, LIST, _robot_post(sender, LIST, headers, f"robot {i}"))
        gw.send(STRANGER, LIST, post(STRANGER, LIST, "a person"))
        wait_until(lambda: len(events(store, "reject", "discard")) == len(ROBOTS) + 1,
                   what="every decision")
        sink.wait_for(1)
        wait_until(lambda: rows(store, outbound) == 0, what="every notice delivered")
    assert [r for r, _ in sink.handler.copies()] == [STRANGER]
    assert len(events(store, "notice-suppressed")) == len(events(store, "reject")) - 1


def test_security_request_addresses_never_answer_a_robot(config_path: Path, sink: Sink,
                                                         store: Store, keys: Keys) -> None:
    addresses = ["discuss-request@example.org", "discuss-join@example.org",
                 "discuss-leave@example.org"]
    with run(config_path, keys) as gw:
        for to in addresses:
            for sender, headers in ROBOTS:
                gw.send(sender, to, _robot_post(sender, to, headers, "subscribe", "subscribe\n"))
        sent = len(addresses) * len(ROBOTS)
        wait_until(lambda: len(events(store, "request-ignored")) == sent, what="all ignored")
        # The control: a person asking for help is answered.
        gw.send(STRANGER, addresses[0], post(STRANGER, addresses[0], "help", "help\n"))
        wait_until(lambda: bool(mails(sink, STRANGER)), what="the control's answer")
        wait_until(lambda: rows(store, outbound) == 0, what="every answer delivered")
    assert [r for r, _ in sink.handler.copies()] == [STRANGER]
    assert rows(store, tokens) == 0   # no confirmation was even issued
    assert len(events(store, "request-ignored")) == sent


# -- no header injection -----------------------------------------------------------------
# What a sender writes in a subject or display name (encoded words may carry CR and LF)
# must never become a header field, or a recipient, of anything we send.

INJECTIONS = [
    "=?utf-8?q?hello=0D=0ABcc:_evil@evil.example=0D=0AX-Injected:_yes?=",
    "=?utf-8?b?aGVsbG8NCkJjYzogZXZpbEBldmlsLmV4YW1wbGUNClgtSW5qZWN0ZWQ6IHllcw==?=",
    "=?utf-8?q?hello=0ABcc:_evil@evil.example=0AX-Injected:_yes?=",   # bare LF
    "=?utf-8?q?hello=0DBcc:_evil@evil.example=0DX-Injected:_yes?=",   # bare CR
]
# A display name that parses as one (":" and "@" encoded, as RFC 2047 5(3) wants); for
# one whose raw ":" splits the From in two, see the DMARC test below.
INJECTED_NAME = "=?utf-8?q?Bob=0D=0ABcc=3A_evil=40evil.example=0D=0AX-Injected=3A_yes?="


def _assert_clean(sink: Sink, allowed: set[str]) -> None:
    for received in sink.handler.messages:
        assert set(received.rcpt_tos) <= allowed, received.rcpt_tos
        msg = parse(received.data)
        names = {k.lower() for k in msg}
        assert not names & {"bcc", "x-injected"}, (msg["Subject"], names)
        for line in header_block(received.data):
            assert not re.match(rb"(?i)(bcc|x-injected)\s*:", line), line
        # What we write says it on one line; a forward to the owners keeps the sender's
        # own encoded words untouched (raw bytes are canonical), harmless as fields.
        if msg["X-Loop"] != "discuss-owner@example.org":
            for value in (str(msg["Subject"]), str(msg["From"]), str(msg["To"])):
                assert "\r" not in value and "\n" not in value, (received.rcpt_tos, value)
        assert EVIL not in " ".join(map(str, msg.get_all("To", []) + msg.get_all("Cc", [])))


def test_security_no_header_injection_in_copies_or_notices(secured: Path, sink: Sink,
                                                           store: Store, keys: Keys) -> None:
    bob = MEMBERS[1]
    request, owner = "discuss-request@example.org", "discuss-owner@example.org"
    with run(secured, keys, _dmarc__example__net=["v=DMARC1; p=reject"]) as gw:
        for n, subject in enumerate(INJECTIONS):
            # A member's post (From rewritten: example.net publishes p=reject), ...
            gw.send(bob, LIST, keys.members.sign(post(
                bob, LIST, subject, f"post {n}\n", message_id=f"<post{n}@example.net>")
                .replace(f"From: {bob}".encode(), f"From: {INJECTED_NAME} <{bob}>".encode())))
            # ... a stranger's post, held: notices to the moderator and the poster, ...
            gw.send(STRANGER, LIST, post(STRANGER, LIST, subject, f"held {n}\n"))
            # ... a command in the subject, answered with "Re: <subject>", ...
            gw.send(NEWCOMER, request, post(NEWCOMER, request, subject.replace(
                "hello", "help"), "help\n"))
            # ... and mail forwarded to the owners.
            gw.send(STRANGER, owner, post(STRANGER, owner, subject, "for the owner\n"))
        n = len(INJECTIONS)
        wait_until(lambda: len(mails(sink, MODERATOR)) == n, what="the moderator's notices")
        wait_until(lambda: len(mails(sink, STRANGER)) == n, what="the poster's notices")
        wait_until(lambda: len(mails(sink, NEWCOMER)) == n, what="the answers to commands")
        # The owner moderates too: copies, forwards and moderator notices.
        wait_until(lambda: len(mails(sink, MEMBERS[0])) == 3 * n, what="the owner's mail")
        wait_until(lambda: all(len(mails(sink, m)) == n for m in [*MEMBERS[1:], NEWBIE]),
                   what="the members' copies")
        wait_until(lambda: rows(store, work) == 0 and rows(store, outbound) == 0,
                   what="all work done")
    _assert_clean(sink, {*MEMBERS, NEWBIE, MODERATOR, STRANGER, NEWCOMER})
    for msg in mails(sink, MODERATOR) + mails(sink, NEWCOMER):
        assert "Bcc: evil@evil.example" in str(msg["Subject"])  # kept, as words on one line
    copy = mails(sink, MEMBERS[2])[0]
    assert "via Discuss" in str(copy["From"]) and "discuss@example.org" in str(copy["From"])


def _moderated(store: Store) -> list[tuple[str, str]]:
    with store.read() as conn:
        return [(r.event, r.detail) for r in conn.execute(
            sa.select(journal.c.event, journal.c.detail)
            .where(journal.c.stage == "moderation").order_by(journal.c.id))]


@pytest.mark.parametrize("from_field, signer", [
    pytest.param("bob@example.net", None, id="plain forgery, held"),
    pytest.param("=?utf-8?q?Bob=0D=0ABcc:_x@evil.example?= <bob@example.net>", None,
                 id="raw colon in an encoded word"),
    pytest.param("bob@example.net, eve@evil.example", "evil",
                 id="second author at the forger's domain"),
])
def test_security_a_forged_from_is_held_however_the_from_is_written(
        secured: Path, sink: Sink, store: Store, keys: Keys, from_field: str,
        signer: str | None) -> None:
    # example.net publishes p=reject; bob@example.net is an approved member.
    data = post(MEMBERS[1], LIST, "Notes from Tuesday", "See you next week.\n").replace(
        f"From: {MEMBERS[1]}".encode(), f"From: {from_field}".encode())
    if signer == "evil":
        data = keys.evil.sign(data)
    with run(secured, keys, _dmarc__example__net=["v=DMARC1; p=reject"]) as gw:
        gw.send("mallory@evil.example", LIST, data)
        wait_until(lambda: bool(_moderated(store)), what="the decision")
        wait_until(lambda: rows(store, work) == 0, what="the post handled")
    [(event, detail)] = _moderated(store)
    assert event == "held", (event, detail)
    if from_field == MEMBERS[1]:
        assert "fails DMARC for example.net" in detail, detail
    else:  # no single From domain to check DMARC against
        assert "no single domain" in detail, detail
    assert not [r for r, _ in sink.handler.copies() if r in MEMBERS[1:]]


# -- HTML digests: no script, no remote loads ---------------------------------------------
# test_digestformats.py proves the renderer against hostile HTML; here a hostile post
# travels the whole way, and the page a digest member receives is checked.

HOSTILE_HTML = """<html><head><script>document.location='https://evil.example/'</script>
<style>body { background: url(https://tracker.example/bg.png) }</style>
<link rel="stylesheet" href="https://tracker.example/x.css">
<base href="https://evil.example/"><meta http-equiv="refresh" content="0;url=https://evil.example/">
</head><body onload="steal()"><p>Dear members</p>
<img src="http://tracker.example/pixel.gif?u=1" width=1 height=1>
<img srcset="http://tracker.example/2x.gif 2x">
<a href="javascript:alert(1)">click</a> <a href=" JaVaScRiPt:alert(2)">again</a>
<a href="data:text/html,<script>alert(3)</script>">data</a>
<iframe src="https://evil.example/frame"></iframe><object data="https://evil.example/o"></object>
<svg><image href="https://tracker.example/svg.png"/></svg>
<video poster="https://tracker.example/poster.png"></video>
<form action="https://evil.example/"><input name=x></form></body></html>
"""
PLAIN_TRAPS = ("<script>alert(4)</script> <img src=http://tracker.example/plain.gif> "
               "javascript:alert(5) <a href=\"javascript:alert(6)\">x</a>\n")
_REMOTE_ATTRS = {"src", "srcset", "background", "poster", "data", "action", "formaction",
                 "xlink:href", "ping", "lowsrc", "dynsrc", "codebase", "cite"}


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k.lower(): v or "" for k, v in attrs}))


def _batched(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(digest_batches.c.posts), 0))
                                ).scalar_one())


@pytest.fixture
def html_digest(tmp_path: Path, sink: Sink, store: Store, store_url: str) -> Path:
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        lists.add_member(conn, lst, MEMBERS[0], now=0.0)
        lists.add_member(conn, lst, MEMBERS[1], now=0.0, mode=Mode.DIGEST_HTML)
    return write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                        policy=CORE_POLICY, sections='[digest]\ntick = "100ms"')


def test_security_html_digest_has_no_script_and_loads_nothing(html_digest: Path, sink: Sink,
                                                              store: Store) -> None:
    author = MEMBERS[0]
    hostile = post(author, LIST, "<script>alert(0)</script> offer", HOSTILE_HTML,
                   extra_headers="MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n")
    plain = post(author, LIST, "plain traps", PLAIN_TRAPS)
    with gateway(html_digest) as gw:
        gw.send(author, LIST, hostile)
        gw.send(author, LIST, plain)
        sink.wait_for(2)   # the regular member's copies
        wait_until(lambda: _batched(store) == 2, what="both posts in the open batch")
        result = CliRunner().invoke(main, ["--config", str(html_digest), "digest", "send", LIST])
        assert result.exit_code == 0, result.output
        sink.wait_for(3)
    [digest] = mails(sink, MEMBERS[1])
    part = digest.get_body(("html",))
    assert part is not None
    page = part.get_content()
    tags = _Tags()
    tags.feed(page)
    names = {t for t, _ in tags.tags}
    assert not names & {"script", "img", "iframe", "object", "embed", "svg", "image", "video",
                        "audio", "source", "link", "base", "form", "input", "frame"}, names
    for tag, attrs in tags.tags:
        assert not _REMOTE_ATTRS & set(attrs), (tag, attrs)
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        if tag == "meta":
            assert attrs.get("http-equiv", "").lower() != "refresh", attrs
        href = re.sub(r"\s", "", attrs.get("href", "")).lower()
        assert not href.startswith(("javascript:", "data:", "vbscript:")), (tag, attrs)
        assert "url(" not in attrs.get("style", ""), (tag, attrs)
    assert not re.search(r"(?i)url\(\s*['\"]?(https?:)?//", page)
    assert "document.location" not in page and "steal()" not in page
    # The posts are there, as text.
    assert "Dear members" in page
    assert "&lt;script&gt;alert(4)&lt;/script&gt;" in page


# -- secrets -----------------------------------------------------------------------------
# test_authentication.py: keygen() writes 0600 and Signer refuses a key others can read.


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_security_init_and_keygen_write_secrets_only_the_owner_can_read(tmp_path: Path) -> None:
    config = tmp_path / "site" / "listgate.toml"
    with umask(0):   # the most careless umask: the files must still be private
        for args in (["init"], ["dkim", "keygen", "example.org"]):
            result = CliRunner().invoke(main, ["--config", str(config), *args])
            assert result.exit_code == 0, result.output
    loaded = load(config)
    secret = loaded.web.secret_file
    key = loaded.dkim.directory / f"{loaded.dkim.selector}._domainkey.example.org.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Nobody else may add, swap or delete keys either.
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert len(bytes.fromhex(secret.read_text().strip())) >= 32


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_security_daemon_refuses_a_link_key_others_can_read(config_path: Path, sink: Sink,
                                                             mode: int) -> None:
    secret = load(config_path).web.secret_file
    LinkSigner.from_file(secret, create=True)
    secret.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600"), gateway(config_path):
        pass
    assert sink.handler.messages == []


def test_security_dkim_key_others_can_read_stops_the_start(config_path: Path,
                                                           sink: Sink) -> None:
    """A list domain's key that anyone on the machine could copy: the daemon does not
    start (and says how to fix it), rather than fail each delivery later."""
    config = load(config_path)
    path, _record = keygen("example.org", config.dkim.selector, config.dkim.directory)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"), gateway(config_path):
        pass
    assert sink.handler.messages == []
    path.chmod(0o600)
    with gateway(config_path) as gw:  # fixed: it starts, and signs
        gw.send(MEMBERS[1], LIST, post(MEMBERS[1], LIST, "Sign me"))
        copies = sink.wait_for(len(MEMBERS))
    assert all(b"DKIM-Signature:" in data for _rcpt, data in copies)


def test_security_secrets_stay_out_of_the_debug_log(secured: Path, sink: Sink, store: Store,
                                                    keys: Keys,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    config = load(secured)
    key_path, _record = keygen("example.org", config.dkim.selector, config.dkim.directory)
    secret = config.web.secret_file
    LinkSigner.from_file(secret, create=True)
    caplog.set_level(logging.DEBUG)
    request = "discuss-request@example.org"
    with run(secured, keys) as gw:
        gw.send(MEMBERS[2], LIST, post(MEMBERS[2], LIST, "Delivered and signed"))
        gw.send(STRANGER, LIST, post(STRANGER, LIST, "Held"))
        gw.send(NEWCOMER, request, post(NEWCOMER, request, "subscribe", "subscribe\n"))
        wait_until(lambda: len(mails(sink, MODERATOR)) == 1 and len(mails(sink, NEWCOMER)) == 2
                   and all(mails(sink, m) for m in MEMBERS), what="copies and notices")
    assert all("DKIM-Signature" in m for m in mails(sink, MEMBERS[0]))
    # The sink is aiosmtpd too ("mail.log"), in its own thread: what it logs of the copies
    # it receives is not the daemon's log.
    ours = [r for r in caplog.records
            if not (r.name == "mail.log" and r.threadName != "listgate-daemon")]
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in ours)
    assert logged.count("\n") > 20   # DEBUG really was captured
    hex_key = secret.read_text().strip()
    assert hex_key not in logged and hex_key[:16] not in logged
    pem_lines = [line for line in key_path.read_text().splitlines() if "-----" not in line]
    assert not [line for line in pem_lines if line in logged]
    # Members' link tokens are keys to their subscriptions: never logged either.
    for member in MEMBERS:
        [copy] = [m for m in mails(sink, member) if m["List-Unsubscribe"]]
        found = re.search(r"/u/(\d+-[a-z2-7]{32})", str(copy["List-Unsubscribe"]))
        assert found is not None
        assert found.group(1).split("-")[1] not in logged, member
