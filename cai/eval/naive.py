"""The naive judge that `cai eval-judge` measures beside the real one against human labels.

The naive judge is what one writes first: show the pair once (A/B as given), let the model
write a few tokens, find the letter in the text. It uses the same principles as the real judge,
so the difference is only how the answer is read and whether both orders are asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.base import Backend, Request, Sampling
from ..constitution import Constitution
from ..stages.judge import JudgeConfig, aggregate, principles_for
from ..stages.pairs import Pair
from ..stages.provenance import StageConfig, stage_provenance
from ..stages.runner import Call, Outcome, run_rows, stage_fingerprint
from ..templates import JUDGE_STAGES, Templates

_LETTER = [
    re.compile(r"\(([AB])\)"),
    re.compile(r"\b(?:[Oo]ption|[Aa]nswer(?: is)?|[Rr]esponse)\s*:?\s*\(?([AB])\b"),
    re.compile(r"^\W*([AB])\b"),
]


def parse_letter(text: str) -> str | None:
    """The answer letter in a generated text, or None (case-sensitive: "a" is a word)."""
    return next((m.group(1) for pat in _LETTER if (m := pat.search(text))), None)


@dataclass(frozen=True)
class NaiveConfig(StageConfig):
    principles: int = 4
    seed: int = 0
    tie_threshold: float = 0.05
    sampling: Sampling = Sampling(max_tokens=12)

    def to_dict(self) -> dict[str, Any]:
        return {"naive": True, **super().to_dict()}


def naive_fingerprint(backend: Backend, constitution: Constitution, templates: Templates, cfg: NaiveConfig) -> str:
    return stage_fingerprint("naive-judge", backend, constitution, templates, ("judge",), cfg.to_dict())


@dataclass
class NaiveStage:
    """Single order, generated text, letter parsed; the label is the mean of the votes."""

    constitution: Constitution
    templates: Templates
    cfg: NaiveConfig
    model_id: str

    def __post_init__(self) -> None:
        c = self.cfg  # the real judge's principle draw and tie rule, one order
        self.jcfg = JudgeConfig(principles=c.principles, seed=c.seed, both_orders=False, tie_threshold=c.tie_threshold)
        self.provenance = stage_provenance("label", self.model_id, self.constitution, self.templates, JUDGE_STAGES,
                                           judge=self.cfg.to_dict())

    async def __call__(self, pair: Pair, call: Call) -> list[Outcome]:
        info = {"source": pair.source}
        if pair.error or pair.response_a.strip() == pair.response_b.strip():
            return [Outcome(pair.id, reason=pair.error or "identical responses: nothing to judge", info=info)]
        todo: list[tuple[str, Request]] = []
        for p in principles_for(pair.id, self.constitution, self.jcfg):
            msgs = self.templates.messages("judge", conversation=pair.prompt, response_a=pair.response_a,
                                           response_b=pair.response_b, principle=p)
            if msgs[-1]["role"] == "assistant":  # no "The answer is: (" prefix: let it write
                msgs = msgs[:-1]
            todo.append((p.id, Request(tuple(msgs), self.cfg.sampling)))
        done = await call.many(r for _, r in todo)
        tokens = sum(c.prompt_tokens + c.completion_tokens for c in done)
        votes: list[dict[str, Any]] = []
        for (pid, _), c in zip(todo, done, strict=True):
            if c.error:
                return [Outcome(pair.id, reason=f"naive judge: backend error: {c.error}", tokens=tokens, info=info)]
            letter = parse_letter(c.text)
            v: dict[str, Any] = {"principle_id": pid, "order": "ab", "mode": "text", "text": c.text}
            if letter is None:
                v["abstain"] = "no answer letter in the text"
            else:
                v.update(p_a=1.0 if letter == "A" else 0.0, p_b=0.0 if letter == "A" else 1.0, abstain=None)
            votes.append(v)
        row = aggregate(pair, votes, self.jcfg)
        if row["p_a"] is None:
            return [Outcome(pair.id, reason="all judgements abstained: no answer letter", tokens=tokens,
                            info={**info, "judgements": row["judgements"]})]
        return [Outcome(pair.id, row={**row, "provenance": self.provenance}, tokens=tokens)]


def naive_chunk(pairs: Sequence[Pair], backend: Backend, constitution: Constitution, templates: Templates,
                cfg: NaiveConfig) -> list[Outcome]:
    """The naive judge over ``pairs`` (no output file): one ``Outcome`` per pair, in order."""
    return run_rows(pairs, NaiveStage(constitution, templates, cfg, backend.model_id), backend)
