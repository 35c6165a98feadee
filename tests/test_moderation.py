"""Holding posts and releasing them by reply, over real SMTP, with every forgery failing.

The list's shipped default policy holds a new member's first post. The moderator
mod@mods.example replies to the notice from a domain with a real DKIM key
(published to the daemon through an injected resolver); forged replies of each
kind must change nothing at all.
"""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway import lists, resources
from gateway.authentication import Resolver, Signer
from gateway.clock import ManualClock
from gateway.notices import reply_subject
from gateway.replytext import Command, find_command
from gateway.schema import RoleName, held, journal, outbound
from gateway.schema import work as work_table
from gateway.store import Store
from tests.conftest import LIST, MEMBERS, NEWBIE, Keys, discussion_list
from tests.support import RunningGateway, Sink, gateway, post, wait_until, write_config

MODERATOR = "mod@mods.example"
MODERATOR_2 = "other-mod@mods.example"
OTHER_LIST = "other@example.org"


@pytest.fixture
def moderated(tmp_path: Path, sink: Sink, store: Store, store_url: str) -> Path:
    """discuss@ with three members, a newcomer, two moderators; the shipped policy."""
    discussion_list(store, roles={MODERATOR: RoleName.MODERATOR,
                                  MODERATOR_2: RoleName.MODERATOR})
    with store.write() as conn:
        other = lists.create(conn, OTHER_LIST, now=0.0)
        lists.add_role(conn, other, MODERATOR, RoleName.MODERATOR)
        lists.add_member(conn, other, NEWBIE, now=0.0)
    return write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                        sections='[moderation]\nsweep_interval = "100ms"')


def messages_to(sink: Sink, rcpt: str) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(d, policy=email.policy.default)  # type: ignore[misc]
            for r, d in sink.handler.copies() if r == rcpt]


def wait_for_mail(sink: Sink, rcpt: str, count: int = 1) -> list[email.message.EmailMessage]:
    wait_until(lambda: len(messages_to(sink, rcpt)) >= count, what=f"{count} mail(s) to {rcpt}")
    return messages_to(sink, rcpt)


def confirm_address(notice: email.message.EmailMessage) -> str:
    reply_to = str(notice["Reply-To"])
    assert re.fullmatch(r"discuss-confirm\+[a-z2-7]{32}@example\.org", reply_to), reply_to
    return reply_to


def hold_a_post(gw: RunningGateway, sink: Sink, subject: str = "Hello, I am new") -> str:
    """The newcomer posts; returns the confirm address from the moderators' notice."""
    gw.send(NEWBIE, LIST, post(NEWBIE, LIST, subject, "Glad to be here.\n"))
    notices = wait_for_mail(sink, MODERATOR)
    notice = notices[-1]
    assert "Held for moderation" in str(notice["Subject"])
    return confirm_address(notice)


def reply(frm: str, to: str, body: str, *, signer: Signer | None = None, subject: str = "Re: held",
          headers: str = "") -> bytes:
    data = post(frm, to, subject, body, extra_headers=headers)
    return signer.sign(data) if signer else data


def held_states(store: Store) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(sa.select(held.c.state).order_by(held.c.id)).scalars())


def delivered_post_count(sink: Sink) -> int:
    """Copies of the newcomer's post that reached the regular members."""
    return sum(1 for m in MEMBERS for msg in messages_to(sink, m)
               if "Glad to be here" in msg.get_body(("plain",)).get_content())  # type: ignore[union-attr]


def events(store: Store, event: str) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(sa.select(journal.c.detail).where(journal.c.event == event))
                    .scalars())


def run(moderated: Path, keys: Keys, **kw: object) -> object:
    return gateway(moderated, resolver=Resolver(records=keys.resolver_records), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("subject, expected", [
    ("Re: [Discuss] Held for moderation", "Re: [Discuss] Held for moderation"),
    ("RE: re:Re : held", "Re: held"),
    ("held", "Re: held"),
    ("Fwd: held", "Re: Fwd: held"),
    ("Re:", "Re: moderation"),
    ("", "Re: moderation"),
    (None, "Re: moderation"),
])
def test_moderation_answers_carry_one_reply_marker(subject: str | None, expected: str) -> None:
    assert reply_subject(subject, "moderation") == expected


# -- the round trip ------------------------------------------------------------------------

def test_moderation_first_post_is_held_then_released_by_a_signed_reply(
        moderated: Path, keys: Keys, sink: Sink, store: Store) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        notice = messages_to(sink, MODERATOR)[0]
        assert "first post of newbie@example.net" in notice.get_body(("plain",)).get_content()
        attached = [p for p in notice.iter_attachments()
                    if p.get_content_type() == "message/rfc822"]
        assert len(attached) == 1
        # The poster is told, and can withdraw by reply.
        poster_notice = wait_for_mail(sink, NEWBIE)[0]
        assert "awaits a moderator" in str(poster_notice["Subject"])
        assert delivered_post_count(sink) == 0

        gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, "approve\n", signer=keys.mods))
        wait_until(lambda: delivered_post_count(sink) == len(MEMBERS), what="the release")
        confirmation = wait_for_mail(sink, MODERATOR, 2)[-1]
        assert "is now approved" in confirmation.get_body(("plain",)).get_content()
        assert confirmation["Subject"] == "Re: held"  # the reply's "Re: held", answered
        assert held_states(store) == ["approved"]

        # One approved post is enough: the next one goes straight through.
        gw.send(NEWBIE, LIST, post(NEWBIE, LIST, "Second", "Glad to be here again.\n"))
        wait_until(lambda: delivered_post_count(sink) == 2 * len(MEMBERS), what="second post")
    assert held_states(store) == ["approved"]


@pytest.mark.parametrize("verb, state, members_get_it", [
    ("reject Please introduce yourself first.", "rejected", False),
    ("discard", "discarded", False),
    ("ban", "discarded", False),
    ("trust", "approved", True),
])
def test_moderation_each_verb_does_what_it_says(moderated: Path, keys: Keys, sink: Sink,
                                                 store: Store, verb: str, state: str,
                                                 members_get_it: bool) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, verb + "\n", signer=keys.mods))
        wait_until(lambda: held_states(store) == [state], what=f"held post {state}")
        wait_for_mail(sink, MODERATOR, 2)  # the confirmation
        if members_get_it:
            wait_until(lambda: delivered_post_count(sink) == len(MEMBERS), what="release")
        poster = messages_to(sink, NEWBIE)
        if verb.startswith("reject"):
            wait_until(lambda: len(messages_to(sink, NEWBIE)) == 2, what="rejection notice")
            text = messages_to(sink, NEWBIE)[-1].get_body(("plain",)).get_content()
            assert "Please introduce yourself first." in text
        elif verb in ("discard", "ban"):
            assert len(poster) == 1  # only the "awaits" notice: a discard is silent
        # What the decision means for the sender's next post:
        gw.send(NEWBIE, LIST, post(NEWBIE, LIST, "Next", "Glad to be here, next.\n"))
        if verb == "ban":
            wait_until(lambda: bool(events(store, "discard")), what="the banned post discarded")
        elif verb == "trust":
            wait_until(lambda: delivered_post_count(sink) == 2 * len(MEMBERS), what="trusted")
        else:
            wait_until(lambda: len(held_states(store)) == 2, what="held again")
    assert delivered_post_count(sink) == (2 if verb == "trust" else 0) * len(MEMBERS)


def test_moderation_replies_from_real_mail_clients_are_understood(
        moderated: Path, keys: Keys, sink: Sink, store: Store) -> None:
    html_reply = ("<div dir=ltr>Discard<br></div><div class=gmail_quote>On Sun, Nov 22 "
                  "Discuss wrote:<blockquote>approve</blockquote></div>")
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        data = reply(MODERATOR, confirm, html_reply, signer=keys.mods,
                     headers="MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n")
        gw.send(MODERATOR, confirm, data)
        wait_until(lambda: held_states(store) == ["discarded"], what="the discard")


def test_moderation_unknown_or_empty_reply_gets_help_and_changes_nothing(
        moderated: Path, keys: Keys, sink: Sink, store: Store) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        # Only quoted text, and a word that is no verb: no default, the token is not spent.
        for body in ("> approve\n", "yes please\n"):
            gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, body, signer=keys.mods))
        helps = wait_for_mail(sink, MODERATOR, 3)[1:]
        assert all("no command was found" in m.get_body(("plain",)).get_content() for m in helps)
        assert held_states(store) == ["held"]
        gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, "approve\n", signer=keys.mods))
        wait_until(lambda: held_states(store) == ["approved"], what="approval after help")


def test_moderation_poster_can_withdraw_by_reply(moderated: Path, keys: Keys, sink: Sink,
                                                  store: Store) -> None:
    with run(moderated, keys) as gw:
        hold_a_post(gw, sink)
        withdraw = str(wait_for_mail(sink, NEWBIE)[0]["Reply-To"])
        gw.send(NEWBIE, withdraw, reply(NEWBIE, withdraw, "withdraw\n"))
        wait_until(lambda: held_states(store) == ["withdrawn"], what="withdrawal")
        wait_for_mail(sink, NEWBIE, 2)
    assert delivered_post_count(sink) == 0


# -- forgeries: none may pass ------------------------------------------------------------

def forged_cases(keys: Keys, confirm: str) -> dict[str, tuple[str, bytes]]:
    """(envelope sender, message) for each way of trying to release without the right."""
    return {
        "a member who is not a moderator, properly signed":
            (MEMBERS[0], reply(MEMBERS[0], confirm, "approve\n", signer=keys.members)),
        "the moderator's From, no DKIM signature":
            (MODERATOR, reply(MODERATOR, confirm, "approve\n")),
        "the moderator's From, a valid DKIM signature of another domain":
            (MODERATOR, reply(MODERATOR, confirm, "approve\n", signer=keys.evil)),
        "the moderator's From, signed, but another envelope sender":
            ("attacker@evil.example", reply(MODERATOR, confirm, "approve\n", signer=keys.mods)),
        "a forged Authentication-Results claiming a pass":
            (MODERATOR, reply(MODERATOR, confirm, "approve\n", headers=(
                "Authentication-Results: mx.example.org; dkim=pass header.d=mods.example; "
                "dmarc=pass header.from=mods.example\r\n"))),
        "the body altered after signing":
            (MODERATOR, keys.mods.sign(reply(MODERATOR, confirm, "discard\n"))
             .replace(b"discard", b"approve")),
    }


def test_moderation_forged_releases_change_nothing(moderated: Path, keys: Keys, sink: Sink,
                                                    store: Store) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        cases = forged_cases(keys, confirm)
        for envelope, data in cases.values():
            gw.send(envelope, confirm, data)
        wait_until(lambda: len(events(store, "confirm-refused")) == len(cases),
                   what="every forgery refused")
        refusals = "\n".join(events(store, "confirm-refused"))
        assert "is not a moderator" in refusals
        assert "not authenticated" in refusals
        assert "envelope sender" in refusals
        # The moderator's own address is told why, and where to turn, line by line.
        wait_until(lambda: any(
            "ask the list's owners:\r\ndiscuss-owner@example.org\r\n"
            in m.get_body(("plain",)).get_content() for m in messages_to(sink, MODERATOR)),
            what="the moderator's answer")
        # The real moderator can still decide: no forgery spent the token.
        gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, "discard\n", signer=keys.mods))
        wait_until(lambda: held_states(store) == ["discarded"], what="the real decision")
    assert delivered_post_count(sink) == 0


def test_moderation_replayed_token_releases_nothing_twice(moderated: Path, keys: Keys,
                                                           sink: Sink, store: Store) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        approval = reply(MODERATOR, confirm, "approve\n", signer=keys.mods)
        gw.send(MODERATOR, confirm, approval)
        wait_until(lambda: delivered_post_count(sink) == len(MEMBERS), what="release")
        gw.send(MODERATOR, confirm, approval)  # the very same signed message, replayed
        late = wait_for_mail(sink, MODERATOR, 3)[-1]
        text = " ".join(late.get_body(("plain",)).get_content().split())
        assert "was already approved by mod@mods.example" in text
    assert delivered_post_count(sink) == len(MEMBERS)


def test_moderation_token_of_another_list_is_refused(moderated: Path, keys: Keys, sink: Sink,
                                                      store: Store) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        token = confirm.split("+", 1)[1].split("@")[0]
        elsewhere = f"other-confirm+{token}@example.org"
        gw.send(MODERATOR, elsewhere, reply(MODERATOR, elsewhere, "approve\n", signer=keys.mods))
        wait_until(lambda: bool(events(store, "confirm-refused")), what="the refusal")
        assert "no such token for this list" in events(store, "confirm-refused")[0]
    assert held_states(store) == ["held"]
    assert delivered_post_count(sink) == 0


def test_moderation_expired_token_is_refused_and_the_hold_expires(
        moderated: Path, keys: Keys, sink: Sink, store: Store) -> None:
    clock = ManualClock()
    with run(moderated, keys, clock=clock) as gw:
        confirm = hold_a_post(gw, sink)
        # The notice's outcome on disk first: a jump of days would expire the lease of
        # its row while in flight, and the notice would rightly go out again.
        wait_until(lambda: outbound_empty(store), what="the notice's outcome recorded")
        clock.advance(6.5 * 86400)  # within a day of the 7-day expiry: a reminder
        reminder = wait_for_mail(sink, MODERATOR, 2)[-1]
        assert "Reminder" in str(reminder["Subject"])
        wait_until(lambda: outbound_empty(store), what="the reminder's outcome recorded")
        clock.advance(86400)  # past expiry: the policy's expiry action (reject) is applied
        wait_until(lambda: held_states(store) == ["expired"], what="expiry")
        told = wait_for_mail(sink, NEWBIE, 2)[-1]
        assert "no moderator approved it in time" in told.get_body(("plain",)).get_content()
        gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, "approve\n", signer=keys.mods))
        wait_until(lambda: bool(events(store, "confirm-late")), what="the late reply refused")
    assert delivered_post_count(sink) == 0


def test_moderation_two_moderators_racing_exactly_one_wins(moderated: Path, keys: Keys,
                                                           sink: Sink, store: Store) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        approvals = [(m, reply(m, confirm, verb + "\n", signer=keys.mods))
                     for m, verb in ((MODERATOR, "approve"), (MODERATOR_2, "discard"))]
        barrier = threading.Barrier(len(approvals))

        def send(envelope: str, data: bytes) -> None:
            barrier.wait()
            gw.send(envelope, confirm, data)

        threads = [threading.Thread(target=send, args=a) for a in approvals]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: len(events(store, "confirmed")) + len(events(store, "confirm-late"))
                   == 2, what="both replies handled")
        assert len(events(store, "confirmed")) == 1
        state = held_states(store)[0]
        if state == "approved":
            wait_until(lambda: delivered_post_count(sink) == len(MEMBERS), what="release")
        # the loser is told who won
        wait_until(lambda: any("already" in m.get_body(("plain",)).get_content()
                               for rcpt in (MODERATOR, MODERATOR_2)
                               for m in messages_to(sink, rcpt)), what="the loser told")
    assert delivered_post_count(sink) == (len(MEMBERS) if state == "approved" else 0)


def test_moderation_auto_replies_to_a_notice_are_ignored(moderated: Path, keys: Keys,
                                                          sink: Sink, store: Store) -> None:
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        vacation = reply(MODERATOR, confirm, "approve\nI am away until Monday.\n",
                         signer=keys.mods, headers="Auto-Submitted: auto-replied\r\n")
        gw.send(MODERATOR, confirm, vacation)
        wait_until(lambda: bool(events(store, "confirm-ignored")), what="ignored")
    assert held_states(store) == ["held"]
    assert len(messages_to(sink, MODERATOR)) == 1  # no reply to an auto-reply


def test_moderation_trusted_front_mta_results_release_when_the_policy_says_so(
        tmp_path: Path, moderated: Path, keys: Keys, sink: Sink, store: Store) -> None:
    (moderated.parent / "policies").mkdir(exist_ok=True)
    policy = (Path(__file__).resolve().parent.parent / "policies" / "default.toml").read_text()
    (moderated.parent / "policies" / "default.toml").write_text(
        policy.replace('authentication = "dkim"', 'authentication = "trusted-ar"'))
    moderated.write_text(moderated.read_text().replace(
        '[moderation]', '[paths]\npolicies = "policies"\n\n[moderation]\n'
                        'trusted_authserv_ids = ["mx.example.org"]'))
    ar = ("Authentication-Results: mx.example.org; dkim=pass header.d=mods.example; "
          "dmarc=pass header.from=mods.example\r\n")
    with run(moderated, keys) as gw:
        confirm = hold_a_post(gw, sink)
        untrusted = ar.replace("mx.example.org", "mx.evil.example")
        gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, "approve\n", headers=untrusted))
        wait_until(lambda: bool(events(store, "confirm-refused")), what="untrusted refused")
        gw.send(MODERATOR, confirm, reply(MODERATOR, confirm, "approve\n", headers=ar))
        wait_until(lambda: held_states(store) == ["approved"], what="trusted release")


def test_moderation_a_row_that_fails_leaves_the_rest_of_its_batch_standing(
        moderated: Path, sink: Sink, store: Store, tmp_path: Path) -> None:
    # One transaction, two lists: alice's post is accepted on discuss@ and held on
    # other@ (she is not a member there), and both rows are claimed together. The hold
    # cannot be made (its notice template breaks when rendered): that row is failed for
    # a retry, with the error, and the accepted post goes out all the same.
    templates = tmp_path / "templates"
    shutil.copytree(resources.templates_dir(), templates)
    (templates / "notices" / "held-moderator.txt.j2").write_text(
        "{{ no_such_field }}\n", encoding="utf-8")
    with moderated.open("a", encoding="utf-8") as f:
        f.write(f'\n[paths]\ntemplates = "{templates}"\n')
    alice = MEMBERS[0]
    with gateway(moderated) as gw:
        gw.send(alice, [LIST, OTHER_LIST], post(alice, LIST, "Both lists", "Hello.\n"))
        wait_for_mail(sink, MEMBERS[1])
        wait_until(lambda: failed_rows(store) != [], what="the hold's row failed")
    (row,) = failed_rows(store)
    assert row.state == "ready" and row.attempts == 1, row
    assert "'no_such_field' is undefined" in row.last_error
    assert held_states(store) == []  # nothing half-made: no hold without its notice


def outbound_empty(store: Store) -> bool:
    with store.read() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(outbound)).scalar_one() == 0


def failed_rows(store: Store) -> list[sa.Row[tuple[object, ...]]]:
    with store.read() as conn:
        return list(conn.execute(sa.select(work_table).where(
            work_table.c.stage == "moderation", work_table.c.last_error.is_not(None))))


def test_moderation_html_reply_with_a_declaration_the_parser_refuses_reads_what_came_first(
) -> None:
    """html.parser raises AssertionError on "<![e09..." (found by fuzz/fuzz_parse.py):
    the reply is what the moderator wrote before it, never the quoted notice after."""
    verbs = frozenset({"approve", "reject", "discard"})

    def reply(body: str) -> bytes:
        return (f"From: {MODERATOR}\r\nSubject: Re: held\r\nMIME-Version: 1.0\r\n"
                "Content-Type: text/html; charset=utf-8\r\n\r\n" + body).encode()

    assert find_command(reply("<p>discard</p><![e09\t\t<blockquote>approve</blockquote>"),
                        verbs) == Command("discard", "")
    assert find_command(reply("<p></p><![e09\t\t<p>approve</p>"), verbs) is None
