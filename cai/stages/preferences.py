"""Label rows -> TRL preference rows (conversational, explicit prompt); ties held out unless kept."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import stats
from ..files import dumps, iter_jsonl, loads


def to_preference(row: dict[str, Any], keep_ties: bool = False) -> dict[str, Any] | None:
    """A label row as a TRL preference row (conversational, explicit prompt); None for a tie."""
    if row.get("p_a") is None or (row.get("tie") and not keep_ties):
        return None
    a_wins = row["p_a"] >= 0.5
    chosen, rejected = (
        (row["response_a"], row["response_b"]) if a_wins else (row["response_b"], row["response_a"])
    )
    p = row["p_a"] if a_wins else 1.0 - row["p_a"]
    return {
        "id": row["id"],
        "prompt": row["prompt"],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "p_chosen": p,
        "score_chosen": p,
        "score_rejected": 1.0 - p,
        "chosen_side": "a" if a_wins else "b",
        "tie": row.get("tie", False),
        "principle_ids": row["principle_ids"],
        "judgements": row["judgements"],
        "position_consistent": row["position_consistent"],
        "label_mode": row["label_mode"],
        "source": row.get("source", ""),
        "provenance": row.get("provenance", {}),
    }


@dataclass
class PreferenceSummary:
    written: int = 0
    ties: int = 0
    abstentions: int = 0  # abstained judgements, over all judged pairs
    judgements: int = 0
    inconsistent: int = 0  # pairs whose two orders prefer different responses
    gated: int = 0  # pairs left out by a quality gate (a truncated response): listed in rejects.jsonl
    # how the judgements were read: {"logprobs": n, "choice": m, "cot": k}; "choice" beside
    # "logprobs" means a server gave no log-probs and the structured-choice fallback answered
    modes: dict[str, int] = field(default_factory=dict)


def judged_by(modes: dict[str, int]) -> str:
    """``logprobs 380, choice 20``: judgements by how they were read, most first."""
    return ", ".join(f"{m} {n}" for m, n in sorted(modes.items(), key=lambda kv: (-kv[1], kv[0])))


def write_preferences(labels: Path, out: Path, keep_ties: bool = False,
                      drop: frozenset[str] = frozenset(), debias_length: bool = False) -> PreferenceSummary:
    """Stream ``labels`` into TRL rows at ``out`` (via ``.part`` and an atomic rename); a pair
    with a gate flag in ``drop`` is left out (and counted). With ``debias_length`` each row also
    gets ``p_chosen_length_debiased``: the soft label with what the length difference predicts
    taken out (``cai.stats.debiased_labels``), beside the raw one."""
    s = PreferenceSummary()
    debiased = (stats.debiased_labels(iter_jsonl(labels)) or {}) if debias_length else {}
    part = out.with_name(out.name + ".part")
    with labels.open(encoding="utf-8") as f, part.open("w", encoding="utf-8") as g:
        for line in f:
            if not line.strip():
                continue
            row = loads(line)
            s.ties += bool(row.get("tie"))
            s.abstentions += row.get("abstentions", 0)
            for j in row.get("judgements", []):
                s.judgements += 1
                if mode := j.get("mode"):
                    s.modes[mode] = s.modes.get(mode, 0) + 1
            s.inconsistent += row.get("position_consistent") is False
            if drop & set(row.get("gates") or ()):
                s.gated += 1
                continue
            if (pref := to_preference(row, keep_ties)) is None:
                continue
            if (p_a := debiased.get(row["id"])) is not None:
                pref["p_chosen_length_debiased"] = p_a if pref["chosen_side"] == "a" else 1.0 - p_a
            g.write(dumps(pref) + "\n")
            s.written += 1
        g.flush()
        os.fsync(g.fileno())
    os.replace(part, out)
    return s
