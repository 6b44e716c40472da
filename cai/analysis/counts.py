"""Running counts of a run's figures, filled row by row as ``cai.analysis.read`` streams a run
folder: answer lengths and marker rates, the judge's view of the revision, label figures per group
of pairs (agreement with people: ``cai.stats.Human``); and the summaries (``describe``,
``histograms``) the figures are made of."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..eval.refusal import Markers
from ..stats import Human

HIST_BINS = 20


@dataclass
class Lengths:
    """Answer lengths and marker rates of a set of answers (one round's, the final revisions, the
    chosen or the rejected ones) and their growth from the answers they revise (per-row ratios,
    and the summed lengths before and after)."""

    lengths: list[int] = field(default_factory=list)
    growth: list[float] = field(default_factory=list)
    sums: list[int] = field(default_factory=lambda: [0, 0])
    markers: Markers = field(default_factory=Markers)

    def add(self, text: str, before: str | None, found: dict[str, bool]) -> None:
        """One answer, the one it grew from (None or empty: no growth counted) and its markers."""
        self.lengths.append(len(text))
        self.markers.record(found)
        if before:
            self.growth.append(len(text) / len(before))
            self.sums[0] += len(before)
            self.sums[1] += len(text)


@dataclass
class Side:
    """The judge's view of one side (the revision) over many pairs, with a tie threshold."""

    n: int = 0
    won: int = 0
    tied: int = 0
    p_sum: float = 0.0

    def add(self, p: float, tie: bool) -> None:
        self.n += 1
        self.p_sum += p
        self.tied += tie
        self.won += (not tie) and p > 0.5

    def summary(self) -> dict[str, Any]:
        lost = self.n - self.won - self.tied
        return {"pairs": self.n, "win_rate": share(self.won, self.n), "tie_rate": share(self.tied, self.n),
                "loss_rate": share(lost, self.n), "decided_win_rate": share(self.won, self.won + lost),
                "mean_p": share(self.p_sum, self.n)}


@dataclass
class Group:
    """Label figures over a group of pairs (all pairs, or one judge principle's)."""

    tie_threshold: float
    pairs: int = 0
    p_sum: float = 0.0
    ties: int = 0
    judgements: int = 0
    abstained: int = 0
    pairs_with_abstention: int = 0
    consistent: int = 0
    consistency_known: int = 0
    first_slot: int = 0
    voted: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    revision: Side = field(default_factory=Side)
    human: Human = field(default_factory=Human)

    def vote(self, order: str, p_a: float) -> None:
        """One judgement: did it prefer whichever answer was shown first? (0.5 is no vote.)"""
        if p_a != 0.5:
            self.voted += 1
            self.first_slot += (p_a > 0.5) == (order == "ab")

    def add(self, p_a: float, judgements: int, abstained: int, consistent: bool | None,
            revised_side: str | None, human: str | None, label: str | None = None) -> str:
        """One pair; returns its label (the row's, else decided from ``p_a`` and the tie threshold)."""
        if label not in ("a", "b", "tie"):
            label = "tie" if abs(p_a - 0.5) < self.tie_threshold or p_a == 0.5 else "a" if p_a > 0.5 else "b"
        tie = label == "tie"
        self.pairs += 1
        self.p_sum += p_a
        self.ties += tie
        self.labels[label] += 1
        self.judgements += judgements
        self.abstained += abstained
        self.pairs_with_abstention += abstained > 0
        if consistent is not None:
            self.consistency_known += 1
            self.consistent += consistent
        if revised_side is not None:
            self.revision.add(p_a if revised_side == "a" else 1.0 - p_a, tie)
        if human in ("a", "b"):
            self.human.add(p_a, human, label)
        return label

    def summary(self, with_bins: bool = True) -> dict[str, Any]:
        n = self.pairs
        return {
            "pairs": n,
            "mean_p_a": share(self.p_sum, n),
            "labels": {k: self.labels.get(k, 0) for k in ("a", "b", "tie")},
            "tie_rate": share(self.ties, n),
            "judgements": self.judgements,
            "abstentions": self.abstained,
            "abstention_rate": share(self.abstained, self.judgements),
            "pairs_with_abstention": self.pairs_with_abstention,
            "position_consistency": share(self.consistent, self.consistency_known),
            "first_slot_rate": share(self.first_slot, self.voted),
            "revision": self.revision.summary(),
            "human": self.human.summary(with_bins=with_bins),
        }


@dataclass
class BestOfN:
    """Best-of-n rows (best_of_n.jsonl): samples per prompt, ranking method, where the best came
    from, the margin (best's score - worst's), the matches played, and the best and worst answers."""

    pairs_file: int = 0  # rows in best_of_n.pairs.jsonl (what the preference split holds)
    rows: int = 0
    samples: Counter[int] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    best_at: Counter[int] = field(default_factory=Counter)  # the best's index among its samples
    margins: list[float] = field(default_factory=list)
    matches: int = 0
    undecided: int = 0
    gates: Counter[str] = field(default_factory=Counter)
    best: Lengths = field(default_factory=Lengths)
    worst: Lengths = field(default_factory=Lengths)

    def add(self, n: int, method: str, best: Any, margin: float | None, decided: list[bool],
            gates: list[str]) -> None:
        self.rows += 1
        self.samples[n] += 1
        self.methods[method] += 1
        if isinstance(best, int) and not isinstance(best, bool):
            self.best_at[best] += 1
        if margin is not None:
            self.margins.append(margin)
        self.matches += len(decided)
        self.undecided += decided.count(False)
        self.gates.update(gates)

    def summary(self) -> dict[str, Any]:
        ties = sum(m <= 0 for m in self.margins)
        longer = sum(b > w for b, w in zip(self.best.lengths, self.worst.lengths, strict=True))
        return {
            "rows": self.rows, "pairs": self.pairs_file, "no_margin": ties,
            "samples": {str(k): v for k, v in sorted(self.samples.items())},
            "methods": dict(self.methods), "best_at": {str(k): v for k, v in sorted(self.best_at.items())},
            "margin": describe(self.margins), "matches": self.matches, "undecided_matches": self.undecided,
            "lengths": {"unit": "chars", "best": describe(self.best.lengths), "worst": describe(self.worst.lengths),
                        "best_longer": share(longer, self.rows)},
            "markers": {"best": self.best.markers.rates(), "worst": self.worst.markers.rates()},
            "gates": dict(self.gates),
        }


def share(k: float, n: float) -> float | None:
    """k / n, or None when n is 0."""
    return k / n if n else None


def describe(xs: list[int] | list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "mean": None, "median": None}
    return {"n": len(xs), "mean": float(statistics.fmean(xs)), "median": float(statistics.median(xs))}


def histograms(chosen: list[int], rejected: list[int], bins: int = HIST_BINS) -> dict[str, Any]:
    """Counts of chosen and rejected lengths on at most ``bins`` shared equal-width bins of a
    round width, up to the 99th percentile (longer answers go in the last bin, so one outlier
    does not flatten the plot)."""
    both = chosen + rejected
    if not both:
        return {"edges": [], "chosen": [], "rejected": []}
    top = max(float(np.percentile(both, 99)) if len(both) >= 50 else float(max(both)), 1.0)
    mag = 10 ** math.floor(math.log10(top / bins))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag * bins >= top)  # round bin edges
    edges = np.arange(0, bins + 1) * step
    bins = max(1, math.ceil(top / step - 1e-9))
    edges = edges[:bins + 1]
    top = float(edges[-1])

    def count(xs: list[int]) -> list[int]:
        clipped = np.minimum(np.asarray(xs, dtype=np.float64), top)
        return [int(c) for c in np.histogram(clipped, bins=edges)[0]] if xs else [0] * (len(edges) - 1)

    return {"edges": [float(e) for e in edges], "chosen": count(chosen), "rejected": count(rejected)}


def rounded(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj
