"""Post accepted -> first member copy at the sink, at light load: Listgate's delivery latency.

usage: .venv/bin/python bench/latency.py [--posts 100] [--gap 0.2] [--members 10]
           [--modes on,off] [--quick] [--json] [--base-port 18110]

Listgate runs from bench/sut-listgate.sh (own PEERS_DIR, default /tmp/peers-extra/latency;
default SQLite store) with a list of M members (default 10) and, as its smarthost, an
aiosmtpd sink inside this script that notes the arrival time of every copy (matched to
its post by Message-ID). smtplib sends the posts one at a time over one connection from
the list's poster, `--gap` seconds apart (after an untimed warm-up of 5). For each post:

    latency = arrival of its first copy at the sink - return of smtplib's sendmail()
              (the 250 after DATA: the post is committed)

and also until its last (M-th) copy. The report gives p50 / p90 / p99 / max in ms per
mode: `on` is the list default (personalised: one SMTP transaction per member, each copy
with its own unsubscribe link), `off` is `lists set --personalize off` (bulk
transactions of up to 100 recipients) — the same daemon, the list re-prepared with
LISTGATE_BENCH_PERSONALIZE=off. Issue 6 target: p50 <= 50 ms, p99 <= 250 ms.
No DKIM key is configured (as in compare.sh): copies go out unsigned; see dkim_cost.py.

--quick: 10 posts, both modes (about 30 s).
Ports: base (intake), base+1 (web endpoint), base+2 (the sink).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import email.utils
import json
import math
import os
import smtplib
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from benchlib import port_open

HERE = Path(__file__).resolve().parent
SUT = HERE / "sut-listgate.sh"
LIST = "bench@example.com"
POSTER = "m00000@example.net"
BODY = "Light-load latency probe.\r\n" + ("x" * 70 + "\r\n") * 13  # about 1 KiB


def log(msg: str) -> None:
    print(f"latency: {msg}", file=sys.stderr, flush=True)


class ArrivalSink:
    """The smarthost: for each Message-ID, the arrival time of every copy."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrivals: dict[str, list[float]] = {}
        self.rcpts = 0
        self._headers = email.parser.BytesHeaderParser(policy=email.policy.compat32)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        msgid = (self._headers.parsebytes(envelope.content).get("Message-ID") or "").strip()
        with self.lock:
            # One entry per recipient: a bulk transaction delivers to all of them at once.
            self.arrivals.setdefault(msgid, []).extend([now] * len(envelope.rcpt_tos))
            self.rcpts += len(envelope.rcpt_tos)
        return "250 OK"

    def copies(self, msgid: str) -> list[float]:
        with self.lock:
            return list(self.arrivals.get(msgid, ()))


class Listgate:
    def __init__(self, peers_dir: Path, post_port: int, web_port: int, sink_port: int) -> None:
        self.env = dict(os.environ, PEERS_DIR=str(peers_dir), POST_PORT=str(post_port),
                        SINK_PORT=str(sink_port),
                        LISTGATE_WEB_LISTEN=f"http://127.0.0.1:{web_port}")
        self.env.pop("LISTGATE_BENCH_PERSONALIZE", None)

    def sut(self, *args: str, personalize: str | None = None) -> str:
        env = dict(self.env)
        if personalize is not None:
            env["LISTGATE_BENCH_PERSONALIZE"] = personalize
        return subprocess.run([str(SUT), *args], env=env, check=True, text=True,
                              stdout=subprocess.PIPE, timeout=900).stdout


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def summary(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {}
    return {"n": len(ms), "p50": round(percentile(ms, 50), 1),
            "p90": round(percentile(ms, 90), 1), "p99": round(percentile(ms, 99), 1),
            "max": round(max(ms), 1), "mean": round(statistics.fmean(ms), 1)}


def run_mode(mode: str, *, port: int, sink: ArrivalSink, posts: int, gap: float,
             members: int, timeout: float = 60) -> dict[str, Any]:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    smtp.ehlo("latency.example")
    sent: list[tuple[str, float]] = []
    try:
        for i in range(-5, posts):  # negative: warm-up, not counted
            msgid = f"<lat-{mode}-{i}-{uuid.uuid4().hex[:12]}@client.example>"
            msg = (f"From: Poster <{POSTER}>\r\nTo: {LIST}\r\nSubject: latency {mode} {i}\r\n"
                   f"Message-ID: {msgid}\r\nDate: {email.utils.formatdate()}\r\n"
                   f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
                   f"\r\n{BODY}")
            smtp.sendmail(POSTER, [LIST], msg.encode("ascii"))
            accepted = time.monotonic()
            if i >= 0:
                sent.append((msgid, accepted))
            time.sleep(gap)
    finally:
        smtp.quit()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(sink.copies(m)) >= members for m, _ in sent):
            break
        time.sleep(0.1)
    first, last, missing = [], [], 0
    for msgid, accepted in sent:
        arr = sorted(sink.copies(msgid))
        if not arr:
            missing += 1
            continue
        first.append((arr[0] - accepted) * 1000)
        if len(arr) >= members:
            last.append((arr[members - 1] - accepted) * 1000)
    return {"mode": mode, "posts": posts, "missing_posts": missing,
            "first_copy_ms": summary(first), "all_copies_ms": summary(last)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=100)
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between posts")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--modes", default="on,off",
                    help="personalize modes, in order: on (list default), off")
    ap.add_argument("--base-port", type=int, default=18110)
    ap.add_argument("--peers-dir", default="/tmp/peers-extra/latency")
    ap.add_argument("--quick", action="store_true", help="10 posts per mode")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.posts = 10
    post_port, web_port, sink_port = a.base_port, a.base_port + 1, a.base_port + 2
    for port in (post_port, web_port, sink_port):
        if port_open(port):
            raise SystemExit(f"port {port} is taken; use another --base-port")
    Path(a.peers_dir).mkdir(parents=True, exist_ok=True)
    sink = ArrivalSink()
    controller = Controller(sink, hostname="127.0.0.1", port=sink_port)
    controller.start()
    lg = Listgate(Path(a.peers_dir), post_port, web_port, sink_port)
    results = []
    load_before = os.getloadavg()
    started = False
    try:
        lg.sut("start")
        started = True
        for mode in a.modes.split(","):
            lg.sut("prepare", LIST, str(a.members), "regular",
                   personalize=None if mode == "on" else mode)
            lg.sut("wait-idle", "120")
            res = run_mode(mode, port=post_port, sink=sink, posts=a.posts, gap=a.gap,
                           members=a.members)
            res["loadavg"] = os.getloadavg()
            results.append(res)
            log(f"{mode}: {res}")
        check = lg.sut("check").strip()
    finally:
        if started:
            lg.sut("stop")
        controller.stop()
    out = {"params": {"posts": a.posts, "gap_s": a.gap, "members": a.members,
                      "client": "smtplib, 1 connection, sequential",
                      "sink": "aiosmtpd in the bench process", "store": "SQLite"},
           "results": results, "loadavg_before": load_before, "listgate_check": check}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{a.posts} posts, {a.gap} s apart, list of {a.members} members, smtplib -> "
          "Listgate -> aiosmtpd sink")
    print("| personalize | copy | p50 ms | p90 ms | p99 ms | max ms | posts missing |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        for what, key in (("first", "first_copy_ms"), (f"all {a.members}", "all_copies_ms")):
            s = r[key]
            if s:
                print(f"| {r['mode']} | {what} | {s['p50']} | {s['p90']} | {s['p99']} | "
                      f"{s['max']} | {r['missing_posts']} |")
    print(f"load average before {load_before}; per mode "
          f"{[r['loadavg'] for r in results]}")
    print(f"listgate check: {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
