"""The stages and periodic jobs of a daemon that runs them, composed and started here.

A supervisor's intake worker runs no stage: it never imports this module, and so never
loads what only the stages use (the policy engine, DKIM and DNS, the promotional model,
the scheduler), about a quarter of a process's memory.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gateway import learning, promo, queue
from gateway.authentication import Resolver, SigningKeys
from gateway.bounces import Bounces
from gateway.clock import Clock
from gateway.commands import Commands
from gateway.config import Config
from gateway.delivery import Delivery
from gateway.digest import Digest
from gateway.fanout import Fanout
from gateway.lists import Directory
from gateway.moderation import Moderation
from gateway.owner import Owner
from gateway.policy import Policies
from gateway.queue import Claimer
from gateway.routing import Stage
from gateway.schema import outbound, work
from gateway.signing import LinkSigner
from gateway.spool import Importer, Spool
from gateway.store import Store
from gateway.tally import Tally
from gateway.templates import Templates
from gateway.transport import Transport, build
from gateway.worker import Progress, Wakeups, run_stage

log = logging.getLogger(__name__)

RunOnce = Callable[[Progress], Progress]


class Stages:
    """Every stage of one daemon, the delivery stage and the periodic jobs.

    Made before anything is opened: an invalid policy file stops the start there."""

    def __init__(self, config: Config, *, clock: Clock, tally: Tally,
                 transport: Transport | None = None, resolver: Resolver | None = None) -> None:
        self.config = config
        self.clock = clock
        self.tally = tally
        self.policies = Policies(config.paths.policies)
        self.transport = transport or build(config.delivery, hostname=config.hostname)
        self.resolver = resolver or Resolver(nameservers=config.dns.nameservers or None,
                                             timeout=config.dns.timeout, clock=clock)
        self.batch: list[tuple[Stage, RunOnce]] = []
        self.periodic: list[tuple[RunOnce, float]] = []
        self.delivery: Delivery | None = None
        self._handing_back: tuple[Store, Claimer] | None = None
        self.keys = SigningKeys(config.dkim.directory, selector=config.dkim.selector,
                                ed25519_selector=config.dkim.ed25519_selector, clock=clock)
        self.models: learning.Models | None = None
        self._jobs: set[asyncio.Future[Progress]] = set()
        self._scheduler: AsyncIOScheduler | None = None
        self._stopped = False

    async def check(self, store: Store, directory: Directory) -> None:
        """Before a socket is open: check every list domain's DKIM keys, and free the
        leases of this host's processes that died."""
        # A key that cannot be used (others can read it, it does not parse) stops the start
        # here, not each delivery later; a domain without a key is only logged.
        for domain in sorted(directory.domains):
            await asyncio.to_thread(self.keys.for_domain, domain)
        await asyncio.to_thread(_recover, store)
        self.models = learning.Models(await asyncio.to_thread(promo.load_model))

    def build(self, store: Store, spool: Spool | None, *, signer: LinkSigner,
              templates: Templates, public_url: str, import_spool: bool) -> None:
        """Every stage; the spool's importer only if ``import_spool``."""
        config, clock, models = self.config, self.clock, self.models
        assert models is not None, "check() first"
        claimer = Claimer(queue.worker_identity(), config.queue.lease, config.queue.max_attempts)
        self._handing_back = (store, claimer)
        trusted = config.moderation.trusted_authserv_ids
        retry = config.queue.retry_delay
        moderation = Moderation(store, clock=clock, claimer=claimer, policies=self.policies,
                                templates=templates, resolver=self.resolver, models=models,
                                trusted_authserv_ids=trusted, retry_delay=retry)
        digest = Digest(store, clock=clock, claimer=claimer, templates=templates,
                        public_url=public_url, chunk=config.digest.chunk, retry_delay=retry)
        bounces = Bounces(store, clock=clock, claimer=claimer, templates=templates,
                          settings=config.bounces, signer=signer, retry_delay=retry)
        self.batch = [
            *([(Stage.INTAKE, Importer(store, spool, clock=clock).run_once)]
              if spool is not None and import_spool else []),
            (Stage.MODERATION, moderation.run_once),
            (Stage.COMMANDS, Commands(store, clock=clock, claimer=claimer,
                                      templates=templates, policies=self.policies,
                                      resolver=self.resolver, trusted_authserv_ids=trusted,
                                      retry_delay=retry).run_once),
            (Stage.FANOUT, Fanout(store, clock=clock, claimer=claimer, templates=templates,
                                  hostname=config.hostname, chunk=config.fanout.chunk,
                                  max_recipients=config.delivery.max_recipients,
                                  resolver=self.resolver, trusted_authserv_ids=trusted,
                                  arc=config.dkim.arc, public_url=public_url,
                                  retry_delay=retry).run_once),
            (Stage.DIGEST, digest.run_once),
            (Stage.OWNER, Owner(store, clock=clock, claimer=claimer,
                                hostname=config.hostname, retry_delay=retry).run_once),
            (Stage.BOUNCES, bounces.run_once),
        ]
        self.delivery = Delivery(store, self.transport, clock=clock, claimer=claimer,
                                 config=config.delivery, retry_delay=retry, link_signer=signer,
                                 keys=self.keys,
                                 authserv_id=config.dkim.authserv_id or config.hostname,
                                 tally=self.tally)
        # Expiries and reminders of held posts, the digest schedules, and the bounces
        # sweep (the smarthost's refusals, further probes, removals).
        self.periodic = [(moderation.sweep, config.moderation.sweep_interval),
                         (digest.tick, config.digest.tick),
                         (bounces.sweep, config.bounces.sweep_interval)]

    def _hand_back(self, stage: Stage) -> Callable[[], int] | None:
        """What a stage's worker runs after a round that raised (see :func:`run_stage`);
        None for the importer, which claims no rows."""
        assert self._handing_back is not None, "build() first"
        store, claimer = self._handing_back
        if stage is Stage.INTAKE:
            return None
        return lambda: queue.hand_back(store, work, claimer, now=self.clock.now(),
                                       stage=stage.value)

    def start(self, wakeups: Wakeups, stopping: asyncio.Event) -> list[asyncio.Task[None]]:
        """The stages' tasks (each ends on ``stopping``) and the periodic jobs' scheduler."""
        assert self.delivery is not None, "build() first"
        poll = self.config.queue.poll_interval
        tasks = [asyncio.create_task(run_stage(stage, run_once, wakeups, poll_interval=poll,
                                               stopping=stopping,
                                               hand_back=self._hand_back(stage)),
                                     name=stage.value)
                 for stage, run_once in self.batch]
        tasks.append(asyncio.create_task(self.delivery.run(wakeups, poll_interval=poll,
                                                           stopping=stopping), name="delivery"))
        self._scheduler = scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        # A run still going when the next is due is skipped (max_instances=1): wanted,
        # and not worth a warning every time.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        # Nor is every run of every job ("Running job ...", "executed successfully").
        logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
        for job, every in self.periodic:
            scheduler.add_job(self._periodic, "interval", seconds=every, args=(job, wakeups),
                              id=job.__qualname__, coalesce=True, max_instances=1,
                              next_run_time=datetime.datetime.now(datetime.UTC))
        scheduler.start()
        return tasks

    def stop_scheduling(self) -> None:
        """No periodic run starts from now on, not even one the scheduler has already
        handed to the event loop: called as soon as the daemon is asked to stop."""
        self._stopped = True
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)

    async def finish(self) -> None:
        """Wait for the periodic runs under way: their threads use the store."""
        await asyncio.gather(*self._jobs, return_exceptions=True)

    async def _periodic(self, job: RunOnce, wakeups: Wakeups) -> None:
        """One run of a periodic job, in a worker thread; awaited at shutdown."""
        if self._stopped:  # a run that would start after the store is closed
            return
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


def _recover(store: Store) -> None:
    """Leases held by processes of this host that died are freed at once."""
    with store.write() as conn:
        for table in (work, outbound):
            freed = queue.recover_dead_leases(conn, table, now=store.clock.now())
            if freed:
                log.warning("recovered %d %s rows claimed by a process that died",
                            freed, table.name)
