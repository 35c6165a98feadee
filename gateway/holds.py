"""Held posts: holding one, and deciding about it — by a moderator's reply, the CLI, or expiry.

Every way of deciding goes through ``decide``, which changes a post's state
with one conditional UPDATE (``WHERE state = 'held'``): whoever comes second
changes nothing and is told who came first. A decision has its effects in the
same transaction: the post goes to fanout, the sender's standing changes, the
list's model learns, and the poster is told when that is safe.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from gateway import journal, learning, lists, tokens
from gateway.lists import MailingList
from gateway.notices import Notice, queue
from gateway.routing import Role, Stage
from gateway.schema import HeldState, State, held, messages, work
from gateway.templates import Templates

log = logging.getLogger(__name__)


class Verb(enum.Enum):
    """What can be done to a held post, and by whom."""

    APPROVE = "approve"    # moderator: send it to the list
    TRUST = "trust"        # moderator: send it, and stop moderating this sender
    REJECT = "reject"      # moderator: do not send it; the poster gets the reason
    DISCARD = "discard"    # moderator: drop it quietly
    BAN = "ban"            # moderator: drop it and discard this sender's future posts
    WITHDRAW = "withdraw"  # the poster: take it back
    EXPIRE = "expire"      # nobody decided in time: the policy's expiry action


MODERATOR_VERBS = frozenset({Verb.APPROVE.value, Verb.TRUST.value, Verb.REJECT.value,
                             Verb.DISCARD.value, Verb.BAN.value})

_OUTCOME = {
    Verb.APPROVE: HeldState.APPROVED, Verb.TRUST: HeldState.APPROVED,
    Verb.REJECT: HeldState.REJECTED, Verb.DISCARD: HeldState.DISCARDED,
    Verb.BAN: HeldState.DISCARDED, Verb.WITHDRAW: HeldState.WITHDRAWN,
}


@dataclass(frozen=True)
class Held:
    id: int
    message_id: int
    list_id: int
    poster: str
    subject: str
    reasons: tuple[str, ...]
    promo_score: float | None
    notify_poster: bool
    state: HeldState
    created_at: float
    expires_at: float
    decided_at: float | None
    decided_by: str | None
    note: str | None

    @classmethod
    def from_row(cls, row: Row[tuple[object, ...]]) -> Held:
        m = row._mapping
        return cls(m["id"], m["message_id"], m["list_id"], m["poster"], m["subject"],
                   tuple(json.loads(m["reasons"])), m["promo_score"], m["notify_poster"],
                   HeldState(m["state"]), m["created_at"], m["expires_at"], m["decided_at"],
                   m["decided_by"], m["note"])

    def describe_decision(self) -> str:
        when = _date(self.decided_at) if self.decided_at else "?"
        return f"{self.state.value} by {self.decided_by or 'nobody'} on {when}"


def _date(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def get(conn: Connection, held_id: int) -> Held | None:
    row = conn.execute(sa.select(held).where(held.c.id == held_id)).first()
    return Held.from_row(row) if row else None


def waiting(conn: Connection, list_id: int | None = None) -> list[Held]:
    q = sa.select(held).where(held.c.state == HeldState.HELD.value)
    if list_id is not None:
        q = q.where(held.c.list_id == list_id)
    return [Held.from_row(r) for r in conn.execute(q.order_by(held.c.id))]


@dataclass(frozen=True)
class Hold:
    """Everything needed to hold one post and tell the people concerned."""

    message_id: int
    raw: bytes
    mailing_list: MailingList
    poster: str
    return_path: str
    subject: str
    reasons: tuple[str, ...]
    promo_score: float | None
    notify_poster: bool
    in_reply_to: str | None


def create(conn: Connection, h: Hold, *, now: float, expiry: float,
           templates: Templates) -> Held:
    """Hold a post: store it, and send one notice to the moderators (and one to the poster)."""
    lst = h.mailing_list
    held_id = int(conn.execute(held.insert().values(
        message_id=h.message_id, list_id=lst.id, poster=h.poster, subject=h.subject[:500],
        reasons=json.dumps(list(h.reasons)), promo_score=h.promo_score,
        notify_poster=h.notify_poster, state=HeldState.HELD.value, created_at=now,
        expires_at=now + expiry, reminded_at=None, decided_at=None, decided_by=None, note=None,
    ).returning(held.c.id)).scalar_one())
    record = get(conn, held_id)
    assert record is not None
    notify_moderators(conn, record, lst, h.raw, now=now, templates=templates)
    if h.notify_poster and h.return_path:
        token = tokens.issue(conn, tokens.Kind.WITHDRAW, list_id=lst.id, held_id=held_id,
                             address=h.poster, now=now, ttl=expiry)
        text = templates.render("notices/held-poster.txt.j2", list_address=lst.address,
                                mailing_list=lst.identity, subject=h.subject,
                                reasons=[r for r in h.reasons if "promotional" not in r],
                                expires=_date(now + expiry))
        queue(conn, Notice(to=h.return_path, subject=f"Your post to {lst.address} awaits a "
                                                     "moderator",
                           text=text, in_reply_to=h.in_reply_to,
                           reply_to=lst.identity.address(f"confirm+{token}")),
              lst.identity, list_id=lst.id, message_id=h.message_id, now=now)
    journal.record(conn, now=now, stage=Stage.MODERATION, event="held", message_id=h.message_id,
                   list_id=lst.id, detail=f"held #{held_id} for {lst.address}: "
                                          + "; ".join(h.reasons), log_message_id=h.in_reply_to)
    return record


def notify_moderators(conn: Connection, record: Held, lst: MailingList, raw: bytes, *,
                      now: float, templates: Templates, reminder: bool = False) -> None:
    """One notice per held post to every moderator, with its own confirm address as Reply-To."""
    moderators = lists.moderators(conn, lst.id)
    if not moderators:
        log.warning("held #%s on %s: the list has no moderators or owners to ask",
                    record.id, lst.address)
        return
    token = tokens.issue(conn, tokens.Kind.HOLD, list_id=lst.id, held_id=record.id,
                         address=lst.address, now=now, ttl=max(1.0, record.expires_at - now))
    confirm = lst.identity.address(f"confirm+{token}")
    text = templates.render(
        "notices/held-moderator.txt.j2", list_address=lst.address, mailing_list=lst.identity,
        held=record, size=len(raw), expires=_date(record.expires_at), confirm_address=confirm,
        reminder=reminder)
    what = "Reminder: still held" if reminder else "Held for moderation"
    queue(conn, Notice(to=lst.identity.address("owner"),
                       subject=f"{lst.subject_prefix} {what}: {record.subject or '(no subject)'}"
                               f" (from {record.poster or 'unknown'})".strip(),
                       text=text, reply_to=confirm, attachments=(raw,)),
          lst.identity, list_id=lst.id, message_id=record.message_id, now=now,
          recipients=moderators)


def decide(conn: Connection, record: Held, verb: Verb, *, actor: str, note: str, now: float,
           lst: MailingList, templates: Templates, expiry_action: str = "reject") -> Held | None:
    """Apply a decision. None if the post was no longer waiting: someone decided first."""
    if verb is Verb.EXPIRE:
        state = {"approve": HeldState.APPROVED, "discard": HeldState.DISCARDED}.get(
            expiry_action, HeldState.EXPIRED)
    else:
        state = _OUTCOME[verb]
    changed = conn.execute(
        sa.update(held).where(held.c.id == record.id, held.c.state == HeldState.HELD.value)
        .values(state=state.value, decided_at=now, decided_by=actor, note=note or None)
    ).rowcount
    if changed != 1:
        return None
    msg = conn.execute(sa.select(messages.c.raw, messages.c.mail_from)
                       .where(messages.c.id == record.message_id)).one()
    if state is HeldState.APPROVED:
        conn.execute(work.insert().values(
            stage=Stage.FANOUT.value, message_id=record.message_id, list_id=lst.id,
            role=Role.POST.value, address=lst.address, detail=None, cursor=None,
            content_id=None, state=State.READY.value, attempts=0, due_at=now,
            lease_owner=None, lease_until=None, last_error=None, created_at=now,
            updated_at=now))
    if record.poster and verb is not Verb.WITHDRAW and verb is not Verb.EXPIRE:
        lists.update_standing(conn, lst.id, record.poster, now=now,
                              trusted=True if verb is Verb.TRUST else None,
                              banned=True if verb is Verb.BAN else None,
                              approved=1 if state is HeldState.APPROVED else 0,
                              rejected=0 if state is HeldState.APPROVED else 1)
        learning.learn(conn, lst.id, msg.raw, promotional=state is not HeldState.APPROVED,
                       now=now)
    if record.notify_poster and msg.mail_from:
        _tell_poster(conn, record, lst, verb, state, note, now=now, templates=templates,
                     return_path=msg.mail_from)
    journal.record(conn, now=now, stage=Stage.MODERATION, event=f"held-{state.value}",
                   message_id=record.message_id, list_id=lst.id,
                   detail=f"held #{record.id} {state.value} by {actor}"
                          + (f": {note}" if note else ""))
    return get(conn, record.id)


def _tell_poster(conn: Connection, record: Held, lst: MailingList, verb: Verb,
                 state: HeldState, note: str, *, now: float, templates: Templates,
                 return_path: str) -> None:
    if state is HeldState.REJECTED or (verb is Verb.EXPIRE and state is HeldState.EXPIRED):
        template, subject = "notices/rejected.txt.j2", f"Your post to {lst.address} was not " \
                                                        "accepted"
        reasons = [f"a moderator rejected it: {note}" if note else "a moderator rejected it"] \
            if verb is Verb.REJECT else ["no moderator approved it in time"]
    elif verb is Verb.WITHDRAW:
        template, subject, reasons = "notices/withdrawn.txt.j2", \
            f"Your post to {lst.address} was withdrawn", []
    else:
        return  # approvals are visible on the list; discards and bans stay silent
    text = templates.render(template, list_address=lst.address, mailing_list=lst.identity,
                            subject=record.subject, reasons=reasons,
                            request_address=lst.identity.address("request"),
                            owner_address=lst.identity.address("owner"))
    queue(conn, Notice(to=return_path, subject=subject, text=text), lst.identity,
          list_id=lst.id, message_id=record.message_id, now=now)


def due_for_reminder(conn: Connection, *, now: float, reminder_before: float,
                     list_id: int) -> list[Held]:
    rows = conn.execute(sa.select(held).where(
        held.c.list_id == list_id, held.c.state == HeldState.HELD.value,
        held.c.reminded_at.is_(None), held.c.expires_at - reminder_before <= now,
        held.c.expires_at > now)).all()
    return [Held.from_row(r) for r in rows]


def mark_reminded(conn: Connection, record: Held, *, now: float) -> bool:
    return conn.execute(sa.update(held).where(held.c.id == record.id,
                                              held.c.reminded_at.is_(None))
                        .values(reminded_at=now)).rowcount == 1


def expired(conn: Connection, *, now: float) -> list[Held]:
    rows = conn.execute(sa.select(held).where(held.c.state == HeldState.HELD.value,
                                              held.c.expires_at <= now)).all()
    return [Held.from_row(r) for r in rows]
