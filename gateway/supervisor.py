"""`listgate serve` with ``[daemon] processes`` > 1: a small supervisor process that
binds the listeners and forks the workers, each a whole ``Daemon`` on the shared store.

`serve` hands over to this module with ``exec`` (same pid), so the supervisor holds
none of the gateway's code: only the standard library and the configuration. Each
worker loads what it runs after the fork; the intake worker never loads the stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config import Config, load, parse_listener
from gateway.errors import ConfigError, ListgateError
from gateway.tally import Tally

log = logging.getLogger(__name__)


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


def configure_logging(config: Config, processes: int) -> None:
    """`serve`'s log lines, on stderr; with workers, each line says whose it is."""
    pid = " [%(process)d]" if processes > 1 else ""
    logging.basicConfig(level=config.log.level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s{pid} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter


def pin_to_cpu(slot: int) -> int | None:
    """Bind every thread of this process, and those it starts later, to one CPU of the
    ones it may use: the ``slot``-th, round robin. The CPU, or None where that cannot
    be done (no ``sched_setaffinity``, or the system refused it: a warning)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[slot % len(allowed)]
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # this thread only; the threads it starts inherit its CPU
    try:
        for tid in threads:
            try:
                os.sched_setaffinity(tid, {cpu})
            except ProcessLookupError:
                pass  # a thread that has ended since the listing
    except OSError as exc:
        log.warning("could not bind this process to CPU %d (%s); set [daemon] pin_cpus = "
                    "false to stop trying", cpu, exc)
        return None
    log.info("bound to CPU %d", cpu)
    return cpu


def be_nicer(nice: int) -> None:
    """Lower this process's priority by ``nice`` (the threads it starts later inherit
    it; call it before any). A warning if the system refuses."""
    try:
        os.nice(nice)
    except OSError as exc:
        log.warning("could not lower this process's priority (%s); set [daemon] "
                    "stage_nice = 0 to stop trying", exc)
        return
    log.info("running at nice %d", os.getpriority(os.PRIO_PROCESS, 0))


def announce(config: Config, bound: Sequence[Bound]) -> None:
    """What `serve` prints on stdout once it is up: where it listens, where mail goes."""
    for b in bound:
        print(f"listening: {b.protocol}://{b.host}:{b.port}", flush=True)
    if not config.delivery.smarthost:
        print(f"no smarthost set: mail for members goes to {config.delivery.outbox / 'new'}",
              flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.supervisor [--config FILE] --processes N``, as `serve` runs it."""
    parser = argparse.ArgumentParser(prog="listgate serve")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--processes", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        configure_logging(config, args.processes)
        return Supervisor(config, args.processes,
                          ready=lambda bound: announce(config, bound)).run()
    except ListgateError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


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
        self._tally = Tally(processes)
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
        import asyncio

        from gateway.daemon import Daemon
        from gateway.worker import WakeChannel

        intake = slot == 0
        self._tally.slot = slot
        if self.config.daemon.pin_cpus:
            pin_to_cpu(slot)
        if not intake and self.config.daemon.stage_nice:
            be_nicer(self.config.daemon.stage_nice)  # intake's sessions go first
        # The intake worker wakes the stage workers; stage workers wake each other.
        siblings = [pair[0] for i, pair in enumerate(self._inboxes) if i not in (0, slot)]
        daemon = Daemon(self.config, listeners=self._listeners if intake else [],
                        serve_web=intake, run_stages=not intake, spool_intake=True,
                        import_spool=slot == 1,
                        channel=WakeChannel(self._inboxes[slot][1], siblings),
                        tally=self._tally)

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


if __name__ == "__main__":
    # Run as the module of its own name (for its logger's name and a single Bound class),
    # not as __main__.
    from gateway import supervisor

    sys.exit(supervisor.main())
