"""The composition root: builds every part of the gateway, wires them, runs them.

Nothing is registered at import time and there are no module-level singletons:
the store, the route table, the stages and the listeners are made here, once.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import signal
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
from gateway.errors import ConfigError
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
from gateway.store import Store
from gateway.templates import Templates
from gateway.transport import Transport, build
from gateway.web import WebServer
from gateway.worker import Progress, Wakeups, run_stage

log = logging.getLogger(__name__)

DIRECTORY_REFRESH = 5.0


@dataclass
class Bound:
    """A listener the daemon opened: what it speaks and where (port 0 becomes real here)."""

    protocol: str
    host: str
    port: int


@dataclass
class Daemon:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    transport: Transport | None = None
    resolver: Resolver | None = None
    bound: list[Bound] = field(default_factory=list)
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
        store = Store(store_url(config), clock=self.clock, pool_size=config.store.pool_size)
        try:
            await self._run(store, policies, templates, signer, stopping, reload_requested, ready)
        finally:
            store.dispose()

    async def _run(self, store: Store, policies: Policies, templates: Templates,
                   signer: LinkSigner, stopping: asyncio.Event, reload_requested: asyncio.Event,
                   ready: Callable[[], None] | None) -> None:
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
        wakeups = Wakeups(loop)
        transport = self.transport or build(config.delivery, hostname=config.hostname)
        resolver = self.resolver or Resolver(nameservers=config.dns.nameservers or None,
                                             timeout=config.dns.timeout, clock=self.clock)
        models = learning.Models(await asyncio.to_thread(promo.load_model))
        trusted = config.moderation.trusted_authserv_ids

        writer = IntakeWriter(store, clock=self.clock, batch=config.intake.commit_batch,
                              on_commit=lambda stages: wakeups.notify(*stages))
        handler = IntakeHandler(directory.router(), writer, clock=self.clock,
                                config=config.intake)
        limiter = ConnectionLimiter(total=config.intake.max_connections,
                                    per_ip=config.intake.max_connections_per_ip)
        servers = []
        for url in config.intake.listen:
            listener = parse_listener(url)
            cls = IntakeLMTP if listener.protocol == "lmtp" else IntakeSMTP
            factory = functools.partial(
                cls, handler, limiter=limiter, line_limit=config.intake.max_line_length,
                data_size_limit=config.intake.max_message_size, hostname=config.hostname,
                ident="Listgate", timeout=config.intake.timeout, loop=loop)
            server = await loop.create_server(factory, host=listener.host, port=listener.port)
            servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.bound.append(Bound(listener.protocol, host, port))
                log.info("listening for %s on %s:%s", listener.protocol.upper(), host, port)

        retry = config.queue.retry_delay
        moderation = Moderation(store, clock=self.clock, claimer=claimer, policies=policies,
                                templates=templates, resolver=resolver, models=models,
                                trusted_authserv_ids=trusted, retry_delay=retry)
        web, public_url = None, ""
        if config.web.listen:
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
                                  recipients=lambda: delivery.tally).render
        poll = config.queue.poll_interval
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
        for job, every in ((moderation.sweep, config.moderation.sweep_interval),
                           (digest.tick, config.digest.tick),
                           (bounces.sweep, config.bounces.sweep_interval)):
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
            for server in servers:
                server.close()
            stopping.set()
            scheduler.shutdown(wait=False)
            if web is not None:
                await asyncio.to_thread(web.stop)
            # Every loop ends on `stopping` and is awaited, so no worker thread still holds
            # a store connection when the store is closed.
            await asyncio.gather(*tasks, *background, *self._jobs, return_exceptions=True)
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
