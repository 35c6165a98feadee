"""GET /metrics on the running daemon: counters and queue depths in Prometheus text."""

from __future__ import annotations

import http.client
import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import ManualClock
from gateway.tally import Tally
from tests.conftest import LIST, MEMBERS
from tests.support import RunningGateway, Sink, gateway, post, wait_until


def scrape(gw: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port("http"), timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/plain")
    finally:
        conn.close()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def test_metrics_count_what_was_taken_and_delivered(config_path: Path, sink: Sink) -> None:
    with gateway(config_path) as gw:
        before = scrape(gw)
        assert before[("listgate_intake_messages_total", ())] == 0
        gw.send(MEMBERS[0], LIST, post(MEMBERS[0], LIST, "Counted"))
        sink.wait_for(len(MEMBERS))
        wait_until(lambda: scrape(gw)[("listgate_delivery_recipients_total",
                                       (("outcome", "delivered"),))] == len(MEMBERS),
                   what="the delivered copies counted")
        after = scrape(gw)
    assert after[("listgate_intake_messages_total", ())] == 1
    assert after[("listgate_delivery_recipients_total", (("outcome", "failed"),))] == 0
    # Nothing left waiting once the post is out.
    assert after[("listgate_queue_rows", (("stage", "delivery"), ("state", "ready")))] == 0
    assert after[("listgate_queue_oldest_seconds", (("stage", "delivery"),))] == 0
    assert after[("listgate_held_posts", ())] == 0


def test_metrics_show_a_deferred_recipient_waiting(config_path: Path, sink: Sink) -> None:
    """A smarthost that says "later" for one member: the copy is counted deferred and
    its row shows in the delivery queue, growing older."""
    sink.handler.rcpt_replies[MEMBERS[1]] = "451 4.3.0 Try again later"
    clock = ManualClock(1_000_000.0)
    with gateway(config_path, clock=clock) as gw:
        gw.send(MEMBERS[0], LIST, post(MEMBERS[0], LIST, "Deferred for one"))
        sink.wait_for(len(MEMBERS) - 1)
        wait_until(lambda: scrape(gw)[("listgate_delivery_recipients_total",
                                       (("outcome", "deferred"),))] == 1,
                   what="the deferred copy counted")
        clock.advance(120)
        seen = scrape(gw)
    assert seen[("listgate_delivery_recipients_total", (("outcome", "delivered"),))] == 2
    assert seen[("listgate_queue_rows", (("stage", "delivery"), ("state", "ready")))] == 1
    assert seen[("listgate_queue_oldest_seconds", (("stage", "delivery"),))] >= 120


def test_shared_tally_sums_the_rows_of_forked_workers() -> None:
    """The workers of one `serve` count into memory shared with the supervisor: each
    adds to its own row, any of them reads the sum, and a worker started again in a
    slot goes on from what the one before it counted."""
    tally = Tally(3)

    def worker(slot: int, counts: dict[str, int]) -> None:
        pid = os.fork()
        if pid == 0:
            try:
                tally.slot = slot
                tally.add(counts)
            finally:
                os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    worker(1, {"delivered": 5, "deferred": 1})
    worker(2, {"delivered": 7, "failed": 2})
    worker(1, {"delivered": 3})  # a restarted worker in slot 1
    assert tally.totals() == {"delivered": 15, "deferred": 1, "failed": 2}
    tally.add({"delivered": 1})  # slot 0, in this process
    assert tally.totals()["delivered"] == 16
    assert Tally().totals() == {"delivered": 0, "deferred": 0, "failed": 0}
