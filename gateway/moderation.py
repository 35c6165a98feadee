"""The moderation stage: every post runs the list's rule chain and gets a decision.

accept  -> a fanout work row
reject  -> a notice to the poster, unless that would be backscatter
discard -> recorded in the journal, dropped
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from gateway import journal, lists, outgoing, queue
from gateway.clock import Clock
from gateway.errors import LeaseLost
from gateway.facts import Envelope, MessageFacts, SenderFacts, message_facts, why_not_notify
from gateway.lists import MailingList
from gateway.notices import Notice, compose
from gateway.policy import Action, Decision, Policies, decide
from gateway.queue import Claimer
from gateway.routing import Role, Stage
from gateway.rules import Post
from gateway.schema import RoleName, State, messages, work
from gateway.store import Store
from gateway.templates import Templates
from gateway.worker import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """A claimed post with everything the chain and the outcome need."""

    work_id: int
    message_id: int
    mailing_list: MailingList | None
    raw: bytes
    envelope: Envelope
    facts: MessageFacts
    sender: SenderFacts


class Moderation:
    stage = Stage.MODERATION

    def __init__(self, store: Store, *, clock: Clock, claimer: Claimer, policies: Policies,
                 templates: Templates, retry_delay: float, batch: int = 32) -> None:
        self.store = store
        self.clock = clock
        self.claimer = claimer
        self.policies = policies
        self.templates = templates
        self.retry_delay = retry_delay
        self.batch = batch

    def run_once(self) -> Progress:
        with self.store.write() as conn:
            rows = queue.claim(conn, work, self.claimer, now=self.clock.now(), limit=self.batch,
                               where=[work.c.stage == self.stage.value])
        progress = Progress(worked=len(rows))
        for row in rows:
            try:
                item = self._load(row)
                decision = self._decide(item)
                with self.store.write() as conn:
                    self._apply(conn, item, decision, progress)
            except LeaseLost:
                log.warning("lease lost on work row %s; another worker has it", row.id)
            except Exception as exc:  # one bad row must not stop the others
                log.exception("moderation of work row %s failed", row.id)
                with self.store.write() as conn:
                    queue.fail(conn, work, row.id, self.claimer, now=self.clock.now(),
                               error=f"{type(exc).__name__}: {exc}", retry_delay=self.retry_delay)
        return progress

    def _load(self, row: Row[tuple[object, ...]]) -> Item:
        with self.store.read() as conn:
            msg = conn.execute(sa.select(messages.c.raw, messages.c.mail_from)
                               .where(messages.c.id == row.message_id)).one()
            lst = lists.by_id(conn, row.list_id) if row.list_id is not None else None
            facts = message_facts(msg.raw)
            sender = self._sender_facts(conn, lst, facts, msg.mail_from)
        return Item(row.id, row.message_id, lst, msg.raw, Envelope(msg.mail_from, row.address),
                    facts, sender)

    @staticmethod
    def _sender_facts(conn: Connection, lst: MailingList | None, facts: MessageFacts,
                      mail_from: str) -> SenderFacts:
        if lst is None:
            return SenderFacts(None, False, False)
        candidates = [a for a in (facts.author, mail_from.lower() or None) if a]
        member = lists.find_member(conn, lst.id, candidates)
        author = facts.author or ""
        return SenderFacts(
            member=member,
            is_moderator=lists.has_role(conn, lst.id, author, RoleName.MODERATOR),
            is_owner=lists.has_role(conn, lst.id, author, RoleName.OWNER),
        )

    def _decide(self, item: Item) -> Decision | None:
        if item.mailing_list is None:
            return None
        chain = self.policies.for_list(item.mailing_list.address)
        post = Post(item.facts, item.envelope, item.sender, item.mailing_list.identity)
        return decide(chain, post)

    def _apply(self, conn: Connection, item: Item, decision: Decision | None,
               progress: Progress) -> None:
        now = self.clock.now()
        if not queue.complete(conn, work, item.work_id, self.claimer):
            raise LeaseLost(f"work row {item.work_id}")
        lst = item.mailing_list

        def record(event: str, list_id: int | None, detail: str) -> None:
            journal.record(conn, now=now, stage=self.stage, event=event,
                           message_id=item.message_id, list_id=list_id, detail=detail,
                           log_message_id=item.facts.message_id)

        if lst is None:
            record("dropped", None, "the list was deleted before the post was moderated")
            return
        assert decision is not None
        reasons = "; ".join(decision.reasons) or "no rule objected"
        record(decision.action.value, lst.id, f"to {lst.address}: {reasons}")
        if decision.action is Action.ACCEPT:
            conn.execute(work.insert().values(
                stage=Stage.FANOUT.value, message_id=item.message_id, list_id=lst.id,
                role=Role.POST.value, address=lst.address, detail=None, cursor=None,
                content_id=None, state=State.READY.value, attempts=0, due_at=now,
                lease_owner=None, lease_until=None, last_error=None, created_at=now,
                updated_at=now))
            progress.wake.add(Stage.FANOUT)
        elif decision.action is Action.REJECT:
            self._notify_rejected(conn, item, lst, decision, now, progress)

    def _notify_rejected(self, conn: Connection, item: Item, lst: MailingList,
                         decision: Decision, now: float, progress: Progress) -> None:
        why_not = why_not_notify(item.facts, item.envelope)
        if why_not:
            journal.record(conn, now=now, stage=self.stage, event="notice-suppressed",
                           message_id=item.message_id, list_id=lst.id,
                           detail=f"no rejection notice: {why_not}")
            return
        text = self.templates.render(
            "notices/rejected.txt.j2", list_address=lst.address, mailing_list=lst,
            subject=item.facts.subject, reasons=decision.reasons,
            request_address=lst.identity.address("request"),
            owner_address=lst.identity.address("owner"))
        data = compose(Notice(to=item.envelope.mail_from,
                              subject=f"Your message to {lst.address} was rejected",
                              text=text, in_reply_to=item.facts.message_id),
                       lst.identity, now=now)
        outgoing.send(conn, data, envelope_from=lst.identity.address("bounces"),
                      recipients=[item.envelope.mail_from], kind=outgoing.Kind.NOTICE,
                      list_id=lst.id, message_id=item.message_id, now=now)
        progress.wake.add(Stage.DELIVERY)
