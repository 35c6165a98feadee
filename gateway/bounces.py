"""The bounces stage: delivery reports and the smarthost's refusals become members' bounce scores.

Scoring is GNU Mailman's. A bounce is attributed to a member of the list — by the
signed VERP address it came back to, by the probe token of its return path, or by the
smarthost refusing a recipient with a 5xx — and a member's score rises by 1 for a hard
(permanent) bounce and by 0.5 for a soft one, at most once a day. A score whose last
bounce is older than ``stale_after`` starts again from 0. At ``threshold`` delivery to
the member is disabled, the member gets a notice that is also the first probe (reply
to stay subscribed), and the owners are told. A further probe goes every
``probe_interval``; a member who answers one is enabled again with a clean score; one
whose probe bounces hard, or who stays silent for ``remove_after``, is removed and the
owners are told.

Only what a forger cannot write counts against a member. Unlike Mailman, which
counts any report that names a member, this stage counts a report only when it came
back to a return path that we made for that member: the signed VERP address
``LIST-bounces+bob=example.net+TAG@`` (TAG an HMAC of the list's and the member's
addresses under the installation's key, gateway.dsn.signed_verp), or a probe's
``LIST-bounces+TOKEN@`` (a random token, stored). A report to the plain
``LIST-bounces@``, to an untagged or wrongly tagged VERP address, or to any other
detail is read and journalled as ``bounce-unverified`` and counts against nobody:
whoever sent it chose the addresses it names. Genuine bounces still count because
every personalised copy goes out from its member's signed return path.

The exception is a list with personalisation off (``listgate lists set LIST
--personalize off``): its posts go out from the plain address, one copy for up to a
hundred members, so a report there is believed as Mailman believes it, and a forger
who knows a member's address can get them disabled (the member is probed before
anything is removed, and a probe's token cannot be forged). Not scored: late bounces
of personalised lists' mail that went out from the plain address (notices; members
whose signed return path would pass RFC 5321's 64 octets; no web endpoint); for those
only the smarthost's own refusals count.

What is no bounce at all: auto-replies and challenge/response mail (the report
parser says so), and warnings that delivery is merely delayed. Nothing here ever
writes to a bounce's sender: the only mail is probes to members and notices to owners.

A probe goes out from ``LIST-bounces+TOKEN@`` (Mailman's probe VERP), TOKEN being the
probe's own token, so a bounce of the probe is told apart from a late bounce of an
earlier post: only the former removes a member at once.
"""

from __future__ import annotations

import datetime
import enum
import logging
import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from gateway import journal, lists, outgoing, queue, tokens
from gateway.clock import Clock
from gateway.config import BouncesConfig
from gateway.dsn import BounceReport, parse_bounce, verp_parse, verp_verified
from gateway.errors import LeaseLost
from gateway.lists import MailingList, Member
from gateway.notices import Notice, compose
from gateway.notices import queue as queue_notice
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.rowstage import RowStage
from gateway.schema import RoleName, bounce_events, delivery_failures, members, messages, work
from gateway.schema import tokens as tokens_table
from gateway.signing import LinkSigner
from gateway.store import Store
from gateway.templates import Templates
from gateway.worker import Progress

log = logging.getLogger(__name__)

HARD = 1.0
SOFT = 0.5
DAY = 86400.0
# A report naming more addresses than this is not about our members one by one.
MAX_ADDRESSES = 100
SWEEP_BATCH = 200  # rows per transaction in the periodic sweep
EVENTS_SHOWN = 10  # recent bounces quoted in an owner's notice

_TOKEN = re.compile(r"[A-Za-z2-7]{32}")
# Delay warnings: a DSN whose every recipient is "delayed" (none "failed"), or a
# non-standard notice that says the far end keeps trying. Read from the start of the
# message only: the notice comes first.
_SCAN = 64 * 1024
_ACTION = re.compile(rb"(?im)^[ \t]*action[ \t]*:[ \t]*([a-z]+)")
_STILL_TRYING = re.compile(
    rb"(?i)\b(?:delayed|delay|not yet been delivered|will continue|will keep trying|"
    rb"will (?:be )?retr(?:y|ied)|continue to (?:try|attempt)|attempts will continue|"
    rb"warning|postponed|no action is required|(?:do )?not (?:need to )?resend)\b")


class Source(enum.StrEnum):
    """Where a bounce was learnt (bounce_events.source)."""

    DSN = "dsn"      # addresses named by a report sent to LIST-bounces@ (no longer counted)
    VERP = "verp"    # a report sent to LIST-bounces+member=domain+TAG@
    SMTP = "smtp"    # the smarthost refused the recipient (delivery_failures)
    PROBE = "probe"  # a report, or a refusal, of a probe


@dataclass(frozen=True)
class Finding:
    """What a received message says: who bounced and how, or why it is no bounce."""

    bounced: tuple[tuple[str, bool], ...]  # (normalised address, permanent)
    ignored: str | None = None


def read_report(raw: bytes, report: BounceReport, *, member: str | None) -> Finding:
    """The bounces in a report; ``member`` is who the return path (VERP or probe) names.

    As Mailman does, a report that came back to a member's own return path is about
    that member whatever addresses it names (the far end may report an alias it
    forwarded to), and counts as hard when nothing says otherwise.
    """
    if not report.is_bounce:
        return Finding((), f"not a bounce: {report.reason}")
    # Only what names no permanent failure can be a warning (a notice naming nobody too).
    if not report.permanent and _delay_warning(raw):
        return Finding((), f"a delay warning, not a bounce: {report.reason}")
    if member is not None:
        soft = member in report.temporary or bool(report.temporary and not report.permanent)
        return Finding(((member, member in report.permanent or not soft),))
    found = [(a, True) for a in sorted(report.permanent)]
    found += [(a, False) for a in sorted(report.temporary - report.permanent)]
    return Finding(tuple(found[:MAX_ADDRESSES]))


def _delay_warning(raw: bytes) -> bool:
    head = raw[:_SCAN]
    actions = {m.group(1).lower() for m in _ACTION.finditer(head)}
    if actions:
        return not any(a.startswith((b"fail", b"error")) for a in actions)
    return bool(_STILL_TRYING.search(head))


# -- scoring --------------------------------------------------------------------------


def record(conn: Connection, lst: MailingList, address: str, *, permanent: bool, source: str,
           detail: str, now: float, settings: BouncesConfig, templates: Templates,
           message_id: int | None = None) -> None:
    """One bounce of one member: an event, a journal line, the score; maybe disable or remove.

    Nothing happens for an address that is not a member of ``lst``.
    """
    # Locked: two gateways scoring the same member must not both read the old score.
    row = conn.execute(sa.select(members).where(members.c.list_id == lst.id,
                                                members.c.address == address)
                       .with_for_update()).first()
    if row is None:
        return
    member = Member.from_row(row)
    kind = "hard" if permanent else "soft"
    what = f"{address}: {kind} bounce ({source})"

    if _disabled(member):
        _event(conn, lst, address, now, permanent, source, False, detail)
        if permanent and source == Source.PROBE:
            _remove(conn, lst, member, now=now, settings=settings, templates=templates,
                    message_id=message_id, why=f"the probe sent to {address} bounced: {detail}")
        else:
            _journal(conn, lst, now, "bounce-uncounted", message_id,
                     f"{what} while delivery is disabled, not counted: {detail}")
        return

    score = member.bounce_score
    last = member.bounce_last_at
    stale = last is not None and now - last > settings.stale_after
    if stale:
        score = 0.0
    counted = last is None or stale or _day(now) != _day(last)
    _event(conn, lst, address, now, permanent, source, counted, detail)
    if not counted:
        _journal(conn, lst, now, "bounce-uncounted", message_id,
                 f"{what} not counted: one bounce a day counts, and {address} already "
                 f"bounced today (score {score:g}): {detail}")
        return
    score += HARD if permanent else SOFT
    conn.execute(sa.update(members).where(members.c.id == member.id)
                 .values(bounce_score=score, bounce_last_at=now))
    restart = " (the old score was stale and started over)" if stale and member.bounce_score else ""
    _journal(conn, lst, now, "bounce", message_id,
             f"{what} counted: score {score:g} of {settings.threshold:g}{restart}: {detail}")
    if score >= settings.threshold:
        _disable(conn, lst, member, score=score, now=now, settings=settings,
                 templates=templates, message_id=message_id)


def _disabled(member: Member) -> bool:
    return not member.enabled and member.disabled_at is not None


def _day(ts: float) -> int:
    """The UTC calendar day: Mailman counts one bounce per date, not per 24 hours."""
    return int(ts // DAY)


def _event(conn: Connection, lst: MailingList, address: str, now: float, permanent: bool,
           source: str, counted: bool, detail: str) -> None:
    conn.execute(bounce_events.insert().values(
        at=now, list_id=lst.id, address=address, permanent=permanent, source=str(source)[:8],
        counted=counted, detail=detail[:2000]))


def _journal(conn: Connection, lst: MailingList, now: float, event: str,
             message_id: int | None, detail: str, log_message_id: str | None = None) -> None:
    journal.record(conn, now=now, stage=Stage.BOUNCES, event=event, message_id=message_id,
                   list_id=lst.id, detail=detail, log_message_id=log_message_id)


def _disable(conn: Connection, lst: MailingList, member: Member, *, score: float, now: float,
             settings: BouncesConfig, templates: Templates, message_id: int | None) -> None:
    reason = f"bounces: score {score:g} reached the threshold {settings.threshold:g}"
    conn.execute(sa.update(members).where(members.c.id == member.id).values(
        enabled=False, disabled_at=now, disabled_reason=reason[:200], probe_sent_at=now))
    _send_probe(conn, lst, member.address, disabled_at=now, now=now, settings=settings,
                templates=templates, message_id=message_id, reminder=False)
    _tell_owners(conn, lst, "disabled", member.address, now=now, settings=settings,
                 templates=templates, message_id=message_id, why=reason, disabled_at=now)
    _journal(conn, lst, now, "bounce-disabled", message_id,
             f"{member.address}: delivery disabled ({reason}); probe sent, owners told")


def _send_probe(conn: Connection, lst: MailingList, address: str, *, disabled_at: float,
                now: float, settings: BouncesConfig, templates: Templates,
                message_id: int | None, reminder: bool) -> None:
    """The notice that delivery is disabled, which asks for a reply: a probe."""
    token = tokens.issue(conn, tokens.Kind.PROBE, list_id=lst.id, address=address, now=now,
                         ttl=max(1.0, float(settings.remove_after)))
    confirm = lst.identity.address(f"confirm+{token}")
    text = templates.render(
        "notices/bounce-disabled.txt.j2", list_address=lst.address, mailing_list=lst.identity,
        address=address, confirm_address=confirm, reminder=reminder,
        disabled=_date(disabled_at), removal=_date(disabled_at + settings.remove_after))
    subject = (f"Still there? Delivery from {lst.address} to you is disabled" if reminder
               else f"Delivery from {lst.address} to you is disabled: your mail bounced")
    data = compose(Notice(to=address, subject=subject, text=text, reply_to=confirm),
                   lst.identity, now=now, auto_submitted="auto-generated")
    outgoing.send(conn, data, envelope_from=lst.identity.address(f"bounces+{token}"),
                  recipients=[address], kind=outgoing.Kind.NOTICE, list_id=lst.id,
                  message_id=message_id, now=now)


def _tell_owners(conn: Connection, lst: MailingList, event: str, address: str, *, now: float,
                 settings: BouncesConfig, templates: Templates, message_id: int | None,
                 why: str, disabled_at: float | None) -> None:
    owners = lists.role_holders(conn, lst.id, RoleName.OWNER)
    if not owners:
        log.warning("%s: %s %s for bounces, and the list has no owner to tell",
                    lst.address, address, event)
        return
    recent = conn.execute(
        sa.select(bounce_events).where(bounce_events.c.list_id == lst.id,
                                       bounce_events.c.address == address)
        .order_by(bounce_events.c.id.desc()).limit(EVENTS_SHOWN)).all()
    text = templates.render(
        "notices/bounce-owner.txt.j2", list_address=lst.address, mailing_list=lst.identity,
        event=event, address=address, why=why,
        disabled=_date(disabled_at) if disabled_at is not None else "",
        removal=(_date(disabled_at + settings.remove_after)
                 if disabled_at is not None else ""),
        events=[{"at": _date(e.at), "kind": "hard" if e.permanent else "soft",
                 "source": e.source, "counted": e.counted, "detail": e.detail[:200]}
                for e in reversed(recent)])
    what = "delivery disabled" if event == "disabled" else "removed"
    queue_notice(conn, Notice(to=lst.identity.address("owner"),
                              subject=f"{lst.address}: {address} {what} (bounces)", text=text),
                 lst.identity, list_id=lst.id, message_id=message_id, now=now,
                 recipients=owners)


def _remove(conn: Connection, lst: MailingList, member: Member, *, now: float,
            settings: BouncesConfig, templates: Templates, message_id: int | None,
            why: str) -> None:
    conn.execute(sa.delete(members).where(members.c.id == member.id))
    _revoke_probes(conn, lst, member.address, now)
    _tell_owners(conn, lst, "removed", member.address, now=now, settings=settings,
                 templates=templates, message_id=message_id, why=why,
                 disabled_at=member.disabled_at)
    _journal(conn, lst, now, "bounce-removed", message_id,
             f"{member.address}: removed from {lst.address}: {why}; owners told")


def _revoke_probes(conn: Connection, lst: MailingList, address: str, now: float) -> None:
    """Outstanding probes of this member expire: their question has been settled."""
    t = tokens_table.c
    conn.execute(sa.update(tokens_table).where(
        t.list_id == lst.id, t.address == address, t.kind == tokens.Kind.PROBE.value,
        t.used_at.is_(None), t.expires_at > now).values(expires_at=now))


def _date(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- enabling again -------------------------------------------------------------------


def reenable(conn: Connection, lst: MailingList, address: str, *, now: float, by: str,
             message_id: int | None = None) -> bool:
    """Deliver to the member again, with a clean score. False if not a member."""
    result = conn.execute(sa.update(members).where(
        members.c.list_id == lst.id, members.c.address == address).values(
        enabled=True, bounce_score=0.0, bounce_last_at=None, disabled_at=None,
        disabled_reason=None, probe_sent_at=None))
    if result.rowcount == 0:
        return False
    _revoke_probes(conn, lst, address, now)
    _journal(conn, lst, now, "bounce-enabled", message_id,
             f"{address}: delivery enabled, bounce score cleared ({by})")
    return True


def answered(conn: Connection, lst: MailingList, token: tokens.Token, *, by: str, now: float,
             templates: Templates, message_id: int | None) -> str:
    """A member replied to a probe: they are there, so delivery resumes. What happened."""
    if not tokens.consume(conn, token, by=by, now=now):
        return f"{token.address}: that probe was already answered, or has expired"
    member = lists.find_member(conn, lst.id, [token.address])
    if member is None:
        return f"{token.address} is no longer a member of {lst.address}"
    was_disabled = _disabled(member)
    reenable(conn, lst, token.address, now=now, by=f"{by} answered a probe",
             message_id=message_id)
    if not was_disabled:
        return f"{token.address} answered a probe; delivery was not disabled (score cleared)"
    text = templates.render("notices/bounce-enabled.txt.j2", list_address=lst.address,
                            mailing_list=lst.identity, address=token.address)
    queue_notice(conn, Notice(to=token.address,
                              subject=f"Delivery from {lst.address} to you is enabled again",
                              text=text),
                 lst.identity, list_id=lst.id, message_id=message_id, now=now)
    return f"{token.address} answered a probe: delivery enabled again"


# -- the stage --------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A message to a -bounces address, read outside any write transaction."""

    work_id: int
    message_id: int | None
    header_message_id: str | None
    mailing_list: MailingList | None
    finding: Finding
    source: Source
    came_to: str  # which -bounces address, in words, for the record
    reason: str  # what the report parser made of it
    unverified: str | None = None  # why its return path proves nothing; None if it does


class Bounces(RowStage):
    stage = Stage.BOUNCES

    def __init__(self, store: Store, *, clock: Clock, claimer: Claimer, templates: Templates,
                 settings: BouncesConfig, signer: LinkSigner, retry_delay: float,
                 batch: int = 16) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self.claimer = claimer
        self.templates = templates
        self.settings = settings
        self.retry_delay = retry_delay
        self.batch = batch

    def handle(self, row: Row[tuple[object, ...]], progress: Progress) -> None:
        """Mail to LIST-bounces@ and LIST-bounces+DETAIL@: attribute, score, record."""
        self._handle(self._read(row), progress)

    def _read(self, row: Row[tuple[object, ...]]) -> Received:
        detail = str(row.detail) if row.detail else ""
        with self.store.read() as conn:
            msg = conn.execute(sa.select(messages.c.raw, messages.c.message_id)
                               .where(messages.c.id == row.message_id)).one()
            lst = lists.by_id(conn, row.list_id) if row.list_id is not None else None
            token = tokens.find(conn, detail) if _TOKEN.fullmatch(detail) else None
        member, source, unverified = None, Source.DSN, None
        verp = verp_parse(detail) if detail else None
        if lst is not None and token is not None and token.kind is tokens.Kind.PROBE \
                and token.list_id == lst.id:
            member, source = token.address, Source.PROBE
        elif lst is not None and verp is not None and verp_verified(
                detail, list_address=lst.address, signer=self.signer) is not None:
            member, source = verp.member, Source.VERP
        elif verp is not None:
            # Who it claims to be about, for the record; it counts against nobody.
            member, source = verp.member, Source.VERP
            if verp.tag is None:
                unverified = "its VERP return path carries no tag (anyone can write it)"
            else:
                unverified = ("the tag of its VERP return path is not the one we gave "
                              "(forged, or made under another key)")
        elif detail:
            unverified = "its return path is neither a member's nor a probe's"
        elif lst is not None and not lst.personalize:
            # This list's posts go out from the plain address, one copy for many members:
            # its bounces can only be read as Mailman reads them, believing the report.
            pass
        else:
            unverified = ("it came to the plain -bounces address, where anyone can say "
                          "anything about anyone, and this list's copies go out from "
                          "each member's signed return path")
        # Pure and bounded, but not free: parsed outside any transaction.
        report = parse_bounce(msg.raw)
        finding = read_report(msg.raw, report, member=member)
        came_to = ("a probe's return path" if source is Source.PROBE
                   else f"bounces+{detail[:100]}" if detail else "the plain -bounces address")
        return Received(row.id, row.message_id, msg.message_id, lst, finding, source,
                        came_to, report.reason, unverified)

    def _handle(self, r: Received, progress: Progress) -> None:
        now = self.clock.now()
        attributed = False
        with self.store.write() as conn:
            if not queue.complete(conn, work, r.work_id, self.claimer):
                raise LeaseLost(f"work row {r.work_id}")
            lst = r.mailing_list
            if lst is None:
                journal.record(conn, now=now, stage=self.stage, event="dropped",
                               message_id=r.message_id, list_id=None,
                               detail="the list was deleted before its bounce was read",
                               log_message_id=r.header_message_id)
                return
            if r.finding.ignored is not None:
                _journal(conn, lst, now, "bounce-ignored", r.message_id,
                         f"{r.finding.ignored} (sent to {r.came_to})",
                         r.header_message_id)
                return
            if r.unverified is not None:
                named = ", ".join(a for a, _p in r.finding.bounced) or "nobody we can read"
                _journal(conn, lst, now, "bounce-unverified", r.message_id,
                         f"a bounce naming {named[:500]}, counted against nobody: "
                         f"{r.unverified} ({r.reason}; sent to {r.came_to})",
                         r.header_message_id)
                return
            wanted = dict(r.finding.bounced)
            known = set(conn.execute(sa.select(members.c.address).where(
                members.c.list_id == lst.id, members.c.address.in_(list(wanted)))).scalars()
            ) if wanted else set()
            for address, permanent in r.finding.bounced:
                if address not in known:
                    continue
                attributed = True
                record(conn, lst, address, permanent=permanent, source=r.source,
                       detail=f"{r.reason} (sent to {r.came_to})", now=now, settings=self.settings,
                       templates=self.templates, message_id=r.message_id)
            if not attributed:
                named = ", ".join(wanted) or "nobody we can read"
                _journal(conn, lst, now, "bounce-unattributed", r.message_id,
                         f"a bounce naming {named[:500]}: no member of {lst.address} "
                         f"({r.reason}; sent to {r.came_to})", r.header_message_id)
        if attributed:
            progress.woke(Stage.DELIVERY)

    # -- periodic -----------------------------------------------------------------------

    def sweep(self, progress: Progress | None = None) -> Progress:
        """The smarthost's refusals, removals of silent members, and further probes."""
        progress = progress or Progress()
        now = self.clock.now()
        done = self._refusals(now) + self._removals(now) + self._probes(now)
        progress.worked += done
        if done:
            progress.woke(Stage.DELIVERY)
        return progress

    def _refusals(self, now: float) -> int:
        """Permanent refusals by the smarthost are bounces (source "smtp"); a refused
        notice to a member whose delivery is disabled is a refused probe."""
        f = delivery_failures.c
        handled = 0
        while True:
            with self.store.write() as conn:
                rows = conn.execute(
                    sa.select(delivery_failures).where(f.processed.is_(False))
                    .order_by(f.id).limit(SWEEP_BATCH).with_for_update(skip_locked=True)).all()
                if not rows:
                    return handled
                conn.execute(sa.update(delivery_failures)
                             .where(f.id.in_([r.id for r in rows])).values(processed=True))
                found: dict[int, MailingList | None] = {}
                for row in rows:
                    if not row.permanent or row.list_id is None:
                        continue
                    if row.list_id not in found:
                        found[row.list_id] = lists.by_id(conn, row.list_id)
                    lst = found[row.list_id]
                    member = (lists.find_member(conn, lst.id, [row.address])
                              if lst is not None else None)
                    if lst is None or member is None:
                        continue
                    source = Source.SMTP
                    if (_disabled(member) and row.kind == outgoing.Kind.NOTICE.value
                            and member.probe_sent_at is not None
                            and row.at >= member.probe_sent_at):
                        source = Source.PROBE
                    record(conn, lst, member.address, permanent=True, source=source,
                           detail=f"smtp {row.code} {' '.join(row.text.split())[:300]} "
                                  f"({row.kind})",
                           now=now, settings=self.settings, templates=self.templates)
                    handled += 1
            if len(rows) < SWEEP_BATCH:
                return handled

    def _removals(self, now: float) -> int:
        """Members disabled for longer than remove_after, who never answered a probe."""
        m = members.c
        handled = 0
        while True:
            with self.store.write() as conn:
                rows = conn.execute(
                    sa.select(members).where(m.enabled.is_(False), m.disabled_at.is_not(None),
                                             m.disabled_at <= now - self.settings.remove_after)
                    .order_by(m.id).limit(SWEEP_BATCH).with_for_update(skip_locked=True)).all()
                for row in rows:
                    member = Member.from_row(row)
                    lst = lists.by_id(conn, member.list_id)
                    assert lst is not None  # members go with their list (ON DELETE CASCADE)
                    probes = _probes_sent(conn, lst, member)
                    _remove(conn, lst, member, now=now, settings=self.settings,
                            templates=self.templates, message_id=None,
                            why=f"delivery disabled since {_date(member.disabled_at or now)} "
                                f"for bounces, and no answer to {probes} probe(s)")
                    handled += 1
            if len(rows) < SWEEP_BATCH:
                return handled

    def _probes(self, now: float) -> int:
        """Another probe to each disabled member whose last one is probe_interval old."""
        m = members.c
        handled = 0
        while True:
            with self.store.write() as conn:
                rows = conn.execute(
                    sa.select(members).where(
                        m.enabled.is_(False), m.disabled_at.is_not(None),
                        m.disabled_at > now - self.settings.remove_after,
                        sa.or_(m.probe_sent_at.is_(None),
                               m.probe_sent_at <= now - self.settings.probe_interval))
                    .order_by(m.id).limit(SWEEP_BATCH).with_for_update(skip_locked=True)).all()
                for row in rows:
                    member = Member.from_row(row)
                    lst = lists.by_id(conn, member.list_id)
                    assert lst is not None
                    conn.execute(sa.update(members).where(m.id == member.id)
                                 .values(probe_sent_at=now))
                    _send_probe(conn, lst, member.address, disabled_at=member.disabled_at or now,
                                now=now, settings=self.settings, templates=self.templates,
                                message_id=None, reminder=True)
                    _journal(conn, lst, now, "bounce-probe", None,
                             f"{member.address}: delivery disabled since "
                             f"{_date(member.disabled_at or now)}; another probe sent")
                    handled += 1
            if len(rows) < SWEEP_BATCH:
                return handled


def _probes_sent(conn: Connection, lst: MailingList, member: Member) -> int:
    t = tokens_table.c
    return int(conn.execute(sa.select(sa.func.count()).select_from(tokens_table).where(
        t.list_id == lst.id, t.address == member.address, t.kind == tokens.Kind.PROBE.value,
        t.created_at >= (member.disabled_at or 0.0))).scalar_one())


def members_with_bounces(conn: Connection, lst: MailingList) -> list[Member]:
    """Members with a bounce score or with delivery disabled, for `listgate bounces ls`."""
    m = members.c
    rows = conn.execute(sa.select(members).where(
        m.list_id == lst.id, sa.or_(m.bounce_score > 0, m.enabled.is_(False)))
        .order_by(m.address)).all()
    return [Member.from_row(r) for r in rows]


def events_of(conn: Connection, lst: MailingList, address: str) -> list[Row[tuple[object, ...]]]:
    """A member's bounce events, oldest first, for `listgate bounces show`."""
    e = bounce_events.c
    return list(conn.execute(sa.select(bounce_events).where(
        e.list_id == lst.id, e.address == address).order_by(e.id)).all())

