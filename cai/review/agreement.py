"""Judge-vs-human agreement on a run's own pairs, from human_labels.jsonl.

Agreement is counted on the pairs both sides decided: the human label (the reviewers' majority,
see ``labels.consensus``) is ``a`` or ``b`` and so is the judge's. Human ties and judge ties are
counted beside it, not in it (as ``cai eval-judge`` counts coverage). With it: a Wilson 95%
interval; Cohen's kappa for each two reviewers who labelled the same pairs; the same figures by
the judge's confidence (max(p, 1 - p)) and by principle (each principle's own verdict, its p(A)
averaged over orders, against the human's); and the AI labels in the unreviewed remainder
expected to flip at the error rate measured in their confidence bucket.

Pairs drawn in the review order (hardest first) make a pessimistic figure; ``cai review
--sample N`` draws pairs uniformly, and those pairs get a figure of their own (``uniform``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from .labels import LABELS, consensus, current, load_pairs, principle_sides, read_records

Z95 = 1.959963984540054
BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion k/n (None when n is 0)."""
    if n <= 0:
        return None
    p, z2 = k / n, z * z
    mid, half = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (mid - half) / (1 + z2 / n)), min(1.0, (mid + half) / (1 + z2 / n))


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (None when chance agreement is 1)."""
    n = len(x)
    if n == 0 or n != len(y):
        return None
    po = sum(a == b for a, b in zip(x, y, strict=True)) / n
    pe = sum(x.count(c) * y.count(c) for c in set(x) | set(y)) / (n * n)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def rate(k: int, n: int) -> dict[str, Any]:
    return {"n": n, "agree": k, "rate": k / n if n else None, "wilson95": wilson(k, n)}


def confidence(p_a: Any) -> float | None:
    return max(float(p_a), 1 - float(p_a)) if isinstance(p_a, (int, float)) else None


def bucket_of(c: float) -> int:
    return min(sum(c >= b for b in BUCKETS[1:]), len(BUCKETS) - 2)


def _agreement(pairs: dict[str, dict[str, Any]], human: dict[str, dict[str, Any]]) -> dict[str, Any]:
    decided = [(pairs[i]["label"], h["label"]) for i, h in human.items()
               if i in pairs and h["label"] in ("a", "b") and pairs[i].get("label") in ("a", "b")]
    out = rate(sum(j == h for j, h in decided), len(decided))
    out["human_ties"] = sum(h["label"] == "tie" for i, h in human.items() if i in pairs)
    out["judge_ties"] = sum(h["label"] in ("a", "b") and pairs[i].get("label") not in ("a", "b")
                            for i, h in human.items() if i in pairs)
    return out


def _kappas(labels: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    by_rev: dict[str, dict[str, str]] = {}
    for (pid, rev), r in labels.items():
        by_rev.setdefault(rev, {})[pid] = r["label"]
    out = []
    for r1, r2 in combinations(sorted(by_rev), 2):
        both = sorted(set(by_rev[r1]) & set(by_rev[r2]))
        if both:
            x, y = [by_rev[r1][i] for i in both], [by_rev[r2][i] for i in both]
            out.append({"reviewers": [r1, r2], "n": len(both), "agree": sum(a == b for a, b in zip(x, y, strict=True)),
                        "kappa": cohen_kappa(x, y)})
    return out


def _by_confidence(pairs: dict[str, dict[str, Any]], human: dict[str, dict[str, Any]],
                   overall: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for b in range(len(BUCKETS) - 1):
        inside = {i: p for i, p in pairs.items()
                  if (c := confidence(p.get("p_a"))) is not None and bucket_of(c) == b}
        fig = _agreement(inside, {i: h for i, h in human.items() if i in inside})
        rest = sum(p.get("label") in ("a", "b") and i not in human for i, p in inside.items())
        src, ref = ("bucket", fig) if fig["n"] else ("all reviewed pairs", overall)
        err = None if ref["rate"] is None else 1 - ref["rate"]
        ci = ref["wilson95"]
        rows.append({"bucket": f"{BUCKETS[b]:.1f}-{BUCKETS[b + 1]:.1f}", **fig, "unreviewed": rest,
                     "error_rate_from": src if err is not None else None,
                     "expected_flips": None if err is None else rest * err,
                     "expected_flips95": None if ci is None else (rest * (1 - ci[1]), rest * (1 - ci[0]))})
    return rows


def _by_principle(pairs: dict[str, dict[str, Any]], human: dict[str, dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, list[int]] = {}
    for i, h in human.items():
        if i in pairs and h["label"] in ("a", "b"):
            for pid, p in principle_sides(pairs[i]).items():
                if p != 0.5:
                    c = counts.setdefault(pid, [0, 0])
                    c[0] += ("a" if p > 0.5 else "b") == h["label"]
                    c[1] += 1
    return {pid: rate(k, n) for pid, (k, n) in sorted(counts.items())}


def summarize(pairs: Iterable[dict[str, Any]], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The agreement figures of judged pairs (labels.jsonl rows) and human label records."""
    by_id = {p["id"]: p for p in pairs}
    labels = {k: r for k, r in current(records).items() if k[0] in by_id}
    human = consensus(labels)
    overall = _agreement(by_id, human)
    uniform = {i: h for i, h in human.items() if h["uniform"]}
    flips = _by_confidence(by_id, human, overall)
    known = [f["expected_flips"] for f in flips if f["expected_flips"] is not None]
    return {
        "pairs": len(by_id), "reviewed": len(human), "labels": len(labels),
        "reviewers": sorted({r for _, r in labels}),
        "human": {x: sum(h["label"] == x for h in human.values()) for x in LABELS},
        "sample": ("uniform" if len(uniform) == len(human) else "mixed" if uniform else "uncertainty")
        if human else None,
        "agreement": overall,
        "uniform": _agreement(by_id, uniform) if uniform else None,
        "kappa": _kappas(labels),
        "by_confidence": flips,
        "expected_flips": sum(known) if known else None,
        "by_principle": _by_principle(by_id, human),
    }


def agreement_summary(run_dir: Path) -> dict[str, Any] | None:
    """``summarize`` of a run folder; None when it has no human labels."""
    records = read_records(run_dir)
    return summarize(load_pairs(run_dir), records) if records else None


def _ratio(fig: dict[str, Any]) -> str:
    if not fig["n"]:
        return "n/a (no pair both decided)"
    lo, hi = fig["wilson95"]
    return f"{fig['agree']}/{fig['n']} ({fig['rate']:.1%}; Wilson 95% {lo:.1%}-{hi:.1%})"


SAMPLE_TEXT = {"uncertainty": "hardest pairs first (judge ties, order and principle disagreements): "
                              "likely below the agreement on all pairs",
               "uniform": "a uniform sample (`cai review --sample N`): an unbiased estimate",
               "mixed": "hardest pairs first, plus a uniform sample (its own line below)"}


def summary_lines(s: dict[str, Any]) -> dict[str, str]:
    """The summary as name -> text, for a dataset card's or a report's table."""
    a = s["agreement"]
    out = {"reviewed pairs (human_labels.jsonl)": f"{s['reviewed']} of {s['pairs']} "
                                                   f"(reviewers: {', '.join(s['reviewers'])})",
           "judge-human agreement": _ratio(a),
           "how the reviewed pairs were drawn": SAMPLE_TEXT[s["sample"]],
           "left out of the agreement": f"{a['human_ties']} human ties, {a['judge_ties']} judge ties"}
    if s["uniform"]:
        out["judge-human agreement, uniform sample only"] = _ratio(s["uniform"])
    for k in s["kappa"]:
        kap = "n/a" if k["kappa"] is None else f"{k['kappa']:.2f}"
        out[f"Cohen's kappa, {' vs '.join(k['reviewers'])}"] = f"{kap} on {k['n']} pairs ({k['agree']} agree)"
    for b in s["by_confidence"]:
        if b["n"] or b["unreviewed"]:
            lo, hi = b["expected_flips95"] or (0, 0)
            flips = "n/a" if b["expected_flips"] is None else (
                f"{b['expected_flips']:.1f} of {b['unreviewed']} unreviewed expected to flip "
                f"(95% {lo:.1f}-{hi:.1f}, rate from {b['error_rate_from']})")
            out[f"judge confidence {b['bucket']}"] = f"{_ratio(b)}; {flips}"
    if s["expected_flips"] is not None:
        out["AI labels expected to flip in the unreviewed remainder"] = f"{s['expected_flips']:.1f}"
    for pid, fig in s["by_principle"].items():
        out[f"principle {pid} (its own verdict)"] = _ratio(fig)
    return out


def review_diagnostics(run_dir: Path, prefs: Iterable[dict[str, Any]] = ()) -> dict[str, dict[str, str]]:
    """The dataset card's "human review" group (nothing when the run has no human labels)."""
    s = agreement_summary(run_dir)
    if s is None:
        return {}
    lines = summary_lines(s)
    sources = [r["label_source"] for r in prefs if r.get("label_source")]
    if sources:
        lines["exported pairs by label_source"] = ", ".join(f"{x} {sources.count(x)}" for x in ("human", "ai"))
    return {"human review (cai review, human_labels.jsonl)": lines}
