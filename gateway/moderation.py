"""The moderation stage: every post runs the list's rule chain and gets a decision.

accept  -> a fanout work row
hold    -> a held post, a notice to the moderators, one to the poster when that is safe
reject  -> a notice to the poster, unless that would be backscatter
discard -> recorded in the journal, dropped

Before the chain runs, the stage gathers what the rules may read (sender
standing, and, when the chain needs them, authentication results and the
promotional score from the list's own model); the rules themselves do no I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from gateway import authentication, holds, journal, learning, lists, promo, queue
from gateway.authentication import AuthResults
from gateway.clock import Clock
from gateway.errors import LeaseLost
from gateway.facts import Envelope, MessageFacts, SenderFacts, message_facts, why_not_notify
from gateway.lists import MailingList
from gateway.notices import Notice
from gateway.notices import queue as queue_notice
from gateway.policy import Action, Chain, Decision, Policies, decide
from gateway.queue import Claimer
from gateway.replytext import own_text
from gateway.routing import Role, Stage
from gateway.rules import Post
from gateway.schema import RoleName, State, messages, work
from gateway.store import Store
from gateway.templates import Templates
from gateway.worker import Progress

log = logging.getLogger(__name__)

# Built once: building a statement costs several times what running it does.
_RAW_AND_SENDER = sa.select(messages.c.raw, messages.c.mail_from).where(
    messages.c.id == sa.bindparam("id"))
_ADD_WORK = work.insert()

# Outcomes committed per write transaction (see Moderation.run_once).
OUTCOMES_PER_COMMIT = 4


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
    chain: Chain | None
    post: Post | None


class Moderation:
    stage = Stage.MODERATION

    def __init__(self, store: Store, *, clock: Clock, claimer: Claimer, policies: Policies,
                 templates: Templates, resolver: authentication.Resolver,
                 models: learning.Models, trusted_authserv_ids: tuple[str, ...] = (),
                 retry_delay: float, batch: int = 32) -> None:
        self.store = store
        self.clock = clock
        self.claimer = claimer
        self.policies = policies
        self.templates = templates
        self.resolver = resolver
        self.models = models
        self.trusted_authserv_ids = trusted_authserv_ids
        self.retry_delay = retry_delay
        self.batch = batch

    def run_once(self, progress: Progress | None = None) -> Progress:
        rows = queue.take(self.store, work, self.claimer, now=self.clock.now(),
                          limit=self.batch, stage=self.stage.value)
        progress = progress or Progress()
        progress.worked += len(rows)
        decided: list[tuple[Item, Decision | None]] = []
        failed: list[tuple[int, Exception]] = []
        for row in rows:
            try:
                item = self._load(row)
                decided.append((item, decide(item.chain, item.post)
                                if item.chain and item.post else None))
            except Exception as exc:  # one bad row must not stop the others
                log.exception("moderation of work row %s failed", row.id)
                failed.append((row.id, exc))
        # The outcomes a few at a time, each in its own savepoint: a row that fails
        # leaves the others' outcomes standing. A short transaction is the point: on
        # SQLite, intake's commit (a client waiting for its 250) waits for the one
        # writer, and a whole batch's outcomes hold it for tens of milliseconds.
        for start in range(0, len(decided), OUTCOMES_PER_COMMIT):
            with self.store.write() as conn:
                for item, decision in decided[start:start + OUTCOMES_PER_COMMIT]:
                    try:
                        with conn.begin_nested():
                            self._apply(conn, item, decision, progress)
                    except LeaseLost:
                        log.warning("lease lost on work row %s; another worker has it",
                                    item.work_id)
                    except Exception as exc:
                        log.exception("moderation of work row %s failed", item.work_id)
                        failed.append((item.work_id, exc))
        if failed:
            with self.store.write() as conn:
                for work_id, error in failed:
                    queue.fail(conn, work, work_id, self.claimer, now=self.clock.now(),
                               error=f"{type(error).__name__}: {error}",
                               retry_delay=self.retry_delay)
        return progress

    # -- gathering facts ---------------------------------------------------------------

    def _load(self, row: Row[tuple[object, ...]]) -> Item:
        with self.store.read() as conn:
            msg = conn.execute(_RAW_AND_SENDER, {"id": row.message_id}).one()
            lst = lists.by_id(conn, row.list_id) if row.list_id is not None else None
            facts = message_facts(msg.raw)
            sender = self._sender_facts(conn, lst, facts, msg.mail_from)
            chain = self.policies.for_list(lst.address) if lst else None
            model = self.models.for_list(conn, lst.id) if lst and chain and \
                "promo" in chain.needs else None
        envelope = Envelope(msg.mail_from, row.address)
        post = None
        if lst is not None and chain is not None:
            needs = chain.needs
            post = Post(
                facts, envelope, sender, lst.identity, emergency=lst.emergency,
                auth=self._auth(msg.raw) if "auth" in needs else None,
                promo=promo.score(msg.raw, model) if model is not None else None,
                first_lines=tuple(line for line in own_text(msg.raw)[1] if line.strip())[:12]
                if "lines" in needs else (),
            )
        return Item(row.id, row.message_id, lst, msg.raw, envelope, facts, sender, chain, post)

    def _auth(self, raw: bytes) -> AuthResults:
        return authentication.verify(raw, self.resolver,
                                     trusted_authserv_ids=self.trusted_authserv_ids,
                                     use="either" if self.trusted_authserv_ids else "dkim")

    @staticmethod
    def _sender_facts(conn: Connection, lst: MailingList | None, facts: MessageFacts,
                      mail_from: str) -> SenderFacts:
        if lst is None:
            return SenderFacts(None, False, False)
        candidates = [a for a in (facts.author, mail_from.lower() or None) if a]
        member = lists.find_member(conn, lst.id, candidates)
        author = facts.author or (member.address if member else "")
        standing = lists.standing(conn, lst.id, author)
        roles = lists.roles_of(conn, lst.id, author)
        return SenderFacts(
            member=member,
            is_moderator=RoleName.MODERATOR in roles,
            is_owner=RoleName.OWNER in roles,
            trusted=standing.trusted,
            banned=standing.banned,
            approved=standing.approved,
        )

    # -- the outcome ------------------------------------------------------------------------

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
        assert decision is not None and item.chain is not None
        if decision.action is Action.HOLD:
            self._hold(conn, item, lst, item.chain, decision, now)
            progress.woke(Stage.DELIVERY)
            return
        reasons = "; ".join(decision.reasons) or "no rule objected"
        record(decision.action.value, lst.id, f"to {lst.address}: {reasons}")
        if decision.action is Action.ACCEPT:
            conn.execute(_ADD_WORK, dict(
                stage=Stage.FANOUT.value, message_id=item.message_id, list_id=lst.id,
                role=Role.POST.value, address=lst.address, detail=None, cursor=None,
                content_id=None, state=State.READY.value, attempts=0, due_at=now,
                lease_owner=None, lease_until=None, last_error=None, created_at=now,
                updated_at=now))
            progress.woke(Stage.FANOUT)
        elif decision.action is Action.REJECT:
            self._notify_rejected(conn, item, lst, decision, now, progress)

    def _hold(self, conn: Connection, item: Item, lst: MailingList, chain: Chain,
              decision: Decision, now: float) -> None:
        auth = item.post.auth if item.post and item.post.auth else self._auth(item.raw)
        why_not = why_not_notify(item.facts, item.envelope, auth_failed=auth.dmarc == "fail")
        score = item.post.promo if item.post else None
        holds.create(conn, holds.Hold(
            message_id=item.message_id, raw=item.raw, mailing_list=lst,
            poster=item.facts.author or item.envelope.mail_from,
            return_path=item.envelope.mail_from,
            subject=item.facts.subject, reasons=tuple(decision.reasons),
            promo_score=score.probability if score else None,
            notify_poster=chain.release.notify_poster and why_not is None,
            in_reply_to=item.facts.message_id,
        ), now=now, expiry=chain.release.hold_expiry, templates=self.templates)

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
        queue_notice(conn, Notice(to=item.envelope.mail_from,
                                  subject=f"Your message to {lst.address} was rejected",
                                  text=text, in_reply_to=item.facts.message_id),
                     lst.identity, list_id=lst.id, message_id=item.message_id, now=now)
        progress.woke(Stage.DELIVERY)

    # -- expiry and reminders ---------------------------------------------------------------

    def sweep(self, progress: Progress | None = None) -> Progress:
        """Remind moderators of holds about to expire; apply the expiry action to the rest."""
        progress = progress or Progress()
        now = self.clock.now()
        with self.store.read() as conn:
            all_lists = lists.all_lists(conn)
        for lst in all_lists:
            release = self.policies.for_list(lst.address).release
            with self.store.write() as conn:
                for record in holds.due_for_reminder(conn, now=now, list_id=lst.id,
                                                     reminder_before=release.reminder_before):
                    if holds.mark_reminded(conn, record, now=now):
                        raw = conn.execute(sa.select(messages.c.raw).where(
                            messages.c.id == record.message_id)).scalar_one()
                        holds.notify_moderators(conn, record, lst, raw, now=now,
                                                templates=self.templates, reminder=True)
                        progress.worked += 1
        with self.store.write() as conn:
            for record in holds.expired(conn, now=now):
                lst_ = lists.by_id(conn, record.list_id)
                if lst_ is None:
                    continue
                release = self.policies.for_list(lst_.address).release
                if holds.decide(conn, record, holds.Verb.EXPIRE, actor="expiry", note="",
                                now=now, lst=lst_, templates=self.templates,
                                expiry_action=release.expiry_action):
                    progress.worked += 1
        if progress.worked:
            progress.woke(Stage.DELIVERY, Stage.FANOUT)
        return progress
