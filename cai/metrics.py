"""Figures about a judge's labels: agreement with people, calibration of the soft labels against
their choices (Brier score, expected calibration error, the reliability curve), position
consistency, abstentions, ties.

One place for them: `cai eval-judge` prints them, the export card and the report show them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import stats
from .files import iter_jsonl


def summarize(
    rows: Iterable[dict[str, Any]], failures: Iterable[dict[str, Any]] = ()
) -> dict[str, Any]:
    """Agreement with the human label, position consistency, abstention, ties, first-slot bias."""
    n = decided = agree = ties = 0
    soft: list[float] = []
    p_a: list[float] = []  # the soft label, beside whether the person chose A: calibration
    chose_a: list[float] = []
    cons: list[bool] = []
    judg = abst = first = voted = 0

    def count_judgements(js: list[dict[str, Any]]) -> None:
        nonlocal judg, abst, first, voted
        for j in js:
            judg += 1
            if j.get("abstain"):
                abst += 1
            elif j.get("p_a") is not None and j["p_a"] != 0.5:
                voted += 1
                first += (j["p_a"] > 0.5) == (j.get("order", "ab") == "ab")

    for r in rows:
        n += 1
        count_judgements(r.get("judgements", []))
        ties += bool(r.get("tie"))
        if r.get("position_consistent") is not None:
            cons.append(bool(r["position_consistent"]))
        h = r.get("human")
        if h in ("a", "b") and r.get("p_a") is not None:
            soft.append(r["p_a"] if h == "a" else 1.0 - r["p_a"])
            p_a.append(r["p_a"])
            chose_a.append(float(h == "a"))
            if r.get("label") in ("a", "b"):
                decided += 1
                agree += r["label"] == h
    failed = 0
    for f in failures:
        failed += 1
        count_judgements(f.get("judgements", []))
    total = n + failed

    def rate(a: float, b: float) -> float | None:
        return a / b if b else None

    return {
        "pairs": total,
        "labelled": n,
        "failures": failed,
        "decided": decided,
        "agreement": rate(agree, decided),
        "coverage": rate(decided, total),
        "soft_agreement": rate(sum(soft), len(soft)),
        "position_consistency": rate(sum(cons), len(cons)),
        "abstention_rate": rate(abst, judg),
        "tie_rate": rate(ties, n),
        "first_slot_rate": rate(first, voted),
        "judgements": judg,
        "brier": stats.brier(p_a, chose_a),
        "ece": stats.ece(p_a, chose_a),
        "reliability": stats.reliability(p_a, chose_a),
    }


def summarize_files(labels: Path, failures: Path | None) -> dict[str, Any]:
    return summarize(iter_jsonl(labels), iter_jsonl(failures))
