"""Prometheus metrics at ``GET /metrics``: what a list owner graphs and alerts on.

Two kinds. Counters of this process (messages taken, recipients delivered, deferred
or failed) come from the stages' own tallies. Queue depths, the age of the oldest
waiting row and held posts are read from the store at scrape time, so they are right
whichever daemon did the work when several share one store, and survive restarts.

Alert on: ``listgate_queue_oldest_seconds`` growing (a stage is stuck or the smarthost
is down), ``listgate_spool_posts`` growing (the stage workers are not importing
intake's posts), ``listgate_queue_rows{state="parked"}`` above zero (something needs a look:
``listgate queue ls --state parked``), ``listgate_held_posts`` (moderators are behind).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.clock import Clock
from gateway.schema import HeldState, State, held, outbound, work
from gateway.store import Store

# The delivery stage's rows live in their own table; they are labelled like the others.
DELIVERY = "delivery"


class Metrics:
    """The registry the web endpoint renders. ``accepted`` and ``recipients`` are read
    when scraped (callables, so the stages need not know about Prometheus)."""

    def __init__(self, store: Store, *, clock: Clock, accepted: Callable[[], int],
                 recipients: Callable[[], Mapping[str, int]],
                 spooled: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Counters(accepted, recipients))
        self.registry.register(_Store(store, clock))
        if spooled is not None:
            self.registry.register(_Spool(spooled))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Counters(Collector):
    def __init__(self, accepted: Callable[[], int],
                 recipients: Callable[[], Mapping[str, int]]) -> None:
        self.accepted = accepted
        self.recipients = recipients

    def collect(self) -> Iterator[Metric]:
        taken = CounterMetricFamily(
            "listgate_intake_messages", "Messages accepted (answered 250, on disk)")
        taken.add_metric([], self.accepted())
        yield taken
        rcpts = CounterMetricFamily(
            "listgate_delivery_recipients",
            "Recipients handed to the smarthost, by outcome", labels=["outcome"])
        counts = self.recipients()
        for outcome in ("delivered", "deferred", "failed"):
            rcpts.add_metric([outcome], counts.get(outcome, 0))
        yield rcpts


class _Spool(Collector):
    def __init__(self, spooled: Callable[[], int]) -> None:
        self.spooled = spooled

    def collect(self) -> Iterator[Metric]:
        posts = GaugeMetricFamily(
            "listgate_spool_posts",
            "Posts taken in and not yet moved from the intake spool into the store")
        posts.add_metric([], self.spooled())
        yield posts


class _Store(Collector):
    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock.now()
        rows = GaugeMetricFamily("listgate_queue_rows", "Queue rows by stage and state",
                                 labels=["stage", "state"])
        oldest = GaugeMetricFamily(
            "listgate_queue_oldest_seconds",
            "Age of the oldest row not parked, by stage (0 when none)", labels=["stage"])
        held_posts = GaugeMetricFamily("listgate_held_posts",
                                       "Posts waiting for a moderator's decision")
        with self.store.read() as conn:
            counts: list[tuple[str, str, int]] = [tuple(r) for r in conn.execute(
                sa.select(work.c.stage, work.c.state, sa.func.count())
                .group_by(work.c.stage, work.c.state))]
            counts += [(DELIVERY, state, n) for state, n in conn.execute(
                sa.select(outbound.c.state, sa.func.count()).group_by(outbound.c.state))]
            ages = dict(conn.execute(
                sa.select(work.c.stage, sa.func.min(work.c.created_at))
                .where(work.c.state != State.PARKED.value).group_by(work.c.stage)).all())
            ages[DELIVERY] = conn.execute(
                sa.select(sa.func.min(outbound.c.created_at))
                .where(outbound.c.state != State.PARKED.value)).scalar()
            waiting = conn.execute(sa.select(sa.func.count()).select_from(held)
                                   .where(held.c.state == HeldState.HELD.value)).scalar_one()
        by_stage: dict[tuple[str, str], int] = {(str(s), str(st)): int(n) for s, st, n in counts}
        stages = sorted({stage for stage, _state in by_stage} | set(ages))
        for stage in stages:
            for state in State:
                rows.add_metric([stage, state.value], by_stage.get((stage, state.value), 0))
            since = ages.get(stage)
            oldest.add_metric([stage], max(0.0, now - since) if since is not None else 0.0)
        held_posts.add_metric([], waiting)
        yield rows
        yield oldest
        yield held_posts
