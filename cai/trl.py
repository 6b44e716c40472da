"""The constitution as a live reward: ``ConstitutionReward``, a reward function for TRL's trainers.

``reward_funcs=[ConstitutionReward(...)]`` in ``GRPOTrainer`` (its ``__call__`` is async: TRL
runs it on its own reward loop beside its other async reward functions; the judging itself runs
on cai's background loop, so neither loop waits on the other); ``OnlineDPOTrainer`` calls reward
functions synchronously: pass ``reward.as_sync()`` there. Prompts and completions may be plain
text or conversational (lists of messages), as TRL passes them.

Modes, and what each costs per call of the reward function (k = the judge's ``principles``):

- ``group``: the completions that share a prompt are a group (GRPO's ``num_generations``, online
  DPO's two); each completion's reward is its soft win rate against the others of its group
  under the pairwise judge (``cai.stages.ranking.round_robin``: both orders, k principles; two
  identical completions tie at 0.5 with no call), centred so that the group's mean is 0 (or the
  raw win rate in 0-1 with ``raw=True``). Calls: prompts x G(G-1)/2 pairs x orders x k, that is
  prompts x G x (G-1) x k with both orders (G = group size).
- ``direct``: each completion alone (RLAIF's d-RLAIF): the judge is asked for a 1-10 score
  (``prompts/score.*.j2``) and the score tokens' log-probs give the expected score, normalised
  to 0-1 as (E - 1) / 9, averaged over k principles. Calls: completions x k. A tokenizer that
  writes "10" as "1" "0" counts its mass as 1: the scale then reads 1-9.

Every call goes through the call cache when ``cache`` names a file (a repeated completion, or a
repeated step, costs nothing), and every judgement is appended to ``record`` (JSONL) when given.
A completion that could not be judged (every judgement abstained, a backend error, a group of
one) gets ``None``, which TRL leaves out.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import runtime
from .backends import build_backend
from .backends.base import Backend
from .cache import CachedBackend, CallCache, CountingBackend
from .constitution import Constitution, load_constitution
from .hashing import short_id
from .stages.judge import JudgeConfig, JudgeStage, option_probs
from .stages.ranking import PairJudge, round_robin
from .stages.runner import Call, Pool
from .templates import Templates
from .types import Message, Request, Sampling

MODES = ("group", "direct")
SCORES = tuple(str(i) for i in range(1, 11))
SCORE_SALT = "score"


def as_messages(prompt: Any) -> list[Message]:
    """A TRL prompt as chat messages: a string is one user turn; a conversation's content parts
    (multimodal) keep their text."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": _text(m.get("content", ""))} for m in prompt]


def as_text(completion: Any) -> str:
    """A TRL completion as text: a string as it is, a conversation's assistant turns joined."""
    if isinstance(completion, str):
        return completion
    turns = [m for m in completion if m.get("role", "assistant") == "assistant"] or list(completion)
    return "\n\n".join(_text(m.get("content", "")) for m in turns)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def expected_score(top: dict[str, float] | None) -> tuple[float, float] | str:
    """The expected 1-10 score under the score tokens' probabilities, and their raw mass; or the
    reason to abstain (no score token among the top log-probs)."""
    got = option_probs(top, SCORES)
    if isinstance(got, str):
        return got
    probs, mass = got
    return sum(p * int(s) for p, s in zip(probs, SCORES, strict=True)), mass


class ConstitutionReward:
    """A TRL reward function judged against a constitution (see the module's docstring).

    ``backend``: a ``Backend``, or a backend name (``openai``, ``vllm``, ``embedded``, ``fake``)
    built with ``model`` and ``backend_options`` by ``cai.backends.build_backend`` (``base_url``,
    ``api_key``...). ``judge``: a ``JudgeConfig`` (mode, k principles, both orders...).
    ``name``: the reward's column in TRL's logs.
    """

    def __init__(self, constitution: Constitution | str | Path | None = None, backend: Backend | str = "openai", *,
                 model: str | None = None, mode: str = "group", raw: bool = False,
                 judge: JudgeConfig | None = None, templates: Templates | str | Path | None = None,
                 cache: str | Path | None = None, record: str | Path | None = None, concurrency: int = 256,
                 name: str = "constitution", **backend_options: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown reward mode {mode!r} (one of {', '.join(MODES)})")
        self.mode, self.raw, self.concurrency, self.__name__ = mode, raw, concurrency, name
        self.constitution = (constitution if isinstance(constitution, Constitution)
                             else load_constitution(constitution))
        self.templates = templates if isinstance(templates, Templates) else Templates(templates)
        self.cfg = judge or JudgeConfig()
        if mode == "direct" and self.cfg.mode != "logprobs":
            raise ValueError(f"direct mode reads score log-probs: judge mode {self.cfg.mode!r} has none")
        inner = (backend if not isinstance(backend, str)
                 else build_backend(backend, model, concurrency=concurrency, **backend_options))
        self.backend = CachedBackend(inner, CallCache(Path(cache))) if cache is not None else CountingBackend(inner)
        self.stage = JudgeStage(self.constitution, self.templates, self.cfg, self.backend.model_id)
        self.record = Path(record) if record is not None else None
        self.provenance = {**self.stage.provenance, "stage": f"reward/{mode}",
                           "score_templates_hash": self.templates.digest(("score",))}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="cai-reward")
        self._write = threading.Lock()

    # --- what TRL calls -------------------------------------------------------------------------

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """The rewards of ``completions`` (one per completion, None where not judged), awaited
        without holding the caller's loop: the judging runs on cai's background loop."""
        return await asyncio.wrap_future(self._submit(prompts, completions, kwargs))

    def as_sync(self) -> Any:
        """This reward as a synchronous function (``OnlineDPOTrainer`` awaits no reward function)."""
        def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
            return self._submit(prompts, completions, kwargs).result()

        reward.__name__ = self.__name__
        return reward

    def _submit(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict[str, Any]) -> Future[Any]:
        """The rewards, judged from the worker thread on cai's background loop (always the same one)."""
        step = getattr(kwargs.get("trainer_state"), "global_step", None)
        return self._worker.submit(runtime.run, self.rewards(prompts, completions, step))

    @property
    def sent(self) -> int:
        """Judge calls sent to the backend so far (cache hits not counted)."""
        return int(self.backend.sent)

    def close(self) -> None:
        """Close the backend (and the cache) on the loop they were used on."""
        self._worker.submit(runtime.run, self.backend.aclose()).result()
        self._worker.shutdown()

    def __enter__(self) -> ConstitutionReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the rewards ----------------------------------------------------------------------------

    async def rewards(self, prompts: Sequence[Any], completions: Sequence[Any],
                      step: int | None = None) -> list[float | None]:
        """One reward per completion (``prompts[i]`` is the prompt of ``completions[i]``)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        call = Call(Pool(self.backend, self.concurrency))
        msgs = [as_messages(p) for p in prompts]
        texts = [as_text(c) for c in completions]
        out: list[float | None] = [None] * len(texts)
        if self.mode == "direct":
            got = await asyncio.gather(*(self._direct(call, m, t) for m, t in zip(msgs, texts, strict=True)))
            out = [reward for reward, _ in got]
            records = [{"step": step, "mode": "direct", "prompt": m, "completion": t, **rec}
                       for m, t, (_, rec) in zip(msgs, texts, got, strict=True)]
        else:
            groups: dict[str, list[int]] = {}
            for i, m in enumerate(msgs):
                groups.setdefault(json.dumps(m, sort_keys=True), []).append(i)
            results = await asyncio.gather(*(self._group(call, msgs[ix[0]], [texts[i] for i in ix])
                                             for ix in groups.values()))
            records = []
            for ix, (rewards, rec) in zip(groups.values(), results, strict=True):
                for i, r in zip(ix, rewards, strict=True):
                    out[i] = r
                records.append({"step": step, "mode": "group", "prompt": msgs[ix[0]], "indices": ix,
                                "completions": [texts[i] for i in ix], "rewards": rewards, **rec})
        self._save(records)
        return out

    async def _group(self, call: Call, prompt: list[Message], texts: list[str]) -> tuple[list[float | None],
                                                                                          dict[str, Any]]:
        if len(texts) < 2:
            return [None] * len(texts), {"win_rates": [None] * len(texts), "matches": [], "provenance": self.provenance}
        ranking = await round_robin(len(texts), PairJudge(self.stage, call, prompt, texts))
        wins = ranking.scores
        known = [w for w in wins if w is not None]
        centre = 0.0 if self.raw or not known else math.fsum(sorted(known)) / len(known)
        rewards = [None if w is None else w - centre for w in wins]
        return rewards, {"win_rates": wins, "matches": [m.to_dict() for m in ranking.matches],
                         "provenance": self.provenance}

    async def _direct(self, call: Call, prompt: list[Message], text: str) -> tuple[float | None, dict[str, Any]]:
        key = "d-" + short_id(["direct", prompt, text])
        sampling = Sampling(max_tokens=1, temperature=0.0, seed=self.cfg.seed, logprobs=self.cfg.top_logprobs)
        principles = self.constitution.draw(key, self.cfg.principles, seed=self.cfg.seed, salt=SCORE_SALT)
        reqs = [Request(tuple(self.templates.messages("score", conversation=prompt, response=text, principle=p)),
                        sampling) for p in principles]
        done = await call.many(reqs)
        judgements: list[dict[str, Any]] = []
        for p, c in zip(principles, done, strict=True):
            j: dict[str, Any] = {"principle_id": p.id}
            got = (f"backend error: {c.error}" if c.error
                   else expected_score(c.logprobs[0] if c.logprobs else None))
            if isinstance(got, str):
                j["abstain"] = got
            elif got[1] < self.cfg.min_mass:
                j.update(mass=round(got[1], 6), abstain=f"score mass {got[1]:.3g} below min_mass {self.cfg.min_mass}")
            else:
                j.update(expected=got[0], mass=round(got[1], 6), abstain=None)
            judgements.append(j)
        scores = [j["expected"] for j in judgements if j.get("abstain") is None]
        expected = sum(scores) / len(scores) if scores else None
        reward = (expected - 1.0) / 9.0 if expected is not None and math.isfinite(expected) else None
        return reward, {"id": key, "reward": reward, "expected_score": expected, "judgements": judgements,
                        "provenance": self.provenance}

    def _save(self, records: list[dict[str, Any]]) -> None:
        if self.record is None or not records:
            return
        with self._write:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with self.record.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
