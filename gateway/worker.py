"""Running a stage: claim a batch, process it, sleep until woken or the poll interval.

Stages tell each other that work is waiting through ``Wakeups`` (in-process
events, and between the workers of one `serve` through a ``WakeChannel``); work
itself only ever passes through the store. A command that queues work (``listgate
digest send``, ``held approve``, ``queue retry``) rings the ``Doorbell`` of the
gateway running on the same SQLite store. Between processes not started together
(other machines, a second `serve`, PostgreSQL's clients), the poll interval bounds
the latency.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import StoreUnavailable
from gateway.routing import Stage

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What one round of a stage did: how many rows, and which stages now have work.

    ``woke`` tells the other stages at once (through ``on_wake``), not at the end of
    the round: a post's next stage starts while the rest of the batch is processed.
    """

    worked: int = 0
    wake: set[Stage] = field(default_factory=set)
    on_wake: Callable[..., None] | None = None

    def woke(self, *stages: Stage) -> None:
        self.wake.update(stages)
        if self.on_wake is not None:
            self.on_wake(*stages)


class Wakeups:
    """Per-stage events that any thread may set; passed on to sibling processes too
    when a ``channel`` is given."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *,
                 channel: WakeChannel | None = None) -> None:
        self._loop = loop
        self._events = {stage: asyncio.Event() for stage in Stage}
        self._channel = channel
        if channel is not None:
            channel.listen(loop, self.notify_local)

    def notify(self, *stages: Stage) -> None:
        self.notify_local(*stages)
        if self._channel is not None and stages:
            self._channel.send(stages)

    def notify_local(self, *stages: Stage) -> None:
        for stage in stages:
            self._loop.call_soon_threadsafe(self._events[stage].set)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close(self._loop)

    async def wait(self, stage: Stage, timeout: float) -> None:
        event = self._events[stage]
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        event.clear()


class WakeChannel:
    """Stage names sent between the worker processes of one `serve`, as datagrams.

    Each worker reads its own ``inbox`` and writes to its siblings' (a unix datagram
    socketpair per worker, made by the supervisor before it forks and kept open by it,
    so a restarted worker gets the same one). A send never blocks: a full inbox means
    its reader has wake-ups waiting already.
    """

    def __init__(self, inbox: socket.socket, siblings: Sequence[socket.socket]) -> None:
        self.inbox = inbox
        self.siblings = list(siblings)

    def send(self, stages: Sequence[Stage] | set[Stage]) -> None:
        data = _datagram(stages)
        for sibling in self.siblings:
            try:
                sibling.send(data, socket.MSG_DONTWAIT)
            except OSError:  # full (it will wake anyway) or gone (it is being restarted)
                pass

    def listen(self, loop: asyncio.AbstractEventLoop, notify: Callable[..., None]) -> None:
        self.inbox.setblocking(False)
        by_name = {stage.value: stage for stage in Stage}

        def readable() -> None:
            stages: set[Stage] = set()
            while True:
                try:
                    data = self.inbox.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break
                stages.update(by_name[name] for name in data.decode("ascii", "replace")
                              .split(",") if name in by_name)
            if stages:
                notify(*stages)

        loop.add_reader(self.inbox.fileno(), readable)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.inbox.fileno())


def _datagram(stages: Iterable[Stage]) -> bytes:
    """Stage names as a ``WakeChannel`` carries them (and a ``Doorbell`` hears them)."""
    return ",".join(stage.value for stage in stages).encode("ascii")


class Doorbell:
    """A unix datagram socket at a path next to the SQLite store (``doorbell_path``):
    a ring wakes every stage now rather than at its next poll.

    It is read as a ``WakeChannel``'s inbox is: a datagram names stages, and names of
    none are ignored. A ring (``ring``) names them all, and only makes the stages look
    in the store for work, which they do at every poll anyway: it needs no trust. The
    file is the owner's alone (mode 0600) all the same. One gateway answers: a second
    `serve` on the same store finds the bell taken and polls; a bell left by a gateway
    that died is taken over.
    """

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self._inode = os.stat(path).st_ino
        self._inbox = WakeChannel(sock, siblings=())

    @classmethod
    def hang(cls, path: Path) -> Doorbell | None:
        """Bind the bell at ``path``; None (and a line in the log) when another gateway
        answers there or the path cannot be bound."""
        if ring(path):
            log.info("doorbell %s: another gateway answers it; commands wake that one, "
                     "and this one polls", path)
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            path.unlink(missing_ok=True)  # a bell nobody answers: left by a gateway that died
            sock.bind(str(path))
            os.chmod(path, 0o600)
            log.info("doorbell %s: commands that queue work ring it", path)
            return cls(sock, path)
        except OSError as exc:
            sock.close()
            log.warning("doorbell %s: cannot be bound (%s); commands take effect at the "
                        "next poll", path, exc.strerror or exc)
            return None

    def listen(self, loop: asyncio.AbstractEventLoop, notify: Callable[..., None]) -> None:
        """Call ``notify(*stages)`` with the stages a ring names."""
        self._inbox.listen(loop, notify)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        self._inbox.close(loop)
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:  # not a successor's bell
                self.path.unlink()
        except OSError:
            pass


_EVERY_STAGE = _datagram(Stage)


def ring(path: Path | None) -> bool:
    """Ring the doorbell at ``path``: whether a running gateway got it. Never blocks,
    never raises: with nobody there, the work waits for a poll."""
    if path is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(_EVERY_STAGE, socket.MSG_DONTWAIT, str(path))
        except BlockingIOError:  # its inbox is full: it has rings to read already
            return True
        except OSError as exc:  # no bell, a dead one, not ours to ring, a path too long
            log.debug("doorbell %s: %s", path, exc)
            return False
    return True


async def run_stage(stage: Stage, run_once: Callable[[Progress], Progress], wakeups: Wakeups, *,
                    poll_interval: float, stopping: asyncio.Event,
                    hand_back: Callable[[], int] | None = None) -> None:
    """Run ``run_once`` in a worker thread until ``stopping`` is set.

    After a round that raised, ``hand_back`` (if given) first makes claimable again
    what that round had claimed: the rows go on as soon as the store takes writes,
    not when their leases end.
    """
    errors = 0
    while not stopping.is_set():
        try:
            if errors and hand_back is not None and (handed := await asyncio.to_thread(hand_back)):
                log.info("%s: %d claimed rows handed back after the error", stage.value, handed)
            progress = await asyncio.to_thread(run_once, Progress(on_wake=wakeups.notify))
            errors = 0
        except StoreUnavailable as exc:
            errors += 1
            log.warning("%s: store unavailable (%s); retrying", stage.value, exc)
            progress = Progress()
        except Exception:  # a stage's loop is a process boundary: log and carry on
            errors += 1
            log.exception("%s: unexpected error; retrying", stage.value)
            progress = Progress()
        if progress.wake:
            wakeups.notify(*progress.wake)
        if progress.worked:
            continue
        delay = poll_interval if errors == 0 else min(30.0, poll_interval * 2 ** errors)
        waiter = asyncio.ensure_future(wakeups.wait(stage, delay))
        stopper = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()
