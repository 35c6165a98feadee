"""The composition root: builds every part of the gateway, wires them, runs them.

Nothing is registered at import time and there are no module-level singletons:
the store, the route table, the stages and the listeners are made here, once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gateway import learning, promo, queue
from gateway.authentication import Resolver, SigningKeys
from gateway.bounces import Bounces
from gateway.clock import Clock, SystemClock
from gateway.commands import Commands
from gateway.config import Config, parse_listener, store_url
from gateway.delivery import Delivery
from gateway.digest import Digest
from gateway.errors import ConfigError, ListgateError
from gateway.fanout import Fanout
from gateway.intake import (
    ConnectionLimiter,
    IntakeHandler,
    IntakeLMTP,
    IntakeSMTP,
    IntakeWriter,
)
from gateway.lists import Directory
from gateway.metrics import Metrics
from gateway.moderation import Moderation
from gateway.owner import Owner
from gateway.policy import Policies
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.schema import outbound, work
from gateway.signing import LinkSigner
from gateway.spool import Importer, Spool, highest_message_id
from gateway.store import Store
from gateway.templates import Templates
from gateway.transport import Transport, build
from gateway.web import WebServer
from gateway.worker import Progress, WakeChannel, Wakeups, run_stage

log = logging.getLogger(__name__)

DIRECTORY_REFRESH = 5.0


@dataclass
class Bound:
    """A listener the daemon opened: what it speaks and where (port 0 becomes real here)."""

    protocol: str
    host: str
    port: int

    @classmethod
    def of(cls, protocol: str, sock: socket.socket) -> Bound:
        host, port = sock.getsockname()[:2]
        log.info("listening for %s on %s:%s", protocol.upper(), host, port)
        return cls(protocol, host, port)


@dataclass
class Daemon:
    """One gateway process. Alone (the default) it opens its listeners and runs every
    stage; as a worker of a ``Supervisor`` it is given the listening sockets (or none),
    whether it serves the web endpoint and runs the stages, and a ``WakeChannel``."""

    config: Config
    clock: Clock = field(default_factory=SystemClock)
    transport: Transport | None = None
    resolver: Resolver | None = None
    bound: list[Bound] = field(default_factory=list)
    listeners: list[tuple[str, socket.socket]] | None = None  # (protocol, bound socket)
    serve_web: bool = True
    run_stages: bool = True
    # Intake commits to the spool (SQLite only; see gateway.spool): worth it when intake
    # has a process of its own, so that no stage's transaction holds up a 250. Without,
    # a spool file left by such a run is still imported.
    spool_intake: bool = False
    import_spool: bool = True  # run the importer (one stage worker of a supervisor does)
    channel: WakeChannel | None = None
    signer: LinkSigner | None = None
    _jobs: set[asyncio.Future[Progress]] = field(default_factory=set)
    _stopping: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def stop(self) -> None:
        """Ask a running daemon to stop; safe from any thread."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def run(self, *, ready: Callable[[], None] | None = None,
                  handle_signals: bool = False) -> None:
        config = self.config
        self._loop = loop = asyncio.get_running_loop()
        self._stopping = stopping = asyncio.Event()
        reload_requested = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopping.set)
            loop.add_signal_handler(signal.SIGHUP, reload_requested.set)

        # Files first: an invalid policy or key stops the start before anything is opened.
        policies = Policies(config.paths.policies)
        templates = Templates(config.paths.templates)
        self.signer = signer = LinkSigner.from_file(config.web.secret_file, create=True)
        # Intake's writes go first: its clients wait for the commit, the stages do not.
        store = Store(store_url(config), clock=self.clock, pool_size=config.store.pool_size,
                      writes_first=not self.run_stages)
        spool = None
        try:
            spool = await asyncio.to_thread(
                functools.partial(Spool.beside, store, create=self.spool_intake))
            await self._run(store, spool, policies, templates, signer, stopping,
                            reload_requested, ready)
        finally:
            if spool is not None:
                spool.close()
            store.dispose()

    async def _run(self, store: Store, spool: Spool | None, policies: Policies,
                   templates: Templates, signer: LinkSigner, stopping: asyncio.Event,
                   reload_requested: asyncio.Event, ready: Callable[[], None] | None) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        store.check_schema()
        directory = Directory(store)
        await asyncio.to_thread(directory.refresh)
        keys = SigningKeys(config.dkim.directory, selector=config.dkim.selector,
                           ed25519_selector=config.dkim.ed25519_selector, clock=self.clock)
        # A key that cannot be used (others can read it, it does not parse) stops the start
        # here, before a socket is open, not each delivery later; a domain without a key
        # is only logged.
        for domain in sorted(directory.domains):
            await asyncio.to_thread(keys.for_domain, domain)
        claimer = Claimer(queue.worker_identity(), config.queue.lease, config.queue.max_attempts)
        await asyncio.to_thread(self._recover, store)
        wakeups = Wakeups(loop, channel=self.channel)
        transport = self.transport or build(config.delivery, hostname=config.hostname)
        resolver = self.resolver or Resolver(nameservers=config.dns.nameservers or None,
                                             timeout=config.dns.timeout, clock=self.clock)
        models = learning.Models(await asyncio.to_thread(promo.load_model))
        trusted = config.moderation.trusted_authserv_ids

        if spool is not None and self.spool_intake:  # numbered on from the last message
            await asyncio.to_thread(spool.number_after, highest_message_id(store))
        writer = IntakeWriter(store, clock=self.clock, batch=config.intake.commit_batch,
                              on_commit=lambda stages: wakeups.notify(*stages),
                              spool=spool if self.spool_intake else None)
        handler = IntakeHandler(directory.router(), writer, clock=self.clock,
                                config=config.intake)
        limiter = ConnectionLimiter(total=config.intake.max_connections,
                                    per_ip=config.intake.max_connections_per_ip)
        servers = []

        def factory(protocol: str) -> Callable[[], IntakeSMTP]:
            return functools.partial(
                IntakeLMTP if protocol == "lmtp" else IntakeSMTP, handler, limiter=limiter,
                line_limit=config.intake.max_line_length,
                data_size_limit=config.intake.max_message_size, hostname=config.hostname,
                ident="Listgate", timeout=config.intake.timeout, loop=loop)

        if self.listeners is None:
            for url in config.intake.listen:
                listener = parse_listener(url)
                servers.append((listener.protocol, await loop.create_server(
                    factory(listener.protocol), host=listener.host, port=listener.port)))
        else:  # a worker: the supervisor bound them, and keeps them across restarts
            for protocol, sock in self.listeners:
                servers.append((protocol, await loop.create_server(factory(protocol),
                                                                   sock=sock)))
        for protocol, server in servers:
            for sock in server.sockets:
                self.bound.append(Bound.of(protocol, sock))

        retry = config.queue.retry_delay
        moderation = Moderation(store, clock=self.clock, claimer=claimer, policies=policies,
                                templates=templates, resolver=resolver, models=models,
                                trusted_authserv_ids=trusted, retry_delay=retry)
        web = None
        # Workers without the endpoint link to it all the same (the supervisor gave
        # a listen URL with port 0 a real port).
        public_url = config.web.public_url if config.web.listen else ""
        if config.web.listen and self.serve_web:
            listen = urlsplit(config.web.listen)
            web = WebServer(store, signer=signer, templates=templates, clock=self.clock,
                            base_url=config.web.base_url)
            host, port = await asyncio.to_thread(
                web.start, listen.hostname or "127.0.0.1",
                listen.port if listen.port is not None else 8080)
            self.bound.append(Bound("http", host, port))
            # Without a base_url, links point at the endpoint itself (fine for trying it out).
            public_url = config.web.base_url.rstrip("/") or f"http://{host}:{port}"
            log.info("web endpoint on http://%s:%s; members' links use %s", host, port,
                     public_url)
        digest = Digest(store, clock=self.clock, claimer=claimer, templates=templates,
                        public_url=public_url, chunk=config.digest.chunk, retry_delay=retry)
        bounces = Bounces(store, clock=self.clock, claimer=claimer, templates=templates,
                          settings=config.bounces, signer=signer, retry_delay=retry)
        batch_stages: list[tuple[Stage, Callable[[Progress], Progress]]] = [
            *([(Stage.INTAKE, Importer(store, spool, clock=self.clock).run_once)]
              if spool is not None and self.import_spool else []),
            (Stage.MODERATION, moderation.run_once),
            (Stage.COMMANDS, Commands(store, clock=self.clock, claimer=claimer,
                                      templates=templates, policies=policies, resolver=resolver,
                                      trusted_authserv_ids=trusted, retry_delay=retry).run_once),
            (Stage.FANOUT, Fanout(store, clock=self.clock, claimer=claimer, templates=templates,
                                  hostname=config.hostname, chunk=config.fanout.chunk,
                                  max_recipients=config.delivery.max_recipients,
                                  resolver=resolver, trusted_authserv_ids=trusted,
                                  arc=config.dkim.arc, public_url=public_url,
                                  retry_delay=retry).run_once),
            (Stage.DIGEST, digest.run_once),
            (Stage.OWNER, Owner(store, clock=self.clock, claimer=claimer,
                                hostname=config.hostname, retry_delay=retry).run_once),
            (Stage.BOUNCES, bounces.run_once),
        ]
        delivery = Delivery(store, transport, clock=self.clock, claimer=claimer,
                            config=config.delivery, retry_delay=retry, link_signer=signer,
                            keys=keys, authserv_id=config.dkim.authserv_id or config.hostname)
        if web is not None:
            web.metrics = Metrics(store, clock=self.clock, accepted=lambda: writer.accepted,
                                  recipients=lambda: delivery.tally,
                                  spooled=spool.depth if spool is not None else None).render
        poll = config.queue.poll_interval
        tasks = []
        if self.run_stages:
            tasks = [asyncio.create_task(run_stage(stage, run_once, wakeups, poll_interval=poll,
                                                   stopping=stopping), name=stage.value)
                     for stage, run_once in batch_stages]
            tasks.append(asyncio.create_task(delivery.run(wakeups, poll_interval=poll,
                                                          stopping=stopping), name="delivery"))
        background = [
            asyncio.create_task(writer.run(stopping), name="intake-writer"),
            asyncio.create_task(self._refresh(directory, stopping, reload_requested, policies),
                                name="directory"),
        ]
        # Periodic jobs: expiries and reminders of held posts, the digest schedules, and
        # the bounces sweep (the smarthost's refusals, further probes, removals).
        scheduler = AsyncIOScheduler(event_loop=loop)
        # A run still going when the next is due is skipped (max_instances=1): wanted,
        # and not worth a warning every time.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        # Nor is every run of every job ("Running job ...", "executed successfully").
        logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        periodic = ((moderation.sweep, config.moderation.sweep_interval),
                    (digest.tick, config.digest.tick),
                    (bounces.sweep, config.bounces.sweep_interval))
        for job, every in periodic if self.run_stages else ():
            scheduler.add_job(self._periodic, "interval", seconds=every, args=(job, wakeups),
                              id=job.__qualname__, coalesce=True, max_instances=1,
                              next_run_time=datetime.datetime.now(datetime.UTC))
        scheduler.start()

        log.info("Listgate running: store %s, delivery to %s",
                 store.engine.url.render_as_string(hide_password=True), transport.describe())
        if ready is not None:
            ready()
        try:
            await stopping.wait()
        finally:
            log.info("stopping: no new connections; finishing work in hand")
            for _protocol, server in servers:
                server.close()
            stopping.set()
            scheduler.shutdown(wait=False)
            if web is not None:
                await asyncio.to_thread(web.stop)
            # Every loop ends on `stopping` and is awaited, so no worker thread still holds
            # a store connection when the store is closed.
            await asyncio.gather(*tasks, *background, *self._jobs, return_exceptions=True)
            wakeups.close()
            log.info("stopped")

    @staticmethod
    def _recover(store: Store) -> None:
        """Leases held by processes of this host that died are freed at once."""
        with store.write() as conn:
            for table in (work, outbound):
                freed = queue.recover_dead_leases(conn, table, now=store.clock.now())
                if freed:
                    log.warning("recovered %d %s rows claimed by a process that died",
                                freed, table.name)

    async def _periodic(self, job: Callable[[Progress], Progress], wakeups: Wakeups) -> None:
        """One run of a periodic job, in a worker thread; awaited at shutdown."""
        task = asyncio.ensure_future(asyncio.to_thread(job, Progress(on_wake=wakeups.notify)))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        try:
            # Shielded: a shutdown cancels this wait, not the thread, which the shutdown
            # then awaits through self._jobs before closing the store.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            return
        except Exception:  # a periodic job is a process boundary: log, try next time
            log.exception("periodic job %s failed", getattr(job, "__qualname__", job))

    @staticmethod
    async def _refresh(directory: Directory, stopping: asyncio.Event, reload: asyncio.Event,
                       policies: Policies) -> None:
        """Re-read the lists every few seconds, and lists and policies at once on SIGHUP."""
        while not stopping.is_set():
            stop, hup = asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(reload.wait())
            await asyncio.wait({stop, hup}, timeout=DIRECTORY_REFRESH,
                               return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            hup.cancel()
            if stopping.is_set():
                return
            if reload.is_set():
                reload.clear()
                try:
                    await asyncio.to_thread(policies.reload)
                    log.info("SIGHUP: policies re-read from %s", policies.root)
                except ConfigError as exc:
                    log.error("SIGHUP: policies NOT reloaded, the ones in force stay: %s", exc)
            try:
                await asyncio.to_thread(directory.refresh)
            except Exception:  # routing keeps the last good snapshot
                log.exception("refreshing the list directory failed")


# -- several processes ----------------------------------------------------------

# A worker that dies is started again after RESTART_DELAY, doubled for each death in a
# row that came before it was up or within STABLE seconds of it, up to RESTART_DELAY_MAX.
RESTART_DELAY = 0.25
RESTART_DELAY_MAX = 10.0
STABLE = 10.0
# A worker that dies this many times in a row before it is up (a bad policy file, an
# outdated schema, a DKIM key it cannot read) ends `serve` with an error.
START_ATTEMPTS = 3
LISTEN_BACKLOG = 128


@dataclass
class _Worker:
    slot: int
    pid: int = 0
    up: bool = False
    started_at: float = 0.0
    deaths: int = 0          # in a row, before it was up or soon after
    restart_at: float | None = None


class Supervisor:
    """`serve` with ``[daemon] processes`` > 1: binds the listeners, forks the workers
    (after the configuration is read, before any event loop or thread exists), passes
    SIGTERM, SIGINT and SIGHUP on to them, and restarts one that dies.

    Worker 0 takes posts in (the listening sockets, the web endpoint) and runs no
    stage: its event loop never waits for the GIL behind a stage's thread, and the
    posts it commits (to the spool, on SQLite) are announced to the others at once
    (``WakeChannel``). Workers 1..N-1 run every stage and the periodic jobs, and wake
    each other; worker 1 alone imports the spool (two importers would read the same
    posts, and one of them would find them all imported). All are whole
    ``Daemon``s on the shared store, so leases make their races safe, and a worker
    that dies holding leases has them freed by its replacement at start. The
    listening sockets stay open in the supervisor: while worker 0 is restarted,
    connections wait in the backlog.
    """

    def __init__(self, config: Config, processes: int, *,
                 ready: Callable[[list[Bound]], None] | None = None) -> None:
        self.config = config
        self.processes = processes
        self.ready = ready
        self.bound: list[Bound] = []
        self._listeners: list[tuple[str, socket.socket]] = []
        self._inboxes: list[tuple[socket.socket, socket.socket]] = []
        self._workers = [_Worker(slot) for slot in range(processes)]
        self._stopping = False
        self._failed = False
        self._start_error = ""
        # Workers report "up SLOT" or "failed SLOT WHY" on one pipe; signals reach the
        # loop as bytes on another (signal.set_wakeup_fd).
        self._report_r = self._report_w = self._signal_r = self._signal_w = -1

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; 0 if every worker stopped cleanly, else 1.

        Raises ListgateError if the workers keep dying before they are up."""
        self.config = _web_port_chosen(self.config)
        self._bind()
        self._inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                         for _ in range(self.processes)]
        self._report_r, self._report_w = os.pipe()
        self._signal_r, self._signal_w = os.pipe()
        for fd in (self._report_r, self._signal_r, self._signal_w):
            os.set_blocking(fd, False)
        previous = {sig: signal.signal(sig, _noted) for sig in (*_FORWARDED, signal.SIGCHLD)}
        old_wakeup = signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        try:
            log.info("supervisor (pid %d) starting %d workers", os.getpid(), self.processes)
            # What is loaded now (the code, the configuration) is shared with the workers
            # until written to. The cyclic GC writes to every object it tracks; frozen,
            # it leaves them be: ~12 MB less memory of their own per worker (PSS).
            gc.collect()
            gc.freeze()
            for worker in self._workers:
                self._fork(worker)
            self._supervise()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (self._report_r, self._report_w, self._signal_r, self._signal_w):
                os.close(fd)
            for _protocol, sock in self._listeners:
                sock.close()
            for pair in self._inboxes:
                for sock in pair:
                    sock.close()
        if self._start_error:
            raise ListgateError(f"the workers could not start: {self._start_error}")
        return 1 if self._failed else 0

    def _bind(self) -> None:
        for url in self.config.intake.listen:
            listener = parse_listener(url)
            infos = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
                    sock.listen(LISTEN_BACKLOG)
                except OSError as exc:
                    sock.close()
                    raise ConfigError(f"[intake] listen {url!r}: cannot listen on "
                                      f"{listener.host}:{listener.port}: {exc.strerror}") from None
                sock.setblocking(False)
                self._listeners.append((listener.protocol, sock))
                self.bound.append(Bound.of(listener.protocol, sock))

    def _fork(self, worker: _Worker) -> None:
        worker.restart_at = None
        worker.up = False
        worker.started_at = time.monotonic()
        parent = os.getpid()
        pid = os.fork()
        if pid:
            worker.pid = pid
            log.info("worker %d started (pid %d)", worker.slot, pid)
            return
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (*_FORWARDED, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            for fd in (self._report_r, self._signal_r, self._signal_w):
                os.close(fd)
            _die_with(parent)
            code = self._work(worker.slot)
        except BaseException:  # the worker's process boundary: never back into the caller
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _work(self, slot: int) -> int:
        """A worker's life, in the forked child."""
        intake = slot == 0
        # The intake worker wakes the stage workers; stage workers wake each other.
        siblings = [pair[0] for i, pair in enumerate(self._inboxes) if i not in (0, slot)]
        daemon = Daemon(self.config, listeners=self._listeners if intake else [],
                        serve_web=intake, run_stages=not intake, spool_intake=True,
                        import_spool=slot == 1,
                        channel=WakeChannel(self._inboxes[slot][1], siblings))

        def report(text: str) -> None:
            # One write under PIPE_BUF: whole, never interleaved with a sibling's.
            os.write(self._report_w, text.replace("\n", " ").encode()[:2000] + b"\n")

        try:
            asyncio.run(daemon.run(ready=lambda: report(f"up {slot}"), handle_signals=True))
        except ListgateError as exc:
            log.error("worker %d: %s", slot, exc)
            report(f"failed {slot} {exc}")
            return 1
        return 0

    def _supervise(self) -> None:
        announced = False
        while any(w.pid for w in self._workers) or (
                not self._stopping and any(w.restart_at is not None for w in self._workers)):
            due = [w.restart_at for w in self._workers if w.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            readable, _w, _x = select.select((self._report_r, self._signal_r), [], [], timeout)
            if self._signal_r in readable:
                for signum in _drain(self._signal_r):
                    self._signal(signum)
            if self._report_r in readable:
                for line in _drain(self._report_r).decode(errors="replace").splitlines():
                    what, _sp, rest = line.partition(" ")
                    slot_text, _sp, why = rest.partition(" ")
                    worker = self._workers[int(slot_text)]
                    if what == "up":
                        worker.up = True
                        log.info("worker %d (pid %d) is up", worker.slot, worker.pid)
                    elif not worker.up:
                        self._start_error = why
                if not announced and all(w.up for w in self._workers):
                    announced = True
                    self._start_error = ""
                    if self.ready is not None:
                        self.ready(self.bound)
            self._reap()
            now = time.monotonic()
            for worker in self._workers:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._fork(worker)

    def _signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self._stopping:
                log.info("%s: stopping the workers", signal.Signals(signum).name)
            self._stopping = True
            for worker in self._workers:
                worker.restart_at = None
        if signum in _FORWARDED:
            for worker in self._workers:
                if worker.pid:
                    try:
                        os.kill(worker.pid, signum)
                    except ProcessLookupError:
                        pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self._workers if w.pid == pid), None)
            if worker is None:
                continue
            worker.pid = 0
            code = os.waitstatus_to_exitcode(status)
            how = f"exit status {code}" if code >= 0 else \
                f"killed by {signal.Signals(-code).name}"
            if self._stopping:
                if code != 0:
                    self._failed = True
                    log.error("worker %d (pid %d) stopped with %s", worker.slot, pid, how)
                else:
                    log.info("worker %d (pid %d) stopped", worker.slot, pid)
                continue
            lived = time.monotonic() - worker.started_at
            worker.deaths = worker.deaths + 1 if not worker.up or lived < STABLE else 1
            if not worker.up and worker.deaths >= START_ATTEMPTS:
                log.error("worker %d died %d times before it was up (last: %s); stopping",
                          worker.slot, worker.deaths, how)
                self._failed = True
                self._start_error = self._start_error or how
                self._signal(signal.SIGTERM)
                continue
            delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** (worker.deaths - 1))
            log.warning("worker %d (pid %d) died (%s) after %.1fs; restarting it in %.2fs",
                        worker.slot, pid, how, lived, delay)
            worker.restart_at = time.monotonic() + delay


_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _web_port_chosen(config: Config) -> Config:
    """A web endpoint on port 0 gets a real port here, so that every worker's links
    point at the one the first worker opens."""
    listen = urlsplit(config.web.listen)
    if not config.web.listen or listen.port != 0:
        return config
    with socket.socket() as probe:
        probe.bind((listen.hostname or "127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = listen._replace(netloc=f"{listen.hostname}:{port}").geturl()
    return dataclasses.replace(config, web=dataclasses.replace(config.web, listen=url))


def _noted(signum: int, frame: object) -> None:
    """The supervisor's handler: the signal number reaches its loop via the wakeup fd."""


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _die_with(parent: int) -> None:
    """A worker gets SIGTERM when the supervisor dies (even by SIGKILL): no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl
        os.kill(os.getpid(), signal.SIGTERM)
