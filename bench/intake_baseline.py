"""Intake posts/s of Listgate next to a bare aiosmtpd server that stores nothing, and the
raw smtp-source -> smtp-sink recipients/s ceiling of this machine.

usage: .venv/bin/python bench/intake_baseline.py [--posts N] [--repeats R] [--quick]
           [--sessions 4] [--size 1024] [--ceiling-msgs M] [--json] [--base-port 18100]

The same client, Postfix's `smtp-source -d -s 4 -m N -l 1024` (4 sessions reusing their
connection, 1 KiB posts), is pointed in turn (alternating who goes first) at

- Listgate, started by bench/sut-listgate.sh (own PEERS_DIR, default
  /tmp/peers-extra/intake) with a list of 1 member and a Postfix `smtp-sink` as its
  smarthost: posts are committed to the store and fanned out meanwhile; the bench
  waits until Listgate is idle before every timed run;
- a bare aiosmtpd server in its own process whose handler answers 250 to DATA and keeps
  nothing: what the same SMTP library costs with no work behind it.

posts/s = N / wall time of smtp-source. Medians over the repeats, and the ratio
Listgate / bare (issue 6 target: >= 0.9); also the ratio within each repeat (the two
ran back to back) and its median, steadier on a machine whose speed drifts. The
ceiling: `smtp-source -d -s 4 -m M -r 100 -l 1024` straight into `smtp-sink` (no
gateway): recipients/s = 100 M / wall time.

--quick: N = 50, 1 repeat, M = 50 (a smoke run, about 20 s).
Ports: base, base+1 (Listgate intake, web), base+2 (its sink), base+3 (bare), base+4
(ceiling sink).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import port_open

HERE = Path(__file__).resolve().parent
SUT = HERE / "sut-listgate.sh"
LIST = "bench@example.com"
POSTER = "m00000@example.net"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"

BARE_SERVER = r"""
import asyncio, sys
from aiosmtpd.controller import Controller

class Bare:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

c = Controller(Bare(), hostname="127.0.0.1", port=int(sys.argv[1]))
c.start()
print("ready", flush=True)
try:
    sys.stdin.read()  # until the bench closes our stdin
finally:
    c.stop()
"""


def log(msg: str) -> None:
    print(f"intake_baseline: {msg}", file=sys.stderr, flush=True)


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, secs: float = 30) -> None:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process for port {port} exited ({proc.returncode})")
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {secs}s")


def start_sink(port: int) -> subprocess.Popen[bytes]:
    """Postfix smtp-sink keeping nothing (as root it must drop to nobody)."""
    if port_open(port):
        raise SystemExit(f"port {port} is taken; use another --base-port")
    cmd = [SMTP_SINK]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    cmd += [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server that runs until its stdin closes (the bare server); terminate
    it if it has not after 10 s."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        stop(proc)


def smtp_source(port: int, *, posts: int, sessions: int, size: int,
                rcpts: int = 1) -> tuple[float, float]:
    """Run the client; (wall seconds, client CPU seconds)."""
    cmd = [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(posts), "-l", str(size),
           "-f", POSTER, "-t", LIST, "-M", "client.example", "-S", "intake bench"]
    if rcpts > 1:
        cmd += ["-r", str(rcpts)]
    cmd.append(f"127.0.0.1:{port}")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    assert p.stdout is not None
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0 or out.strip():
        raise RuntimeError(f"smtp-source: {out.decode(errors='replace')}")
    return wall, ru.ru_utime + ru.ru_stime


class Listgate:
    """bench/sut-listgate.sh with its own state folder and ports."""

    def __init__(self, peers_dir: Path, post_port: int, web_port: int, sink_port: int) -> None:
        self.env = dict(os.environ, PEERS_DIR=str(peers_dir), POST_PORT=str(post_port),
                        SINK_PORT=str(sink_port),
                        LISTGATE_WEB_LISTEN=f"http://127.0.0.1:{web_port}")

    def sut(self, *args: str, timeout: float = 900) -> str:
        return subprocess.run([str(SUT), *args], env=self.env, check=True, text=True,
                              stdout=subprocess.PIPE, timeout=timeout).stdout

    def pid(self) -> int:
        return int(self.sut("pids").split()[0])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--ceiling-msgs", type=int, default=2000,
                    help="messages of 100 recipients for the raw ceiling")
    ap.add_argument("--base-port", type=int, default=18100)
    ap.add_argument("--peers-dir", default="/tmp/peers-extra/intake")
    ap.add_argument("--quick", action="store_true", help="N=50, 1 repeat: a smoke run")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    a = ap.parse_args()
    if a.quick:
        a.posts, a.repeats, a.ceiling_msgs = 50, 1, 50
    for exe in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(exe, os.X_OK):
            raise SystemExit(f"missing {exe} (Debian package postfix)")
    post_port, web_port, lg_sink_port, bare_port, ceil_port = (a.base_port + i
                                                               for i in range(5))
    for port in (post_port, web_port, bare_port):
        if port_open(port):
            raise SystemExit(f"port {port} is taken; use another --base-port")
    peers_dir = Path(a.peers_dir)
    peers_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    runs: dict[str, list[tuple[float, float]]] = {"listgate": [], "bare": []}
    lg = Listgate(peers_dir, post_port, web_port, lg_sink_port)
    sink = bare = ceil_sink = None
    started = False
    try:
        sink = start_sink(lg_sink_port)
        lg.sut("start")
        started = True
        lg.sut("prepare", LIST, "1", "regular")
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        wait_port(bare_port, bare)
        # One untimed warm-up each: first connections, imports, SQLite file growth.
        smtp_source(post_port, posts=min(50, a.posts), sessions=a.sessions, size=a.size)
        smtp_source(bare_port, posts=min(50, a.posts), sessions=a.sessions, size=a.size)
        for r in range(a.repeats):
            order = ["listgate", "bare"] if r % 2 == 0 else ["bare", "listgate"]
            for who in order:
                lg.sut("wait-idle", "600")
                port = post_port if who == "listgate" else bare_port
                wall, cpu = smtp_source(port, posts=a.posts, sessions=a.sessions, size=a.size)
                runs[who].append((a.posts / wall, cpu))
                log(f"repeat {r + 1} {who}: {a.posts / wall:.0f} posts/s ({wall:.2f} s)")
        lg.sut("wait-idle", "600")
        check = lg.sut("check")
    finally:
        if started:
            lg.sut("stop")
        if bare is not None:
            finish(bare)
        stop(sink)
    # The ceiling, with nothing else of ours running.
    ceil_runs = []
    try:
        ceil_sink = start_sink(ceil_port)
        smtp_source(ceil_port, posts=min(50, a.ceiling_msgs), sessions=a.sessions,
                    size=a.size, rcpts=100)
        for r in range(a.repeats):
            wall, _ = smtp_source(ceil_port, posts=a.ceiling_msgs, sessions=a.sessions,
                                  size=a.size, rcpts=100)
            ceil_runs.append(100 * a.ceiling_msgs / wall)
            log(f"repeat {r + 1} ceiling: {ceil_runs[-1]:.0f} recipients/s ({wall:.2f} s)")
    finally:
        stop(ceil_sink)

    lg_med = median([p for p, _ in runs["listgate"]])
    bare_med = median([p for p, _ in runs["bare"]])
    # Each repeat runs the two back to back: the ratio within a repeat cancels the
    # machine's slower and faster minutes, which the medians of each side do not.
    paired = [lg / bare for (lg, _), (bare, _) in zip(runs["listgate"], runs["bare"],
                                                      strict=True)]
    result: dict[str, Any] = {
        "params": {"client": f"smtp-source -d -s {a.sessions} -m {a.posts} -l {a.size}",
                   "repeats": a.repeats, "list_members": 1,
                   "ceiling": f"smtp-source -d -s {a.sessions} -m {a.ceiling_msgs} -r 100 "
                              f"-l {a.size} -> smtp-sink"},
        "listgate_posts_per_s": [round(p, 1) for p, _ in runs["listgate"]],
        "bare_posts_per_s": [round(p, 1) for p, _ in runs["bare"]],
        "listgate_median": round(lg_med, 1),
        "bare_median": round(bare_med, 1),
        "ratio_listgate_bare": round(lg_med / bare_med, 3),
        "paired_ratios": [round(x, 3) for x in paired],
        "paired_ratio_median": round(median(paired), 3),
        "client_cpu_s_median": {"listgate": round(median([c for _, c in runs["listgate"]]), 3),
                                "bare": round(median([c for _, c in runs["bare"]]), 3)},
        "ceiling_rcpts_per_s": [round(x) for x in ceil_runs],
        "ceiling_median": round(median(ceil_runs)),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "listgate_check": check.strip(),
    }
    if a.json:
        print(json.dumps(result))
        return 0
    p = result["params"]
    print(f"client: {p['client']}, {a.repeats} repeats (alternating), list of 1 member")
    print("| server | posts/s median | runs |")
    print("|---|---:|---|")
    print(f"| Listgate (SQLite, fan-out to smtp-sink) | {lg_med:.0f} | "
          f"{', '.join(f'{x:.0f}' for x in result['listgate_posts_per_s'])} |")
    print(f"| bare aiosmtpd (250, stores nothing) | {bare_med:.0f} | "
          f"{', '.join(f'{x:.0f}' for x in result['bare_posts_per_s'])} |")
    print(f"| ratio Listgate / bare | {result['ratio_listgate_bare']:.2f} | |")
    print(f"| ratio within each repeat, median | {result['paired_ratio_median']:.2f} | "
          f"{', '.join(f'{x:.2f}' for x in result['paired_ratios'])} |")
    print(f"ceiling ({p['ceiling']}): {result['ceiling_median']} recipients/s median "
          f"({', '.join(str(x) for x in result['ceiling_rcpts_per_s'])})")
    print(f"load average before {load_before}, after {result['loadavg_after']}")
    print(f"listgate check: {check.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
