"""Measure gateway.dsn.parse_bounce on the shared corpus of real bounces.

    .venv/bin/python bench/bounce_eval.py [CORPUS_BOUNCES_DIR]

Reads MANIFEST.tsv (``expected``: the bounced address(es), comma-separated;
``expected_kind``: ``permanent``, ``temporary``, ``not-a-bounce``, or the labelling
tool's reason such as ``user_unknown``) and prints:

- files, and bounces with an expected address;
- attributed correctly: every expected address is in permanent or temporary;
- missed: a bounce where some expected address is not reported;
- wrong addresses: an address reported that the manifest does not expect, in any
  file (a not-a-bounce file expects none), split by where it was reported;
- not-a-bounce files treated as bounces (``is_bounce`` True);
- agreement on kind where the manifest says permanent or temporary;
- every failure, with the parser's reason.

The figures are printed twice: for every label as given, and without the labels in
DISPUTED, which this measurement holds to be wrong (each with its reason, printed at
the end). Judge the parser by the first set and the labels by the second.

Expected values are cleaned the way any reader of such labels would: an address-type
prefix ("rfc822;") and angle brackets are dropped, and the address is normalised like
Listgate normalises addresses. A value that is not an address stays as it is and so
can never be matched; the listing shows it.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.addresses import normalise  # noqa: E402
from gateway.dsn import BounceReport, parse_bounce  # noqa: E402
from gateway.errors import AddressError  # noqa: E402

DEFAULT_CORPUS = REPO.parent / "shared" / "corpus" / "bounces"

# Labels this measurement disagrees with, and why; read each file before trusting
# either side. They are counted in the strict figures and left out of the second set.
DISPUTED = {
    "bounceparser__autoreply.msg.eml":
        "an auto-reply from the person (\"Thank you for your e-mail\", Precedence: bulk); "
        "auto-replies are not bounces, the label is BounceParser's output",
    "bounceparser__sendmail-host-unknown.msg.eml":
        "the only address named, recipient@#example.net, is not a valid address",
    "bounceparser__warning-2.msg.eml":
        "the DSN has two recipients with Action: failed, Status: 5.1.1 (a@ and c@); "
        "the label names one",
    "bounceparser__warning-3.msg.eml":
        "the label '1' is the DSN's Original-Recipient, a bare local part; its "
        "Final-Recipient is 1@server4.example.co.uk",
    "bounceparser__warning-8.msg.eml":
        "a Postfix-style delay warning (Action: delayed, 4.0.0) labelled not-a-bounce, while "
        "flufl__dsn_08, the same Postfix warning, is labelled temporary with its address",
    "bounceparser__warning-9.msg.eml":
        "sendmail reports gail.windy@example.com 'expanded from: <Gail.Windy@example.net>', "
        "the address the list sent to; the label keeps only the expansion (the label of "
        "flufl__sendmail_01, the same sendmail format, keeps both)",
}
NOT_A_BOUNCE = "not-a-bounce"
TARGET_ATTRIBUTED = 0.95


def clean_expected(value: str) -> set[str]:
    found = set()
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if ";" in item:
            item = item.rsplit(";", 1)[1].strip()
        item = item.strip("<>")
        try:
            found.add(normalise(item))
        except AddressError:
            found.add(item.lower())
    return found


@dataclass
class Outcome:
    file: str
    kind: str
    expected: set[str]
    report: BounceReport

    @property
    def reported(self) -> set[str]:
        return set(self.report.permanent | self.report.temporary)

    @property
    def is_labelled_bounce(self) -> bool:
        return self.kind != NOT_A_BOUNCE and bool(self.expected)

    @property
    def attributed(self) -> bool:
        return self.expected <= self.reported

    @property
    def wrong(self) -> set[str]:
        return self.reported - self.expected

    @property
    def kind_agrees(self) -> bool | None:
        if self.kind == "permanent":
            return self.expected <= set(self.report.permanent)
        if self.kind == "temporary":
            return self.expected <= set(self.report.temporary)
        return None


def evaluate(folder: Path) -> list[Outcome]:
    outcomes = []
    with open(folder / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            kind = row["expected_kind"].strip()
            expected = set() if kind == NOT_A_BOUNCE else clean_expected(row["expected"])
            report = parse_bounce((folder / row["file"]).read_bytes())
            outcomes.append(Outcome(row["file"], kind, expected, report))
    return outcomes


def show(o: Outcome) -> str:
    r = o.report
    return (f"  {o.file}  [{o.kind or '-'}]\n"
            f"      expected {sorted(o.expected) or '-'}\n"
            f"      got is_bounce={r.is_bounce} permanent={sorted(r.permanent) or '-'} "
            f"temporary={sorted(r.temporary) or '-'}\n"
            f"      reason: {r.reason}")


def main(argv: list[str]) -> int:
    folder = Path(argv[1]) if len(argv) > 1 else DEFAULT_CORPUS
    if not (folder / "MANIFEST.tsv").is_file():
        print(f"no bounce corpus at {folder} (MANIFEST.tsv missing)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    outcomes = evaluate(folder)
    elapsed = time.perf_counter() - started

    print(f"corpus: {folder}")
    summarise(outcomes, "all labels as given")
    summarise([o for o in outcomes if o.file not in DISPUTED],
              f"without the {len(DISPUTED)} disputed labels listed below")
    print(f"parse time: {elapsed:.2f}s for {len(outcomes)} files")

    bounces = [o for o in outcomes if o.is_labelled_bounce]
    missed = [o for o in bounces if not o.attributed]
    wrong = [o for o in outcomes if o.wrong]
    false_bounces = [o for o in outcomes if o.kind == NOT_A_BOUNCE and o.report.is_bounce]
    kinds = [o for o in bounces if o.kind_agrees is not None]
    sections = [
        ("missed", missed),
        ("wrong addresses", wrong),
        ("not-a-bounce files treated as bounces", false_bounces),
        ("kind disagrees", [o for o in kinds if not o.kind_agrees]),
    ]
    for title, items in sections:
        if items:
            print(f"\n{title} ({len(items)}):")
            for o in items:
                print(show(o))
    print("\ndisputed labels:")
    for name, why in DISPUTED.items():
        print(f"  {name}: {why}")
    return 0


def summarise(outcomes: list[Outcome], title: str) -> None:
    """Print the figures for some outcomes, and whether they meet the target."""
    bounces = [o for o in outcomes if o.is_labelled_bounce]
    correct = [o for o in bounces if o.attributed]
    wrong = [o for o in outcomes if o.wrong]
    wrong_perm = sum(len(o.wrong & o.report.permanent) for o in outcomes)
    wrong_temp = sum(len(o.wrong & o.report.temporary) for o in outcomes)
    not_bounces = [o for o in outcomes if o.kind == NOT_A_BOUNCE]
    false_bounces = [o for o in not_bounces if o.report.is_bounce]
    unlabelled = [o for o in outcomes if o.kind != NOT_A_BOUNCE and not o.expected]
    kinds = [o for o in bounces if o.kind_agrees is not None]
    kinds_ok = [o for o in kinds if o.kind_agrees]
    share = len(correct) / len(bounces) if bounces else 0.0
    met = share >= TARGET_ATTRIBUTED and not wrong
    print(f"\n{title}:")
    print(f"  files:                                      {len(outcomes)}")
    print(f"  bounces with an expected address:           {len(bounces)}")
    print(f"  attributed correctly (all expected found):  {len(correct)} ({share:.1%})")
    print(f"  missed:                                     {len(bounces) - len(correct)}")
    print(f"  wrong addresses attributed:                 {wrong_perm + wrong_temp} in "
          f"{len(wrong)} files ({wrong_perm} as permanent, {wrong_temp} as temporary)")
    print(f"  not-a-bounce files:                         {len(not_bounces)}")
    print(f"  not-a-bounce files treated as bounces:      {len(false_bounces)}")
    print(f"  no expected address, not not-a-bounce:     {len(unlabelled)} "
          f"(is_bounce True for {sum(o.report.is_bounce for o in unlabelled)}, "
          f"addresses reported for {sum(bool(o.reported) for o in unlabelled)})")
    print(f"  kind agrees (manifest permanent/temporary): {len(kinds_ok)} of {len(kinds)}")
    print(f"  target (>= {TARGET_ATTRIBUTED:.0%} attributed, no wrong address): "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
