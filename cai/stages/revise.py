"""Critique and revise: the supervised stage of Constitutional AI.

For each prompt the model answers; then for ``rounds`` rounds it critiques its latest answer
against a principle drawn for that (row, round) and rewrites it. Each step is one batched
backend call over a chunk of rows. Every critique and revision is kept in the output row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..backends.base import Backend, Completion, Message, Request, Sampling
from ..config import ReviseSettings
from ..constitution import Constitution, Principle
from ..hashing import call_seed
from ..inputs import PromptRow
from ..quality.flags import FLAGS, check_text, clean_revision
from ..templates import Templates
from .provenance import StageConfig, stage_provenance
from .runner import Call, Outcome, run_rows, stage_fingerprint

DRAW_SALT = "revise"
STAGES = ("generate", "critique", "revise")


def _sampling(s: ReviseSettings, tokens: int) -> Sampling:
    return Sampling(max_tokens=tokens, temperature=s.temperature, repetition_penalty=s.repetition_penalty)


def _critique_tokens(s: ReviseSettings) -> int:
    return s.critique_max_tokens or max(32, s.max_tokens * 3 // 4)


_TREE = ReviseSettings.model_validate({})  # the defaults are the settings tree's (revise.*)


@dataclass(frozen=True)
class ReviseConfig(StageConfig):
    """The stage as it runs, derived from ``ReviseSettings`` (``of``); critique tokens default
    to 3/4 of max_tokens."""

    rounds: int = _TREE.rounds
    seed: int = 0
    generate: Sampling = _sampling(_TREE, _TREE.max_tokens)
    critique: Sampling = _sampling(_TREE, _critique_tokens(_TREE))
    revise: Sampling = _sampling(_TREE, _TREE.max_tokens)

    @classmethod
    def of(cls, s: ReviseSettings, seed: int = 0) -> ReviseConfig:
        return cls(rounds=s.rounds, seed=seed, generate=_sampling(s, s.max_tokens),
                   critique=_sampling(s, _critique_tokens(s)), revise=_sampling(s, s.max_tokens))


def row_flags(calls: list[dict[str, Any]], final: str, critique: str | None,
              examples: list[str] | None = None) -> list[str]:
    """The quality flags (``cai.quality.flags.FLAGS``) of a row: ``truncated`` when any of its calls hit
    the token limit, and the text checks of its final answer (the SFT target; ``examples``: the
    few-shot texts it must not merely copy)."""
    text = check_text(final, finish_reason=None, critique=critique, examples=examples or ())
    cut = any(c.get("finish_reason") == "length" for c in calls)
    return [f for f in FLAGS if f in text or (f == "truncated" and cut)]


def fingerprint(backend: Backend, constitution: Constitution, templates: Templates, cfg: ReviseConfig) -> str:
    return stage_fingerprint("revise", backend, constitution, templates, STAGES, cfg.to_dict())


def principles_for(row_id: str, constitution: Constitution, cfg: ReviseConfig) -> list[Principle]:
    """One principle per round, distinct while the constitution has enough of them."""
    return constitution.draw(row_id, cfg.rounds, seed=cfg.seed, salt=DRAW_SALT)


def _seeded(s: Sampling, seed: int, row_id: str, step: str) -> Sampling:
    """Give each call its own reproducible seed derived from the run seed, row and step."""
    return s if s.seed is None else replace(s, seed=call_seed(seed, row_id, step))


@dataclass
class ReviseStage:
    """Critique and revise one row: its answer, then per round a critique and a revision, each
    call sent as soon as the row's previous one returns. A failed or empty call fails the row
    with the step's name."""

    constitution: Constitution
    templates: Templates
    cfg: ReviseConfig
    model_id: str

    def __post_init__(self) -> None:
        self.provenance = stage_provenance("revise", self.model_id, self.constitution, self.templates, STAGES,
                                           config=self.cfg.to_dict())

    def _example_texts(self, principle_id: str) -> list[str]:
        p = self.constitution.by_id().get(principle_id)
        return [t for e in (p.examples if p else ()) for t in (e.response, e.revision) if t]

    async def __call__(self, r: PromptRow, call: Call) -> list[Outcome]:
        cfg, tpl = self.cfg, self.templates
        tokens = 0
        calls: list[dict[str, Any]] = []  # each call's finish reason and tokens, under ``name``

        async def ask(step: str, name: str, messages: list[Message], sampling: Sampling, key: str) -> Completion | str:
            nonlocal tokens
            kind = "answer" if step == "initial answer" else step.rsplit(" ", 1)[-1]  # critique, revision
            c = await call(Request(tuple(messages), _seeded(sampling, cfg.seed, r.id, key), step=kind))
            tokens += c.prompt_tokens + c.completion_tokens
            if c.error:
                return f"{step}: backend error: {c.error}"
            if not c.text.strip():
                return f"{step}: empty output (finish_reason={c.finish_reasons[:1]})"
            calls.append({"step": name, "finish_reason": c.finish_reasons[0] if c.finish_reasons else None,
                          "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens})
            return c

        def failure(reason: str) -> list[Outcome]:
            return [Outcome(r.id, reason=reason, tokens=tokens, info={"source": r.source})]

        first = await ask("initial answer", "initial", tpl.generate_messages(r.prompt), cfg.generate, "initial")
        if isinstance(first, str):
            return failure(first)
        initial = current = first.text.strip()
        rounds: list[dict[str, Any]] = []
        for rnd, p in enumerate(principles_for(r.id, self.constitution, cfg)):
            ctx = {"conversation": r.prompt, "response": current, "principle": p, "round": rnd + 1}
            asked = tpl.messages("critique", **ctx)
            crit = await ask(f"round {rnd + 1} critique", f"critique {rnd + 1}", asked, cfg.critique, f"c{rnd}")
            if isinstance(crit, str):
                return failure(crit)
            rev = await ask(f"round {rnd + 1} revision", f"revision {rnd + 1}",
                            tpl.revision_messages(asked, **ctx, critique=crit.text.strip()), cfg.revise, f"r{rnd}")
            if isinstance(rev, str):
                return failure(rev)
            rounds.append({"round": rnd + 1, "principle_id": p.id, "critique_request": p.critique,
                           "critique": crit.text, "revision_request": p.revision, "revision": rev.text})
            current = clean_revision(rev.text) or current
        last = rounds[-1] if rounds else None
        row = {
            "id": r.id,
            "prompt": r.prompt,
            "messages": [*r.prompt, {"role": "assistant", "content": current}],
            "initial_response": initial,
            "revised_response": current,
            "principle_ids": [x["principle_id"] for x in rounds],
            "rounds": rounds,
            "calls": calls,
            "source": r.source,
            "extra": r.extra,
            "provenance": self.provenance,
            "gates": row_flags(calls, last["revision"] if last else current, last["critique"] if last else None,
                               self._example_texts(last["principle_id"]) if last else None),
        }
        return [Outcome(r.id, row=row, tokens=tokens)]


def revise_chunk(rows: Sequence[PromptRow], backend: Backend, constitution: Constitution, templates: Templates,
                 cfg: ReviseConfig) -> list[Outcome]:
    """Critique and revise ``rows`` (no output file): one ``Outcome`` per row, in order."""
    return run_rows(rows, ReviseStage(constitution, templates, cfg, backend.model_id), backend)

