"""Critique and revise: the supervised stage of Constitutional AI.

For each prompt the model answers; then for ``rounds`` rounds it critiques its latest answer
against a principle drawn for that (row, round) and rewrites it. Each step is one batched
backend call over a chunk of rows. Every critique and revision is kept in the output row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import __version__
from ..backends.base import Backend, Completion, Request, Sampling
from ..constitution import Constitution, Principle
from ..hashing import call_seed
from ..inputs import PromptRow
from ..templates import Templates
from .runner import Outcome, stage_fingerprint

DRAW_SALT = "revise"
_LABEL = re.compile(r"^\s*(revised (reply|response)|revision|rewrite)\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class ReviseConfig:
    rounds: int = 4
    seed: int = 0
    generate: Sampling = field(default_factory=lambda: Sampling(max_tokens=256))
    critique: Sampling = field(default_factory=lambda: Sampling(max_tokens=192))
    revise: Sampling = field(default_factory=lambda: Sampling(max_tokens=256))

    @classmethod
    def build(cls, rounds: int, seed: int, max_tokens: int, temperature: float = 0.0,
              repetition_penalty: float = 1.0, critique_max_tokens: int | None = None) -> ReviseConfig:
        """The settings `cai revise` and `cai run` both build, so that they share cached calls."""
        def sampling(tokens: int) -> Sampling:
            return Sampling(max_tokens=tokens, temperature=temperature, repetition_penalty=repetition_penalty)

        return cls(rounds=rounds, seed=seed, generate=sampling(max_tokens),
                   critique=sampling(critique_max_tokens or max(32, max_tokens * 3 // 4)),
                   revise=sampling(max_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds, "seed": self.seed, "generate": self.generate.to_dict(),
            "critique": self.critique.to_dict(), "revise": self.revise.to_dict(),
        }


def clean_revision(text: str) -> str:
    """Strip whitespace and a leading "Revision:" label that small models like to add."""
    return _LABEL.sub("", text.strip(), count=1).strip()


def fingerprint(backend: Backend, constitution: Constitution, templates: Templates, cfg: ReviseConfig) -> str:
    return stage_fingerprint("revise", backend, constitution, templates, ("generate", "critique", "revise"),
                             cfg.to_dict())


def principles_for(row_id: str, constitution: Constitution, cfg: ReviseConfig) -> list[Principle]:
    """One principle per round, distinct while the constitution has enough of them."""
    return constitution.draw(row_id, cfg.rounds, seed=cfg.seed, salt=DRAW_SALT)


def _seeded(s: Sampling, seed: int, row_id: str, step: str) -> Sampling:
    """Give each call its own reproducible seed derived from the run seed, row and step."""
    return s if s.seed is None else replace(s, seed=call_seed(seed, row_id, step))


def revise_chunk(
    rows: Sequence[PromptRow],
    backend: Backend,
    constitution: Constitution,
    templates: Templates,
    cfg: ReviseConfig,
) -> list[Outcome]:
    """Run the whole critique-revise loop for a chunk of rows, one batched call per step."""
    state: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    tokens: dict[str, int] = {r.id: 0 for r in rows}
    draws = {r.id: principles_for(r.id, constitution, cfg) for r in rows}

    def call(step: str, reqs: dict[str, Request]) -> dict[str, Completion]:
        ids = list(reqs)
        done = backend.complete([reqs[i] for i in ids])
        out: dict[str, Completion] = {}
        for rid, c in zip(ids, done, strict=True):
            tokens[rid] += c.prompt_tokens + c.completion_tokens
            if c.error:
                failed[rid] = f"{step}: backend error: {c.error}"
            elif not c.text.strip():
                failed[rid] = f"{step}: empty output (finish_reason={c.finish_reasons[:1]})"
            else:
                out[rid] = c
        return out

    gen_reqs = {r.id: Request(tuple(templates.generate_messages(r.prompt)),
                              _seeded(cfg.generate, cfg.seed, r.id, "initial")) for r in rows}
    for rid, c in call("initial answer", gen_reqs).items():
        state[rid] = {"initial": c.text.strip(), "current": c.text.strip(), "rounds": [],
                      "calls": [_raw("initial", c)]}

    by_id = {r.id: r for r in rows}
    for rnd in range(cfg.rounds):
        alive = [rid for rid in state if rid not in failed]
        crit_reqs = {}
        for rid in alive:
            p = draws[rid][rnd]
            msgs = templates.messages("critique", conversation=by_id[rid].prompt,
                                      response=state[rid]["current"], principle=p, round=rnd + 1)
            crit_reqs[rid] = Request(tuple(msgs), _seeded(cfg.critique, cfg.seed, rid, f"c{rnd}"))
        crits = call(f"round {rnd + 1} critique", crit_reqs)
        rev_reqs = {}
        for rid, c in crits.items():
            p = draws[rid][rnd]
            msgs = templates.messages("revise", conversation=by_id[rid].prompt,
                                      response=state[rid]["current"], critique=c.text.strip(),
                                      principle=p, round=rnd + 1)
            rev_reqs[rid] = Request(tuple(msgs), _seeded(cfg.revise, cfg.seed, rid, f"r{rnd}"))
        revs = call(f"round {rnd + 1} revision", rev_reqs)
        for rid, rc in revs.items():
            p = draws[rid][rnd]
            s = state[rid]
            s["rounds"].append({
                "round": rnd + 1, "principle_id": p.id,
                "critique_request": p.critique, "critique": crits[rid].text,
                "revision_request": p.revision, "revision": rc.text,
            })
            s["calls"] += [_raw(f"critique {rnd + 1}", crits[rid]), _raw(f"revision {rnd + 1}", rc)]
            s["current"] = clean_revision(rc.text) or s["current"]

    provenance = {
        "stage": "revise", "cai_version": __version__, "model": backend.model_id,
        "constitution": constitution.name, "constitution_version": constitution.version,
        "constitution_hash": constitution.digest(),
        "templates_hash": templates.digest(("generate", "critique", "revise")),
        "config": cfg.to_dict(),
    }
    outcomes: list[Outcome] = []
    for r in rows:
        if r.id in failed:
            outcomes.append(Outcome(r.id, reason=failed[r.id], tokens=tokens[r.id],
                                    info={"source": r.source}))
            continue
        s = state[r.id]
        row = {
            "id": r.id,
            "prompt": r.prompt,
            "messages": [*r.prompt, {"role": "assistant", "content": s["current"]}],
            "initial_response": s["initial"],
            "revised_response": s["current"],
            "principle_ids": [x["principle_id"] for x in s["rounds"]],
            "rounds": s["rounds"],
            "calls": s["calls"],
            "source": r.source,
            "extra": r.extra,
            "provenance": provenance,
        }
        outcomes.append(Outcome(r.id, row=row, tokens=tokens[r.id]))
    return outcomes


def _raw(step: str, c: Completion) -> dict[str, Any]:
    return {"step": step, "finish_reason": c.finish_reasons[0] if c.finish_reasons else None,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
