"""The commands stage: mail to LIST-confirm+TOKEN@ (and, later, -request, -join, -leave).

A reply to a held-post notice releases nothing unless all of these hold:
the token exists, belongs to this list and this held post, is unused and
unexpired; the reply's From is a moderator (or owner) of the list and its
envelope sender is the same address; the reply authenticates as the list's
policy demands (a valid DKIM signature of the From domain, or the verdict of
a trusted front MTA); and its first written line (or subject) is a verb.
Forgeries change nothing and get no reply, except that a moderator is told
why a reply from their own address was refused.

A reply to a subscription confirmation or to a bounce probe counts when its
From is the address the token was sent to, its envelope sender is the same,
and it does not fail DMARC; a probe answered enables delivery to the member again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from gateway import authentication, bounces, holds, journal, lists, queue, selfservice, tokens
from gateway.clock import Clock
from gateway.errors import LeaseLost
from gateway.facts import Envelope, MessageFacts, message_facts, why_not_notify
from gateway.lists import MailingList
from gateway.notices import Notice, reply_subject
from gateway.notices import queue as queue_notice
from gateway.policy import Policies
from gateway.queue import Claimer
from gateway.replytext import find_command
from gateway.routing import Role, Stage
from gateway.rowstage import RowStage
from gateway.schema import HeldState, RoleName, messages, work
from gateway.schema import journal as journal_table
from gateway.store import Store
from gateway.templates import Templates
from gateway.worker import Progress

log = logging.getLogger(__name__)

_BATV = re.compile(r"^(prvs|msprvs\d?|btv1)=[^=]+=", re.IGNORECASE)


def same_sender(header_from: str, envelope_from: str) -> bool:
    """The envelope sender is the From address (allowing a BATV-tagged return path)."""
    local, _, domain = envelope_from.lower().partition("@")
    return header_from.lower() == f"{_BATV.sub('', local)}@{domain}"


@dataclass(frozen=True)
class Reply:
    """A message to the confirm address, read and checked outside any write transaction."""

    work_id: int
    message_id: int
    raw: bytes
    facts: MessageFacts
    envelope: Envelope
    mailing_list: MailingList | None
    token: tokens.Token | None
    role: Role = Role.CONFIRM


# Replies to one address's -request mail per list and day (GNU Mailman's
# max_autoresponses_per_day): a forger cannot use the list to flood someone's inbox.
MAX_REQUEST_REPLIES_PER_DAY = 10


def _answered_today(conn: Connection, lst: MailingList, sender: str, now: float) -> int:
    return int(conn.execute(
        sa.select(sa.func.count()).select_from(journal_table)
        .where(journal_table.c.list_id == lst.id, journal_table.c.event == "request",
               journal_table.c.at >= now - 86400,
               journal_table.c.detail.startswith(f"{sender}: ", autoescape=True))
    ).scalar_one())


class Commands(RowStage):
    stage = Stage.COMMANDS
    roles = (Role.CONFIRM, Role.REQUEST, Role.JOIN, Role.LEAVE)

    def __init__(self, store: Store, *, clock: Clock, claimer: Claimer, templates: Templates,
                 policies: Policies, resolver: authentication.Resolver,
                 trusted_authserv_ids: tuple[str, ...], retry_delay: float,
                 batch: int = 16) -> None:
        self.store = store
        self.clock = clock
        self.claimer = claimer
        self.templates = templates
        self.policies = policies
        self.resolver = resolver
        self.trusted_authserv_ids = trusted_authserv_ids
        self.retry_delay = retry_delay
        self.batch = batch

    def handle(self, row: Row[tuple[object, ...]], progress: Progress) -> None:
        self._handle(self._read(row), progress)

    def _read(self, row: Row[tuple[object, ...]]) -> Reply:
        with self.store.read() as conn:
            msg = conn.execute(sa.select(messages.c.raw, messages.c.mail_from)
                               .where(messages.c.id == row.message_id)).one()
            lst = lists.by_id(conn, row.list_id) if row.list_id is not None else None
            token = tokens.find(conn, row.detail) if row.detail else None
        return Reply(row.id, row.message_id, msg.raw, message_facts(msg.raw),
                     Envelope(msg.mail_from, row.address), lst, token, Role(row.role))

    def _handle(self, r: Reply, progress: Progress) -> None:
        lst = r.mailing_list
        auto = why_not_notify(r.facts, r.envelope)
        if lst is None:
            self._finish(r, None, "ignored", "the list was deleted")
        elif r.role is not Role.CONFIRM:
            self._request(r, lst, auto, progress)
        elif r.token is None or r.token.list_id != lst.id:
            # An unknown token, or another list's: a forger learns nothing, not even that.
            self._finish(r, lst, "confirm-refused", "no such token for this list")
        elif auto and "robot" not in auto and "empty return path" not in auto:
            # An auto-reply (vacation, list mail) to a notice: never an instruction.
            self._finish(r, lst, "confirm-ignored", f"not a person's reply: {auto}")
        elif r.token.kind is tokens.Kind.HOLD:
            self._moderator(r, lst, r.token, progress)
        elif r.token.kind is tokens.Kind.WITHDRAW:
            self._poster(r, lst, r.token, progress)
        elif r.token.kind is tokens.Kind.PROBE:
            self._probe(r, lst, r.token, progress)
        else:
            self._subscription(r, lst, r.token, progress)

    # -- moderators ------------------------------------------------------------------

    def _moderator(self, r: Reply, lst: MailingList, token: tokens.Token,
                   progress: Progress) -> None:
        sender = r.facts.author or ""
        with self.store.read() as conn:
            is_moderator = bool(sender) and lists.has_role(conn, lst.id, sender,
                                                           RoleName.MODERATOR, RoleName.OWNER)
        if not is_moderator:
            self._finish(r, lst, "confirm-refused",
                         f"{sender or 'a sender with no From'} is not a moderator of "
                         f"{lst.address}")
            return
        if not same_sender(sender, r.envelope.mail_from):
            self._finish(r, lst, "confirm-refused",
                         f"From {sender} but envelope sender <{r.envelope.mail_from}>",
                         reply=("envelope", {"sender": sender,
                                             "envelope": r.envelope.mail_from or "<>"}))
            return
        release = self.policies.for_list(lst.address).release
        auth = authentication.verify(r.raw, self.resolver, use=release.authentication,
                                     trusted_authserv_ids=self.trusted_authserv_ids)
        if not auth.authenticated:
            why = ", ".join(f"dkim={res} d={d}" for d, res in auth.dkim) or "no DKIM signature"
            if auth.trusted:
                why += f"; trusted front MTA said {auth.trusted}"
            self._finish(r, lst, "confirm-refused", f"reply from {sender} not authenticated "
                                                    f"({release.authentication}): {why}",
                         reply=("unauthenticated", {"sender": sender, "why": why}))
            return
        command = find_command(r.raw, holds.MODERATOR_VERBS)
        if command is None:
            self._finish(r, lst, "confirm-help", f"no command in the reply from {sender}",
                         reply=("help", {}))
            return
        now = self.clock.now()
        with self.store.write() as conn:
            self._complete(conn, r)
            record = holds.get(conn, token.held_id) if token.held_id else None
            if record is None:
                self._record(conn, r, lst, "confirm-refused", "the held post is gone")
                return
            if record.state is not HeldState.HELD or token.used_at is not None:
                self._reply(conn, r, lst, sender, "already", {"held": record})
                self._record(conn, r, lst, "confirm-late",
                             f"{sender}: held #{record.id} was already "
                             f"{record.describe_decision()}")
                return
            if not tokens.consume(conn, token, by=sender, now=now):
                fresh = holds.get(conn, record.id) or record
                outcome = "already" if fresh.state is not HeldState.HELD else "expired"
                self._reply(conn, r, lst, sender, outcome, {"held": fresh})
                self._record(conn, r, lst, "confirm-late", f"{sender}: token already used "
                                                           "or expired")
                return
            verb = holds.Verb(command.verb)
            decided = holds.decide(conn, record, verb, actor=sender, note=command.argument,
                                   now=now, lst=lst, templates=self.templates,
                                   expiry_action=release.expiry_action)
            if decided is None:
                fresh = holds.get(conn, record.id) or record
                self._reply(conn, r, lst, sender, "already", {"held": fresh})
                return
            self._reply(conn, r, lst, sender, "done", {"held": decided,
                                                       "note": command.argument})
            self._record(conn, r, lst, "confirmed", f"{sender}: {verb.value} held #{record.id}")
        progress.woke(Stage.FANOUT, Stage.DELIVERY)

    # -- posters ----------------------------------------------------------------------

    def _poster(self, r: Reply, lst: MailingList, token: tokens.Token,
                progress: Progress) -> None:
        sender = self._addressee(r, lst, token, addressee="poster", sent="token",
                                 reply="reply")
        if sender is None:
            return
        now = self.clock.now()
        command = find_command(r.raw, frozenset({holds.Verb.WITHDRAW.value}))
        with self.store.write() as conn:
            self._complete(conn, r)
            record = holds.get(conn, token.held_id) if token.held_id else None
            if record is None:
                self._record(conn, r, lst, "confirm-refused", "the held post is gone")
                return
            if command is None:
                self._poster_reply(conn, r, lst, record, "help")
                self._record(conn, r, lst, "confirm-help", f"no command from poster {sender}")
                return
            if record.state is not HeldState.HELD or not tokens.consume(conn, token, by=sender,
                                                                          now=now):
                self._poster_reply(conn, r, lst, holds.get(conn, record.id) or record, "already")
                return
            holds.decide(conn, record, holds.Verb.WITHDRAW, actor=sender, note="", now=now,
                         lst=lst, templates=self.templates)
            self._record(conn, r, lst, "confirmed", f"{sender} withdrew held #{record.id}")
        progress.woke(Stage.DELIVERY)

    # -- self-service: -request, -join, -leave, and confirming them --------------------

    def _request(self, r: Reply, lst: MailingList, auto: str | None,
                 progress: Progress) -> None:
        sender = r.facts.author or ""
        auth = authentication.verify(r.raw, self.resolver,
                                     trusted_authserv_ids=self.trusted_authserv_ids,
                                     use="either" if self.trusted_authserv_ids else "dkim")
        why_not = auto or why_not_notify(r.facts, r.envelope, auth_failed=auth.dmarc == "fail")
        if why_not or not sender:
            # Answered never: the sender may be forged, bulk or a robot.
            self._finish(r, lst, "request-ignored", f"{r.role.value} from "
                                                    f"{sender or '?'}: {why_not or 'no From'}")
            return
        if r.role is Role.REQUEST:
            commands = selfservice.commands_in(r.raw)
        else:
            verb = "subscribe" if r.role is Role.JOIN else "unsubscribe"
            commands = [selfservice.Command(f"({verb} by mail to {r.envelope.recipient})",
                                            verb, ())]
        requester = selfservice.Requester(sender, auth.authenticated)
        now = self.clock.now()
        with self.store.write() as conn:
            answered = _answered_today(conn, lst, sender, now)
            if answered >= MAX_REQUEST_REPLIES_PER_DAY:
                # Someone may be mailing -request in this address's name to flood it.
                self._complete(conn, r)
                self._record(conn, r, lst, "request-ignored",
                             f"{sender}: {answered} requests answered in the last day "
                             f"(at most {MAX_REQUEST_REPLIES_PER_DAY}); not answered")
                return
            self._complete(conn, r)
            selfservice.run(conn, lst, requester, commands, now=now, templates=self.templates,
                            message_id=r.message_id)
            selfservice.reply(conn, lst, requester, subject=r.facts.subject,
                              in_reply_to=r.facts.message_id, now=now,
                              templates=self.templates, message_id=r.message_id)
            self._record(conn, r, lst, "request", f"{sender}: " + "; ".join(
                f"{line} -> {result.splitlines()[0]}" for line, result in requester.results)
                or f"{sender}: no commands")
        progress.woke(Stage.DELIVERY)

    def _subscription(self, r: Reply, lst: MailingList, token: tokens.Token,
                      progress: Progress) -> None:
        """A reply to a confirmation request: the address itself confirms."""
        sender = self._addressee(r, lst, token, addressee="address", sent="confirmation",
                                 reply="confirmation")
        if sender is None:
            return
        now = self.clock.now()
        with self.store.write() as conn:
            self._complete(conn, r)
            result = selfservice.confirm(conn, lst, token, by=sender, now=now,
                                         templates=self.templates, message_id=r.message_id)
            self._record(conn, r, lst, "confirmed", result)
        progress.woke(Stage.DELIVERY)

    def _probe(self, r: Reply, lst: MailingList, token: tokens.Token,
               progress: Progress) -> None:
        """A reply to a bounce probe: the member is there after all, so delivery resumes."""
        sender = self._addressee(r, lst, token, addressee="member", sent="probe",
                                 reply="probe reply")
        if sender is None:
            return
        now = self.clock.now()
        with self.store.write() as conn:
            self._complete(conn, r)
            result = bounces.answered(conn, lst, token, by=sender, now=now,
                                      templates=self.templates, message_id=r.message_id)
            self._record(conn, r, lst, "confirmed", result)
        progress.woke(Stage.DELIVERY)

    # -- the plumbing ------------------------------------------------------------------

    def _addressee(self, r: Reply, lst: MailingList, token: tokens.Token, *, addressee: str,
                   sent: str, reply: str) -> str | None:
        """The reply's sender if it is the address the token was sent to, in From and in
        the envelope alike, and its DMARC does not fail; else None, and the reply is
        refused (journaled, nothing answered). The words name who the token was sent to
        (``addressee``), in what (``sent``), and what came back (``reply``)."""
        sender = r.facts.author or ""
        if sender != token.address or not same_sender(sender, r.envelope.mail_from):
            self._finish(r, lst, "confirm-refused",
                         f"{sender or 'no From'} is not the {addressee} this {sent} was sent to")
            return None
        auth = authentication.verify(r.raw, self.resolver,
                                     trusted_authserv_ids=self.trusted_authserv_ids)
        if auth.dmarc == "fail":
            self._finish(r, lst, "confirm-refused", f"{reply} from {sender} fails DMARC")
            return None
        return sender

    def _complete(self, conn: Connection, r: Reply) -> None:
        if not queue.complete(conn, work, r.work_id, self.claimer):
            raise LeaseLost(f"work row {r.work_id}")

    def _record(self, conn: Connection, r: Reply, lst: MailingList | None, event: str,
                detail: str) -> None:
        journal.record(conn, now=self.clock.now(), stage=self.stage, event=event,
                       message_id=r.message_id, list_id=lst.id if lst else None,
                       detail=detail, log_message_id=r.facts.message_id)

    def _finish(self, r: Reply, lst: MailingList | None, event: str, detail: str, *,
                reply: tuple[str, dict[str, object]] | None = None) -> None:
        with self.store.write() as conn:
            self._complete(conn, r)
            self._record(conn, r, lst, event, detail)
            if reply is not None and lst is not None and r.facts.author:
                self._reply(conn, r, lst, r.facts.author, reply[0], reply[1])

    def _reply(self, conn: Connection, r: Reply, lst: MailingList, to: str, outcome: str,
               context: dict[str, object]) -> None:
        """Answer a moderator (only ever a moderator's own address)."""
        text = self.templates.render(
            "notices/moderator-reply.txt.j2", list_address=lst.address,
            mailing_list=lst.identity, outcome=outcome,
            owner_address=lst.identity.address("owner"),
            **{"held": None, "note": "", "sender": to, "why": "", "envelope": "", **context})
        queue_notice(conn, Notice(to=to, subject=reply_subject(r.facts.subject, "moderation"),
                                  text=text, in_reply_to=r.facts.message_id),
                     lst.identity, list_id=lst.id, message_id=r.message_id,
                     now=self.clock.now())

    def _poster_reply(self, conn: Connection, r: Reply, lst: MailingList, record: holds.Held,
                      outcome: str) -> None:
        if why_not_notify(r.facts, r.envelope):
            return
        text = self.templates.render("notices/poster-reply.txt.j2", list_address=lst.address,
                                     mailing_list=lst.identity, outcome=outcome,
                                     subject=record.subject, state=record.state.value)
        queue_notice(conn, Notice(to=r.envelope.mail_from,
                                  subject=reply_subject(r.facts.subject, "your held post"),
                                  text=text, in_reply_to=r.facts.message_id),
                     lst.identity, list_id=lst.id, message_id=r.message_id,
                     now=self.clock.now())
