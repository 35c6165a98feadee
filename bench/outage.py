"""Smarthost outage: connections refused, then 421, then 451, then recovery; nothing may be lost.

    .venv/bin/python bench/outage.py                  a 3-minute outage (a third of each kind)
    .venv/bin/python bench/outage.py --minutes 1      shorter
    .venv/bin/python bench/outage.py --store-url postgresql://postgres@127.0.0.1:5432/outage

The daemon (`listgate serve`, its own process) delivers to a smarthost that is
first not listening at all, then greets every connection with `421 4.3.2` and
hangs up, then takes every transaction up to the end of DATA and answers
`451 4.3.0`. Posts keep arriving all along (paced, to two lists: one with
per-member copies, one with personalisation off, so both delivery paths defer).
Then the smarthost recovers. [delivery] retry_initial and retry_max are set to
seconds for the run. The verdict:

- nothing lost: every post that got a 250 reached every member, and no recipient
  was recorded as failed;
- no duplicates (no transaction was ever accepted twice);
- retries backed off: the interval chosen at each deferral (read from the store as
  the outage goes on, and from the delivery log's `deferred … until +Ns` lines)
  grows from retry_initial towards retry_max and never exceeds it;
- the queue drains after recovery (the time is reported), nothing parked.

Exit status 0 only if all of that holds. Reuses bench/soak.py's sink, daemon
process and load generator.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import itertools
import re
import socketserver
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from soak import (
    REPO,
    GatewayProcess,
    Loader,
    Setup,
    Sink,
    addresses,
    database,
    free_port,
    parked_by_cli,
    queue_rows,
    tally_posts,
    wait_until,
    write_config,
)

from gateway.clock import SystemClock
from gateway.schema import State, delivery_failures, outbound
from gateway.store import Store

DOMAIN = "bench.test"
REPLY_421 = b"421 4.3.2 smarthost.test Service not available, closing channel\r\n"
REPLY_451 = "451 4.3.0 Temporary failure, try again later"
DEFERRED = re.compile(r"^(\S+ \S+) INFO gateway\.delivery: deferred outbound=(\d+) .* until "
                      r"\+(\d+)s")
PARTLY = re.compile(r"^(\S+ \S+) INFO gateway\.delivery: delivered outbound=(\d+) .* deferred "
                    r"(\d+)")


class Greeter(socketserver.ThreadingTCPServer):
    """A smarthost that answers every connection with a 421 and hangs up."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, port: int) -> None:
        self.greeted: list[float] = []
        super().__init__(("127.0.0.1", port), GreetHandler)

    def start(self) -> Greeter:
        threading.Thread(target=self.serve_forever, name="greeter", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class GreetHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, Greeter)
        self.server.greeted.append(time.monotonic())
        with contextlib.suppress(OSError):
            self.request.sendall(REPLY_421)


@dataclass
class Sampler:
    """Reads the outbound queue every half second: the backlog, and the interval the
    gateway chose at each deferral (due_at - updated_at of a row released with tries=k)."""

    store: Store
    intervals: dict[tuple[int, int], float] = field(default_factory=dict)  # (row, tries) ->
    backlog: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sampler:
        threading.Thread(target=self._run, name="sampler", daemon=True).start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            with contextlib.suppress(sa.exc.SQLAlchemyError), self.store.read() as conn:
                rows = conn.execute(sa.select(outbound.c.id, outbound.c.tries, outbound.c.state,
                                              outbound.c.due_at, outbound.c.updated_at)).all()
                self.backlog.append((time.monotonic(), len(rows)))
                for r in rows:
                    if r.state == State.READY.value and r.tries > 0:
                        self.intervals.setdefault((r.id, r.tries), r.due_at - r.updated_at)


def by_try(intervals: dict[tuple[int, int], float]) -> dict[int, list[float]]:
    grouped: dict[int, list[float]] = collections.defaultdict(list)
    for (_row, tries), interval in intervals.items():
        grouped[tries].append(interval)
    return dict(sorted(grouped.items()))


def log_deferrals(log: Path, since: float) -> tuple[dict[int, list[int]], list[float]]:
    """From the delivery log: each bulk row's `until +Ns` sequence, and the wall-clock
    times of every deferral (bulk or per-member), for lines written after ``since``."""
    sequences: dict[int, list[int]] = collections.defaultdict(list)
    times: list[float] = []
    for line in log.read_text(errors="replace").splitlines():
        m = DEFERRED.match(line) or PARTLY.match(line)
        if m is None:
            continue
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at < since:
            continue
        times.append(at)
        if m.re is DEFERRED:
            sequences[int(m.group(2))].append(int(m.group(3)))
    return dict(sequences), times


def failures_recorded(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(delivery_failures))
                   .scalar_one())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0,
                   help="the whole outage; a third refused, a third 421, a third 451")
    p.add_argument("--rate", type=float, default=1.0, help="posts per second (default 1)")
    p.add_argument("--members", type=int, default=3, help="members per list (default 3)")
    p.add_argument("--retry-initial", type=int, default=2, help="seconds (default 2)")
    p.add_argument("--retry-max", type=int, default=30, help="seconds (default 30)")
    p.add_argument("--store-url", help="default: SQLite in the work directory")
    p.add_argument("--keep-db", action="store_true", help="do not drop a database made here")
    p.add_argument("--workdir", type=Path, help="default: a new directory under /tmp")
    p.add_argument("--listgate", type=Path, default=REPO / ".venv" / "bin" / "listgate")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="listgate-outage-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with database(args.store_url, workdir, keep=args.keep_db) as url:
        sink = Sink()  # not started: the outage begins with nothing listening
        smtp_port = free_port()
        config = write_config(workdir, store_url=url, smtp_port=smtp_port, smarthost=sink.url,
                              retry_initial=f"{args.retry_initial}s",
                              retry_max=f"{args.retry_max}s")
        setup = Setup(workdir, config, url, args.listgate, smtp_port)
        lists = {f"outage-a@{DOMAIN}": addresses("a", args.members),
                 f"outage-b@{DOMAIN}": addresses("b", args.members)}
        posters = addresses("poster", 2)
        setup.cli("init")
        for address, members in lists.items():
            setup.cli("lists", "create", address)
            setup.cli("members", "add", address, *posters, "--mode", "nomail", "--approved")
            setup.cli("members", "add", address, *members)
        setup.cli("lists", "set", f"outage-b@{DOMAIN}", "--personalize", "off")
        store = Store(url, clock=SystemClock(), pool_size=2)
        gw = GatewayProcess(args.listgate, config, smtp_port)
        try:
            gw.start()
            return run(args, setup, gw, sink, store, lists, posters)
        finally:
            with contextlib.suppress(Exception):
                if gw.proc is not None and gw.proc.poll() is None:
                    gw.kill()
            sink.stop()
            store.dispose()


def run(args: argparse.Namespace, setup: Setup, gw: GatewayProcess, sink: Sink, store: Store,
        lists: dict[str, list[str]], posters: list[str]) -> int:
    outage = args.minutes * 60
    third = outage / 3
    total = max(len(lists), int(outage * args.rate))
    print(f"smarthost outage: {outage:.0f}s ({third:.0f}s refused, {third:.0f}s 421 at the "
          f"greeting, {third:.0f}s 451 after DATA), {total} posts at {args.rate:g}/s to "
          f"{', '.join(lists)} ({args.members} members each; the second not personalised); "
          f"retry_initial {args.retry_initial}s, retry_max {args.retry_max}s", flush=True)
    print(f"  store {store.engine.url.render_as_string(hide_password=True)}; "
          f"work directory {setup.workdir}", flush=True)
    wall0, start = time.time(), time.monotonic()
    sampler = Sampler(store).start()
    loader = Loader(setup.smtp_port, list(lists), posters, total, 2, args.rate).start()

    print(f"  {0:6.1f}s: smarthost refuses connections", flush=True)
    time.sleep(max(0.0, start + third - time.monotonic()))
    greeter = Greeter(sink.port).start()
    print(f"  {time.monotonic() - start:6.1f}s: smarthost greets with 421", flush=True)
    try:
        time.sleep(max(0.0, start + 2 * third - time.monotonic()))
    finally:
        greeter.stop()
    sink.handler.data_reply = REPLY_451
    sink.start()
    print(f"  {time.monotonic() - start:6.1f}s: smarthost answers 451 after DATA "
          f"({len(greeter.greeted)} connections were greeted with 421)", flush=True)
    time.sleep(max(0.0, start + outage - time.monotonic()))
    sink.handler.data_reply = None
    recovered = time.monotonic()
    during = len(sink.handler.taken())
    print(f"  {recovered - start:6.1f}s: smarthost recovers ({len(sink.handler.refused)} "
          f"transactions were answered 451; {during} copies taken during the outage)",
          flush=True)
    loader.join(60)
    loader.stop.set()

    accepted = loader.accepted
    expected = sum(len(lists[p.list_address]) for p in accepted)
    wait_until(lambda: queue_rows(store) == 0 and len(sink.handler.taken()) >= expected,
               args.drain_timeout, "the queue to drain", interval=0.2)
    drained_at = time.monotonic()
    drain = drained_at - recovered
    sampler.stop.set()
    parked, parked_summary = parked_by_cli(setup)
    failed = failures_recorded(store)
    status = gw.terminate()

    copies = sink.handler.taken()
    first_copy = min((c.at for c in copies), default=drained_at) - recovered
    lost, dups = [], 0
    for address, members in lists.items():
        t = tally_posts(copies, [p for p in accepted if p.list_address == address], members)
        lost += t.lost
        dups += len(t.duplicates)
    tries = by_try(sampler.intervals)
    sequences, deferral_times = log_deferrals(gw.log, wall0)
    cap = float(args.retry_max)
    medians = [statistics.median(v) for v in tries.values()]
    grows = (len(medians) >= 3 and all(b >= a - 1 for a, b in itertools.pairwise(medians))
             and medians[-1] > medians[0])
    within = all(args.retry_initial - 1 <= i <= cap + 1 for v in tries.values() for i in v)
    log_ok = all(all(b >= a for a, b in itertools.pairwise(s)) and max(s) <= cap
                 for s in sequences.values())

    print(f"  posts with a 250: {len(accepted)} (during the outage: "
          f"{sum(1 for p in accepted if p.accepted_at < recovered)}); attempts without a 250: "
          f"{loader.failed_attempts}")
    print(f"  copies: expected {expected}, received {len(copies)}, lost {len(lost)}, "
          f"duplicates {dups}; recipients recorded as failed: {failed}")
    print("  interval chosen at each deferral, by the row's try number (from the store):")
    for k, values in tries.items():
        print(f"    try {k:2d}: {len(values):4d} deferrals, interval min {min(values):5.1f}s "
              f"median {statistics.median(values):5.1f}s max {max(values):5.1f}s")
    longest = sorted(sequences.items(), key=lambda kv: -len(kv[1]))[:3]
    for row, seq in longest:
        print(f"  delivery log, delivery/{row}: deferred until "
              + " ".join(f"+{s}s" for s in seq))
    buckets = collections.Counter(int((t - wall0) // 30) for t in deferral_times)
    backlog = {int((t - start) // 30): n for t, n in sampler.backlog}
    print("  per 30 s: deferrals logged / outbound rows queued: "
          + "  ".join(f"{b * 30}s:{buckets.get(b, 0)}/{backlog.get(b, 0)}"
                      for b in range(int((drained_at - start) // 30) + 1)))
    print(f"  after recovery: first copy in {first_copy:.1f}s, queue drained in {drain:.1f}s "
          f"(retry_max {args.retry_max}s)")
    print(f"  parked: {parked} ({parked_summary!r}); daemon exit status on SIGTERM: {status}")
    for token, rcpt in lost[:10]:
        print(f"  LOST {token.decode()} -> {rcpt}")

    failures = []
    if lost or failed:
        failures.append("mail was lost")
    if dups:
        failures.append(f"{dups} duplicate copies")
    if parked:
        failures.append("rows parked")
    if not (grows and within and log_ok):
        failures.append("retries did not back off from retry_initial to retry_max")
    if failures:
        print("VERDICT: FAIL: " + "; ".join(failures))
        return 1
    print(f"VERDICT: PASS: nothing lost, no duplicates, retries backed off "
          f"{medians[0]:.0f}s -> {medians[-1]:.0f}s, drained {drain:.1f}s after recovery")
    return 0


if __name__ == "__main__":
    sys.exit(main())
