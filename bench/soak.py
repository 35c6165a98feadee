"""Crash soak: posts keep arriving while the daemon is SIGKILLed and restarted; nothing may be lost.

    .venv/bin/python bench/soak.py                 3000 posts, 10 kills, SQLite (~5 min)
    .venv/bin/python bench/soak.py --quick         300 posts, 3 kills (~1 min)
    .venv/bin/python bench/soak.py --store-url postgresql://postgres@127.0.0.1:5432/soak

A load generator (smtplib, several threads, paced) sends posts to two lists: one
whose members get every post, one whose members get RFC 1153 digests (a schedule
of every minute and a small size threshold, so issues close often). Meanwhile the
daemon, `listgate serve` in its own process, is SIGKILLed at random moments and
restarted. A counting SMTP sink stands in for the smarthost. Once the queue has
drained the script prints a verdict from what the sink received:

- every post that got a 250 reached every regular member (lost: none);
- every closed digest issue reached every digest member, and every such post is in
  exactly one issue;
- duplicates are counted per kill: a kill can only repeat what was in flight, at
  most [delivery] connections x 4 rows (the feeder's claim-ahead) of recipients;
- nothing is parked (`listgate queue ls --state parked`) or left held;
- the daemon's resident memory (VmRSS) and open file descriptors, sampled every
  second from /proc, are printed for each run of the daemon (start, after warm-up,
  end, peak). With `--kills 0` (one daemon for the whole load: a leak soak) they
  must be flat: once warmed up (the first quarter of the load) RSS grows by at most
  10 % (and 8 MiB), and the daemon holds no more descriptors once idle than it did
  after warm-up.

    .venv/bin/python bench/soak.py --kills 0 --posts 3000 --rate 25   leak soak, 2 min

Exit status 0 only if nothing was lost, nothing parked or held, no kill caused more
duplicates than were in flight, and (with no kills) memory and descriptors were flat.
A PostgreSQL URL names a database the script creates (and drops at the end) when it
does not exist; an existing one must be empty. The work directory (config,
daemon.log, SQLite store) is kept.

bench/outage.py reuses the sink, the daemon process and the load generator.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.clock import SystemClock
from gateway.schema import BatchState, digest_batches, held, outbound, work
from gateway.store import Store, normalise_url

REPO = Path(__file__).resolve().parent.parent
DOMAIN = "bench.test"
TOKEN = re.compile(rb"soak\.[a-z]+\.\d+\.\d+@" + re.escape(DOMAIN).encode())
ISSUE = re.compile(rb"^Subject: .*Digest, Vol (\d+), Issue (\d+)", re.M)
CONNECTIONS = 4  # [delivery] connections
CLAIM_AHEAD = 4  # the delivery feeder holds connections x 4 rows at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.2) -> float:
    """Seconds it took; SystemExit naming ``what`` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


# -- the counting sink ---------------------------------------------------------------

@dataclass(frozen=True)
class Copy:
    """One recipient's copy as the sink took it (or refused it)."""

    at: float          # time.monotonic()
    rcpt: str
    tokens: frozenset[bytes]
    issue: tuple[int, int] | None  # (volume, number) of a digest


class SinkHandler:
    """Takes every transaction, or answers ``data_reply`` (e.g. a 451) after DATA."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.copies: list[Copy] = []
        self.refused: list[Copy] = []
        self.data_reply: str | None = None

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads one command at a time, so pipelining clients are fine.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        issue = ISSUE.search(data[:4096])
        now = time.monotonic()
        copies = [Copy(now, rcpt, frozenset(TOKEN.findall(data)),
                       (int(issue.group(1)), int(issue.group(2))) if issue else None)
                  for rcpt in envelope.rcpt_tos]
        reply = self.data_reply
        with self.lock:
            (self.refused if reply else self.copies).extend(copies)
        return reply or "250 2.0.0 Ok: queued"

    def taken(self) -> list[Copy]:
        with self.lock:
            return list(self.copies)


class Sink:
    """A real SMTP server on loopback standing in for the smarthost."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.handler = SinkHandler()
        self._controller: Controller | None = None

    def start(self) -> Sink:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                      data_size_limit=50 * 1024 * 1024)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"


# -- the daemon, as its own process --------------------------------------------------

class GatewayProcess:
    """`listgate serve` in its own process, appending to one log across restarts."""

    def __init__(self, listgate: Path, config: Path, smtp_port: int) -> None:
        self.listgate = listgate
        self.config = config
        self.smtp_port = smtp_port
        self.log = config.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until it listens; returns how long that took."""
        started = time.monotonic()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([str(self.listgate), "--config", str(self.config),
                                          "serve"], stdout=logf, stderr=subprocess.STDOUT,
                                         cwd=self.config.parent)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"the daemon exited with {self.proc.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"the daemon did not listen on {self.smtp_port} within {timeout}s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(120)


# -- the daemon's memory and descriptors -----------------------------------------------

@dataclass(frozen=True)
class Sample:
    at: float   # time.monotonic()
    pid: int
    rss_kib: int
    fds: int


def sample(pid: int) -> Sample | None:
    """VmRSS and the number of open descriptors of ``pid`` (None if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return Sample(time.monotonic(), pid, int(m.group(1)) if m else 0, fds)


@dataclass
class Resources:
    """Samples the running daemon every ``every`` seconds, across restarts."""

    gateway: GatewayProcess
    every: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Resources:
        threading.Thread(target=self._run, name="resources", daemon=True).start()
        return self

    def take(self) -> None:
        proc = self.gateway.proc
        if proc is not None and proc.poll() is None:
            s = sample(proc.pid)
            if s is not None:
                self.samples.append(s)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.take()

    def runs(self) -> list[list[Sample]]:
        """The samples of each run of the daemon (one per process id), in order."""
        by_pid: dict[int, list[Sample]] = {}
        for s in list(self.samples):
            by_pid.setdefault(s.pid, []).append(s)
        return list(by_pid.values())


def flatness(run: list[Sample], warm: float) -> tuple[Sample, Sample, Sample, int, int]:
    """(first, warmed-up, last sample, peak RSS, peak fds) of one run; ``warm`` is
    when the warm-up ended (the first sample at or after it counts)."""
    warmed = next((s for s in run if s.at >= warm), run[-1])
    return (run[0], warmed, run[-1], max(s.rss_kib for s in run), max(s.fds for s in run))


# -- set-up: config, store, lists, through the real CLI ------------------------------

@dataclass(frozen=True)
class Setup:
    workdir: Path
    config: Path
    store_url: str
    listgate: Path
    smtp_port: int

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(self.listgate), "--config", str(self.config), *args],
                              capture_output=True, text=True, cwd=self.workdir)
        if check and done.returncode != 0:
            raise SystemExit(f"listgate {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout}{done.stderr}")
        return done


def write_config(workdir: Path, *, store_url: str, smtp_port: int, smarthost: str,
                 retry_initial: str, retry_max: str, extra: str = "") -> Path:
    path = workdir / "listgate.toml"
    path.write_text(f"""\
[store]
url = "{store_url}"

[intake]
listen = ["smtp://127.0.0.1:{smtp_port}"]
hostname = "lists.{DOMAIN}"

[queue]
poll_interval = "200ms"
lease = "30s"
retry_delay = "1s"

[delivery]
smarthost = "{smarthost}"
connections = {CONNECTIONS}
retry_initial = "{retry_initial}"
retry_max = "{retry_max}"

[web]
listen = "http://127.0.0.1:0"

{extra}
""", encoding="utf-8")
    return path


@contextlib.contextmanager
def database(url: str | None, workdir: Path, *, keep: bool) -> Iterator[str]:
    """The store URL to use: a new SQLite file, or a PostgreSQL database that is
    created here if absent (and then dropped at the end unless ``keep``)."""
    if url is None or url.startswith("sqlite"):
        yield url or f"sqlite:///{workdir / 'listgate.db'}"
        return
    url = normalise_url(url)
    target = sa.engine.make_url(url)
    name = target.database
    if not name:
        raise SystemExit(f"{url}: name a database (created if it does not exist)")
    admin = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                              {"n": name}).first() is not None
        if not exists:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    if exists:
        probe = sa.create_engine(url)
        tables = sa.inspect(probe).get_table_names()
        probe.dispose()
        if tables:
            admin.dispose()
            raise SystemExit(f"database {name!r} is not empty; name a new one (the script "
                             "creates and drops it) or drop this one")
    try:
        yield url
    finally:
        if not exists and not keep:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def addresses(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}@members.{DOMAIN}" for i in range(count)]


# -- the load generator --------------------------------------------------------------

@dataclass(frozen=True)
class Post:
    token: bytes
    list_address: str
    accepted_at: float


@dataclass
class Loader:
    """Sends ``total`` posts that get a 250, spread over ``targets``, paced at ``rate``.

    A post that does not get its 250 (the daemon was killed, the connection reset)
    is sent again as a new post with a new token: the client cannot know whether
    the first one was committed, so only a 250 counts.
    """

    port: int
    targets: list[str]   # list addresses, used round-robin
    posters: list[str]
    total: int
    threads: int
    rate: float
    accepted: list[Post] = field(default_factory=list)
    failed_attempts: int = 0
    attempted_tokens: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_index: int = 0
    _outstanding: list[int] = field(default_factory=list)
    _attempt: int = 0
    _next_at: float = 0.0
    _workers: list[threading.Thread] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Loader:
        self._next_at = time.monotonic()
        for n in range(self.threads):
            t = threading.Thread(target=self._work, name=f"loader-{n}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._workers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self._workers)

    def _take(self) -> tuple[int, int, float] | None:
        """(post index, attempt number, when to send) or None when all are accepted."""
        with self._lock:
            if self._outstanding:
                index = self._outstanding.pop()
            elif self._next_index < self.total:
                index, self._next_index = self._next_index, self._next_index + 1
            else:
                return None
            self._attempt += 1
            at = max(time.monotonic(), self._next_at)
            self._next_at = at + 1.0 / self.rate
            return index, self._attempt, at

    def _work(self) -> None:
        client: smtplib.SMTP | None = None
        while not self.stop.is_set():
            taken = self._take()
            if taken is None:
                break
            index, attempt, at = taken
            time.sleep(max(0.0, at - time.monotonic()))
            target = self.targets[index % len(self.targets)]
            poster = self.posters[index % len(self.posters)]
            kind = target.split("@")[0].rsplit("-", 1)[-1]
            token = f"soak.{kind}.{index}.{attempt}@{DOMAIN}"
            data = (f"From: {poster}\r\nTo: {target}\r\nSubject: soak post {index} "
                    f"(attempt {attempt})\r\nMessage-ID: <{token}>\r\n"
                    f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
                    f"\r\nPost {index} of the soak.\r\ntoken: {token}\r\n").encode()
            with self._lock:
                self.attempted_tokens.add(token.encode())
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.port, timeout=20)
                client.sendmail(poster, [target], data)
            except (smtplib.SMTPException, OSError):
                with self._lock:
                    self._outstanding.append(index)
                    self.failed_attempts += 1
                if client is not None:
                    with contextlib.suppress(smtplib.SMTPException, OSError):
                        client.close()
                client = None
                time.sleep(0.2)
                continue
            with self._lock:
                self.accepted.append(Post(token.encode(), target, time.monotonic()))
        if client is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()


# -- the store, read for the verdict ---------------------------------------------------

def queue_rows(store: Store) -> int:
    with store.read() as conn:
        return sum(int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                   for t in (work, outbound))


def open_batch_posts(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(digest_batches.c.posts),
                                                             0))
                                .where(digest_batches.c.state == BatchState.OPEN.value))
                   .scalar_one())


def batch_states(store: Store) -> collections.Counter[str]:
    with store.read() as conn:
        return collections.Counter(conn.execute(
            sa.select(digest_batches.c.state).where(digest_batches.c.posts > 0)).scalars())


def closed_issues(store: Store) -> list[tuple[int, int]]:
    with store.read() as conn:
        return [(int(v), int(n)) for v, n in conn.execute(
            sa.select(digest_batches.c.volume, digest_batches.c.number)
            .where(digest_batches.c.state != BatchState.OPEN.value)
            .order_by(digest_batches.c.id))]


def held_waiting(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(held)
                                .where(held.c.state == "held")).scalar_one())


def parked_by_cli(setup: Setup) -> tuple[int, str]:
    """Parked rows as `listgate queue ls --state parked` reports them, and its summary line."""
    out = setup.cli("queue", "ls", "--state", "parked").stdout.strip().splitlines()
    summary = out[-1] if out else ""
    m = re.search(r"(\d+) parked", summary)
    return (int(m.group(1)) if m else 0), summary


def log_problems(log: Path) -> collections.Counter[str]:
    """ERROR lines and tracebacks in the daemon log, by their logger and first words."""
    counts: collections.Counter[str] = collections.Counter()
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\S+ \S+ (ERROR|CRITICAL) (\S+): (.{0,60})", line)
        if m:
            counts[f"{m.group(2)}: {m.group(3)}"] += 1
    return counts


# -- the verdict ---------------------------------------------------------------------

@dataclass(frozen=True)
class Tally:
    """What reached whom: copies of posts and of digest issues, and the duplicates."""

    expected: int
    lost: list[tuple[bytes, str]]
    duplicates: list[Copy]  # the second and later copies, each with its arrival time


def tally_posts(copies: list[Copy], posts: list[Post], members: list[str]) -> Tally:
    seen: collections.Counter[tuple[bytes, str]] = collections.Counter()
    dups = []
    for c in copies:
        if c.issue is None and c.rcpt in members:
            for token in c.tokens:
                seen[(token, c.rcpt)] += 1
                if seen[(token, c.rcpt)] > 1:
                    dups.append(c)
    expected = [(p.token, m) for p in posts for m in members]
    return Tally(len(expected), [pair for pair in expected if not seen[pair]], dups)


def tally_issues(copies: list[Copy], issues: list[tuple[int, int]],
                 members: list[str]) -> Tally:
    seen: collections.Counter[tuple[tuple[int, int], str]] = collections.Counter()
    dups = []
    for c in copies:
        if c.issue is not None and c.rcpt in members:
            seen[(c.issue, c.rcpt)] += 1
            if seen[(c.issue, c.rcpt)] > 1:
                dups.append(c)
    expected = [(i, m) for i in issues for m in members]
    lost = [(f"Vol {v}, Issue {n}".encode(), m) for (v, n), m in expected if not seen[((v, n), m)]]
    return Tally(len(expected), lost, dups)


def posts_per_issue(copies: list[Copy], posts: list[Post]) -> tuple[int, int]:
    """(posts in no issue, posts in more than one issue), from the digests' text."""
    issues_of: dict[bytes, set[tuple[int, int]]] = collections.defaultdict(set)
    for c in copies:
        if c.issue is not None:
            for token in c.tokens:
                issues_of[token].add(c.issue)
    return (sum(1 for p in posts if not issues_of.get(p.token)),
            sum(1 for p in posts if len(issues_of.get(p.token, ())) > 1))


def per_kill(duplicates: list[Copy], kills: list[float]) -> tuple[list[int], int]:
    """Duplicates charged to the last kill before each arrived; and those before any kill."""
    counts = [0] * len(kills)
    unexplained = 0
    for d in duplicates:
        before = [i for i, k in enumerate(kills) if k < d.at]
        if before:
            counts[before[-1]] += 1
        else:
            unexplained += 1
    return counts, unexplained


# -- the run --------------------------------------------------------------------------

@dataclass
class Killer:
    """SIGKILLs the daemon when the load reaches each threshold (posts accepted) and a
    random fraction of a second more, then restarts it; the daemon runs at least
    ``min_uptime`` seconds between kills."""

    gateway: GatewayProcess
    loader: Loader
    thresholds: list[int]
    downtime: tuple[float, float]
    rng: random.Random
    min_uptime: float = 1.0
    kills: list[float] = field(default_factory=list)
    restarts: list[float] = field(default_factory=list)
    thread: threading.Thread | None = None

    def run(self) -> Killer:
        self.thread = threading.Thread(target=self._run, name="killer", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        up = time.monotonic()
        for threshold in self.thresholds:
            while len(self.loader.accepted) < threshold and not self.loader.done:
                time.sleep(0.01)
            time.sleep(max(self.rng.uniform(0.0, 0.5), up + self.min_uptime - time.monotonic()))
            self.gateway.kill()
            self.kills.append(time.monotonic())
            time.sleep(self.rng.uniform(*self.downtime))
            self.restarts.append(self.gateway.start())
            up = time.monotonic()


def kill_thresholds(rng: random.Random, kills: int, posts: int) -> list[int]:
    """``kills`` distinct random counts of accepted posts, spread over the whole load."""
    low, high = max(1, posts // 50), max(posts * 95 // 100, posts // 50 + kills + 1)
    return sorted(rng.sample(range(low, high), kills))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="300 posts and 3 kills (unless given): about a minute")
    p.add_argument("--posts", type=int, help="posts that must get a 250 (default 3000)")
    p.add_argument("--kills", type=int,
                   help="SIGKILLs of the daemon (default 10); 0: a leak soak, one daemon")
    p.add_argument("--rate", type=float, default=15.0, help="posts per second (default 15)")
    p.add_argument("--threads", type=int, default=4, help="SMTP client threads (default 4)")
    p.add_argument("--members", type=int, default=3,
                   help="regular members, and digest members (default 3 each)")
    p.add_argument("--digest-max-posts", type=int, default=20,
                   help="posts that close a digest issue early (default 20)")
    p.add_argument("--store-url", help="default: SQLite in the work directory")
    p.add_argument("--keep-db", action="store_true", help="do not drop a database made here")
    p.add_argument("--workdir", type=Path, help="default: a new directory under /tmp")
    p.add_argument("--seed", type=int, help="random seed (printed; default: random)")
    p.add_argument("--listgate", type=Path, default=REPO / ".venv" / "bin" / "listgate")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    args.posts = args.posts or (300 if args.quick else 3000)
    args.kills = args.kills if args.kills is not None else (3 if args.quick else 10)
    args.seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    return args


def prepare(setup: Setup, regular_list: str, digest_list: str, posters: list[str],
            regular: list[str], digest: list[str], digest_max_posts: int) -> None:
    setup.cli("init")
    setup.cli("lists", "create", regular_list, "--name", "Soak")
    setup.cli("lists", "create", digest_list, "--name", "Soakd")
    setup.cli("lists", "set", digest_list, "--digest-schedule", "* * * * *",
              "--digest-timezone", "UTC", "--digest-max-posts", str(digest_max_posts))
    for lst in (regular_list, digest_list):
        # Posters are known (not held as first posts) and get no copies themselves.
        setup.cli("members", "add", lst, *posters, "--mode", "nomail", "--approved")
    setup.cli("members", "add", regular_list, *regular, "--mode", "regular")
    setup.cli("members", "add", digest_list, *digest, "--mode", "digest-plain")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="listgate-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    regular_list, digest_list = f"soak-reg@{DOMAIN}", f"soak-dig@{DOMAIN}"
    posters = addresses("poster", 4)
    regular, digest = addresses("reg", args.members), addresses("dig", args.members)

    with database(args.store_url, workdir, keep=args.keep_db) as url:
        sink = Sink().start()
        smtp_port = free_port()
        config = write_config(workdir, store_url=url, smtp_port=smtp_port, smarthost=sink.url,
                              retry_initial="1s", retry_max="5s",
                              extra='[digest]\ntick = "1s"\n')
        setup = Setup(workdir, config, url, args.listgate, smtp_port)
        prepare(setup, regular_list, digest_list, posters, regular, digest,
                args.digest_max_posts)
        store = Store(url, clock=SystemClock(), pool_size=2)
        gw = GatewayProcess(args.listgate, config, smtp_port)
        print(f"crash soak: {args.posts} posts at {args.rate:g}/s to {regular_list} "
              f"({len(regular)} regular members) and {digest_list} ({len(digest)} digest-plain "
              f"members), {args.kills} SIGKILLs; seed {args.seed}", flush=True)
        print(f"  store {store.engine.url.render_as_string(hide_password=True)}; "
              f"work directory {workdir}", flush=True)
        try:
            return run(args, rng, setup, gw, sink, store, regular_list, digest_list, posters,
                       regular, digest)
        finally:
            with contextlib.suppress(Exception):
                if gw.proc is not None and gw.proc.poll() is None:
                    gw.kill()
            sink.stop()
            store.dispose()


def run(args: argparse.Namespace, rng: random.Random, setup: Setup, gw: GatewayProcess,
        sink: Sink, store: Store, regular_list: str, digest_list: str, posters: list[str],
        regular: list[str], digest: list[str]) -> int:
    gw.start()
    start = time.monotonic()
    loader = Loader(setup.smtp_port, [regular_list, digest_list], posters, args.posts,
                    args.threads, args.rate).start()
    killer = Killer(gw, loader, kill_thresholds(rng, args.kills, args.posts), (0.0, 1.0),
                    rng).run()
    resources = Resources(gw).start()
    warm_at: float | None = None
    while not loader.done:
        if warm_at is None and len(loader.accepted) >= args.posts // 4:
            warm_at = time.monotonic()
        loader.join(10)
        print(f"  {time.monotonic() - start:6.1f}s: {len(loader.accepted)} accepted, "
              f"{loader.failed_attempts} attempts without a 250, {len(killer.kills)} kills, "
              f"{len(sink.handler.taken())} copies at the sink", flush=True)
    assert killer.thread is not None
    killer.thread.join()
    load_done = time.monotonic()

    def drained() -> bool:
        if open_batch_posts(store):
            # The last posts are in an open issue: close it now, as an operator would.
            setup.cli("digest", "send", digest_list, check=False)
        return queue_rows(store) == 0 and open_batch_posts(store) == 0

    drain = wait_until(drained, args.drain_timeout, "the queue to drain", interval=0.5)
    time.sleep(2.0)  # idle: let sessions and delivery connections be let go
    resources.take()
    resources.stop.set()
    parked, parked_summary = parked_by_cli(setup)
    held_count = held_waiting(store)
    states = batch_states(store)
    issues = closed_issues(store)
    status = gw.terminate()
    copies = sink.handler.taken()

    accepted = loader.accepted
    regular_posts = [p for p in accepted if p.list_address == regular_list]
    digest_posts = [p for p in accepted if p.list_address == digest_list]
    posts = tally_posts(copies, regular_posts, regular)
    digests = tally_issues(copies, issues, digest)
    in_no_issue, in_two = posts_per_issue(copies, digest_posts)
    accepted_tokens = {p.token for p in accepted}
    seen_tokens = {t for c in copies for t in c.tokens}
    unacknowledged = len(seen_tokens - accepted_tokens)
    bound = CONNECTIONS * CLAIM_AHEAD * args.members  # rows in flight x recipients per row
    charged, unexplained = per_kill(posts.duplicates + digests.duplicates, killer.kills)
    over = [i + 1 for i, n in enumerate(charged) if n > bound]
    restart = sorted(killer.restarts)
    problems = log_problems(gw.log)
    runs = resources.runs()

    print(f"  kills at {', '.join(f'{k - start:.1f}s' for k in killer.kills)}; restarts took "
          f"{restart[0]:.1f}-{restart[-1]:.1f}s" if restart else "  no kills happened")
    print(f"  posts with a 250: {len(accepted)} ({len(regular_posts)} regular, "
          f"{len(digest_posts)} digest); attempts without a 250: {loader.failed_attempts} "
          f"(of which delivered anyway: {unacknowledged})")
    print(f"  regular copies: expected {posts.expected}, lost {len(posts.lost)}, "
          f"duplicates {len(posts.duplicates)}")
    print(f"  digest issues: {len(issues)} closed ({dict(states)}); copies expected "
          f"{digests.expected}, lost {len(digests.lost)}, duplicates {len(digests.duplicates)}; "
          f"posts in no issue {in_no_issue}, in two issues {in_two}")
    print(f"  duplicates per kill: {' '.join(f'#{i + 1}:{n}' for i, n in enumerate(charged))} "
          f"(bound: {CONNECTIONS * CLAIM_AHEAD} rows in flight x {args.members} rcpts = {bound}); "
          f"before any kill: {unexplained}")
    print(f"  parked: {parked} (`listgate queue ls --state parked`: {parked_summary!r}); "
          f"held: {held_count}")
    print(f"  drained {drain:.1f}s after the last post was accepted "
          f"(load took {load_done - start:.1f}s); daemon exit status on SIGTERM: {status}")
    leak = ""
    if args.kills and runs:
        peaks = [(max(s.rss_kib for s in r), max(s.fds for s in r)) for r in runs]
        print(f"  daemon runs: {len(runs)}; peak RSS per run {min(p[0] for p in peaks) / 1024:.1f}"
              f"-{max(p[0] for p in peaks) / 1024:.1f} MiB, peak fds per run "
              f"{min(p[1] for p in peaks)}-{max(p[1] for p in peaks)}; the last run ended at "
              f"{runs[-1][-1].rss_kib / 1024:.1f} MiB, {runs[-1][-1].fds} fds")
    for i, run_samples in enumerate(runs if not args.kills else []):
        first, warmed, last, peak_rss, peak_fds = flatness(run_samples, warm_at or load_done)
        span = last.at - first.at
        print(f"  daemon run {i + 1} ({span:.0f}s, {len(run_samples)} samples): RSS "
              f"{first.rss_kib / 1024:.1f} MiB at start, {warmed.rss_kib / 1024:.1f} after "
              f"warm-up, {last.rss_kib / 1024:.1f} at the end (peak {peak_rss / 1024:.1f}); "
              f"fds {first.fds}, {warmed.fds}, {last.fds} (peak {peak_fds})")
        if args.kills == 0:
            growth = last.rss_kib - warmed.rss_kib
            if growth > max(warmed.rss_kib // 10, 8 * 1024):
                leak += f"RSS grew {growth / 1024:.1f} MiB after warm-up; "
            if last.fds > warmed.fds:
                leak += f"{last.fds - warmed.fds} more fds when idle than after warm-up; "
    if problems:
        print(f"  daemon log errors: {sum(problems.values())}")
        for what, n in problems.most_common(8):
            print(f"    {n:5d}  {what}")
    for token, rcpt in (posts.lost + digests.lost)[:10]:
        print(f"  LOST {token.decode()} -> {rcpt}")

    failures = []
    if posts.lost or digests.lost or in_no_issue:
        failures.append("mail was lost")
    if in_two:
        failures.append("a post went out in two digest issues")
    if parked or held_count:
        failures.append("rows parked or posts held")
    if over or unexplained:
        failures.append(f"more duplicates than were in flight (kills {over}, "
                        f"{unexplained} before any kill)")
    if states.get(BatchState.CLOSED.value):
        failures.append("a closed digest issue was never marked sent")
    if leak:
        failures.append("not flat: " + leak.rstrip("; "))
    if args.kills == 0 and not runs:
        failures.append("no memory samples of the daemon were taken")
    if len(killer.kills) < args.kills:
        failures.append(f"only {len(killer.kills)} of {args.kills} kills happened")
    if failures:
        print("VERDICT: FAIL: " + "; ".join(failures))
        return 1
    dups = len(posts.duplicates) + len(digests.duplicates)
    if args.kills == 0:
        print("VERDICT: PASS: nothing lost, nothing parked, no duplicates; memory and "
              "descriptors flat")
        return 0
    print(f"VERDICT: PASS: nothing lost, nothing parked; {dups} duplicate copies over "
          f"{len(killer.kills)} kills, each kill within its in-flight bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())
