"""A `cai run` folder as numbers: the figures of ``report.json`` (``cai.report`` draws them) and the card.

``build_report(run_dir)`` reads ``run.json`` (optional: `cai revise`/`cai label` with
``-o DIR/...`` write none), ``revisions.jsonl``, ``labels.jsonl`` and their
``*.failures.jsonl`` (one pass each, streaming: only the first ``max_rows`` rows are kept whole,
for the page's table) and returns the figures as one JSON-ready dict:

- ``headline``: the few numbers to read first (also what a dataset card can quote).
- ``revise``: rows, failures, answer length per round (round 0 is the initial answer) and its
  growth, marker rates (``cai.eval.refusal``) per round, and per revision principle how often it
  was drawn, how much its revisions grew the answer, and how often the judge then preferred
  the final revision.
- ``labels``: ``overall`` and ``per_principle`` (the judge's principles, read from each
  pair's judgements): pairs, mean soft label, ties, abstentions, position consistency, the
  judge's preference for the revision (pairs from the ``revisions`` source, oriented by
  matching their texts with ``revisions.jsonl``) and, when pairs carry a human label,
  agreement, Brier score, ECE and a reliability table.
- ``length_bias``: ``cai.stats.length_bias`` on all pairs and on the revision pairs
  oriented so that A is the revision (so there ``lc_rate`` is the length-controlled
  revision win rate).
- ``lengths``: histograms of the chosen and rejected answers' lengths on shared bins.
- ``markers``: marker rates of chosen and rejected answers (decided pairs).
- ``gates``: counts of each gate flag (rows' optional ``gates`` list), per file.
- ``usage``: run.json's tokens served over every run of the folder (by stage and step, those
  of gated rows in ``rejected``) and, when priced, their ``cost`` (absent before cai counted them).

Definitions, all over the rows that have the figure's inputs:
- revision win rate: pairs where the label is the revised answer / revision pairs (ties count
  as not won; ``decided_win_rate`` leaves them out). ``mean_p``: mean soft label of the revision.
- a tie: ``|p - 0.5| < tie_threshold`` (the run's judge setting), as ``cai.judge`` decides.
- position consistency: share of pairs whose two orders (A/B and B/A) prefer the same answer
  (``position_consistent`` of the label rows; per principle, from that principle's judgements).
- abstention rate: abstained judgements / judgements; failures: rows in ``*.failures.jsonl``.
- human agreement: as `cai eval-judge` (``cai.metrics``): pairs where the judge's label equals
  the human's / human-labelled pairs the judge decided (``coverage``: decided / all;
  ``agreement_all`` counts a tie as a disagreement). Brier and ECE are of ``p_a`` against "the
  human preferred A" (see ``cai.stats``).
- first-slot rate: share of judgements (not exactly 0.5) that prefer the answer shown first.
- length growth: the ratio of mean lengths, sum over rows of len(round k) / sum of len(round
  k-1) (characters; the whole revision: last round over the first answer), so it moves with
  the plotted mean lengths; ``median_row_ratio`` beside it: the median over rows of the
  per-row ratio.
- ``run``: models, constitution, judge mode and cai version from run.json, else from the rows'
  provenance (folders of `cai revise` or `cai label`, which write no run.json).
- ``best_of_n`` (a folder with best_of_n.jsonl only): rows, pairs (best_of_n.pairs.jsonl: best vs
  worst with a margin, not gated), samples per prompt, ranking method, where the best sample
  stood, the margin (the best's soft win rate minus the worst's), matches played and undecided,
  the best and worst answers' lengths and markers; the matches are judged pairs in ``labels``
  (origin ``ranking``), so the judge's figures cover them.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .. import stats
from .counts import describe, histograms, rounded, share
from .human import agreement_summary
from .read import MAX_CHARS, MAX_ROWS, RunData, as_dict, as_list, as_text, load_run
from .rewards import rewards_summary

REPORT_VERSION = 1
__all__ = ["MAX_ROWS", "REPORT_VERSION", "RunData", "build_report", "figures", "load_run"]


def _ratio(sums: list[int]) -> float | None:
    return share(sums[1], sums[0])


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _run_info(data: RunData) -> dict[str, Any]:
    """Models, constitution, judge mode and cai version: run.json's, else the rows' provenance."""
    m, rev, lab = data.manifest, data.provenance.get("revise", {}), data.provenance.get("label", {})
    bon = data.provenance.get("best_of_n", {})
    const = as_dict(m.get("constitution"))
    models = m.get("models") or {k: p["model"] for k, p in (("policy", rev), ("judge", lab)) if p.get("model")} | (
        {"samples": bon["policy_model"]} if bon.get("policy_model") else {})
    name = const.get("name") or rev.get("constitution") or lab.get("constitution")
    version = const.get("version") or rev.get("constitution_version") or lab.get("constitution_version")
    mode = (as_dict(m.get("judge")).get("mode") or as_dict(as_dict(m.get("config")).get("label")).get("mode")
            or as_dict(lab.get("judge")).get("mode"))
    return {"cai_version": m.get("cai_version") or rev.get("cai_version") or lab.get("cai_version"),
            "models": models or None, "constitution": name,
            "constitution_version": str(version) if version is not None else None, "label_mode": mode}


def figures(data: RunData) -> dict[str, Any]:
    """The report's figures from a loaded run (what ``report.json`` holds)."""
    assert data.overall is not None
    m = data.manifest
    label_cfg = as_dict(as_dict(m.get("config")).get("label"))
    const = as_dict(m.get("constitution"))
    principles = [p for p in as_list(const.get("principles")) if isinstance(p, dict)]
    by_round = [{"round": k, **describe(r.lengths), "growth": _ratio(r.sums), "median_row_ratio": _median(r.growth),
                 "markers": r.markers.rates()} for k, r in enumerate(data.rounds)]
    first, whole = (data.rounds[0].lengths if data.rounds else []), data.whole
    fails = {stage: sum(reasons.values()) for stage, reasons in data.failures.items()}
    bon = data.best_of_n.summary() if data.best_of_n is not None else None
    revise = {
        "rows": data.revise_rows, "failures": fails["revisions"],
        "failure_reasons": dict(data.failures["revisions"]), "rounds": max(len(data.rounds) - 1, 0),
        "lengths": {"unit": "chars", "initial": describe(first), "revised": describe(whole.lengths),
                    "growth": _ratio(whole.sums), "median_row_ratio": _median(whole.growth)},
        "by_round": by_round,
        "markers": {"initial": data.rounds[0].markers.rates() if data.rounds else None,
                    "revised": whole.markers.rates() if whole.markers.n else None},
        "per_principle": {pid: {"rounds": v["rounds"], "growth": _ratio(v["growth"]),
                                "judged": v["side"].summary()}
                          for pid, v in sorted(data.revise_principles.items())},
        "gates": dict(data.revise_gates),
    }
    overall = data.overall.summary()
    labels = {
        "pairs": data.overall.pairs, "failures": fails["labels"],
        "failure_reasons": dict(data.failures["labels"]), "by_origin": dict(data.origins),
        "unmatched_revision_pairs": data.unmatched, "tie_threshold": data.tie_threshold,
        "overall": overall,
        "per_principle": {pid: g.summary(with_bins=False) for pid, g in sorted(data.per_principle.items())},
        "gates": dict(data.label_gates),
    }
    bias = {"all": stats.length_bias(data.length_rows, unit=data.unit) if data.length_rows else None,
            "revision": stats.length_bias(data.revision_length_rows, unit=data.unit)
            if data.revision_length_rows else None}
    rev = as_dict(overall["revision"])
    human = as_dict(overall["human"])
    lead = as_dict(bias["revision"] or bias["all"])
    headline = {
        "rows_revised": data.revise_rows, "pairs_labelled": data.overall.pairs,
        "failures": fails["revisions"] + fails["labels"] + fails["best_of_n"],
        "revision_win_rate": rev["win_rate"],
        "revision_win_rate_length_controlled": as_dict(bias["revision"]).get("lc_rate"),
        "mean_p_revision": rev["mean_p"],
        "mean_p_a": overall["mean_p_a"],
        "tie_rate": overall["tie_rate"], "abstention_rate": overall["abstention_rate"],
        "position_consistency": overall["position_consistency"],
        "first_slot_rate": overall["first_slot_rate"],
        "longer_chosen": as_dict(bias["all"]).get("longer_chosen"),
        "length_pearson": lead.get("pearson"),
        "length_growth": _ratio(whole.sums), "length_growth_median_ratio": _median(whole.growth),
        "human_pairs": human.get("pairs", 0), "human_agreement": human.get("agreement"),
        "human_coverage": human.get("coverage"),
        "brier": human.get("brier"), "ece": human.get("ece"),
    }
    if bon is not None:
        headline |= {"best_of_n_rows": bon["rows"], "best_of_n_pairs": bon["pairs"],
                     "best_of_n_mean_margin": bon["margin"]["mean"]}
    report = {
        "report_version": REPORT_VERSION,
        "run": {
            "dir": str(data.run_dir), "status": m.get("status", "complete"), **_run_info(data),
            "principles": {str(p.get("id")): as_text(p.get("comparison") or p.get("critique")) for p in principles},
            "sources": label_cfg.get("sources"),
            "length_unit": data.unit, "table_rows": len(data.table), "table_total": data.table_total,
            "text_chars": MAX_CHARS,
        },
        "headline": headline,
        "revise": revise,
        "labels": labels,
        "length_bias": bias,
        "lengths": {"unit": "chars", "chosen": describe(data.chosen.lengths),
                    "rejected": describe(data.rejected.lengths),
                    "histogram": histograms(data.chosen.lengths, data.rejected.lengths)},
        "markers": {"pairs": data.chosen.markers.n, "chosen": data.chosen.markers.rates(),
                    "rejected": data.rejected.markers.rates()},
    }
    if bon is not None:
        report["best_of_n"] = {**bon, "failures": fails["best_of_n"],
                               "failure_reasons": dict(data.failures["best_of_n"])}
    if isinstance(usage := m.get("usage"), dict):  # tokens served over the folder's runs, and their cost
        report["usage"] = {**usage, **({"cost": m["cost"]} if isinstance(m.get("cost"), dict) else {})}
    if (rewards := rewards_summary(data.run_dir)) is not None:  # a training run's (cai.trl, record=)
        report["rewards"] = rewards
    if (review := agreement_summary(data.run_dir)) is not None:  # human labels from `cai review`
        report["human_review"] = review
    return dict(rounded(report))


def build_report(run_dir: Path, *, unit: str = "chars") -> dict[str, Any]:
    """The figures of a finished run folder (``InputError`` when it is not one); see the module doc."""
    return figures(load_run(Path(run_dir), unit=unit, max_rows=0))
