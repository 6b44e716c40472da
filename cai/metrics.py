"""Figures about a judge's labels: agreement with people, calibration of the soft labels against
their choices (Brier score, expected calibration error, the reliability curve), position
consistency, abstentions, ties.

One place for them: `cai eval-judge` prints them, the export card and the report show them.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from typing import Any

from . import stats
from .files import iter_jsonl


def summarize(rows: Iterable[dict[str, Any]], failures: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """Agreement with the human label, position consistency, abstention, ties, first-slot bias."""
    n = failed = ties = judg = abst = first = voted = 0
    human, cons = stats.Human(), list[bool]()
    for r, labelled in chain(((r, True) for r in rows), ((f, False) for f in failures)):
        for j in r.get("judgements", []):  # a failed pair's judgements count too
            judg += 1
            if j.get("abstain"):
                abst += 1
            elif j.get("p_a") is not None and j["p_a"] != 0.5:
                voted += 1
                first += (j["p_a"] > 0.5) == (j.get("order", "ab") == "ab")
        if not labelled:
            failed += 1
            continue
        n += 1
        ties += bool(r.get("tie"))
        if r.get("position_consistent") is not None:
            cons.append(bool(r["position_consistent"]))
        if r.get("human") in ("a", "b") and r.get("p_a") is not None:
            human.add(r["p_a"], r["human"], r.get("label"))
    total = n + failed

    def rate(a: float, b: float) -> float | None:
        return a / b if b else None

    h = human.summary() or {"agreement": None, "soft_agreement": None, "brier": None, "ece": None,
                            "reliability": stats.reliability([], [])}
    return {"pairs": total, "labelled": n, "failures": failed, "decided": human.decided, "agreement": h["agreement"],
            "coverage": rate(human.decided, total), "soft_agreement": h["soft_agreement"],
            "position_consistency": rate(sum(cons), len(cons)), "abstention_rate": rate(abst, judg),
            "tie_rate": rate(ties, n), "first_slot_rate": rate(first, voted), "judgements": judg,
            "brier": h["brier"], "ece": h["ece"], "reliability": h["reliability"]}


def summarize_files(labels: Path, failures: Path | None) -> dict[str, Any]:
    return summarize(iter_jsonl(labels), iter_jsonl(failures))
