"""What the stages that handle their ``work`` rows one at a time share: the round."""

from __future__ import annotations

import abc
import logging
from typing import ClassVar

from sqlalchemy.engine import Row

from gateway import queue
from gateway.clock import Clock
from gateway.errors import LeaseLost
from gateway.queue import Claimer
from gateway.routing import Role, Stage
from gateway.schema import work
from gateway.store import Store
from gateway.worker import Progress

log = logging.getLogger(__name__)


class RowStage(abc.ABC):
    """A stage whose round claims up to ``batch`` of its due ``work`` rows (of ``roles``,
    if any) and hands each to ``handle``. A row whose handling raises is failed: tried
    again after ``retry_delay``, parked once it has used its attempts; the others go on.
    A row whose lease was lost meanwhile is left to the worker that holds it now."""

    stage: ClassVar[Stage]
    roles: ClassVar[tuple[Role, ...]] = ()
    store: Store
    clock: Clock
    claimer: Claimer
    retry_delay: float
    batch: int

    def run_once(self, progress: Progress | None = None) -> Progress:
        rows = queue.take(self.store, work, self.claimer, now=self.clock.now(),
                          limit=self.batch, stage=self.stage.value,
                          roles=[r.value for r in self.roles])
        progress = progress or Progress()
        progress.worked += len(rows)
        for row in rows:
            try:
                self.handle(row, progress)
            except LeaseLost:
                log.warning("lease lost on %s work row %s; another worker has it",
                            self.stage.value, row.id)
            except Exception as exc:  # one bad row must not stop the others
                log.exception("%s work row %s failed", self.stage.value, row.id)
                with self.store.write() as conn:
                    queue.fail(conn, work, row.id, self.claimer, now=self.clock.now(),
                               error=f"{type(exc).__name__}: {exc}", retry_delay=self.retry_delay)
        return progress

    @abc.abstractmethod
    def handle(self, row: Row[tuple[object, ...]], progress: Progress) -> None:
        """Do what ``row`` asks, completing it in the store (``queue.complete``) in the
        transaction that records the outcome; raise ``LeaseLost`` if that finds the row
        no longer ours."""
