"""`listgate serve` with ``[daemon] processes = 2``: a supervisor, an intake worker
and a stage worker.

The real command in its own process, real SMTP clients on loopback, a real sink,
on SQLite and PostgreSQL: concurrent posts reach every member exactly once; SIGTERM
to the supervisor stops every worker and loses nothing that got a 250; a worker
killed with SIGKILL under load is restarted and its leased work is done; a worker
that cannot start makes `serve` exit non-zero with the reason.
"""

from __future__ import annotations

import collections
import email
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.schema import messages, outbound, work
from gateway.spool import Spool, spooled
from gateway.store import Store
from tests.conftest import LIST, MEMBERS
from tests.support import REPO, GatewayProcess, Sink, free_port, post, wait_until, write_config

pytestmark = pytest.mark.slow

WORKERS = 2
CLIENTS = 4
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


class Serve:
    """`listgate serve` with two workers, its output in a log file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> Serve:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--config", str(self.config), "serve"],
                stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        if wait:
            # Printed once every worker is up (the sockets answer before: the supervisor
            # binds them, and connections wait in the backlog for a worker).
            wait_until(lambda: "listening: smtp://" in self.text() or self.exited(),
                       what="serve to start")
            assert not self.exited(), self.text()[-3000:]
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def workers(self) -> dict[int, int]:
        """slot -> pid of the worker started last in that slot."""
        return {int(slot): int(pid) for slot, pid in STARTED.findall(self.text())}

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def serve(config_path: Path) -> Iterator[Serve]:
    port = free_port()
    text = config_path.read_text()
    text = re.sub(r"listen = \[[^\]]*\]", f'listen = ["smtp://127.0.0.1:{port}"]', text, count=1)
    config_path.write_text(f"[daemon]\nprocesses = {WORKERS}\n{text}")
    running = Serve(config_path)
    running.port = port  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        if running.proc is not None and running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(10)
        for pid in running.workers().values():  # none may outlive the test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def send(port: int, mids: list[str]) -> list[str]:
    """Posts from concurrent clients; returns the Message-IDs that got a 250."""
    accepted: list[str] = []
    lock = threading.Lock()

    def client(share: list[str]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                for mid in share:
                    smtp.sendmail(MEMBERS[0], LIST, post(MEMBERS[0], LIST, f"p {mid}",
                                                         message_id=mid))
                    with lock:
                        accepted.append(mid)
        except (smtplib.SMTPException, OSError):
            pass  # the daemon was stopped under this client: what got 250 counts

    threads = [threading.Thread(target=client, args=(mids[i::CLIENTS],))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return accepted


def send_in_background(port: int, mids: list[str]) -> tuple[threading.Thread, list[str]]:
    """``send`` in a thread (started); the list fills with what got a 250."""
    accepted: list[str] = []
    sender = threading.Thread(target=lambda: accepted.extend(send(port, mids)))
    sender.start()
    return sender, accepted


def copies(sink: Sink) -> collections.Counter[tuple[str, str]]:
    counter: collections.Counter[tuple[str, str]] = collections.Counter()
    for rcpt, data in sink.handler.copies():
        counter[(str(email.message_from_bytes(data)["Message-ID"]), rcpt)] += 1
    return counter


def delivered(sink: Sink, mids: list[str]) -> bool:
    have = copies(sink)
    return all(have[(mid, rcpt)] for mid in mids for rcpt in MEMBERS)


def queued(store: Store) -> int:
    """Queue rows, and posts in the intake spool (SQLite: worker 0 commits there)."""
    with store.read() as conn:
        return spooled(store) + sum(conn.execute(sa.select(sa.func.count()).select_from(t))
                              .scalar_one() for t in (work, outbound))


def leased_by(store: Store, pid: int) -> int:
    with store.read() as conn:
        return sum(conn.execute(sa.select(sa.func.count()).select_from(t).where(
            t.c.lease_owner.like(f"%:{pid}:%"))).scalar_one() for t in (work, outbound))


def metrics(serve: Serve) -> str:
    """``/metrics``, served by the intake worker (the one started last)."""
    web = re.findall(r"web endpoint on (http://[\d.]+:\d+)", serve.text())
    assert web, serve.text()[-3000:]
    with urllib.request.urlopen(f"{web[-1]}/metrics", timeout=30) as answer:
        return str(answer.read().decode())


def delivered_metric(serve: Serve) -> int:
    found = re.search(r'^listgate_delivery_recipients_total\{outcome="delivered"\} (\S+)$',
                      metrics(serve), re.M)
    assert found is not None
    return int(float(found.group(1)))


def cpus_of(pid: int) -> set[int]:
    """The CPUs any thread of ``pid`` may run on."""
    return {cpu for tid in os.listdir(f"/proc/{pid}/task")
            for cpu in os.sched_getaffinity(int(tid))}


def stat_fields(path: str) -> list[str]:
    """The fields of a /proc stat file after the command name (which may hold blanks
    and parentheses): [0] is field 3, the state."""
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def nices_of(pid: int) -> set[int]:
    """The nice values of the threads of ``pid`` (field 19 of each thread's stat)."""
    return {int(stat_fields(f"/proc/{pid}/task/{tid}/stat")[16])
            for tid in os.listdir(f"/proc/{pid}/task")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return stat_fields(f"/proc/{pid}/stat")[0] != "Z"  # a zombie is dead too


@pytest.mark.parametrize("store_url", [
    "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_processes_deliver_every_post_once_and_stop_on_sigterm(
        serve: Serve, sink: Sink, store: Store) -> None:
    serve.start()
    workers = serve.workers()
    assert sorted(workers) == list(range(WORKERS))
    mids = [f"<mp.{i}@example.net>" for i in range(120)]
    assert sorted(send(serve.port, mids)) == sorted(mids)  # type: ignore[attr-defined]
    wait_until(lambda: delivered(sink, mids) and queued(store) == 0, timeout=60,
               what="every post delivered")
    have = copies(sink)
    assert set(have) == {(mid, rcpt) for mid in mids for rcpt in MEMBERS}
    assert max(have.values()) == 1
    # Worker 0 took the posts in, worker 1 worked on them.
    log = serve.text()
    assert f"[{workers[0]}] INFO gateway.intake: accepted" in log
    assert f"[{workers[1]}] INFO gateway.delivery: delivered" in log
    assert f"[{workers[0]}] INFO gateway.delivery: delivered" not in log
    # /metrics, served by worker 0, counts what worker 1 delivered.
    assert delivered_metric(serve) == len(mids) * len(MEMBERS)
    # Worker 0 never loaded the stages' code (DKIM's cryptography among it); worker 1 did.
    maps = {slot: Path(f"/proc/{pid}/maps").read_text() for slot, pid in workers.items()}
    assert "cryptography" not in maps[0]
    assert "cryptography" in maps[1]
    # Each worker, every thread of it, is bound to a CPU of its own (round robin).
    allowed = sorted(os.sched_getaffinity(0))
    for slot, pid in workers.items():
        assert cpus_of(pid) == {allowed[slot % len(allowed)]}, slot
    # The stage worker, every thread of it, yields the CPU to intake's (stage_nice).
    assert nices_of(workers[0]) == {0}
    assert nices_of(workers[1]) == {10}

    # SIGTERM with posts still arriving: everything stops, what got 250 is kept.
    more = [f"<mp.b{i}@example.net>" for i in range(150)]
    sender, accepted = send_in_background(serve.port, more)  # type: ignore[attr-defined]
    wait_until(lambda: "message_id=<mp.b" in serve.text(), what="the second load under way")
    time.sleep(0.2)
    assert serve.terminate() == 0, serve.text()[-3000:]
    sender.join(60)
    assert not any(alive(pid) for pid in workers.values())
    for slot, pid in workers.items():
        assert f"worker {slot} (pid {pid}) stopped\n" in serve.text()
    # What was accepted and not yet sent is still queued; a new serve sends it.
    serve.start()
    wait_until(lambda: delivered(sink, accepted) and queued(store) == 0, timeout=60,
               what="the posts accepted before SIGTERM delivered")
    assert serve.terminate() == 0


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_processes_restart_a_killed_worker_and_finish_its_work(
        serve: Serve, sink: Sink, store: Store) -> None:
    serve.start()
    victim = serve.workers()[1]
    mids = [f"<mp.k{i}@example.net>" for i in range(150)]
    sender, accepted = send_in_background(serve.port, mids)  # type: ignore[attr-defined]
    # Kill it while it holds leases.
    wait_until(lambda: leased_by(store, victim) > 0, what="the victim at work")
    os.kill(victim, signal.SIGKILL)
    sender.join(60)
    wait_until(lambda: serve.workers()[1] != victim and "worker 1 (pid" in serve.text()
               .rsplit(f"worker 1 started (pid {serve.workers()[1]})", 1)[-1],
               what="the worker restarted and up")
    assert f"worker 1 (pid {victim}) died (killed by SIGKILL)" in serve.text()
    assert sorted(accepted) == sorted(mids)  # the other worker kept taking posts
    wait_until(lambda: delivered(sink, mids) and queued(store) == 0, timeout=60,
               what="every post delivered, the victim's leased work too")
    assert leased_by(store, victim) == 0
    # Each recipient counted once, by the victim or by the worker in its place: what the
    # victim counted before it died is not forgotten.
    assert delivered_metric(serve) == len(mids) * len(MEMBERS)
    assert serve.terminate() == 0, serve.text()[-3000:]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_processes_three_workers_share_the_stages_and_import_each_post_once(
        serve: Serve, sink: Sink, store: Store) -> None:
    serve.config.write_text(serve.config.read_text().replace(
        f"processes = {WORKERS}\n", "processes = 3\n", 1))
    serve.start()
    assert sorted(serve.workers()) == [0, 1, 2]
    mids = [f"<mp.t{i}@example.net>" for i in range(120)]
    assert sorted(send(serve.port, mids)) == sorted(mids)  # type: ignore[attr-defined]
    wait_until(lambda: delivered(sink, mids) and queued(store) == 0, timeout=60,
               what="every post delivered")
    assert max(copies(sink).values()) == 1
    # One importer: no post was read by two of them.
    assert "imported before the spool forgot it" not in serve.text()
    assert serve.terminate() == 0, serve.text()[-3000:]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_processes_sigkill_of_the_intake_worker_loses_no_post_that_got_250(
        serve: Serve, sink: Sink, store: Store) -> None:
    serve.start()
    victim = serve.workers()[0]
    mids = [f"<mp.i{i}@example.net>" for i in range(300)]
    sender, accepted = send_in_background(serve.port, mids)  # type: ignore[attr-defined]
    # Killed with posts arriving: some sessions are cut off, mid-commit or not.
    wait_until(lambda: serve.text().count("INFO gateway.intake: accepted") >= 50,
               what="the intake worker at work")
    os.kill(victim, signal.SIGKILL)
    sender.join(60)
    wait_until(lambda: f"worker 0 (pid {victim}) died (killed by SIGKILL)" in serve.text(),
               what="the supervisor to see worker 0 die")
    assert 0 < len(accepted) < len(mids)  # the clients of the killed worker gave up
    wait_until(lambda: delivered(sink, accepted) and queued(store) == 0, timeout=60,
               what="every post that got a 250 delivered")
    assert max(copies(sink).values()) == 1
    # And the restarted intake worker takes posts again.
    again = [f"<mp.j{i}@example.net>" for i in range(20)]
    wait_until(lambda: serve.workers()[0] != victim, what="worker 0 restarted")
    assert sorted(send(serve.port, again)) == sorted(again)  # type: ignore[attr-defined]
    wait_until(lambda: delivered(sink, again), timeout=60, what="the later posts delivered")
    assert serve.terminate() == 0, serve.text()[-3000:]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_processes_intake_commits_to_the_spool_and_the_stage_worker_imports_it(
        serve: Serve, sink: Sink, store: Store) -> None:
    """On SQLite the intake worker's 250 rests on the spool alone: with the stage worker
    frozen, posts are still taken in, kept in the spool and nowhere else; the
    worker started in its place imports and delivers each of them once."""
    serve.start()
    stages = serve.workers()[1]
    os.kill(stages, signal.SIGSTOP)
    try:
        mids = [f"<mp.s{i}@example.net>" for i in range(40)]
        assert sorted(send(serve.port, mids)) == sorted(mids)  # type: ignore[attr-defined]
        spool = Spool.beside(store)
        assert spool is not None
        try:
            spooled = spool.oldest(100)
        finally:
            spool.close()
        assert sorted(str(email.message_from_bytes(s.post.raw)["Message-ID"])
                      for s in spooled) == sorted(mids)
        with store.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(messages)).scalar() == 0
        # Each 250 named the number the post keeps in the store.
        log = serve.text()
        assert all(f"accepted queue_id={s.seq} " in log for s in spooled)
        # /metrics (served by the intake worker) shows them waiting.
        assert f"listgate_spool_posts {len(mids)}.0" in metrics(serve)
    finally:
        os.kill(stages, signal.SIGKILL)
    wait_until(lambda: delivered(sink, mids) and queued(store) == 0, timeout=60,
               what="the spooled posts imported and delivered by the restarted worker")
    assert max(copies(sink).values()) == 1
    with store.read() as conn:
        ids = dict(conn.execute(sa.select(messages.c.message_id, messages.c.id)).all())
    assert {ids[mid] for mid in mids} == {s.seq for s in spooled}
    assert serve.terminate() == 0, serve.text()[-3000:]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_processes_exit_non_zero_when_workers_cannot_start(tmp_path: Path,
                                                           store_url: str) -> None:
    # An empty store (never `listgate init`): each worker stops at the schema check.
    config = write_config(tmp_path, store_url=store_url,
                          listen=[f"smtp://127.0.0.1:{free_port()}"],
                          sections="[daemon]\nprocesses = 2\n")
    running = Serve(config).start(wait=False)
    assert running.proc is not None
    assert running.proc.wait(60) == 1
    text = running.text()
    assert "error: the workers could not start:" in text, text[-3000:]
    assert "listgate db upgrade" in text
    assert "died 3 times before it was up" in text
    assert not any(alive(pid) for pid in running.workers().values())


def test_processes_supervisor_loads_only_the_configuration() -> None:
    """`serve` execs a small supervisor: the gateway's code is loaded by the workers."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, gateway.supervisor; print(*sorted(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    assert "gateway.config" in loaded
    heavy = {"asyncio", "sqlalchemy", "gateway.daemon", "gateway.store", "jinja2", "alembic"}
    assert heavy.isdisjoint(loaded)


def test_processes_bad_value_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, sections="[daemon]\nprocesses = 0\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), "serve"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "[daemon] processes must be at least 1" in result.stderr


PIN_THREADS = """
import os, threading
from gateway.supervisor import pin_to_cpu
before = threading.Event()
threading.Thread(target=before.wait, daemon=True).start()  # a thread started before
cpu = pin_to_cpu(1)
after = threading.Thread(target=lambda: print(sorted(os.sched_getaffinity(0))))
after.start(); after.join()  # a thread started after
print(cpu, sorted({c for t in os.listdir("/proc/self/task")
                   for c in os.sched_getaffinity(int(t))}))
"""


def test_processes_pin_to_cpu_binds_every_thread_and_later_ones() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", PIN_THREADS], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.splitlines()
    cpu = allowed[1 % len(allowed)]
    assert out == [f"[{cpu}]", f"{cpu} [{cpu}]"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("pin", [True, False])
def test_processes_one_process_serve_is_bound_to_one_cpu_unless_told_not_to(
        tmp_path: Path, store: Store, store_url: str, pin: bool) -> None:
    port = free_port()
    config = write_config(tmp_path / "gw", listen=[f"smtp://127.0.0.1:{port}"],
                          store_url=store_url,
                          sections=f"[daemon]\npin_cpus = {str(pin).lower()}\n")
    gateway = GatewayProcess(config).start(port)
    try:
        assert gateway.proc is not None
        allowed = os.sched_getaffinity(0)
        assert cpus_of(gateway.proc.pid) == ({min(allowed)} if pin else allowed)
        assert ("bound to CPU" in gateway.log.read_text()) is pin
    finally:
        assert gateway.terminate() == 0


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_processes_stage_nice_zero_runs_every_worker_alike(
        tmp_path: Path, store: Store, store_url: str) -> None:
    config = write_config(tmp_path / "gw", listen=[f"smtp://127.0.0.1:{free_port()}"],
                          store_url=store_url,
                          sections="[daemon]\nprocesses = 2\nstage_nice = 0\n")
    serve = Serve(config).start()
    try:
        assert [nices_of(pid) for _slot, pid in sorted(serve.workers().items())] == [{0}, {0}]
        assert "running at nice" not in serve.text()
    finally:
        assert serve.terminate() == 0


def test_processes_be_nicer_refused_warns_and_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.supervisor import be_nicer

    def refuse(increment: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refuse)
    with caplog.at_level("WARNING", logger="gateway.supervisor"):
        be_nicer(10)
    assert "could not lower this process's priority" in caplog.text
    assert "stage_nice = 0" in caplog.text


def test_processes_pin_to_cpu_refused_warns_and_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where the system refuses (a container without the capability, say): a warning
    that says how to stop trying, and the gateway runs unbound."""
    from gateway.supervisor import pin_to_cpu

    def refuse(pid: int, cpus: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    with caplog.at_level("WARNING", logger="gateway.supervisor"):
        assert pin_to_cpu(0) is None
    assert "could not bind this process to CPU" in caplog.text
    assert "pin_cpus = false" in caplog.text
