"""The quality gates: what keeps a row out of the training data, and the file that says why.

Rows record facts, not verdicts: every revision row carries its flags (``gates``: truncated,
empty, loop, meta, restates_critique; see ``cai.quality.flags``) and every label row the flags of its
responses. The gate settings (``GateSettings``) turn facts into verdicts at the end of a run:

- a revision row with a dropping flag, or (``keep: improved``) one whose revision the judge
  prefers less than the first answer, is not an SFT target;
- a pair with a truncated response is left out of ``preferences.jsonl``;
- an input prompt that duplicates an earlier one, or matches the decontamination set, is
  skipped before any call is made.

Each of them gets one line in ``rejects.jsonl`` (``id``, ``stage``, ``reasons``, and what was
rejected: the ``prompt`` messages, with the final revision as ``text`` for a revise row and the
pair's ``response_a``/``response_b`` for a label row), nothing is dropped silently, and
``cai export`` leaves them out unless ``--include-rejects``. Because the verdicts are computed
from the rows, changing a gate setting needs no model call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GateSettings
from ..files import dumps, iter_jsonl, write_text_atomic
from ..inputs import PromptRow
from .dedup import Decontaminator, _Index

REJECTS_FILE = "rejects.jsonl"


@dataclass
class InputGate:
    """Streams prompts, skipping exact/near duplicates of earlier ones and decontamination hits;
    ``skipped`` keeps each skipped id with its reason."""

    settings: GateSettings
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self._index = _Index(s.dedup_threshold, 128) if s.dedup else None
        self._eval = (Decontaminator.from_file(s.decontaminate, threshold=s.dedup_threshold)
                      if s.decontaminate else None)

    def __call__(self, rows: Iterable[PromptRow], on_skip: Callable[[int], None] | None = None) -> Iterator[PromptRow]:
        """``rows`` less the ones skipped, each skip told to ``on_skip`` (a progress total) as it is made."""
        for r in rows:
            text = "\n".join(m["content"] for m in r.prompt if m["role"] == "user")  # what was asked
            if self._eval is not None and (hit := self._eval.check(text)) is not None:
                reason, detail = "contaminated", f"{hit[1]} match of an evaluation prompt: {hit[0][:200]}"
            elif self._index is not None and (dup := self._index.match_or_add(r.id, text)) is not None:
                reason, detail = f"duplicate_{dup[1]}", f"{dup[1]} duplicate of {dup[0]}"
            else:
                yield r
                continue
            self.skipped.append({"id": r.id, "stage": "input", "reasons": [reason], "detail": detail,
                                 "source": r.source, "prompt": r.prompt})
            if on_skip is not None:
                on_skip(1)


def write_rejects(folder: Path, settings: GateSettings, skipped: Iterable[dict[str, Any]] = (),
                  revisions: str = "revisions.jsonl", labels: str = "labels.jsonl") -> dict[str, int]:
    """Write ``rejects.jsonl`` (whole, atomically): ``skipped`` and every row a gate keeps out of the
    training data, with its reasons (see the module doc); return the count of each reason by stage."""
    out = list(skipped)
    drop = settings.dropping()
    worse: set[str] = set()
    for row in iter_jsonl(folder / labels if labels else None):
        if reasons := sorted(drop & set(row.get("gates") or ())):
            out.append({"id": row["id"], "stage": "label", "reasons": reasons, "prompt": row.get("prompt"),
                        "response_a": row.get("response_a"), "response_b": row.get("response_b")})
        if row.get("origin") == "revision" and row.get("label") == "a":  # a: the first answer
            worse.add(row["id"])
    for row in iter_jsonl(folder / revisions if revisions else None):
        reasons = [f for f in row.get("gates") or () if f in drop]
        if settings.keep == "improved" and row["id"] in worse:
            reasons.append("not_improved")
        if reasons:
            out.append({"id": row["id"], "stage": "revise", "reasons": reasons, "prompt": row.get("prompt"),
                        "text": row.get("revised_response")})
    write_text_atomic(folder / REJECTS_FILE, "".join(dumps(r) + "\n" for r in out))
    return dict(sorted(Counter(f"{r['stage']}.{reason}" for r in out for reason in r["reasons"]).items()))


def rejected_ids(folder: Path, stage: str) -> set[str]:
    """The ids of one stage's rows in a run folder's rejects.jsonl (none when it has no such file)."""
    return {r["id"] for r in iter_jsonl(folder / REJECTS_FILE) if r.get("stage") == stage}
