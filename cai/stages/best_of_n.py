"""Best-of-n: sample ``n`` answers per prompt, rank them with the pairwise judge
(``cai.stages.ranking``: round robin for n <= 8, a knockout above, both orders), and keep the
best as an SFT row (``messages`` = prompt + best, every sample and the ranking as its trace) and
best-vs-worst as a preference pair (West-of-N) when the best scored above the worst.

The n answers come from one request with ``n`` (seeded per prompt) to the policy
(``label.policy_model`` on the same backend, else ``model``); a server that ignores ``n`` is asked
for the missing ones one by one, each with its own seed. The judge is ``model``. The rows go to
``best_of_n.jsonl`` through the runner (resume by id), in `cai best-of-n` and in `cai run` with
``best_of_n.enabled`` alike (``cai.pipeline.execute``); the pairs are made from them at the end
(``write_pairs``), as ``preferences.jsonl`` is made from ``labels.jsonl``, and a row a gate keeps
out (a truncated best or worst) gets a line in rejects.jsonl (``rejects``, stage ``best_of_n``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..backends.base import Backend, Sampling
from ..config import RunConfig
from ..constitution import Constitution
from ..files import dumps, iter_jsonl
from ..hashing import call_seed, sha256_json
from ..inputs import PromptRow
from ..output import JsonlSink
from ..templates import Templates, with_system
from ..types import Request
from .judge import JudgeConfig, JudgeStage
from .judge import fingerprint as judge_fingerprint
from .provenance import StageConfig
from .ranking import ROUND_ROBIN_MAX, PairJudge, rank
from .runner import Call, Outcome, Pool, Stream

ROWS_FILE = "best_of_n.jsonl"  # in a run folder: the best answers (SFT rows)
STAGE = "best_of_n"  # its name in run.json's counts and in rejects.jsonl


@dataclass(frozen=True)
class BestOfNConfig(StageConfig):
    """The best-of-n stage as it runs, derived from the settings tree (``of``)."""

    n: int = 4
    seed: int = 0
    sampling: Sampling = Sampling()
    round_robin_max: int = ROUND_ROBIN_MAX

    @classmethod
    def of(cls, cfg: RunConfig) -> BestOfNConfig:
        s = cfg.best_of_n
        return cls(n=s.n, seed=cfg.seed,
                   sampling=Sampling(max_tokens=s.max_tokens or cfg.revise.max_tokens, temperature=s.temperature))


def fingerprint(backend: Backend, constitution: Constitution, templates: Templates, judge: JudgeConfig,
                cfg: BestOfNConfig, policy: str | None = None) -> str:
    """What a best-of-n row depends on: the judge's fingerprint, the sampling, the generate
    template, and the policy's model when it is not the judge's."""
    parts: list[Any] = ["best_of_n", judge_fingerprint(backend, constitution, templates, judge), cfg.to_dict(),
                        templates.digest(("generate",))]
    return sha256_json(parts if policy in (None, backend.model_id) else [*parts, ["policy", policy]])


def make_stream(cfg: RunConfig, constitution: Constitution, templates: Templates, sink: JsonlSink,
                judge: Backend, prompts: Iterable[PromptRow], *, policy: Pool | None = None,
                total: int | None = None, prune: bool = False) -> Stream[PromptRow]:
    """The best-of-n stream of ``prompts`` into ``sink`` (``fingerprint``): judged by ``judge``,
    sampled from ``policy`` (another backend's requests) or the judge's own."""
    stage = BestOfNStage(JudgeStage(constitution, templates, JudgeConfig.of(cfg.label, cfg.seed), judge.model_id),
                         BestOfNConfig.of(cfg), templates.render_text("generate", "system"), policy)
    return Stream(sink, prompts, stage, "best-of-n", total, prune=prune, progress=cfg.progress,
                  stage="best_of_n")


def pairs_path(rows: Path) -> Path:
    """Where the pairs of a best-of-n file go: best_of_n.jsonl -> best_of_n.pairs.jsonl."""
    return rows.with_name(rows.name.removesuffix(".jsonl") + ".pairs.jsonl")


@dataclass
class BestOfNStage:
    """The row function: one prompt in, one best-of-n row out (or a failure with its reason)."""

    judge: JudgeStage
    cfg: BestOfNConfig
    system: str | None = None
    policy: Pool | None = None  # the policy's requests, when it is another backend than the judge's

    async def sample(self, r: PromptRow, call: Call) -> tuple[list[str], list[str | None]] | str:
        """``n`` answers: one request with ``n``; the missing ones (a server that ignores ``n``)
        one request each, with distinct seeds."""
        cfg, messages = self.cfg, tuple(with_system(self.system, r.prompt))
        c = await call(Request(messages, replace(cfg.sampling, n=cfg.n, seed=call_seed(cfg.seed, r.id, "best_of_n")),
                               step="sample"))
        if c.error:
            return f"sampling: backend error: {c.error}"
        texts = list(c.texts[:cfg.n])
        reasons: list[str | None] = [*c.finish_reasons[:len(texts)], *[None] * (len(texts) - len(c.finish_reasons))]
        one = replace(cfg.sampling, n=1)
        extra = await call.many(
            Request(messages, replace(one, seed=call_seed(cfg.seed, r.id, f"best_of_n-{i}")), step="sample")
            for i in range(len(texts), cfg.n))
        for e in extra:
            if e.error or not e.texts:
                return f"sampling: backend error: {e.error or 'no answer'}"
            texts.append(e.texts[0])
            reasons.append(e.finish_reasons[0] if e.finish_reasons else None)
        return [t.strip() for t in texts], reasons

    async def __call__(self, r: PromptRow, call: Call) -> list[Outcome]:
        got = await self.sample(r, Call(self.policy, call.bar, call.priority, call.affinity)
                                if self.policy is not None else call)
        if isinstance(got, str):
            return [Outcome(r.id, reason=got, info={"source": r.source})]
        texts, reasons = got
        ranking = await rank(len(texts), PairJudge(self.judge, call, r.prompt, texts), self.cfg.round_robin_max)
        if ranking.best is None or ranking.worst is None:
            why = sorted({m.reason or "undecided" for m in ranking.matches})
            return [Outcome(r.id, reason=f"ranking: no match decided ({'; '.join(why)})", info={"source": r.source})]
        best, worst = texts[ranking.best], texts[ranking.worst]
        row = {
            "id": r.id,
            "prompt": r.prompt,
            "messages": [*r.prompt, {"role": "assistant", "content": best}],
            "best": ranking.best,
            "worst": ranking.worst,
            "best_response": best,
            "worst_response": worst,
            "margin": ranking.margin,
            "samples": [{"text": t, "finish_reason": f, "score": s}
                        for t, f, s in zip(texts, reasons, ranking.scores, strict=True)],
            "ranking": ranking.to_dict(),
            "gates": ["truncated"] if "length" in (reasons[ranking.best], reasons[ranking.worst]) else [],
            "source": r.source,
            "extra": r.extra,
            "provenance": {**self.judge.provenance, "stage": STAGE,
                           "policy_model": (self.policy.backend if self.policy is not None else self.judge).model_id,
                           "best_of_n": self.cfg.to_dict()},
        }
        return [Outcome(r.id, row=row)]


def to_pair(row: dict[str, Any]) -> dict[str, Any] | None:
    """A best-of-n row as a TRL preference row (best chosen, worst rejected); None without a margin."""
    margin = row.get("margin")
    if margin is None or margin <= 0:
        return None
    scores = row["ranking"]["scores"]
    return {
        "id": row["id"],
        "prompt": row["prompt"],
        "chosen": [{"role": "assistant", "content": row["best_response"]}],
        "rejected": [{"role": "assistant", "content": row["worst_response"]}],
        "score_chosen": scores[row["best"]],
        "score_rejected": scores[row["worst"]],
        "margin": margin,
        "label_mode": ((row.get("provenance") or {}).get("judge") or {}).get("mode"),
        "source": row.get("source", ""),
        "provenance": row.get("provenance", {}),
    }


def write_pairs(rows: Path, out: Path | None = None, drop: frozenset[str] = frozenset()) -> int:
    """The West-of-N pairs of ``rows`` (best_of_n.jsonl) to ``out`` (default beside it), atomically,
    but for rows flagged by a gate in ``drop`` (a truncated best or worst); returns how many were written."""
    out = out or pairs_path(rows)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in iter_jsonl(rows) if rows.is_file() else ():
            if not drop & set(row.get("gates") or ()) and (pair := to_pair(row)) is not None:
                f.write(dumps(pair) + "\n")
                n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return n



def rejects(rows: Path, drop: frozenset[str]) -> list[dict[str, Any]]:
    """rejects.jsonl's lines for the rows of ``rows`` a gate in ``drop`` keeps out (stage ``best_of_n``)."""
    out = []
    for row in iter_jsonl(rows) if rows.is_file() else ():
        if reasons := sorted(drop & set(row.get("gates") or ())):
            out.append({"id": row["id"], "stage": STAGE, "reasons": reasons, "prompt": row.get("prompt"),
                        "text": row.get("best_response"), "worst": row.get("worst_response")})
    return out
