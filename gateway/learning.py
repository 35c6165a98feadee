"""Each list's promotional model: the shipped model plus what its moderators taught it.

A list stores only its own counts (``list_models``); scoring uses the shipped
model merged with them, cached until the list learns again. Moderators teach
by deciding: reject, discard and ban mean promotional; approve and trust mean
discussion. Learning happens in the transaction that records the decision.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway import promo
from gateway.schema import list_models

# Read for every post: built once (building a statement costs more than running it).
# The model itself (a list's word counts) is read only when the list has learned.
_OF_LIST = list_models.c.list_id == sa.bindparam("list_id")
_LEARNED_AT = sa.select(list_models.c.updated_at).where(_OF_LIST)
_LIST_MODEL = sa.select(list_models.c.model, list_models.c.updated_at).where(_OF_LIST)


class Models:
    """Merged models per list, cached by the time each list last learned."""

    def __init__(self, base: promo.Model) -> None:
        self.base = base
        self._cache: dict[int, tuple[float, promo.Model]] = {}
        self._lock = threading.Lock()

    def for_list(self, conn: Connection, list_id: int) -> promo.Model:
        learned_at = conn.execute(_LEARNED_AT, {"list_id": list_id}).scalar()
        if learned_at is None:
            return self.base
        with self._lock:
            cached = self._cache.get(list_id)
            if cached is not None and cached[0] == learned_at:
                return cached[1]
        row = conn.execute(_LIST_MODEL, {"list_id": list_id}).first()
        if row is None:  # the list was deleted between the two reads
            return self.base
        merged = self.base.merged(promo.Model.from_json(row.model))
        with self._lock:
            self._cache[list_id] = (row.updated_at, merged)
        return merged


def learn(conn: Connection, list_id: int, raw: bytes, *, promotional: bool, now: float) -> None:
    """Teach the list's own model one moderator decision."""
    row = conn.execute(sa.select(list_models.c.model, list_models.c.decisions)
                       .where(list_models.c.list_id == list_id).with_for_update()).first()
    model = promo.Model.from_json(row.model) if row else promo.Model.empty()
    model.learn(promo.tokens(raw), promotional)
    if row is None:
        conn.execute(list_models.insert().values(list_id=list_id, model=model.to_json(),
                                                 decisions=1, updated_at=now))
    else:
        conn.execute(sa.update(list_models).where(list_models.c.list_id == list_id)
                     .values(model=model.to_json(), decisions=row.decisions + 1, updated_at=now))
