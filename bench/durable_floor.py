"""What any aiosmtpd server that makes a post durable before its 250 can take in on
this machine, next to the bare server that stores nothing: the floor under issue 6's
intake target (>= 0.9 of the bare server), without Listgate's own code.

usage: .venv/bin/python bench/durable_floor.py [--posts N] [--repeats R] [--quick]
           [--sessions 4] [--size 1024] [--variants bare,thread,...] [--base-port 18140]

The client is intake_baseline.py's: `smtp-source -d -s 4 -m N -l 1024`. Every variant is
the same aiosmtpd server (the bare server's `Controller`, or the same `SMTP` class on a
socket the processes share) whose DATA handler differs:

- bare: answers 250 and keeps nothing (intake_baseline.py's bare server);
- thread-nosync: hands the post to a writer thread (group commit: whatever has come
  in while it wrote) that `pwrite`s it into a file and wakes the loop; no flush, so
  this is what the hand-off alone costs;
- thread: the same, and `fdatasync` before the wake-up: a real durable 250;
- aio: no thread; the post is written with Linux native AIO (`io_submit`, O_DIRECT,
  RWF_DSYNC) and its completion read from an eventfd on the event loop (Linux x86-64);
- thread-2proc: `thread` in two processes accepting on one listening socket, each with
  its own file (smtp-source's sessions are shared between them by the kernel's accept
  race, not evenly).

Each file is written with zeros before the run, so every write is in place (an
`fdatasync` of a file that grows also commits its new size). Prints posts/s per
variant (median over the repeats) and the ratio to `bare` within each repeat (the
variants of a repeat run back to back, in an order that rotates).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from intake_baseline import (
    BARE_SERVER,
    SMTP_SINK,
    SMTP_SOURCE,
    finish,
    median,
    smtp_source,
    wait_port,
)

# The durable servers: argv = port mode processes folder. One script for all of them,
# so that they differ only in the handler.
DURABLE_SERVER = r"""
import asyncio, ctypes, mmap, os, socket, sys, threading
from aiosmtpd.smtp import SMTP

port, mode, processes, folder = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
SIZE = 32 << 20  # bytes of each log file, written once with zeros; writes wrap around


def prewritten(path, flags=0):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    zeros = bytes(1 << 20)
    for _ in range(SIZE >> 20):
        os.write(fd, zeros)
    os.fsync(fd)
    os.close(fd)
    return os.open(path, os.O_RDWR | flags)


class ThreadLog:
    # Posts queue up while the writer thread writes (and flushes) the last batch.
    def __init__(self, path, loop, flush):
        self.fd, self.offset, self.loop, self.flush = prewritten(path), 0, loop, flush
        self.pending, self.ready = [], threading.Condition()
        threading.Thread(target=self.write, daemon=True).start()

    def add(self, data, done):
        with self.ready:
            self.pending.append((data, done))
            self.ready.notify()

    def write(self):
        while True:
            with self.ready:
                while not self.pending:
                    self.ready.wait()
                batch, self.pending = self.pending, []
            data = b"".join(d for d, _ in batch)
            if self.offset + len(data) > SIZE:
                self.offset = 0
            os.pwrite(self.fd, data, self.offset)
            self.offset += len(data)
            if self.flush:
                os.fdatasync(self.fd)
            self.loop.call_soon_threadsafe(resolve, [done for _, done in batch])


def resolve(waiting):
    for done in waiting:
        if not done.done():  # its session may have gone
            done.set_result(None)


class Iocb(ctypes.Structure):  # struct iocb, little-endian x86-64
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class AioLog:
    # One write per post, submitted at once; completions wake the loop via an eventfd.
    IO_SETUP, IO_GETEVENTS, IO_SUBMIT, PWRITE, RWF_DSYNC, RESFD, BLOCK = \
        206, 208, 209, 1, 2, 1, 4096

    def __init__(self, path, loop):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.fd, self.offset, self.next_id, self.inflight = \
            prewritten(path, os.O_DIRECT), 0, 1, {}
        self.ctx = ctypes.c_ulong(0)
        if self.libc.syscall(self.IO_SETUP, 256, ctypes.byref(self.ctx)) != 0:
            raise OSError(ctypes.get_errno(), "io_setup")
        self.events = (IoEvent * 64)()
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK)
        loop.add_reader(self.eventfd, self.reap)

    def add(self, data, done):
        size = -(-len(data) // self.BLOCK) * self.BLOCK
        buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        buf.write(data)
        if self.offset + size > SIZE:
            self.offset = 0
        cb = Iocb(data=self.next_id, opcode=self.PWRITE, fildes=self.fd,
                  rw_flags=self.RWF_DSYNC, nbytes=size, offset=self.offset,
                  flags=self.RESFD, resfd=self.eventfd)
        cb.buf = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self.offset += size
        if self.libc.syscall(self.IO_SUBMIT, self.ctx, 1,
                             (ctypes.POINTER(Iocb) * 1)(ctypes.pointer(cb))) != 1:
            raise OSError(ctypes.get_errno(), "io_submit")
        self.inflight[self.next_id] = (cb, buf, done)
        self.next_id += 1

    def reap(self):
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return
        while (n := self.libc.syscall(self.IO_GETEVENTS, self.ctx, 0, 64, self.events, None)) > 0:
            for event in self.events[:n]:
                _cb, _buf, done = self.inflight.pop(event.data)
                if done.done():  # its session has gone
                    continue
                if event.res < 0:
                    done.set_exception(OSError(-event.res, "aio write"))
                else:
                    done.set_result(None)


class Durable:
    def __init__(self, log):
        self.log = log

    async def handle_DATA(self, server, session, envelope):
        done = asyncio.get_running_loop().create_future()
        self.log.add(envelope.original_content, done)
        await done
        return "250 OK"


def serve(slot, listener):
    loop = asyncio.new_event_loop()
    path = os.path.join(folder, f"log{slot}")
    log = AioLog(path, loop) if mode == "aio" else ThreadLog(path, loop, mode != "thread-nosync")
    handler = Durable(log)
    accepted = 0

    def session():
        nonlocal accepted
        accepted += 1  # noted in a file: the bench reports how the sessions split
        path = os.path.join(folder, f"sessions{slot}")
        with open(path + ".new", "w") as f:
            f.write(str(accepted))
        os.replace(path + ".new", path)  # whole, for a reader at any moment
        return SMTP(handler)

    loop.run_until_complete(loop.create_server(session, sock=listener))
    loop.run_forever()


listener = socket.create_server(("127.0.0.1", port), backlog=128)
children = []
for slot in range(processes):
    pid = os.fork()
    if pid == 0:
        try:
            serve(slot, listener)
        finally:
            os._exit(1)
    children.append(pid)
print("ready", flush=True)
try:
    sys.stdin.read()  # until the bench closes our stdin
finally:
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
"""

VARIANTS = {  # name: (mode, processes); "bare" is intake_baseline.py's bare server
    "bare": ("", 1),
    "thread-nosync": ("thread-nosync", 1),
    "thread": ("thread", 1),
    "aio": ("aio", 1),
    "thread-2proc": ("thread", 2),
}


def start(variant: str, port: int, folder: str) -> subprocess.Popen[bytes]:
    mode, processes = VARIANTS[variant]
    for slot in range(processes):  # the last server's counts
        (Path(folder) / f"sessions{slot}").unlink(missing_ok=True)
    argv = ["-c", BARE_SERVER, str(port)] if variant == "bare" else \
        ["-c", DURABLE_SERVER, str(port), mode, str(processes), folder]
    proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    wait_port(port, proc, secs=120)  # the log files are written first
    return proc


def sessions(folder: str, processes: int) -> list[int]:
    """Sessions each process of a durable server has accepted so far."""
    counts = []
    for slot in range(processes):
        try:
            counts.append(int((Path(folder) / f"sessions{slot}").read_text()))
        except FileNotFoundError:
            counts.append(0)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--base-port", type=int, default=18140)
    ap.add_argument("--quick", action="store_true", help="N=50, 1 repeat: a smoke run")
    a = ap.parse_args()
    if a.quick:
        a.posts, a.repeats = 50, 1
    variants = a.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "bare" not in variants:
        raise SystemExit(f"--variants: give bare and any of {', '.join(VARIANTS)} "
                         f"(unknown: {', '.join(unknown) or 'none'})")
    if "aio" in variants and (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        print("aio left out: its system call numbers are Linux x86-64's", file=sys.stderr)
        variants.remove("aio")
    for exe in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(exe, os.X_OK):
            raise SystemExit(f"missing {exe} (Debian package postfix)")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="durable-floor-", dir=Path.cwd()) as folder:
        for r in range(a.repeats):
            turn = variants[r % len(variants):] + variants[:r % len(variants)]
            for i, variant in enumerate(turn):
                port = a.base_port + i
                proc = start(variant, port, folder)
                try:
                    smtp_source(port, posts=min(50, a.posts), sessions=a.sessions, size=a.size)
                    before = sessions(folder, VARIANTS[variant][1])
                    wall, _cpu = smtp_source(port, posts=a.posts, sessions=a.sessions,
                                             size=a.size)
                    split = [n - b for n, b in zip(sessions(folder, VARIANTS[variant][1]),
                                                   before, strict=True)]
                finally:
                    finish(proc)
                rates[variant].append(a.posts / wall)
                shared = f" (sessions per process: {'+'.join(map(str, split))})" \
                    if len(split) > 1 else ""
                print(f"durable_floor: repeat {r + 1} {variant}: {a.posts / wall:.0f} posts/s"
                      f"{shared}", file=sys.stderr, flush=True)
    print(f"client: smtp-source -d -s {a.sessions} -m {a.posts} -l {a.size}, "
          f"{a.repeats} repeats; log files in the current directory's file system")
    print("| server | posts/s median | ratio to bare within each repeat | median ratio |")
    print("|---|---:|---|---:|")
    for variant in variants:
        ratios = [x / bare for x, bare in zip(rates[variant], rates["bare"], strict=True)]
        print(f"| {variant} | {median(rates[variant]):.0f} | "
              f"{', '.join(f'{x:.2f}' for x in ratios)} | {median(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
