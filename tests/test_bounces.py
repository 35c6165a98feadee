"""Bounce scoring, disabling, probes and removal, with bounces sent over real SMTP.

The daemon does it all: it takes the bounces in (intake), reads them (the bounces
stage), sweeps (the smarthost's refusals, further probes, removals), delivers what
the stage sends (to the sink) and reads probe replies (commands). Tests of the
counting rules and of the weekly schedule drive ``record`` and ``Bounces.sweep`` on
the store with a manual clock instead: they do not wait for a schedule.
"""

from __future__ import annotations

import csv
import email
import email.message
import email.policy
import re
import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gateway import lists
from gateway.bounces import Bounces, Finding, read_report, record
from gateway.cli import main as cli_main
from gateway.clock import ManualClock
from gateway.config import BouncesConfig, Config, Seconds, load
from gateway.dsn import parse_bounce, signed_verp, verp_encode
from gateway.lists import MailingList, Member
from gateway.queue import Claimer
from gateway.schema import (
    Mode,
    State,
    bounce_events,
    delivery_failures,
    journal,
    messages,
    outbound,
    work,
)
from gateway.signing import LinkSigner
from gateway.store import Store
from gateway.templates import Templates
from tests.conftest import LIST, MEMBERS
from tests.helpers_unit import NO_CORPUS
from tests.support import (
    CORPUS,
    RunningGateway,
    Sink,
    as_sent,
    gateway,
    post,
    wait_until,
)

START = 1_800_000_000.0  # 2027-01-15 08:00 UTC
DAY = 86400.0
OWNER, BOB, CAROL = MEMBERS  # alice is the list's owner (tests.conftest)
BOUNCES_ADDRESS = "discuss-bounces@example.org"
# Mailman's VERP address: anyone can write it, so nothing sent to it counts.
GUESSABLE_BOB_VERP = verp_encode("discuss", "example.org", BOB)
TAGGED = re.compile(r"discuss-bounces\+bob=example\.net\+[a-z2-7]{12}@example\.org")
SETTINGS = BouncesConfig()
# For what does not depend on the database (the SQL of scoring and sweeping runs on both).
SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


def dsn(recipient: str, *, action: str = "failed", status: str = "5.1.1",
        to: str = BOUNCES_ADDRESS, original: bytes | None = None) -> bytes:
    """An RFC 3464 delivery status notification, as Postfix writes one; ``original`` is
    the message that bounced, whose header it quotes."""
    quoted = (original.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace").replace("\r\n", "\n")
              if original is not None else
              "From: Discuss <discuss@example.org>\nSubject: [Discuss] Hello")
    return as_sent(f"""\
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
To: {to}
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn.{abs(hash((recipient, action, status, to)))}@mx.example.net>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

This is the mail system at host mx.example.net.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{recipient}>: host mx.example.net said: 550 5.1.1 <{recipient}>:
    Recipient address rejected: User unknown

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; 550 5.1.1 User unknown

--B
Content-Type: text/rfc822-headers

{quoted}

--B--
""".encode())


# -- driving the stage -----------------------------------------------------------------------

@pytest.fixture
def config(config_path: Path) -> Config:
    return load(config_path)


def key_of(config: Config) -> LinkSigner:
    """The daemon's own key: it reads the same file (and makes it if it is not there yet)."""
    return LinkSigner.from_file(config.web.secret_file, create=True)


def verp_of(config_path: Path, address: str = BOB) -> str:
    """The signed return path of ``address``'s copies, as the daemon makes it."""
    return signed_verp("discuss", "example.org", address, key_of(load(config_path)))


def stage(store: Store, config: Config, clock: ManualClock) -> Bounces:
    return Bounces(store, clock=clock, claimer=Claimer("tests:bounces", 30.0, 3),
                   templates=Templates(config.paths.templates), settings=config.bounces,
                   signer=key_of(config), retry_delay=1.0)


def count(store: Store, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where))
                   .scalar_one())


def drain(store: Store) -> None:
    """Wait for the daemon to read every bounce taken in (intake stored each one before
    its 250, so none is still on its way)."""
    wait_until(lambda: count(store, work, work.c.stage == "bounces") == 0,
               what="every bounce to be read")


def settle(store: Store) -> None:
    """Wait until nothing is left to do (before moving a manual clock on: that would
    expire the leases of work in flight)."""
    wait_until(lambda: count(store, work) == 0 and count(store, outbound) == 0,
               what="the queues to empty")


def member(store: Store, address: str = BOB) -> Member | None:
    with store.read() as conn:
        return lists.find_member(conn, the_list(store).id, [address])


def the_list(store: Store) -> MailingList:
    with store.read() as conn:
        return lists.get(conn, LIST)


def events(store: Store, address: str = BOB) -> list[tuple[bool, str, bool]]:
    """(permanent, source, counted) of each bounce event of ``address``, oldest first."""
    with store.read() as conn:
        rows = conn.execute(sa.select(bounce_events).where(bounce_events.c.address == address)
                            .order_by(bounce_events.c.id)).all()
    return [(r.permanent, r.source, r.counted) for r in rows]


def journal_events(store: Store, prefix: str = "bounce") -> list[tuple[str, str]]:
    with store.read() as conn:
        rows = conn.execute(sa.select(journal.c.event, journal.c.detail)
                            .where(journal.c.event.startswith(prefix))
                            .order_by(journal.c.id)).all()
    return [(r.event, r.detail) for r in rows]


def mail_to(sink: Sink, rcpt: str) -> list[tuple[str, email.message.EmailMessage]]:
    """(envelope sender, message) of every copy the sink got for ``rcpt``."""
    with sink.handler.lock:
        got = [(m.mail_from, m.data) for m in sink.handler.messages if rcpt in m.rcpt_tos]
    return [(frm, email.message_from_bytes(data, policy=email.policy.default))  # type: ignore[misc]
            for frm, data in got]


def wait_for_mail(sink: Sink, rcpt: str,
                  n: int = 1) -> list[tuple[str, email.message.EmailMessage]]:
    wait_until(lambda: len(mail_to(sink, rcpt)) >= n, what=f"{n} mail(s) to {rcpt}")
    return mail_to(sink, rcpt)


def text_of(msg: email.message.EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    return str(body.get_content())  # type: ignore[attr-defined]


def bounce_days(store: Store, clock: ManualClock, days: int, address: str = BOB) -> None:
    """``days`` hard bounces of ``address``, one a day, recorded as the stage records them."""
    templates = Templates(load_templates_root())
    for _ in range(days):
        with store.write() as conn:
            record(conn, the_list(store), address, permanent=True, source="verp",
                   detail="test bounce", now=clock.now(), settings=SETTINGS,
                   templates=templates)
        clock.advance(DAY)


def load_templates_root() -> Path:
    return load(None).paths.templates


@contextmanager
def running(config_path: Path, clock: ManualClock, *,
            sweep_interval: float | None = None) -> Iterator[RunningGateway]:
    """The daemon; ``sweep_interval`` makes its bounces sweep run that often (real time)."""
    settings = load(config_path).bounces
    if sweep_interval is not None:
        settings = replace(settings, sweep_interval=Seconds(sweep_interval))
    with gateway(config_path, clock=clock, bounces=settings) as gw:
        yield gw


def send_bounce(gw: RunningGateway, to: str, data: bytes, mail_from: str = "") -> None:
    with gw.smtp() as client:
        client.sendmail(mail_from, [to], data)


def copy_of(sink: Sink, rcpt: str, subject: str) -> tuple[str, bytes]:
    """(envelope sender, bytes) of ``rcpt``'s copy of the post with ``subject``."""
    def found() -> list[tuple[str, bytes]]:
        with sink.handler.lock:
            return [(m.mail_from, m.data) for m in sink.handler.messages
                    if rcpt in m.rcpt_tos and f"Subject: [Discuss] {subject}\r\n".encode()
                    in m.data]
    wait_until(lambda: bool(found()), what=f"{rcpt}'s copy of {subject!r}")
    [got] = found()
    return got


# -- scoring, disabling, probes: over SMTP -----------------------------------------------------

def test_bounces_dsns_of_members_copies_disable_delivery_end_to_end(
        config_path: Path, store: Store, sink: Sink) -> None:
    """Posts go out, bob's copies bounce to their VERP return path on five days, and the
    daemon alone reads the reports, scores bob, disables him and tells him and the owner;
    his answer to the probe brings the next post back to him."""
    clock = ManualClock(START)
    with running(config_path, clock) as gw:
        for day in range(1, 6):
            gw.send(OWNER, LIST, post(OWNER, LIST, f"Day {day}"))
            envelope, copy = copy_of(sink, BOB, f"Day {day}")
            # bob's copy names him in its return path, with a tag that only the daemon
            # can write; that is where his bounces come to.
            assert TAGGED.fullmatch(envelope), envelope
            assert envelope == verp_of(config_path)
            report = dsn(BOB, to=envelope, original=copy)
            assert parse_bounce(report).permanent == {BOB}
            send_bounce(gw, envelope, report)
            wait_until(lambda d=day: len(events(store)) == d,  # type: ignore[misc]
                       what=f"bounce {day} to be recorded")
            bob = member(store)
            assert bob is not None and bob.bounce_score == day
            assert bob.enabled is (day < 5)
            settle(store)
            if day < 5:
                clock.advance(DAY)  # one bounce a day counts
        assert events(store) == [(True, "verp", True)] * 5
        assert events(store, CAROL) == [] and events(store, OWNER) == []
        bob = member(store)
        assert bob is not None and bob.disabled_at == START + 4 * DAY
        assert "score 5" in (bob.disabled_reason or "")

        # bob is told, by a notice that is also the first probe (reply to stay subscribed),
        # sent from the probe's own return path ...
        probes = [(f, m) for f, m in mail_to(sink, BOB) if "disabled" in str(m["Subject"])]
        [(probe_from, notice)] = probes
        confirm = str(notice["Reply-To"])
        token = re.fullmatch(r"discuss-confirm\+([a-z2-7]{32})@example\.org", confirm)
        assert token is not None, confirm
        assert probe_from == f"discuss-bounces+{token.group(1)}@example.org"
        assert str(notice["Auto-Submitted"]) == "auto-generated"
        assert "disabled delivery" in text_of(notice) and confirm in text_of(notice)
        # ... and so is the owner, with the bounces that did it.
        [(_, owners)] = [(f, m) for f, m in mail_to(sink, OWNER)
                         if "(bounces)" in str(m["Subject"])]
        assert str(owners["Subject"]) == f"{LIST}: {BOB} delivery disabled (bounces)"
        assert text_of(owners).count("hard (verp)") == 5

        # A disabled member gets no posts (the owner and carol do).
        gw.send(OWNER, LIST, post(OWNER, LIST, "After the bounces"))
        copy_of(sink, CAROL, "After the bounces")
        copy_of(sink, OWNER, "After the bounces")
        assert not [m for _f, m in mail_to(sink, BOB) if "After the" in str(m["Subject"])]

        # bob answers the probe: delivery resumes, with his signed return path again.
        gw.send(BOB, confirm, post(BOB, confirm, "Re: disabled", "Still here!\n"))
        wait_until(lambda: member(store).enabled is True,  # type: ignore[union-attr]
                   what="bob to be enabled")
        settle(store)
        gw.send(OWNER, LIST, post(OWNER, LIST, "Welcome back"))
        assert copy_of(sink, BOB, "Welcome back")[0] == verp_of(config_path)
    # Nothing ever went back to a bounce's sender (the null return path, MAILER-DAEMON).
    assert not mail_to(sink, "MAILER-DAEMON@mx.example.net")
    assert {r for r, _d in sink.handler.copies()} == {OWNER, BOB, CAROL}


def test_bounces_probe_answered_enables_delivery_again(
        config_path: Path, store: Store, sink: Sink) -> None:
    clock = ManualClock(START)
    bounce_days(store, clock, 5)
    assert member(store).enabled is False  # type: ignore[union-attr]
    with running(config_path, clock) as gw:
        [(_, notice)] = wait_for_mail(sink, BOB)
        confirm = str(notice["Reply-To"])
        # Someone else answering changes nothing.
        gw.send(CAROL, confirm, post(CAROL, confirm, "Re: disabled", "I am bob, honest.\n"))
        wait_until(lambda: ("confirm-refused", f"{CAROL} is not the member this probe was "
                                               "sent to") in journal_events(store, "confirm"),
                   what="the forged answer to be refused")
        assert member(store).enabled is False  # type: ignore[union-attr]

        gw.send(BOB, confirm, post(BOB, confirm, "Re: disabled", "Still here!\n"))
        wait_until(lambda: member(store).enabled is True,  # type: ignore[union-attr]
                   what="bob to be enabled")
        bob = member(store)
        assert bob is not None and bob.bounce_score == 0 and bob.disabled_at is None
        [_, (_, thanks)] = wait_for_mail(sink, BOB, 2)
        assert "enabled again" in str(thanks["Subject"])
        # The probe's token is spent: a second answer does nothing more.
        gw.send(BOB, confirm, post(BOB, confirm, "Re: disabled", "Again!\n"))
        wait_until(lambda: sum(1 for e, d in journal_events(store, "confirm")
                               if "already answered" in d) == 1, what="the second answer")
    assert ("bounce-enabled", f"{BOB}: delivery enabled, bounce score cleared "
            f"({BOB} answered a probe)") in journal_events(store)


def test_bounces_probe_that_bounces_hard_removes_the_member(
        config_path: Path, store: Store, sink: Sink) -> None:
    clock = ManualClock(START)
    bounce_days(store, clock, 5)
    with running(config_path, clock) as gw:
        [(envelope, _notice)] = wait_for_mail(sink, BOB)
        # A late bounce of an earlier post to bob's VERP address removes nobody ...
        bob_verp = verp_of(config_path)
        send_bounce(gw, bob_verp, dsn(BOB, to=bob_verp))
        drain(store)
        assert member(store) is not None
        assert events(store)[-1] == (True, "verp", False)
        # ... a delay warning about the probe neither ...
        send_bounce(gw, envelope, dsn(BOB, action="delayed", status="4.4.1", to=envelope))
        drain(store)
        assert member(store) is not None
        # ... but the probe's own hard bounce does, at once.
        send_bounce(gw, envelope, dsn(BOB, to=envelope))
        drain(store)
        assert member(store) is None
        assert events(store)[-1] == (True, "probe", False)
        owners = wait_for_mail(sink, OWNER, 2)
        assert str(owners[-1][1]["Subject"]) == f"{LIST}: {BOB} removed (bounces)"
        assert "the probe sent to bob@example.net bounced" in text_of(owners[-1][1])
    assert len(mail_to(sink, BOB)) == 1  # the probe, and nothing after


def test_bounces_smtp_refusals_are_counted_by_the_daemons_sweep(
        config_path: Path, config: Config, store: Store, sink: Sink) -> None:
    clock = ManualClock(START)
    sink.handler.rcpt_replies[BOB] = "550 5.1.1 <bob@example.net>: no such user"
    sink.handler.rcpt_replies[CAROL] = "452 4.2.2 mailbox full"
    with running(config_path, clock, sweep_interval=0.2) as gw:
        gw.send(OWNER, LIST, post(OWNER, LIST, "Hello all"))
        wait_until(lambda: events(store) == [(True, "smtp", True)], what="bob's refusal")
        assert member(store).bounce_score == 1.0  # type: ignore[union-attr]
        assert count(store, delivery_failures, delivery_failures.c.processed.is_(False)) == 0
        stage(store, config, clock).sweep()  # processed once only
        assert len(events(store)) == 1
    # A temporary refusal (retried by delivery) is no bounce.
    assert events(store, CAROL) == []


# -- the same, on the store: counting rules ------------------------------------------------------

def test_bounces_count_once_a_day_and_start_over_when_stale(config_path: Path,
                                                            store: Store) -> None:
    clock = ManualClock(START)
    templates = Templates(load_templates_root())

    def bounce(permanent: bool = True) -> float:
        with store.write() as conn:
            record(conn, the_list(store), BOB, permanent=permanent, source="dsn",
                   detail="test", now=clock.now(), settings=SETTINGS, templates=templates)
        bob = member(store)
        assert bob is not None
        return bob.bounce_score

    assert bounce() == 1.0
    clock.advance(3600)
    assert bounce() == 1.0  # the same day: recorded, not counted
    assert bounce(permanent=False) == 1.0
    clock.advance(DAY)
    assert bounce(permanent=False) == 1.5  # soft: half a point
    clock.advance(SETTINGS.stale_after + 1)
    assert bounce() == 1.0  # the last bounce was too long ago: from 0 again
    assert events(store) == [(True, "dsn", True), (True, "dsn", False), (False, "dsn", False),
                             (False, "dsn", True), (True, "dsn", True)]
    assert [e for e, _d in journal_events(store)] == [
        "bounce", "bounce-uncounted", "bounce-uncounted", "bounce", "bounce"]
    # A bounce for someone who is no member changes nothing.
    with store.write() as conn:
        record(conn, the_list(store), "nobody@example.net", permanent=True, source="dsn",
               detail="test", now=clock.now(), settings=SETTINGS, templates=templates)
    assert events(store, "nobody@example.net") == []


def test_bounces_silent_member_is_probed_every_interval_then_removed(
        store: Store, config: Config) -> None:
    clock = ManualClock(START)
    bounce_days(store, clock, 5)
    disabled_at = START + 4 * DAY
    bounces = stage(store, config, clock)

    def probes() -> int:
        with store.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(tokens_table())
                                    .where(tokens_table().c.kind == "probe")).scalar_one())

    assert probes() == 1
    clock.advance(disabled_at + 7 * DAY - clock.now() - 60)
    bounces.sweep()
    assert probes() == 1  # not yet a week
    for week in (1, 2):
        clock.advance(DAY)
        bounces.sweep()
        bounces.sweep()  # once per interval, however often the sweep runs
        assert probes() == 1 + week
        assert member(store).probe_sent_at == clock.now()  # type: ignore[union-attr]
        clock.advance(6 * DAY)
    clock.advance(disabled_at + SETTINGS.remove_after - clock.now())
    bounces.sweep()
    assert member(store) is None
    assert probes() == 3  # removed, not probed a fourth time
    [(_event, detail)] = [e for e in journal_events(store) if e[0] == "bounce-removed"]
    assert "no answer to 3 probe(s)" in detail
    with store.read() as conn:
        rows = conn.execute(sa.select(outbound.c.recipients, outbound.c.envelope_from)
                            .order_by(outbound.c.id)).all()
    # Three probes to bob, each from its own probe address; two notices to the owner.
    to_bob = [r.envelope_from for r in rows if r.recipients == BOB]
    assert len(to_bob) == 3 and len(set(to_bob)) == 3
    assert all(re.fullmatch(r"discuss-bounces\+[a-z2-7]{32}@example\.org", e) for e in to_bob)
    assert [r.recipients for r in rows if r.recipients != BOB] == [OWNER, OWNER]


def tokens_table() -> sa.Table:
    from gateway.schema import tokens as table
    return table


@SQLITE_ONLY
def test_bounces_reset_by_cli_and_listing(config_path: Path, store: Store) -> None:
    clock = ManualClock(START)
    bounce_days(store, clock, 5)
    bounce_days(store, clock, 1, address=CAROL)

    def cli(*args: str) -> str:
        result = CliRunner().invoke(cli_main, ["--config", str(config_path), *args],
                                    env={"COLUMNS": "250", "LISTGATE_CONFIG": None})
        assert result.exit_code == 0, result.output
        return result.stdout

    listing = cli("bounces", "ls", LIST)
    assert re.search(rf"{re.escape(BOB)}\W.*\W5\W.*\Wdisabled\W", listing), listing
    assert re.search(rf"{re.escape(CAROL)}\W.*\W1\W.*\Wenabled\W", listing), listing
    assert OWNER not in listing and "2 member(s)" in listing
    shown = cli("bounces", "show", LIST, BOB)
    assert shown.count("verp") == 5 and "5 bounce(s)" in shown
    assert "enabled, bounce score cleared" in cli("bounces", "reset", LIST, BOB.upper())
    bob = member(store)
    assert bob is not None and bob.enabled and bob.bounce_score == 0
    # The probe already sent is spent: answering it now does nothing.
    with store.read() as conn:
        expired = conn.execute(sa.select(tokens_table().c.expires_at)).scalars().all()
    assert expired and all(e <= START + 10 * DAY for e in expired)
    result = CliRunner().invoke(cli_main, ["--config", str(config_path), "bounces", "reset",
                                           LIST, "nobody@example.net"], env={"COLUMNS": "250"})
    assert result.exit_code == 1


# -- what is no bounce --------------------------------------------------------------------------

def manifest(kinds: set[str]) -> list[str]:
    path = CORPUS / "bounces" / "MANIFEST.tsv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [r["file"] for r in csv.DictReader(f, delimiter="\t")
                if r["expected_kind"] in kinds]


@SQLITE_ONLY
def test_bounces_delay_warnings_and_auto_replies_count_for_nothing(
        corpus: Path, config_path: Path, store: Store, sink: Sink) -> None:
    # Delay warnings (DSN "Action: delayed", "will keep trying" notices), vacation
    # messages and challenge/response mail, sent to bob's VERP address.
    files = manifest({"temporary", "not-a-bounce"})
    assert len(files) >= 15
    bob_verp = verp_of(config_path)
    with running(config_path, ManualClock(START)) as gw:
        with gw.smtp() as client:
            for name in files:
                client.sendmail("", [bob_verp], as_sent((corpus / "bounces" / name).read_bytes()))
        drain(store)
    assert events(store) == []
    ignored = [d for e, d in journal_events(store) if e == "bounce-ignored"]
    assert len(ignored) == len(files)
    assert sum("delay warning" in d for d in ignored) >= 11
    assert count(store, outbound) == 0 and sink.handler.count() == 0


# "Action: failed" with a 4.x.x status: the far end gave up on a temporary failure.
SOFT_FAILURES = {"flufl__dsn_02.txt.eml"}


@pytest.mark.parametrize("name", [n for n in manifest({"permanent"}) if n not in SOFT_FAILURES]
                         or [pytest.param("", marks=pytest.mark.skip(reason=NO_CORPUS))])
def test_bounces_real_hard_bounces_to_a_verp_address_count_hard(name: str) -> None:
    raw = (CORPUS / "bounces" / name).read_bytes()
    assert read_report(raw, parse_bounce(raw), member=BOB) == Finding(((BOB, True),))


def test_bounces_a_temporary_failure_given_up_on_counts_soft(corpus: Path) -> None:
    for name in SOFT_FAILURES:
        raw = (corpus / "bounces" / name).read_bytes()
        assert read_report(raw, parse_bounce(raw), member=BOB) == Finding(((BOB, False),))
        # Sent to the plain -bounces address, the addresses it names are the ones.
        report = parse_bounce(raw)
        assert read_report(raw, report, member=None) == Finding(
            tuple((a, False) for a in sorted(report.temporary)))


# -- junk, and no backscatter -------------------------------------------------------------------

ORIGINATORS = re.compile(rb"(?im)^(?:from|sender|reply-to|return-path)[ \t]*:(.*)$")
EMAIL = re.compile(rb"[\w.+=-]+@[\w.-]+\w")


# Robustness does not depend on the database, and 500 messages take a while.
@SQLITE_ONLY
def test_bounces_every_corpus_file_over_smtp_without_a_crash_or_backscatter(
        corpus: Path, config_path: Path, config: Config, store: Store, sink: Sink) -> None:
    with open(corpus / "bounces" / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with open(corpus / "odd" / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        odd = [corpus / "odd" / r["file"] for r in csv.DictReader(f, delimiter="\t")]
    # Everyone the bounces name is a member; even so, only those that came to bob's
    # signed return path are attributed (to him), and those to -bounces@ to nobody.
    named = {a for r in rows for a in re.findall(r"[^\s,;<>]+@[^\s,;<>]+", r["expected"])}
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        lists.add_members(conn, lst, [(a, "", Mode.REGULAR) for a in named if valid(a)],
                          now=0.0)
    files = [corpus / "bounces" / r["file"] for r in rows] + odd
    # Whoever wrote or sent one of these messages: nothing may go to them.
    senders = {"someone@sender.example"}
    for path in files:
        for line in ORIGINATORS.findall(path.read_bytes()[:20000]):
            senders.update(a.decode("latin-1").lower() for a in EMAIL.findall(line))
    refused = 0
    bob_verp = verp_of(config_path)
    with running(config_path, ManualClock(START)) as gw:
        # The daemon reads them as they come in.
        with gw.smtp() as client:
            for i, path in enumerate(files):
                # Bounces come from the null sender, the odd files from a person; half
                # of them go to a member's VERP address.
                mail_from = "" if i < len(rows) else "someone@sender.example"
                to = bob_verp if i % 2 else BOUNCES_ADDRESS
                try:
                    client.sendmail(mail_from, [to], as_sent(path.read_bytes()))
                except smtplib.SMTPResponseException:
                    refused += 1  # an empty file: 554, says the intake's own test
                    client.rset()
        drain(store)
        stage(store, config, ManualClock(START)).sweep()
    accepted = len(files) - refused
    with store.read() as conn:
        parked = conn.execute(sa.select(sa.func.count()).select_from(work)
                              .where(work.c.state == State.PARKED.value)).scalar_one()
        ends = conn.execute(sa.select(journal.c.message_id).where(
            journal.c.stage == "bounces").distinct()).scalars().all()
        taken = conn.execute(sa.select(sa.func.count()).select_from(messages)).scalar_one()
        recipients = {a for r in conn.execute(sa.select(outbound.c.recipients)).scalars()
                      for a in r.split("\n")}
    assert refused <= 2 and taken == accepted and parked == 0
    assert len(ends) == accepted  # every message read, and the journal says how
    # Bounces to bob's return path were attributed to him, and to nobody else ...
    assert len(events_by_source(store)) > 50
    assert set(events_by_source(store)) == {"verp"} and len(events(store)) > 50
    unverified = [d for e, d in journal_events(store) if e == "bounce-unverified"]
    assert len(unverified) > 50 and all("plain -bounces" in d for d in unverified)
    # ... yet one day of bounces disables nobody, so nobody gets mail at all, least of all
    # anyone who sent one of these messages.
    assert recipients == set() and sink.handler.count() == 0
    assert not {r for r, _d in sink.handler.copies()} & senders


def valid(address: str) -> bool:
    from gateway import addresses
    from gateway.errors import AddressError
    try:
        addresses.normalise(address)
    except AddressError:
        return False
    return True


def events_by_source(store: Store) -> list[str]:
    with store.read() as conn:
        return list(conn.execute(sa.select(bounce_events.c.source)).scalars())


# -- forged and unreadable bounces change nothing ------------------------------------------------

MALLORY = "mallory@evil.example"
# A real, if malformed, failure notice among the corpus's odd messages.
ODD_BOUNCES = {"mime4j__mimetools-testmsgs__badbound.msg.eml"}


def unreadable() -> list[bytes]:
    """Messages no one can read as a failure notice: junk, and broken MIME."""
    nested = (b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
              b"\r\n" + b'--B\r\nContent-Type: multipart/mixed; boundary="B"\r\n\r\n' * 500)
    made = [
        b"\x00\xff\xfe\x00 not mail at all \x00\r\n\r\n\x00\x01\x02",
        b"Subject: \xff\xfe\xfd\r\nContent-Type: text/plain; charset=x-unknown\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!! not base64 @@@@\r\n",
        nested,
    ]
    path = CORPUS / "odd" / "MANIFEST.tsv"
    if not path.is_file():
        return made
    with open(path, newline="", encoding="utf-8") as f:
        broken = [CORPUS / "odd" / r["file"] for r in csv.DictReader(f, delimiter="\t")
                  if r["defects"] and r["content_type"] != "multipart/report"
                  and r["file"] not in ODD_BOUNCES]
    return made + [p.read_bytes() for p in broken]


@SQLITE_ONLY
def test_bounces_foreign_forged_and_unreadable_bounces_change_nothing(
        config_path: Path, store: Store, sink: Sink) -> None:
    # Return paths as the daemon signs them (here, as if mallory had once been a member).
    mallory_verp, bob_verp = verp_of(config_path, MALLORY), verp_of(config_path)
    guessed = verp_encode("discuss", "example.org", MALLORY)
    forged: list[tuple[str, str, bytes]] = [
        # A hard bounce for someone who is not on the list, at their VERP address ...
        ("", mallory_verp, dsn(MALLORY, to=mallory_verp)),
        ("", guessed, dsn(MALLORY, to=guessed)),
        # ... and at the plain -bounces address.
        ("", BOUNCES_ADDRESS, dsn(MALLORY)),
        # A report of bob's mail that says it was delivered.
        ("", bob_verp, dsn(BOB, action="delivered", status="2.0.0", to=bob_verp)),
        ("", bob_verp, dsn(BOB, action="relayed", status="2.0.0", to=bob_verp)),
        # A person writing to bob's VERP address (or to -bounces) asking for him to go.
        (MALLORY, bob_verp, post(MALLORY, bob_verp, "unsubscribe",
                                 "Please remove bob@example.net from the list.\n")),
        (MALLORY, BOUNCES_ADDRESS, post(MALLORY, BOUNCES_ADDRESS, "remove bob@example.net")),
    ]
    junk = [("", bob_verp if i % 2 else BOUNCES_ADDRESS, raw)
            for i, raw in enumerate(unreadable())]
    with running(config_path, ManualClock(START)) as gw, gw.smtp() as client:
        for mail_from, to, raw in forged + junk:
            client.sendmail(mail_from, [to], as_sent(raw))
        drain(store)
    # Nobody's score moved, and nothing was recorded against anyone ...
    assert count(store, bounce_events) == 0
    for address in MEMBERS:
        m = member(store, address)
        assert m is not None and m.enabled and m.bounce_score == 0 and m.bounce_last_at is None
    # ... every message was read and the journal says why it counted for nothing ...
    outcomes = [e for e, _d in journal_events(store)]
    assert len(outcomes) == len(forged) + len(junk)
    assert set(outcomes) <= {"bounce-ignored", "bounce-unattributed", "bounce-unverified"}
    assert count(store, work) == 0
    # ... and nobody got an answer: not the forger, not the list's owner, not bob.
    assert count(store, outbound) == 0 and sink.handler.count() == 0


def test_bounces_a_guessed_probe_return_path_removes_nobody(
        config_path: Path, store: Store, sink: Sink) -> None:
    """Only a probe's real token makes a hard bounce remove a member at once; a
    bounce to a made-up one is not even recorded against the member it names."""
    clock = ManualClock(START)
    bounce_days(store, clock, 5)
    made_up = "discuss-bounces+" + "a" * 32 + "@example.org"
    with running(config_path, clock) as gw:
        [(probe_from, _notice)] = wait_for_mail(sink, BOB)
        assert probe_from != made_up
        send_bounce(gw, made_up, dsn(BOB, to=made_up))
        drain(store)
    bob = member(store)
    assert bob is not None and not bob.enabled
    assert events(store) == [(True, "verp", True)] * 5  # bounce_days's, and no more
    assert [e for e, _d in journal_events(store, "bounce-")] == [
        "bounce-disabled", "bounce-unverified"]
    assert len(mail_to(sink, OWNER)) == 1  # "disabled", and no "removed"


def flipped(tag: str) -> str:
    return ("b" if tag[0] == "a" else "a") + tag[1:]


def test_bounces_forged_to_guessable_or_wrongly_tagged_return_paths_change_nothing(
        config_path: Path, store: Store, sink: Sink) -> None:
    """Mailman counts a bounce sent to LIST-bounces+bob=example.net@, which anyone can
    write: five days of those disable bob there. Here, day after day of forged hard
    bounces to every return path a forger can make up count for nothing, while one
    real bounce to bob's real return path (read from his copy) counts."""
    clock = ManualClock(START)
    other_key = LinkSigner(b"a key that is not the daemon's!!")
    with running(config_path, clock) as gw:
        gw.send(OWNER, LIST, post(OWNER, LIST, "Hello"))
        real, copy = copy_of(sink, BOB, "Hello")
        assert TAGGED.fullmatch(real), real
        tag = real.rpartition("@")[0].rpartition("+")[2]
        carol_tag = verp_of(config_path, CAROL).rpartition("@")[0].rpartition("+")[2]
        made_up = [
            GUESSABLE_BOB_VERP,  # Mailman's form
            real.replace(tag, flipped(tag)),  # one character of the tag changed
            real.replace(f"+{tag}", f"+{tag[:-1]}"),  # cut short
            real.replace(tag, carol_tag),  # carol's tag on bob's address
            signed_verp("discuss", "example.org", BOB, other_key),  # another key
            "discuss-bounces+" + "a" * 32 + "@example.org",  # a made-up probe
            "discuss-bounces+remove-bob@example.org",
            BOUNCES_ADDRESS,  # the plain address, naming bob
        ]
        assert real not in made_up
        settle(store)
        for day in range(6):
            for to in made_up:
                send_bounce(gw, to, dsn(BOB, to=to, original=copy))
            drain(store)
            assert count(store, bounce_events) == 0, day
            bob = member(store)
            assert bob is not None and bob.enabled and bob.bounce_score == 0
            settle(store)
            clock.advance(DAY)
        unverified = [d for e, d in journal_events(store) if e == "bounce-unverified"]
        assert len(unverified) == 6 * len(made_up)
        assert all("counted against nobody" in d for d in unverified)
        assert sum("carries no tag" in d for d in unverified) == 6
        assert sum("not the one we gave" in d for d in unverified) == 6 * 4
        # Nobody was told anything: not bob, not the owner, not the forger.
        assert [m["Subject"] for _f, m in mail_to(sink, BOB)] == ["[Discuss] Hello"]
        assert len(mail_to(sink, OWNER)) == 1

        # The real return path still works: the test above could fail.
        send_bounce(gw, real, dsn(BOB, to=real, original=copy))
        wait_until(lambda: events(store) == [(True, "verp", True)], what="the real bounce")
        assert member(store).bounce_score == 1.0  # type: ignore[union-attr]


def test_bounces_of_a_list_without_personal_copies_are_read_at_the_plain_address(
        config_path: Path, store: Store, sink: Sink) -> None:
    """With personalisation off, copies go out from the plain -bounces address (one
    copy for many members), so a report there is believed, as Mailman does; the
    member is scored, and a report naming a stranger still counts for nobody."""
    with store.write() as conn:
        lists.update(conn, the_list(store), personalize=False)
    clock = ManualClock(START)
    with running(config_path, clock) as gw:
        gw.send(OWNER, LIST, post(OWNER, LIST, "Hello"))
        envelope_from, copy = copy_of(sink, BOB, "Hello")
        assert envelope_from == BOUNCES_ADDRESS
        send_bounce(gw, BOUNCES_ADDRESS, dsn(BOB, original=copy))
        wait_until(lambda: events(store) == [(True, "dsn", True)], what="bob's bounce counted")
        send_bounce(gw, BOUNCES_ADDRESS, dsn("stranger@example.net", original=copy))
        drain(store)
    assert member(store).bounce_score == 1.0  # type: ignore[union-attr]
    assert [e for e, _d in journal_events(store) if e == "bounce-unattributed"] == \
        ["bounce-unattributed"]
    assert count(store, bounce_events) == 1
