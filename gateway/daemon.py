"""The composition root: builds every part of the gateway, wires them, runs them.

Nothing is registered at import time and there are no module-level singletons:
the store, the route table, the stages and the listeners are made here, once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway import queue
from gateway.clock import Clock, SystemClock
from gateway.config import Config, parse_listener, store_url
from gateway.delivery import Delivery
from gateway.fanout import Fanout
from gateway.intake import (
    ConnectionLimiter,
    IntakeHandler,
    IntakeLMTP,
    IntakeSMTP,
    IntakeWriter,
)
from gateway.lists import Directory
from gateway.moderation import Moderation
from gateway.owner import Owner
from gateway.policy import Policies
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.schema import outbound, work
from gateway.store import Store
from gateway.templates import Templates
from gateway.transport import Transport, build
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
    bound: list[Bound] = field(default_factory=list)
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
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopping.set)

        store = Store(store_url(config), clock=self.clock, pool_size=config.store.pool_size)
        store.check_schema()
        policies = Policies(config.paths.policies)
        templates = Templates(config.paths.templates)
        directory = Directory(store)
        await asyncio.to_thread(directory.refresh)
        claimer = Claimer(queue.worker_identity(), config.queue.lease, config.queue.max_attempts)
        await asyncio.to_thread(self._recover, store)
        wakeups = Wakeups(loop)
        transport = self.transport or build(config.delivery, hostname=config.hostname)

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
        batch_stages: list[tuple[Stage, Callable[[], Progress]]] = [
            (Stage.MODERATION, Moderation(store, clock=self.clock, claimer=claimer,
                                          policies=policies, templates=templates,
                                          retry_delay=retry).run_once),
            (Stage.FANOUT, Fanout(store, clock=self.clock, claimer=claimer, templates=templates,
                                  hostname=config.hostname, chunk=config.fanout.chunk,
                                  max_recipients=config.delivery.max_recipients,
                                  retry_delay=retry).run_once),
            (Stage.OWNER, Owner(store, clock=self.clock, claimer=claimer,
                                hostname=config.hostname, retry_delay=retry).run_once),
        ]
        delivery = Delivery(store, transport, clock=self.clock, claimer=claimer,
                            config=config.delivery, retry_delay=retry)
        poll = config.queue.poll_interval
        tasks = [asyncio.create_task(run_stage(stage, run_once, wakeups, poll_interval=poll,
                                               stopping=stopping), name=stage.value)
                 for stage, run_once in batch_stages]
        tasks.append(asyncio.create_task(delivery.run(wakeups, poll_interval=poll,
                                                      stopping=stopping), name="delivery"))
        background = [
            asyncio.create_task(writer.run(), name="intake-writer"),
            asyncio.create_task(self._refresh(directory, stopping), name="directory"),
        ]
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
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            store.dispose()
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

    @staticmethod
    async def _refresh(directory: Directory, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await asyncio.sleep(DIRECTORY_REFRESH)
            try:
                await asyncio.to_thread(directory.refresh)
            except Exception:  # routing keeps the last good snapshot
                log.exception("refreshing the list directory failed")
