"""Listgate against Mailman from bench.py's JSON lines: a markdown table of ratios.

    ratios.py RESULTS.jsonl...                  the table (listgate / mailman per metric)
    ratios.py --check --expect-runs N FILE...   exit 1 unless N runs of the SUT completed,
                                                each delivering every recipient exactly once

Each system is recognised by the start of its bench label (--sut listgate,
--baseline mailman). Timed figures are the medians bench.py puts in its "summary"
lines; memory is the largest peak RSS of the SUT's process tree over all runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool


# From the summary line of each workload and M.
FANOUT = (
    Metric("median_intake_posts_per_s", "intake posts/s", True),
    Metric("median_first_delivery_s", "first delivery s", False),
    Metric("median_e2e_s", "end-to-end s", False),
    Metric("median_rcpts_per_s", "recipients/s", True),
    Metric("median_sut_cpu_s", "SUT CPU-s", False),
    Metric("max_peak_rss_mb", "peak RSS MB (run)", False),
)
DIGEST = (
    Metric("median_intake_posts_per_s", "intake posts/s", True),
    Metric("median_posts_processed_per_s", "posts processed/s", True),
    Metric("median_digest_s", "digest s", False),
    Metric("median_sut_cpu_posts_s", "SUT CPU-s (posts)", False),
    Metric("max_peak_rss_mb", "peak RSS MB (run)", False),
)


def records(paths: Iterable[str]) -> Iterator[Record]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    yield json.loads(line)


def is_of(record: Record, prefix: str) -> bool:
    return str(record.get("sut", "")).startswith(prefix)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def ratio_cell(mine: float | None, base: float | None, higher_is_better: bool) -> str:
    if mine is None or base is None or base == 0:
        return "-"
    r = mine / base
    better = (r > 1) == higher_is_better
    return f"**{r:.2f}**" if better and r != 1 else f"{r:.2f}"


def table(data: list[Record], sut: str, baseline: str) -> list[str]:
    out: list[str] = []
    summaries = [d for d in data if d.get("type") == "summary"]
    keys = sorted({(d["workload"], d["M"], d["N"]) for d in summaries},
                  key=lambda k: (k[0] != "fanout", k[0], k[1], k[2]))
    labels = {prefix: sorted({str(d["sut"]) for d in data if is_of(d, prefix)})
              for prefix in (sut, baseline)}
    out.append(f"{sut}: {', '.join(labels[sut]) or 'no results'}; "
               f"{baseline}: {', '.join(labels[baseline]) or 'no results'}")
    out.append("")
    out.append(f"| workload | M | N | metric | {sut} | {baseline} | ratio {sut}/{baseline} |")
    out.append("|---|---:|---:|---|---:|---:|---:|")
    for workload, m, n in keys:
        metrics = FANOUT if workload == "fanout" else DIGEST

        def pick(prefix: str, *, w: str = workload, m: int = m, n: int = n) -> Record | None:
            found = [d for d in summaries if is_of(d, prefix)
                     and (d["workload"], d["M"], d["N"]) == (w, m, n)]
            return found[-1] if found else None
        mine, base = pick(sut), pick(baseline)
        for metric in metrics:
            a = mine.get(metric.key) if mine else None
            b = base.get(metric.key) if base else None
            out.append(f"| {workload} | {m} | {n} | {metric.title} | {fmt(a)} | {fmt(b)} | "
                       f"{ratio_cell(a, b, metric.higher_is_better)} |")
        noise = [f"{p} {fmt(r.get('median_other_cpu_s'))}" for p, r in
                 ((sut, mine), (baseline, base)) if r]
        complete = [f"{p} {'complete' if r.get('complete') else 'INCOMPLETE'}"
                    for p, r in ((sut, mine), (baseline, base)) if r]
        out.append(f"| {workload} | {m} | {n} | other CPU-s (noise); runs | "
                   f"{'; '.join(noise)} | {'; '.join(complete)} | |")
    for title, kind, key in (("idle RSS MB", "idle", "rss_mb"),
                             ("peak RSS MB (whole bench)", "memory", "peak_total_rss_mb")):
        values = []
        for prefix in (sut, baseline):
            found = [float(d[key]) for d in data if d.get("type") == kind and is_of(d, prefix)]
            values.append(max(found) if found else None)
        out.append(f"| all | | | {title} | {fmt(values[0])} | {fmt(values[1])} | "
                   f"{ratio_cell(values[0], values[1], False)} |")
    out.append("")
    out.append("Ratios in bold favour " + sut + " (higher throughput, or lower time, CPU, "
               "memory). Medians over the repeats; compare only within one run.")
    return out


def check(data: list[Record], sut: str, expect_runs: int) -> list[str]:
    """Why the SUT's runs are not a complete, exact set (empty: they are)."""
    problems = []
    runs = [d for d in data if d.get("type") == "run" and is_of(d, sut)]
    if len(runs) < expect_runs:
        problems.append(f"{len(runs)} runs of {sut} recorded, expected {expect_runs}")
    for r in runs:
        where = f"{r['workload']} M={r['M']} N={r['N']} rep {r['rep']}"
        if not r.get("complete"):
            problems.append(f"{where}: incomplete, {r.get('rcpts_at_done')} of "
                            f"{r.get('rcpts_expected')} recipients reached the sink")
        elif r["workload"] == "fanout" and r.get("rcpts_total") != r.get("rcpts_expected"):
            problems.append(f"{where}: the sink saw {r.get('rcpts_total')} recipients, "
                            f"expected exactly {r.get('rcpts_expected')}")
        if r.get("posts_sent") != r["N"]:
            problems.append(f"{where}: {r.get('posts_sent')} of {r['N']} posts accepted")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="RESULTS.jsonl")
    p.add_argument("--sut", default="listgate", help="label prefix of the system measured")
    p.add_argument("--baseline", default="mailman", help="label prefix of the reference")
    p.add_argument("--check", action="store_true",
                   help="check the SUT's runs instead of printing ratios")
    p.add_argument("--expect-runs", type=int, default=1, metavar="N")
    a = p.parse_args(argv)
    data = list(records(a.files))
    if a.check:
        problems = check(data, a.sut, a.expect_runs)
        for problem in problems:
            print(f"ratios: {problem}", file=sys.stderr)
        if not problems:
            print(f"ratios: {a.sut}: all runs complete, every recipient delivered once")
        return 1 if problems else 0
    print("\n".join(table(data, a.sut, a.baseline)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
