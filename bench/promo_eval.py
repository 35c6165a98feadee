"""Measure the promotional rule by cross-validation on the labeled corpus.

    .venv/bin/python bench/promo_eval.py [CORPUS_LABELED_DIR]

Five outer folds (grouped by subject, see bench/promo_train.py). In each, the whole
training procedure (word model, combining weights, threshold) runs on the other four
folds only, and the held-out fold is scored at the threshold that procedure picked, so
no number here was tuned on the mail it measures. Prints, pooled over the folds:

- precision (held mail that is promotional), recall (promotional mail held) and
  false-hold rate (ham held / all ham), with the spread over folds, for the signals
  alone, the word model alone and both combined; and the combined figures apart for
  mail whose words the word model knows and mail whose words it does not;
- how often each signal fires on ham and on promotional mail, and its weight in the
  shipped model;
- messages scored per second by ``promo.score`` on raw bytes with the shipped model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import promo_train as train  # noqa: E402

from gateway import promo  # noqa: E402

VARIANTS = (("signals alone", False, True), ("model alone", True, False),
            ("combined", True, True))


@dataclass
class Tally:
    held_promo: int = 0
    held_ham: int = 0
    promo: int = 0
    ham: int = 0

    def add(self, promotional: bool, held: bool) -> None:
        if promotional:
            self.promo += 1
            self.held_promo += held
        else:
            self.ham += 1
            self.held_ham += held

    @property
    def precision(self) -> float:
        held = self.held_promo + self.held_ham
        return self.held_promo / held if held else 1.0

    @property
    def recall(self) -> float:
        return self.held_promo / self.promo if self.promo else 0.0

    @property
    def false_hold(self) -> float:
        return self.held_ham / self.ham if self.ham else 0.0


def cross_validate(examples: Sequence[train.Example], out: Callable[[str], None],
                   errors: list[tuple[train.Example, promo.PromoScore]] | None = None, *,
                   min_evidence: float = train.MIN_EVIDENCE,
                   familiar_min_evidence: float = train.FAMILIAR_MIN_EVIDENCE,
                   by_words: dict[bool, Tally] | None = None,
                   ) -> dict[str, tuple[Tally, list[Tally], list[tuple[float, float]]]]:
    """Pooled and per-fold tallies and each fold's (threshold, floor), per variant;
    ``by_words`` gets the combined tallies apart by ``Verdict.familiar``."""
    results: dict[str, tuple[Tally, list[Tally], list[tuple[float, float]]]] = {
        name: (Tally(), [], []) for name, _m, _s in VARIANTS}
    outer = train.folds(examples)
    for k, test in enumerate(outer):
        test_set = set(test)
        training = [i for i in range(len(examples)) if i not in test_set]
        verdicts = train.out_of_fold_model(examples, training)
        for name, use_model, use_signals in VARIANTS:
            model = train.fit(examples, training, use_model=use_model,
                              use_signals=use_signals, verdicts=verdicts,
                              min_evidence=min_evidence,
                              familiar_min_evidence=familiar_min_evidence)
            pooled, per_fold, thresholds = results[name]
            fold = Tally()
            for i in test:
                s = promo.score_features(examples[i].features, model)
                pooled.add(examples[i].promotional, s.promotional)
                fold.add(examples[i].promotional, s.promotional)
                if name != "combined":
                    continue
                if by_words is not None:
                    familiar = model.judge(examples[i].features.tokens).familiar
                    by_words.setdefault(familiar, Tally()).add(examples[i].promotional,
                                                               s.promotional)
                if errors is not None and s.promotional != examples[i].promotional:
                    errors.append((examples[i], s))
            per_fold.append(fold)
            thresholds.append((model.threshold, model.floor))
        out(f"  fold {k + 1}: {len(test)} messages held out "
            f"({sum(examples[i].promotional for i in test)} promotional)")
    return results


def _spread(values: list[float]) -> str:
    return f"{min(values):.1%}-{max(values):.1%}"


def throughput(corpus: Path, model: promo.Model) -> tuple[int, float, float]:
    """Messages scored, wall seconds and CPU seconds (the machine may be shared)."""
    raws = [p.read_bytes() for folder in ("ham", "promo")
            for p in sorted((corpus / folder).glob("*.eml"))]
    start, cpu = time.perf_counter(), time.process_time()
    for raw in raws:
        promo.score(raw, model)
    return len(raws), time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("corpus", nargs="?", type=Path, default=train.DEFAULT_CORPUS)
    parser.add_argument("--errors", action="store_true",
                        help="list the ham held and the promotional mail missed (combined)")
    parser.add_argument("--min-evidence", type=float, default=train.MIN_EVIDENCE,
                        help="log-odds beyond the prior a message needs to be held when the "
                             "word model cannot judge its words (default "
                             f"{train.MIN_EVIDENCE}: more than one signal)")
    parser.add_argument("--familiar-min-evidence", type=float,
                        default=train.FAMILIAR_MIN_EVIDENCE,
                        help="log-odds beyond the prior a message needs to be held when the "
                             "word model knows its words (default "
                             f"{train.FAMILIAR_MIN_EVIDENCE})")
    args = parser.parse_args(argv)
    if not (args.corpus / "ham").is_dir() or not (args.corpus / "promo").is_dir():
        parser.error(f"{args.corpus} has no ham/ and promo/ folders")
    examples = train.load_corpus(args.corpus)
    n_promo = sum(ex.promotional for ex in examples)
    out(f"corpus: {n_promo} promotional, {len(examples) - n_promo} ham; "
        f"{train.FOLDS}-fold cross-validation grouped by subject, "
        f"threshold picked in each fold for <= {train.TARGET_FALSE_HOLD:.1%} false holds "
        f"on its training folds, and no lower than {args.familiar_min_evidence} of evidence "
        f"beyond the prior where the model knows the words, {args.min_evidence} where not")
    errors: list[tuple[train.Example, promo.PromoScore]] = []
    by_words: dict[bool, Tally] = {}
    results = cross_validate(examples, out, errors, min_evidence=args.min_evidence,
                             familiar_min_evidence=args.familiar_min_evidence,
                             by_words=by_words)
    out("")
    out(f"{'':14s} {'precision':>9s} {'recall':>7s} {'false-hold':>10s} "
        f"{'false-hold per fold':>19s} {'recall per fold':>15s} {'threshold':>9s} "
        f"{'floor':>6s}")
    for name, (pooled, per_fold, thresholds) in results.items():
        out(f"{name:14s} {pooled.precision:9.1%} {pooled.recall:7.1%} "
            f"{pooled.false_hold:10.2%} {_spread([f.false_hold for f in per_fold]):>19s} "
            f"{_spread([f.recall for f in per_fold]):>15s} "
            f"{sum(t for t, _f in thresholds) / len(thresholds):9.3f} "
            f"{sum(f for _t, f in thresholds) / len(thresholds):6.3f}")
    out(f"  ({results['combined'][0].held_ham} ham held, "
        f"{results['combined'][0].promo - results['combined'][0].held_promo} "
        f"promotional missed, combined)")
    for familiar, tally in sorted(by_words.items(), reverse=True):
        words = "knows the words" if familiar else "does not know the words"
        out(f"  combined, where the model {words}: {tally.held_promo} of {tally.promo} "
            f"promotional held ({tally.recall:.1%}), {tally.held_ham} of {tally.ham} ham")
    if args.errors:
        for ex, s in sorted(errors, key=lambda e: (e[0].promotional, e[0].name)):
            what = "missed" if ex.promotional else "held  "
            out(f"  {what} {ex.name} p={s.probability:.3f} threshold={s.threshold:.3f} "
                f"model={s.model_probability:.3f} "
                f"{', '.join(f'{sig.name}{sig.weight:+.1f}' for sig in s.signals)}")

    shipped = promo.load_model()
    out("")
    out(f"signals: how often each fires, and its weight in {promo.DEFAULT_MODEL_PATH.name}")
    out(f"  {'signal':24s} {'ham':>6s} {'promo':>6s} {'weight':>7s}")
    ham = [ex for ex in examples if not ex.promotional]
    spam = [ex for ex in examples if ex.promotional]
    for spec in promo.SIGNALS:
        on_ham = sum(spec.name in ex.features.strengths() for ex in ham) / len(ham)
        on_promo = sum(spec.name in ex.features.strengths() for ex in spam) / len(spam)
        out(f"  {spec.name:24s} {on_ham:6.1%} {on_promo:6.1%} "
            f"{shipped.weights.of(spec.name):+7.2f}")

    n, seconds, cpu = throughput(args.corpus, shipped)
    out("")
    out(f"speed: {n} messages scored from raw bytes in {seconds:.2f} s "
        f"({cpu:.2f} s of CPU): {n / seconds:.0f} messages/s, {n / cpu:.0f} per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
