"""The rewards a training run got from ``cai.trl.ConstitutionReward(record=DIR/rewards.jsonl)``:
what `cai report DIR` shows of them. Each record is one group (``group`` mode: ``rewards``, one a
completion) or one completion (``direct`` mode: ``reward``); ``None`` is a completion the judge
could not score (TRL leaves it out). Per training step: completions, scored, mean, lowest, highest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .read import iter_rows

REWARDS_FILE = "rewards.jsonl"


def rewards_summary(run_dir: Path) -> dict[str, Any] | None:
    """The rewards of ``run_dir/rewards.jsonl`` by step, or None when there is no such file."""
    path = Path(run_dir) / REWARDS_FILE
    if not path.is_file():
        return None
    steps: dict[Any, list[float | None]] = {}
    modes: set[str] = set()
    for row in iter_rows(path, "rewards"):
        modes.add(str(row.get("mode")))
        got = row.get("rewards") if row.get("mode") == "group" else [row.get("reward")]
        steps.setdefault(row.get("step"), []).extend(
            float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None for x in got or [])

    def figures(xs: list[float | None]) -> dict[str, Any]:
        known = [x for x in xs if x is not None]
        return {"completions": len(xs), "scored": len(known),
                "mean": math.fsum(known) / len(known) if known else None,
                "min": min(known, default=None), "max": max(known, default=None)}

    every = [x for xs in steps.values() for x in xs]
    return {"file": REWARDS_FILE, "mode": ", ".join(sorted(modes)), **figures(every),
            "by_step": [{"step": s, **figures(xs)} for s, xs in steps.items()]}
