"""Running a stage: claim a batch, process it, sleep until woken or the poll interval.

Stages tell each other that work is waiting through ``Wakeups`` (in-process
events); work itself only ever passes through the store. With several
processes sharing a store, the poll interval is the bound on latency between them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import StoreUnavailable
from gateway.routing import Stage

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What one round of a stage did: how many rows, and which stages now have work.

    ``woke`` tells the other stages at once (through ``on_wake``), not at the end of
    the round: a post's next stage starts while the rest of the batch is processed.
    """

    worked: int = 0
    wake: set[Stage] = field(default_factory=set)
    on_wake: Callable[..., None] | None = None

    def woke(self, *stages: Stage) -> None:
        self.wake.update(stages)
        if self.on_wake is not None:
            self.on_wake(*stages)


class Wakeups:
    """Per-stage events that any thread may set."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events = {stage: asyncio.Event() for stage in Stage}

    def notify(self, *stages: Stage) -> None:
        for stage in stages:
            self._loop.call_soon_threadsafe(self._events[stage].set)

    async def wait(self, stage: Stage, timeout: float) -> None:
        event = self._events[stage]
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        event.clear()


async def run_stage(stage: Stage, run_once: Callable[[Progress], Progress], wakeups: Wakeups, *,
                    poll_interval: float, stopping: asyncio.Event) -> None:
    """Run ``run_once`` in a worker thread until ``stopping`` is set."""
    errors = 0
    while not stopping.is_set():
        try:
            progress = await asyncio.to_thread(run_once, Progress(on_wake=wakeups.notify))
            errors = 0
        except StoreUnavailable as exc:
            errors += 1
            log.warning("%s: store unavailable (%s); retrying", stage.value, exc)
            progress = Progress()
        except Exception:  # a stage's loop is a process boundary: log and carry on
            errors += 1
            log.exception("%s: unexpected error; retrying", stage.value)
            progress = Progress()
        if progress.wake:
            wakeups.notify(*progress.wake)
        if progress.worked:
            continue
        delay = poll_interval if errors == 0 else min(30.0, poll_interval * 2 ** errors)
        waiter = asyncio.ensure_future(wakeups.wait(stage, delay))
        stopper = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()
