"""Judge-vs-human agreement in words: the lines a dataset card and a report show for the figures
that ``cai.analysis.human`` computes (``summarize``) from a run's human_labels.jsonl."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..analysis.human import agreement_summary


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
    if sources := [r["label_source"] for r in prefs if r.get("label_source")]:
        lines["exported pairs by label_source"] = ", ".join(f"{x} {sources.count(x)}" for x in ("human", "ai"))
    return {"human review (cai review, human_labels.jsonl)": lines}
