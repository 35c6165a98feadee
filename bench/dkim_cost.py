"""CPU per post of DKIM signing (and ARC sealing) as the gateway's delivery stage does it.

usage: .venv/bin/python bench/dkim_cost.py [--runs 500] [--repeats 5] [--quick] [--json]

Keys are made with gateway.authentication.keygen() (RSA-2048 and ed25519) in a temporary
folder and loaded with SigningKeys, exactly as `listgate serve` does; each case then
calls what gateway/delivery.py calls for one outgoing copy (Delivery._sign):

- `dkim rsa`: Signer.sign() with the RSA-2048 key (rsa-sha256): a copy of a non-post
  (notices, digests), or a post when [dkim] arc = false;
- `dkim rsa+ed25519`: the same with [dkim] ed25519_selector set: two signatures;
- `dkim+arc rsa` / `dkim+arc rsa+ed25519`: sign_and_seal() with arc=(authserv-id,
  results) as for a post when [dkim] arc = true (the default): DKIM signature(s), then
  an ARC set (ARC-Seal and ARC-Message-Signature, always rsa-sha256);
- `personal copy (dkim+arc rsa)`: what a personalised list pays per member on top:
  LinkSigner.member_token() + personalise() + sign_and_seal();
- the bare primitives: one RSA-2048 PKCS#1 v1.5 SHA-256 signature, one ed25519-sha256
  signature (the gateway never signs with ed25519 alone: RSA is always the first
  signature).

Posts: a list copy's header (From, To, Subject, Date, Message-ID, List-* fields, ...)
and a plain-text body of 1 KiB and of 10 KiB. CPU time is time.process_time() (this
process, one thread) around a batch of --runs calls; the figure is the median over
--repeats batches, in microseconds per call. The machine's load does not enter CPU time
much, but turbo/cache effects of other jobs do: see the load average printed.

--quick: 20 runs x 3 repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from gateway.authentication import AuthResults, SigningKeys, keygen, sign_and_seal
from gateway.signing import PLACEHOLDER, LinkSigner, personalise

DOMAIN = "example.com"
AUTHSERV_ID = "listgate.bench.test"
RESULTS = AuthResults(from_domain="example.net", dkim=(("example.net", "pass"),),
                      dkim_aligned_pass=True, dmarc_policy="none", dmarc="pass",
                      arc="none", trusted=None)


def post(body_bytes: int) -> bytes:
    header = (
        "Return-Path: <m00000@example.net>\r\n"
        "From: Poster Zero <m00000@example.net>\r\n"
        "To: bench@example.com\r\n"
        f"Subject: [Bench] a post of about {body_bytes} bytes\r\n"
        "Date: Tue, 01 Dec 2026 21:00:00 +0000\r\n"
        f"Message-ID: <dkim-cost-{body_bytes}@client.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "Sender: bench-bounces@example.com\r\n"
        "List-Id: Bench <bench.example.com>\r\n"
        "List-Post: <mailto:bench@example.com>\r\n"
        "List-Help: <mailto:bench-request@example.com?subject=help>\r\n"
        f"List-Unsubscribe: <https://lists.example.com/u/{PLACEHOLDER}>,\r\n"
        " <mailto:bench-leave@example.com>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "Precedence: list\r\n"
        "\r\n")
    line = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
    body = (line * (body_bytes // len(line) + 1))[:body_bytes - 2] + "\r\n"
    return (header + body).encode("utf-8")


def cpu_us(fn: Callable[[], object], runs: int, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    per_call = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(runs):
            fn()
        per_call.append((time.process_time() - t0) / runs * 1e6)
    return statistics.median(per_call), per_call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=500, help="calls per timed batch")
    ap.add_argument("--repeats", type=int, default=5, help="batches; the median is reported")
    ap.add_argument("--quick", action="store_true", help="20 runs x 3 repeats")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.repeats = 20, 3
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dkim-cost-") as tmp:
        keydir = Path(tmp) / "dkim"
        keygen(DOMAIN, "listgate", keydir, bits=2048)
        keygen(DOMAIN, "ed", keydir, ed25519=True)
        rsa_only = SigningKeys(keydir, selector="listgate").for_domain(DOMAIN)
        rsa_ed = SigningKeys(keydir, selector="listgate",
                             ed25519_selector="ed").for_domain(DOMAIN)
        assert rsa_only is not None and rsa_ed is not None
        links = LinkSigner(os.urandom(32))
        rows: list[dict[str, Any]] = []
        for size in (1024, 10240):
            data = post(size)

            def personal_copy(data: bytes = data) -> bytes:
                token = links.member_token(7, 123456, "m12345@example.net")
                return sign_and_seal(personalise(data, token), signer=rsa_only,
                                     arc=(AUTHSERV_ID, RESULTS))

            cases: list[tuple[str, Callable[[], object]]] = [
                ("dkim rsa", partial(rsa_only.sign, data)),
                ("dkim rsa+ed25519", partial(rsa_ed.sign, data)),
                ("dkim+arc rsa", partial(sign_and_seal, data, signer=rsa_only,
                                         arc=(AUTHSERV_ID, RESULTS))),
                ("dkim+arc rsa+ed25519", partial(sign_and_seal, data, signer=rsa_ed,
                                                 arc=(AUTHSERV_ID, RESULTS))),
                ("personal copy (dkim+arc rsa)", personal_copy),
            ]
            for name, fn in cases:
                med, all_ = cpu_us(fn, a.runs, a.repeats)
                rows.append({"case": name, "body_bytes": size, "post_bytes": len(data),
                             "median_us": round(med), "min_us": round(min(all_)),
                             "batches_us": [round(x) for x in all_]})
        # The primitives over a 300-byte hash input (a typical canonical header).
        header = b"x" * 300
        for name, fn in (("primitive rsa-2048 sign", lambda: rsa_only._sign_rsa(header)),
                         ("primitive ed25519 sign", lambda: rsa_ed._sign_ed25519(header))):
            med, all_ = cpu_us(fn, a.runs, a.repeats)
            rows.append({"case": name, "body_bytes": None, "post_bytes": None,
                         "median_us": round(med), "min_us": round(min(all_)),
                         "batches_us": [round(x) for x in all_]})
    out = {"params": {"runs_per_batch": a.runs, "repeats": a.repeats,
                      "clock": "time.process_time", "rsa_bits": 2048,
                      "python": sys.version.split()[0]},
           "rows": rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"CPU per call, median of {a.repeats} batches of {a.runs} (time.process_time)")
    print("| case | body bytes | message bytes | median µs | min µs | per second on one core "
          "(median) | batches µs |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        med = r["median_us"]
        print(f"| {r['case']} | {r['body_bytes'] or '-'} | {r['post_bytes'] or '-'} | {med} | "
              f"{r['min_us']} | "
              f"{1e6 / med if med else float('inf'):.0f} | "
              f"{', '.join(str(x) for x in r['batches_us'])} |")
    print(f"load average before {load_before}, after {out['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
