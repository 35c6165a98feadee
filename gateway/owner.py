"""The owner stage: mail to LIST-owner@ is forwarded to the list's owners.

The copy gets a Received field and an X-Loop of the owner address; mail that
already carries that X-Loop, or that has no owner to go to, is recorded and
not forwarded.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.engine import Row

from gateway import headers as h
from gateway import journal, lists, outgoing, queue
from gateway.clock import Clock
from gateway.decorate import Trace, received_field
from gateway.errors import LeaseLost
from gateway.facts import message_facts
from gateway.message import split
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.rowstage import RowStage
from gateway.schema import RoleName, messages, work
from gateway.store import Store
from gateway.worker import Progress

log = logging.getLogger(__name__)


class Owner(RowStage):
    stage = Stage.OWNER

    def __init__(self, store: Store, *, clock: Clock, claimer: Claimer, hostname: str,
                 retry_delay: float, batch: int = 16) -> None:
        self.store = store
        self.clock = clock
        self.claimer = claimer
        self.hostname = hostname
        self.retry_delay = retry_delay
        self.batch = batch

    def handle(self, row: Row[tuple[object, ...]], progress: Progress) -> None:
        now = self.clock.now()
        with self.store.write() as conn:
            if not queue.complete(conn, work, row.id, self.claimer):
                raise LeaseLost(f"work row {row.id}")
            lst = lists.by_id(conn, row.list_id) if row.list_id is not None else None
            msg = conn.execute(sa.select(messages).where(messages.c.id == row.message_id)).one()
            facts = message_facts(msg.raw)

            def record(event: str, list_id: int | None, detail: str) -> None:
                journal.record(conn, now=now, stage=self.stage, event=event,
                               message_id=msg.id, list_id=list_id, detail=detail,
                               log_message_id=facts.message_id)

            if lst is None:
                record("dropped", None, "the list was deleted before the mail was forwarded")
                return
            owner_address = lst.identity.address("owner")
            if owner_address in facts.x_loops:
                record("discarded", lst.id, f"loop: it already carries X-Loop: {owner_address}")
                return
            owners = lists.role_holders(conn, lst.id, RoleName.OWNER)
            if not owners:
                record("unforwarded", lst.id, f"{lst.address} has no owners to forward to "
                                              "(add one with `listgate roles add`)")
                return
            parts = split(msg.raw)
            parts.prepend(h.RECEIVED, received_field(Trace(
                msg.helo, msg.peer, self.hostname, msg.protocol, msg.id, row.address,
                msg.received_at)))
            parts.add(h.X_LOOP, owner_address)
            outgoing.send(conn, parts.to_bytes(), envelope_from=lst.identity.address("bounces"),
                          recipients=owners, kind=outgoing.Kind.FORWARD, list_id=lst.id,
                          message_id=msg.id, now=now)
            record("forwarded", lst.id, f"to the owners of {lst.address}: {', '.join(owners)}")
        progress.woke(Stage.DELIVERY)
