"""Memory and fan-out rate of Listgate with a very large list (100,000 or 1,000,000 members).

usage: .venv/bin/python bench/scale.py [--members 100000] [--posts 5]
           [--store sqlite|postgresql] [--personalize default|on|off]
           [--import cli|direct|auto] [--cap 900] [--quick] [--json] [--base-port 18120]

    bench/scale.py                                        (a) 100,000 members, SQLite, 5 posts
    bench/scale.py --store postgresql --members 1000000 --posts 1 --personalize off
                                                          (b) 1,000,000 members, PostgreSQL

Listgate runs from bench/sut-listgate.sh (own PEERS_DIR, default /tmp/peers-extra/scale)
with Postfix's `smtp-sink` as its smarthost (it appends every transaction to a dump file;
the script counts the `X-Rcpt-Args:` lines, one per recipient, as bench.py does). Steps:

1. the list is created, `m00000@example.net` (member 0, the poster) made a moderator,
   and M members `m00000@example.net` ... imported: with `listgate members import`
   (a CSV file) or, with --import direct, straight into the store's `members` table
   (PostgreSQL: COPY; SQLite: executemany in one transaction) with the same column values
   `lists.add_members` writes. --import auto (default) uses the CLI up to 200,000
   members and direct beyond (the CLI: 5.4 s for 100,000 on SQLite, but on PostgreSQL
   with stale statistics about 400 rows/s and falling once the table holds 50,000 rows).
   The import time is reported either way; on PostgreSQL `ANALYZE members` follows (this
   server has autovacuum off);
2. `lists set --personalize` when asked (default: the list default, personalised),
   SIGHUP, and a probe until intake routes the list;
3. the daemon's resident memory (VmRSS summed over `listgate serve` and any children) is
   sampled every --sample seconds from /proc; its VmHWM (peak) is read at the end;
4. `smtp-source -d -s 1 -m P -l 1024` sends P posts; the run ends once the sink has
   counted P x M recipients, or nothing arrived for 60 s, or after --cap seconds;
5. reported: recipients delivered, rate = delivered / (last arrival - first post sent),
   RSS at the start (idle, list loaded), peak and end, VmHWM, and the daemon's CPU-s.

With --store postgresql the script creates the database --pg-db (default listgate_scale,
dropped first if it exists) on --pg-url's server and drops it at the end; the PostgreSQL
server's own memory is not in the figures. The default SQLite store lives in the state
folder and is recreated on every start. No DKIM key is configured (as in compare.sh).

--quick: 2,000 members and 2 posts (about 30 s; with --store postgresql too).
Ports: base (intake), base+1 (web endpoint), base+2 (the sink).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import port_open

HERE = Path(__file__).resolve().parent
SUT = HERE / "sut-listgate.sh"
VENV_BIN = HERE.parent / ".venv" / "bin"
LISTGATE = VENV_BIN / "listgate"
LIST = "bench@example.com"
POSTER = "m00000@example.net"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
CLI_IMPORT_MAX = 200_000
STALL_S = 60


def log(msg: str) -> None:
    print(f"scale: {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def address(i: int) -> str:
    return f"m{i:05d}@example.net"  # m00000 ... m99999, then m100000 ...


# ------------------------------------------------------------------ the sink


class CountingSink:
    """Postfix smtp-sink appending to a dump file; recipients counted incrementally."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.dump = workdir / "dump"
        self.dump.touch()
        cmd = [SMTP_SINK]
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
            os.chown(self.dump, nobody.pw_uid, nobody.pw_gid)
            cmd += ["-u", "nobody"]
        cmd += ["-D", str(self.dump), f"127.0.0.1:{port}", "1024"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if port_open(port):
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"smtp-sink did not start on {port}")
        self._f = open(self.dump, "rb")  # noqa: SIM115  (read as it grows; closed in stop())
        self._rest = b""
        self.rcpts = 0

    def poll(self) -> int:
        while True:
            data = self._f.read(1 << 22)
            if not data:
                return self.rcpts
            buf = self._rest + data
            cut = buf.rfind(b"\n") + 1
            self._rest = buf[cut:]
            self.rcpts += buf[:cut].count(b"\nX-Rcpt-Args:") + buf.startswith(b"X-Rcpt-Args:")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._f.close()


# ------------------------------------------------------------------ memory


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []  # (monotonic, summed VmRSS kB)
        self.stop_ev = threading.Event()

    def sample(self) -> int:
        kb = sum(status_kb(p, "VmRSS") for p in tree(self.pid))
        self.samples.append((time.monotonic(), kb))
        return kb

    def run(self) -> None:
        while not self.stop_ev.is_set():
            self.sample()
            self.stop_ev.wait(self.interval)


# ------------------------------------------------------------------ Listgate


class Listgate:
    def __init__(self, peers_dir: Path, ports: tuple[int, int, int], store_url: str) -> None:
        post, web, sink = ports
        self.post_port = post
        self.state = peers_dir / "listgate"
        self.cfg = self.state / "listgate.toml"
        self.env = dict(os.environ, PEERS_DIR=str(peers_dir), POST_PORT=str(post),
                        SINK_PORT=str(sink), LISTGATE_WEB_LISTEN=f"http://127.0.0.1:{web}")
        self.env.pop("LISTGATE_BENCH_PERSONALIZE", None)
        if store_url:
            self.env["LISTGATE_BENCH_STORE_URL"] = store_url
        else:
            self.env.pop("LISTGATE_BENCH_STORE_URL", None)
        self.store_url = store_url or f"sqlite:///{self.state / 'listgate.db'}"

    def sut(self, *args: str, timeout: float = 3600) -> str:
        return subprocess.run([str(SUT), *args], env=self.env, check=True, text=True,
                              stdout=subprocess.PIPE, timeout=timeout).stdout

    def lg(self, *args: str) -> str:
        return subprocess.run([str(LISTGATE), "--config", str(self.cfg), *args], env=self.env,
                              check=True, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=7200).stdout

    def pid(self) -> int:
        return int(self.sut("pids").split()[0])

    def routes_list(self) -> bool:
        try:
            c = smtplib.SMTP("127.0.0.1", self.post_port, timeout=10)
            try:
                c.ehlo("scale.example")
                c.mail(POSTER)
                code, _ = c.rcpt(LIST)
                c.rset()
            finally:
                c.quit()
            return code == 250
        except (OSError, smtplib.SMTPException):
            return False


def import_cli(lg: Listgate, members: int, workdir: Path) -> None:
    csv = workdir / "members.csv"
    with open(csv, "w") as f:
        for i in range(members):
            f.write(f"{address(i)},,regular\n")
    out = lg.lg("members", "import", LIST, str(csv))
    log(out.strip().splitlines()[-1])
    csv.unlink()


def import_direct(lg: Listgate, members: int) -> None:
    """The rows `lists.add_members` would write, in bulk."""
    import sqlalchemy as sa

    url = lg.store_url
    engine = sa.create_engine(url)
    now = time.time()
    with engine.begin() as conn:
        name, _, domain = LIST.partition("@")
        list_id = conn.execute(sa.text("SELECT id FROM lists WHERE name = :n AND domain = :d"),
                               {"n": name, "d": domain}).scalar_one()
        if url.startswith("postgresql"):
            raw: Any = conn.connection.driver_connection
            with raw.cursor() as cur, cur.copy(
                    "COPY members (list_id, address, display_name, mode, enabled, created_at,"
                    " bounce_score) FROM STDIN") as copy:
                for i in range(members):
                    copy.write_row((list_id, address(i), "", "regular", True, now, 0.0))
        else:
            step = 50_000
            for start in range(0, members, step):
                conn.execute(sa.text(
                    "INSERT INTO members (list_id, address, display_name, mode, enabled,"
                    " created_at, bounce_score) VALUES (:l, :a, '', 'regular', 1, :t, 0)"),
                    [{"l": list_id, "a": address(i), "t": now}
                     for i in range(start, min(members, start + step))])
    engine.dispose()


def analyze(store_url: str) -> float:
    """ANALYZE members (PostgreSQL): this server runs with autovacuum off, and with the
    statistics of an empty table the planner reads every member for each lookup."""
    import sqlalchemy as sa

    t0 = time.monotonic()
    engine = sa.create_engine(store_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE members"))
    engine.dispose()
    return time.monotonic() - t0


def pg_database(admin_url: str, db: str, *, create: bool) -> None:
    import sqlalchemy as sa
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        if create:
            conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    engine.dispose()


def run(a: argparse.Namespace) -> dict[str, Any]:
    ports = (a.base_port, a.base_port + 1, a.base_port + 2)
    for port in ports:
        if port_open(port):
            raise SystemExit(f"port {port} is taken; use another --base-port")
    store_url = ""
    if a.store == "postgresql":
        store_url = a.pg_url.rstrip("/") + "/" + a.pg_db
        pg_database(a.pg_url.rstrip("/") + "/postgres", a.pg_db, create=True)
        log(f"created database {a.pg_db}")
    peers_dir = Path(a.peers_dir)
    peers_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="scale-", dir=a.work_dir))
    lg = Listgate(peers_dir, ports, store_url)
    sink = CountingSink(ports[2], workdir)
    sampler: RssSampler | None = None
    started = False
    res: dict[str, Any] = {}
    try:
        lg.sut("start")
        started = True
        pid = lg.pid()
        lg.lg("lists", "create", LIST, "--name", "Bench")
        lg.lg("roles", "add", LIST, POSTER, "moderator")
        how = a.import_ if a.import_ != "auto" else (
            "cli" if a.members <= CLI_IMPORT_MAX else "direct")
        t0 = time.monotonic()
        if how == "cli":
            import_cli(lg, a.members, workdir)
        else:
            import_direct(lg, a.members)
        import_s = time.monotonic() - t0
        log(f"imported {a.members} members ({how}) in {import_s:.1f} s")
        analyze_s = analyze(lg.store_url) if a.store == "postgresql" else 0.0
        if a.personalize != "default":
            lg.lg("lists", "set", LIST, "--personalize", a.personalize)
        os.kill(pid, signal.SIGHUP)  # re-read the lists now
        for _ in range(120):
            if lg.routes_list():
                break
            time.sleep(0.5)
        else:
            raise SystemExit("intake does not route the list")
        lg.sut("wait-idle", "600")
        sampler = RssSampler(pid, a.sample)
        rss_start = sampler.sample()
        cpu0 = cpu_s(tree(pid))
        sampler.start()
        target = a.posts * a.members
        t_send = time.monotonic()
        client = subprocess.Popen(
            [SMTP_SOURCE, "-d", "-s", "1", "-m", str(a.posts), "-l", "1024", "-f", POSTER,
             "-t", LIST, "-M", "client.example", "-S", "scale bench",
             f"127.0.0.1:{ports[0]}"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        t_first = t_last = None
        last_n, last_change, n = 0, time.monotonic(), 0
        ended = "complete"
        next_log = time.monotonic() + 30
        while True:
            n = sink.poll()
            now = time.monotonic()
            if n and t_first is None:
                t_first = now
            if n != last_n:
                last_n, last_change, t_last = n, now, now
            if n >= target:
                break
            if now - last_change > STALL_S:
                ended = f"stalled (nothing for {STALL_S} s)"
                break
            if now - t_send > a.cap:
                ended = f"capped at {a.cap} s"
                break
            if now > next_log:
                log(f"{n} of {target} recipients, {n / (now - t_send):.0f}/s, "
                    f"RSS {sampler.samples[-1][1] / 1024:.1f} MB")
                next_log = now + 30
            time.sleep(0.2)
        client_out = client.communicate(timeout=60)[0].decode(errors="replace").strip()
        cpu_used = cpu_s(tree(pid)) - cpu0
        sampler.stop_ev.set()
        sampler.join()
        rss_end = sampler.sample()
        hwm = sum(status_kb(p, "VmHWM") for p in tree(pid))
        rss = [kb for _, kb in sampler.samples]
        elapsed = (t_last or time.monotonic()) - t_send
        res = {
            "members": a.members, "posts": a.posts, "store": a.store,
            "personalize": a.personalize, "import": how, "import_s": round(import_s, 1),
            "analyze_s": round(analyze_s, 1),
            "import_rows_per_s": round(a.members / import_s),
            "recipients_expected": target, "recipients_delivered": n, "ended": ended,
            "first_delivery_s": round(t_first - t_send, 2) if t_first else None,
            "elapsed_s": round(elapsed, 1),
            "rcpts_per_s": round(n / elapsed) if elapsed > 0 else None,
            "rss_mb": {"start": round(rss_start / 1024, 1),
                       "peak": round(max(rss) / 1024, 1),
                       "end": round(rss_end / 1024, 1)},
            "rss_mb_at_quarters": [round(rss[int(q * (len(rss) - 1))] / 1024, 1)
                                   for q in (0, 0.25, 0.5, 0.75, 1)],
            "vmhwm_mb": round(hwm / 1024, 1), "rss_samples": len(rss),
            "sample_interval_s": a.sample,
            "daemon_cpu_s": round(cpu_used, 1), "client": client_out or "ok",
            "loadavg_end": os.getloadavg(),
        }
        res["check"] = lg.sut("check").strip()
        dump_mb = sink.dump.stat().st_size / 1e6
        res["sink_dump_mb"] = round(dump_mb, 1)
    finally:
        if sampler is not None:
            sampler.stop_ev.set()
        if started:
            try:
                lg.sut("stop")
            except subprocess.CalledProcessError as exc:
                log(f"stop failed: {exc}")
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if a.store == "postgresql":
            pg_database(a.pg_url.rstrip("/") + "/postgres", a.pg_db, create=False)
            log(f"dropped database {a.pg_db}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--posts", type=int, default=5)
    ap.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--personalize", choices=["default", "on", "off"], default="default")
    ap.add_argument("--import", dest="import_", choices=["auto", "cli", "direct"],
                    default="auto")
    ap.add_argument("--cap", type=float, default=900, help="stop waiting after this many s")
    ap.add_argument("--sample", type=float, default=1.0, help="RSS sampling interval, s")
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1")
    ap.add_argument("--pg-db", default="listgate_scale")
    ap.add_argument("--base-port", type=int, default=18120)
    ap.add_argument("--peers-dir", default="/tmp/peers-extra/scale")
    ap.add_argument("--work-dir", default="/tmp", help="where the sink's dump goes")
    ap.add_argument("--quick", action="store_true", help="2,000 members, 2 posts")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.members, a.posts = 2000, 2
    load_before = os.getloadavg()
    res = run(a)
    res["loadavg_before"] = load_before
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{res['members']} members, {res['posts']} posts (smtp-source -d -s 1 -l 1024), "
          f"store {res['store']}, personalize {res['personalize']}, import {res['import']}")
    print("| figure | value |")
    print("|---|---:|")
    rows = [
        ("member import", f"{res['import_s']} s ({res['import_rows_per_s']} rows/s)"
                          + (f", then ANALYZE {res['analyze_s']} s" if res["store"] == "postgresql"
                             else "")),
        ("recipients delivered / expected",
         f"{res['recipients_delivered']} / {res['recipients_expected']} ({res['ended']})"),
        ("first delivery", f"{res['first_delivery_s']} s"),
        ("first post sent -> last arrival", f"{res['elapsed_s']} s"),
        ("recipients/s", res["rcpts_per_s"]),
        ("daemon RSS start / peak / end", "{start} / {peak} / {end} MB".format(
            **res["rss_mb"])),
        ("RSS at 0/25/50/75/100 % of the run",
         " / ".join(str(x) for x in res["rss_mb_at_quarters"]) + " MB"),
        ("daemon VmHWM (peak since start)", f"{res['vmhwm_mb']} MB"),
        ("daemon CPU-s during the run", res["daemon_cpu_s"]),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(f"load average before {load_before}, at the end {res['loadavg_end']}")
    print(f"listgate check: {res['check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
