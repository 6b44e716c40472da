"""Human labels win: the preference rows of a run with the human label where one exists.

``apply_human_labels(rows, run_dir, mode)`` takes the rows of preferences.jsonl and gives the rows
to export, each with ``label_source`` (``"human"`` or ``"ai"``):

- ``ai``: the rows as they are (the judge's labels);
- ``human``: only the pairs a person labelled ``a`` or ``b``;
- ``human-first``: the human label where one exists, the judge's elsewhere. A human tie drops the
  pair; a human ``a``/``b`` on a pair the judge called a tie brings it in. Pairs the quality gates
  left out (rejects.jsonl) stay out.

A human-labelled row chooses the human's side; ``score_chosen``/``score_rejected`` are 1 and 0
(a person's hard label), ``p_chosen`` stays the judge's probability of the chosen response (below
0.5 where the person overruled the judge), and ``tie`` is false.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..analysis.human import HUMAN_FILE, LABELS_FILE, human_labels, load_pairs
from ..errors import InputError
from ..quality.gates import rejected_ids
from ..stages.preferences import to_preference

MODES = ("ai", "human", "human-first")


def _human_row(pair: dict[str, Any], side: str) -> dict[str, Any]:
    row = to_preference(pair, keep_ties=True) or {}
    chosen, rejected = (pair["response_a"], pair["response_b"]) if side == "a" else (
        pair["response_b"], pair["response_a"])
    p_a = pair.get("p_a")
    return row | {"id": pair["id"], "prompt": pair["prompt"],
                  "chosen": [{"role": "assistant", "content": chosen}],
                  "rejected": [{"role": "assistant", "content": rejected}],
                  "p_chosen": None if p_a is None else p_a if side == "a" else 1.0 - p_a,
                  "score_chosen": 1.0, "score_rejected": 0.0, "chosen_side": side, "tie": False,
                  "label_source": "human"}


def apply_human_labels(rows: Iterable[dict[str, Any]], run_dir: Path, mode: str = "human-first"
                       ) -> list[dict[str, Any]]:
    """The preference rows to export under ``mode`` (see the module), each with ``label_source``;
    judge rows keep their order, pairs the judge tied come after them in labels.jsonl order."""
    if mode not in MODES:
        raise InputError(f"unknown labels mode {mode!r} (one of {', '.join(MODES)})")
    rows = list(rows)
    if mode == "ai":
        return [r | {"label_source": "ai"} for r in rows]
    human = human_labels(run_dir)
    pairs = {p["id"]: p for p in load_pairs(run_dir)} if human else {}
    gated = rejected_ids(Path(run_dir), "label")
    out, done = [], {r["id"] for r in rows}
    for r in rows:
        h = human.get(r["id"], {}).get("label")
        if h in ("a", "b") and r["id"] in pairs:
            out.append(_human_row(pairs[r["id"]], h))
        elif h is None and mode == "human-first":
            out.append(r | {"label_source": "ai"})
    for pid, pair in pairs.items():
        h = human.get(pid, {}).get("label")
        if pid not in done and pid not in gated and h in ("a", "b"):
            out.append(_human_row(pair, h))
    return out


def with_human_labels(numbered: Iterable[tuple[str, dict[str, Any]]], run_dir: Path, mode: str = "human-first"
                      ) -> Iterable[tuple[str, dict[str, Any]]]:
    """``apply_human_labels`` over (where, row) pairs (where: ``file:line`` of the row, for error
    messages). A run folder without human_labels.jsonl gets its rows back untouched (no
    ``label_source``: the export stays as it was), except that ``human`` mode is refused."""
    if not (Path(run_dir) / HUMAN_FILE).exists():
        if mode == "human":
            raise InputError(f"{run_dir}: no {HUMAN_FILE}: label pairs with `cai review {run_dir}` first, "
                             "or export with --labels ai or human-first")
        return numbered
    numbered = list(numbered)
    where = {r.get("id"): w for w, r in numbered}
    return [(where.get(r["id"], f"{Path(run_dir) / LABELS_FILE}: pair {r['id']}"), r)
            for r in apply_human_labels((r for _, r in numbered), run_dir, mode)]
