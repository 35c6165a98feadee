"""The composition root: builds every part of one gateway process, wires them, runs them.

Nothing is registered at import time and there are no module-level singletons:
the store, the route table, the stages (through ``gateway.stages``, only in a process
that runs them) and the listeners are made here, once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.clock import Clock, SystemClock
from gateway.config import Config, parse_listener, store_url
from gateway.errors import ConfigError
from gateway.intake import (
    ConnectionLimiter,
    IntakeHandler,
    IntakeLMTP,
    IntakeSMTP,
    IntakeWriter,
)
from gateway.lists import Directory
from gateway.metrics import Metrics
from gateway.signing import LinkSigner
from gateway.spool import Spool, highest_message_id
from gateway.store import Store, doorbell_path
from gateway.supervisor import Bound
from gateway.tally import Tally
from gateway.templates import Templates
from gateway.web import WebServer
from gateway.worker import Doorbell, WakeChannel, Wakeups

if TYPE_CHECKING:
    from gateway.authentication import Resolver
    from gateway.policy import Policies
    from gateway.stages import Stages
    from gateway.transport import Transport

log = logging.getLogger(__name__)

DIRECTORY_REFRESH = 5.0


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
    # What /metrics reports as delivered: shared by the workers of a supervisor.
    tally: Tally = field(default_factory=Tally)
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
        stages = None
        if self.run_stages:
            # Imported here: a supervisor's intake worker never loads the stages' code.
            from gateway.stages import Stages

            stages = Stages(config, clock=self.clock, tally=self.tally,
                            transport=self.transport, resolver=self.resolver)
        templates = Templates(config.paths.templates)
        self.signer = signer = LinkSigner.from_file(config.web.secret_file, create=True)
        # Intake's writes go first: its clients wait for the commit, the stages do not.
        store = Store(store_url(config), clock=self.clock, pool_size=config.store.pool_size,
                      writes_first=not self.run_stages)
        spool = None
        try:
            spool = await asyncio.to_thread(
                functools.partial(Spool.beside, store, create=self.spool_intake))
            await self._run(store, spool, stages, templates, signer, stopping,
                            reload_requested, ready)
        finally:
            if spool is not None:
                spool.close()
            store.dispose()

    async def _run(self, store: Store, spool: Spool | None, stages: Stages | None,
                   templates: Templates, signer: LinkSigner, stopping: asyncio.Event,
                   reload_requested: asyncio.Event, ready: Callable[[], None] | None) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        store.check_schema()
        directory = Directory(store)
        await asyncio.to_thread(directory.refresh)
        if stages is not None:
            await stages.check(store, directory)
        wakeups = Wakeups(loop, channel=self.channel)

        if spool is not None and self.spool_intake:  # numbered on from the last message
            await asyncio.to_thread(spool.number_after, highest_message_id(store))
        writer = IntakeWriter(store, clock=self.clock, batch=config.intake.commit_batch,
                              on_commit=lambda stages: wakeups.notify(*stages),
                              spool=spool if self.spool_intake else None)
        handler = IntakeHandler(directory.router(), writer, clock=self.clock,
                                config=config.intake, refresh=directory.refresh)
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
        if stages is not None:
            stages.build(store, spool, signer=signer, templates=templates,
                         public_url=public_url, import_spool=self.import_spool)
        if web is not None:
            web.metrics = Metrics(store, clock=self.clock, accepted=lambda: writer.accepted,
                                  recipients=self.tally.totals,
                                  spooled=spool.depth if spool is not None else None).render
        tasks = stages.start(wakeups, stopping) if stages is not None else []
        # One process of a `serve` answers the doorbell: the one that imports the spool
        # (a single process is that one). Its wake-ups reach the other workers too.
        doorbell = None
        path = doorbell_path(store.url)
        if stages is not None and self.import_spool and path is not None:
            doorbell = await asyncio.to_thread(Doorbell.hang, path)
            if doorbell is not None:
                doorbell.listen(loop, wakeups.notify)
        background = [
            asyncio.create_task(writer.run(stopping), name="intake-writer"),
            asyncio.create_task(self._refresh(directory, stopping, reload_requested,
                                              stages.policies if stages is not None else None),
                                name="directory"),
        ]
        log.info("Listgate running: store %s%s",
                 store.engine.url.render_as_string(hide_password=True),
                 f", delivery to {stages.transport.describe()}" if stages is not None else
                 ", taking posts in (the stages run in other processes)")
        if ready is not None:
            ready()
        try:
            await stopping.wait()
        finally:
            log.info("stopping: no new connections; finishing work in hand")
            for _protocol, server in servers:
                server.close()
            if doorbell is not None:
                doorbell.close(loop)
            stopping.set()
            if stages is not None:
                stages.stop_scheduling()
            if web is not None:
                await asyncio.to_thread(web.stop)
            # Every loop ends on `stopping` and is awaited, so no worker thread still holds
            # a store connection when the store is closed.
            await asyncio.gather(*tasks, *background, return_exceptions=True)
            if stages is not None:
                await stages.finish()
            wakeups.close()
            log.info("stopped")

    @staticmethod
    async def _refresh(directory: Directory, stopping: asyncio.Event, reload: asyncio.Event,
                       policies: Policies | None) -> None:
        """Re-read the lists every few seconds, and lists and policies (if this daemon
        runs the stages that use them) at once on SIGHUP."""
        while not stopping.is_set():
            stop, hup = asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(reload.wait())
            await asyncio.wait({stop, hup}, timeout=DIRECTORY_REFRESH,
                               return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            hup.cancel()
            if stopping.is_set():
                return
            hupped = reload.is_set()
            reload.clear()
            if hupped and policies is not None:
                try:
                    await asyncio.to_thread(policies.reload)
                    log.info("SIGHUP: policies re-read from %s", policies.root)
                except ConfigError as exc:
                    log.error("SIGHUP: policies NOT reloaded, the ones in force stay: %s", exc)
            try:
                await asyncio.to_thread(directory.refresh)
            except Exception:  # routing keeps the last good snapshot
                log.exception("refreshing the list directory failed")
