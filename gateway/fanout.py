"""The fanout stage: an accepted post becomes outbound rows for the list's members.

The decorated copy is built once and stored as content; members are read in
chunks by id, and each chunk's outbound rows are written in the same
transaction that moves the work row's cursor past them. A crash resumes at
the cursor: no member is queued twice, none is skipped, and memory stays flat
however large the list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from gateway import authentication, digest, dmarc, journal, lists, outgoing, queue
from gateway.clock import Clock
from gateway.decorate import Trace, decorate_post
from gateway.errors import LeaseLost
from gateway.facts import message_facts
from gateway.lists import MailingList
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.rowstage import RowStage
from gateway.schema import Mode, members, messages, work
from gateway.signing import PLACEHOLDER
from gateway.store import Store
from gateway.templates import Templates
from gateway.worker import Progress

log = logging.getLogger(__name__)

# The statements every post runs, built once: building a statement costs several times
# what running it does.
_MESSAGE_ID = sa.select(messages.c.message_id).where(messages.c.id == sa.bindparam("id"))
_MESSAGE = sa.select(messages).where(messages.c.id == sa.bindparam("id"))
_MEMBERS_AFTER = (
    sa.select(members.c.id, members.c.address)
    .where(members.c.list_id == sa.bindparam("list_id"),
           members.c.mode == Mode.REGULAR.value, members.c.enabled.is_(True),
           members.c.id > sa.bindparam("cursor"))
    .order_by(members.c.id).limit(sa.bindparam("chunk"))
)


class Fanout(RowStage):
    stage = Stage.FANOUT

    def __init__(self, store: Store, *, clock: Clock, claimer: Claimer, templates: Templates,
                 hostname: str, chunk: int, max_recipients: int, retry_delay: float,
                 resolver: authentication.Resolver, trusted_authserv_ids: tuple[str, ...] = (),
                 arc: bool = False, public_url: str = "", batch: int = 8) -> None:
        self.public_url = public_url
        self.resolver = resolver
        self.trusted_authserv_ids = trusted_authserv_ids
        self.arc = arc
        self.store = store
        self.clock = clock
        self.claimer = claimer
        self.templates = templates
        self.hostname = hostname
        self.chunk = chunk
        self.max_recipients = max_recipients
        self.retry_delay = retry_delay
        self.batch = batch

    def handle(self, row: Row[tuple[object, ...]], progress: Progress) -> None:
        with self.store.read() as conn:
            lst = lists.by_id(conn, row.list_id) if row.list_id is not None else None
            message_id_header = None if lst is None or row.content_id is None else \
                conn.execute(_MESSAGE_ID, {"id": row.message_id}).scalar_one_or_none()
        if lst is None:
            with self.store.write() as conn:
                if not queue.complete(conn, work, row.id, self.claimer):
                    raise LeaseLost(f"work row {row.id}")
                journal.record(conn, now=self.clock.now(), stage=self.stage, event="dropped",
                               message_id=row.message_id, list_id=None,
                               detail="the list was deleted before the post went out")
            return
        # The copy is built outside the write lock, and stored in the transaction that
        # queues the first chunk (for most lists, the only one).
        copy = None if row.content_id is not None else self._copy(row, lst)
        if copy is not None:
            message_id_header = copy.message_id_header
        content_id: int | None = row.content_id
        cursor = row.cursor or 0
        queued = 0
        while True:
            now = self.clock.now()
            with self.store.write() as conn:
                if content_id is None:
                    assert copy is not None
                    content_id = self._store(conn, copy, lst, now, progress)
                chunk = conn.execute(_MEMBERS_AFTER, {"list_id": lst.id, "cursor": cursor,
                                                      "chunk": self.chunk}).all()
                personal = lst.links_base(self.public_url) is not None
                recipients = [f"{r.address} {r.id}" if personal else r.address for r in chunk]
                outgoing.enqueue(conn, content_id=content_id,
                                 envelope_from=lst.identity.address("bounces"),
                                 recipients=recipients, kind=outgoing.Kind.POST,
                                 list_id=lst.id, message_id=row.message_id, now=now,
                                 batch=self.max_recipients, personalize=personal)
                queued += len(recipients)
                if len(chunk) < self.chunk:
                    if not queue.complete(conn, work, row.id, self.claimer):
                        raise LeaseLost(f"work row {row.id}")
                    outgoing.drop_unused_content(conn, content_id)
                    journal.record(conn, now=now, stage=self.stage, event="fanned-out",
                                   message_id=row.message_id, list_id=lst.id,
                                   detail=f"to {lst.address}: queued for {queued} "
                                          "regular members" + (" (resumed)" if row.cursor else ""),
                                   log_message_id=message_id_header)
                    progress.woke(Stage.DELIVERY)
                    return
                cursor = chunk[-1].id
                moved = conn.execute(
                    sa.update(work).where(queue.owned(work, row.id, self.claimer))
                    .values(cursor=cursor, content_id=content_id,
                            lease_until=now + self.claimer.lease, updated_at=now)
                ).rowcount
                if moved != 1:
                    raise LeaseLost(f"work row {row.id}")
            progress.woke(Stage.DELIVERY)

    def _copy(self, row: Row[tuple[object, ...]], lst: MailingList) -> _Copy:
        """The members' copy of the post (with the member placeholder where its links are
        personal). CPU work only: nothing is written."""
        with self.store.read() as conn:
            msg = conn.execute(_MESSAGE, {"id": row.message_id}).one()
        links = lst.links_base(self.public_url)
        footer = self.templates.render(
            "footer.txt.j2", list_address=lst.address, mailing_list=lst.identity,
            preferences_url=f"{links}/u/{PLACEHOLDER}" if links else None)
        trace = Trace(helo=msg.helo, peer=msg.peer, hostname=self.hostname,
                      protocol=msg.protocol, queue_id=msg.id, recipient=lst.address,
                      received_at=msg.received_at)
        auth = authentication.verify(msg.raw, self.resolver,
                                     trusted_authserv_ids=self.trusted_authserv_ids,
                                     use="either" if self.trusted_authserv_ids else "dkim")
        mitigation = dmarc.Mitigation(lst.dmarc_mitigation)
        # A policy we could not look up is treated as strict: rewriting costs little,
        # a rejected copy costs a member their subscription (bounces).
        mitigate = mitigation is not dmarc.Mitigation.NONE and (
            dmarc.needs_mitigation(auth.dmarc_policy) or auth.dmarc == "temperror")
        raw = msg.raw
        if mitigate and mitigation is dmarc.Mitigation.WRAP:
            raw = dmarc.wrap(raw, lst.identity, subject=message_facts(msg.raw).subject)
        data = decorate_post(raw, lst.identity, footer=footer, trace=trace, links_base=links,
                             rewrite_from=mitigate and mitigation is dmarc.Mitigation.REWRITE)
        # The copies' ARC sets vouch for how the post authenticated as it came in; a
        # wrapped post is a new message from the list, with no chain of its own.
        arc_results = authentication.results_to_json(auth) \
            if self.arc and not (mitigate and mitigation is dmarc.Mitigation.WRAP) else None
        mitigated = (f"{auth.from_domain} publishes p={auth.dmarc_policy} "
                     f"(dmarc={auth.dmarc}): {mitigation.value}") if mitigate else None
        return _Copy(data, arc_results, mitigated, msg.id, msg.size, msg.message_id)

    def _store(self, conn: Connection, copy: _Copy, lst: MailingList, now: float,
               progress: Progress) -> int:
        content_id = outgoing.add_content(conn, copy.data, now=now, auth=copy.arc_results)
        if copy.mitigated is not None:
            journal.record(conn, now=now, stage=self.stage, event="dmarc-mitigated",
                           message_id=copy.message_id, list_id=lst.id, detail=copy.mitigated)
        # In the transaction that marks this post's content made: it joins the digest
        # batch exactly once, however often this fanout is retried.
        if digest.add_post(conn, lst, message_id=copy.message_id, size=copy.size, now=now):
            progress.woke(Stage.DIGEST)
        return content_id


@dataclass(frozen=True)
class _Copy:
    data: bytes
    arc_results: str | None
    mitigated: str | None  # what the DMARC mitigation did, for the journal
    message_id: int
    size: int
    message_id_header: str | None
