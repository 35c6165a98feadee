"""Self-service by mail and by link: -request, -join/-leave with double opt-in, one click."""

from __future__ import annotations

import email
import email.policy
import re
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway import lists
from gateway.authentication import Resolver
from gateway.clock import ManualClock
from gateway.commands import MAX_REQUEST_REPLIES_PER_DAY
from gateway.schema import Mode, RoleName, journal
from gateway.store import Store
from tests.conftest import LIST, Keys
from tests.support import CORE_POLICY, Sink, gateway, post, wait_until, write_config

MEMBER = "member@example.net"
OWNER = "owner@example.net"
NEWCOMER = "new@example.net"


@pytest.fixture
def self_service(tmp_path: Path, sink: Sink, store: Store, store_url: str) -> Path:
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        lists.add_member(conn, lst, MEMBER, now=0.0)
        lists.add_member(conn, lst, OWNER, now=0.0)
        lists.add_role(conn, lst, OWNER, RoleName.OWNER)
    return write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                        policy=CORE_POLICY)


def mails(sink: Sink, rcpt: str) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(d, policy=email.policy.default)  # type: ignore[misc]
            for r, d in sink.handler.copies() if r == rcpt]


def text_of(msg: email.message.EmailMessage) -> str:
    return " ".join(msg.get_body(("plain",)).get_content().split())  # type: ignore[union-attr]


def member_mode(store: Store, address: str) -> Mode | None:
    with store.read() as conn:
        found = lists.find_member(conn, lists.get(conn, LIST).id, [address])
    return found.mode if found else None


def events(store: Store, event: str) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(sa.select(journal.c.detail).where(journal.c.event == event))
                    .scalars())


def run(config: Path, keys: Keys) -> object:
    return gateway(config, resolver=Resolver(records=keys.resolver_records))


def test_selfservice_subscribe_by_request_is_double_opt_in(self_service: Path, sink: Sink,
                                                           store: Store, keys: Keys) -> None:
    request = "discuss-request@example.org"
    with run(self_service, keys) as gw:  # type: ignore[attr-defined]
        gw.send(NEWCOMER, request, post(NEWCOMER, request, "subscribe", "subscribe\n"))
        wait_until(lambda: len(mails(sink, NEWCOMER)) == 2, what="reply and confirmation")
        answer, ask = sorted(mails(sink, NEWCOMER), key=lambda m: "confirm" in str(m["Subject"]))
        assert "a confirmation request was sent to new@example.net" in text_of(answer)
        assert member_mode(store, NEWCOMER) is None  # nobody joins without confirming
        confirm = str(ask["Reply-To"])
        assert re.fullmatch(r"discuss-confirm\+[a-z2-7]{32}@example\.org", confirm)
        # Asking again within the hour sends no second request.
        gw.send(NEWCOMER, request, post(NEWCOMER, request, "subscribe", "subscribe\n"))
        wait_until(lambda: len(mails(sink, NEWCOMER)) == 3, what="the second reply")
        assert "less than an hour ago" in text_of(mails(sink, NEWCOMER)[-1])
        # A reply from another address does not confirm.
        gw.send(MEMBER, confirm, post(MEMBER, confirm, "Re: confirm", "yes\n"))
        wait_until(lambda: bool(events(store, "confirm-refused")), what="the refusal")
        assert member_mode(store, NEWCOMER) is None
        gw.send(NEWCOMER, confirm, post(NEWCOMER, confirm, "Re: Please confirm", "ok\n"))
        wait_until(lambda: member_mode(store, NEWCOMER) is Mode.REGULAR, what="the join")
        wait_until(lambda: any("Welcome" in str(m["Subject"]) for m in mails(sink, NEWCOMER)),
                   what="the welcome message")
        # The same confirmation again does nothing more.
        gw.send(NEWCOMER, confirm, post(NEWCOMER, confirm, "Re: Please confirm", "ok\n"))
        wait_until(lambda: len(events(store, "confirmed")) == 2, what="the replay handled")
    assert "already used" in events(store, "confirmed")[-1]


def test_selfservice_join_and_leave_addresses(self_service: Path, sink: Sink, store: Store,
                                              keys: Keys) -> None:
    leave = "discuss-leave@example.org"
    with run(self_service, keys) as gw:  # type: ignore[attr-defined]
        gw.send(MEMBER, leave, post(MEMBER, leave, "bye", ""))
        wait_until(lambda: any("confirm" in str(m["Subject"]).lower()
                               for m in mails(sink, MEMBER)), what="the leave confirmation")
        ask = next(m for m in mails(sink, MEMBER) if "confirm" in str(m["Subject"]).lower())
        confirm = str(ask["Reply-To"])
        gw.send(MEMBER, confirm, post(MEMBER, confirm, "Re: confirm", ""))
        wait_until(lambda: member_mode(store, MEMBER) is None, what="the member left")


def test_selfservice_set_mode_needs_an_authenticated_member(self_service: Path, sink: Sink,
                                                            store: Store, keys: Keys) -> None:
    request = "discuss-request@example.org"
    with run(self_service, keys) as gw:  # type: ignore[attr-defined]
        unsigned = post(MEMBER, request, "settings", "set digest html\n")
        gw.send(MEMBER, request, unsigned)
        wait_until(lambda: len(mails(sink, MEMBER)) == 1, what="the refusal")
        assert "could not be authenticated" in text_of(mails(sink, MEMBER)[0])
        assert member_mode(store, MEMBER) is Mode.REGULAR
        signed = keys.members.sign(post(MEMBER, request, "settings",
                                        "set digest html\nhelp\nend\nset nomail\n"))
        gw.send(MEMBER, request, signed)
        wait_until(lambda: member_mode(store, MEMBER) is Mode.DIGEST_HTML, what="the change")
        wait_until(lambda: len(mails(sink, MEMBER)) == 2, what="the summary")
        summary = text_of(mails(sink, MEMBER)[1])
        assert "done: you now get digest-html" in summary and "> set nomail" not in summary
        gw.send(OWNER, request, keys.members.sign(post(OWNER, request, "who", "who\n")))
        wait_until(lambda: len(mails(sink, OWNER)) == 1, what="the member list")
        assert "2 members" in text_of(mails(sink, OWNER)[0])
        gw.send(MEMBER, request, keys.members.sign(post(MEMBER, request, "who", "who\n")))
        wait_until(lambda: len(mails(sink, MEMBER)) == 3, what="the refusal of who")
        assert "only the list's owners" in text_of(mails(sink, MEMBER)[2])


@pytest.mark.parametrize("headers, sender", [
    ("Precedence: bulk\r\n", NEWCOMER),
    ("Auto-Submitted: auto-generated\r\n", NEWCOMER),
    ("", ""),
    ("", "mailer-daemon@example.net"),
])
def test_selfservice_never_answers_bulk_robots_or_empty_senders(
        self_service: Path, sink: Sink, store: Store, keys: Keys, headers: str,
        sender: str) -> None:
    request = "discuss-request@example.org"
    with run(self_service, keys) as gw:  # type: ignore[attr-defined]
        gw.send(sender, request, post(sender or NEWCOMER, request, "subscribe", "subscribe\n",
                                      extra_headers=headers))
        wait_until(lambda: bool(events(store, "request-ignored")), what="ignored")
    assert sink.handler.copies() == []


def test_selfservice_answers_one_address_at_most_ten_times_a_day(
        self_service: Path, sink: Sink, store: Store, keys: Keys) -> None:
    """Someone mails -request again and again in a victim's name: the victim gets at
    most ten answers a day (GNU Mailman's max_autoresponses_per_day), then none; the
    next day they are answered again, and other addresses never were affected."""
    request = "discuss-request@example.org"
    clock = ManualClock(1_800_000_000.0)
    with gateway(self_service, clock=clock,
                 resolver=Resolver(records=keys.resolver_records)) as gw:
        for i in range(MAX_REQUEST_REPLIES_PER_DAY + 3):
            gw.send(MEMBER, request, post(MEMBER, request, f"help {i}", "help\n"))
        wait_until(lambda: len(events(store, "request")) + len(events(store, "request-ignored"))
                   == MAX_REQUEST_REPLIES_PER_DAY + 3, what="every request read")
        wait_until(lambda: len(mails(sink, MEMBER)) == MAX_REQUEST_REPLIES_PER_DAY,
                   what="ten answers")
        assert len(events(store, "request-ignored")) == 3
        assert all("not answered" in d for d in events(store, "request-ignored"))
        gw.send(OWNER, request, post(OWNER, request, "help", "help\n"))
        wait_until(lambda: len(mails(sink, OWNER)) == 1, what="another address answered")
        clock.advance(86400 + 1)
        gw.send(MEMBER, request, post(MEMBER, request, "help again", "help\n"))
        wait_until(lambda: len(mails(sink, MEMBER)) == MAX_REQUEST_REPLIES_PER_DAY + 1,
                   what="an answer the next day")


def test_selfservice_one_click_unsubscribe_by_http_post(self_service: Path, sink: Sink,
                                                        store: Store, keys: Keys) -> None:
    with run(self_service, keys) as gw:  # type: ignore[attr-defined]
        gw.send(OWNER, LIST, post(OWNER, LIST, "Hello", "A post.\n"))
        wait_until(lambda: bool(mails(sink, MEMBER)), what="the member's copy")
        copy = mails(sink, MEMBER)[0]
        assert copy["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = re.search(r"<(http[^>]+)>", str(copy["List-Unsubscribe"]))
        assert url is not None
        # RFC 8058: a POST with this body, and nothing else, unsubscribes.
        request = urllib.request.Request(url.group(1), data=b"List-Unsubscribe=One-Click",
                                         method="POST", headers={
                                             "Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    assert member_mode(store, MEMBER) is None
    assert member_mode(store, OWNER) is Mode.REGULAR
