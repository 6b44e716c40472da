"""The AI judge: preference labels from the log-probs of the option tokens.

For each pair, ``k`` principles are drawn (salt "judge"). For each principle and each order
(A/B as given, then swapped) the judge prompt ends with "The answer is: (" and ONE token is
generated with the top log-probs: the label is P(A) / (P(A) + P(B)), no text is parsed.
"A" and " A" (and tokenizer space markers) count as the same option; case matters. When
neither option is in the top list the judgement abstains, with its reason.
The pair's soft label ``p_a`` is the mean over principles of the mean over orders, leaving out
abstentions; when every judgement abstains the pair is a failure, not a tie.

Modes: ``logprobs`` (the default), ``cot`` (the judge reasons first, then the option
probabilities are read after "Therefore, the answer is: (" and clamped, as in the CAI paper),
and ``choice`` (structured output, for servers without log-probs: a hard 0/1 label).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..backends.base import Backend, Completion, Request, Sampling
from ..config import LabelSettings
from ..constitution import Constitution, Principle
from ..templates import JUDGE_STAGES, Templates
from .pairs import Pair
from .provenance import StageConfig, stage_provenance
from .runner import Call, Outcome, run_rows, stage_fingerprint

DRAW_SALT = "judge"
MODES = ("logprobs", "cot", "choice")
OPTIONS = ("A", "B")
ORDERS = ("ab", "ba")
_SPACE_MARKS = (" ", "\u2581", "\u0120", "\t")  # plain space, sentencepiece, byte-level BPE
_SPACES = "".join(_SPACE_MARKS)


_TREE = LabelSettings.model_validate({})  # the defaults are the settings tree's (label.*)


@dataclass(frozen=True)
class JudgeConfig(StageConfig):
    """The judge as it runs, derived from ``LabelSettings`` (``of``)."""

    mode: str = _TREE.mode
    principles: int = _TREE.principles  # k principles per pair; the soft label is their mean
    both_orders: bool = _TREE.both_orders  # judge (A, B) and (B, A) and average: position-bias control
    seed: int = 0
    top_logprobs: int = _TREE.top_logprobs
    min_mass: float = _TREE.min_mass  # abstain when P(A) + P(B) (unnormalised) is below this
    clamp: tuple[float, float] | None = (_TREE.clamp[0], _TREE.clamp[1]) if _TREE.clamp else None  # CoT mode only
    tie_threshold: float = _TREE.tie_threshold  # |p - 0.5| below this is a tie
    fallback: bool = _TREE.fallback  # a logprobs answer without log-probs is asked again as a choice
    cot: Sampling = Sampling(max_tokens=_TREE.cot_max_tokens, stop=("Therefore",))

    @classmethod
    def of(cls, s: LabelSettings, seed: int = 0) -> JudgeConfig:
        return cls(mode=s.mode, principles=s.principles, both_orders=s.both_orders, seed=seed,
                   top_logprobs=s.top_logprobs, min_mass=s.min_mass,
                   clamp=(s.clamp[0], s.clamp[1]) if s.clamp else None, tie_threshold=s.tie_threshold,
                   fallback=s.fallback, cot=Sampling(max_tokens=s.cot_max_tokens, seed=seed, stop=("Therefore",)))

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown judge mode {self.mode!r} (one of {', '.join(MODES)})")

    def answer_sampling(self) -> Sampling:
        return Sampling(max_tokens=1, temperature=0.0, seed=self.seed, logprobs=self.top_logprobs)

    def choice_sampling(self) -> Sampling:
        return Sampling(max_tokens=1, temperature=0.0, seed=self.seed, choices=OPTIONS)


def option_probs(top: dict[str, float] | None, options: Sequence[str] = OPTIONS) -> tuple[list[float], float] | str:
    """Normalised option probabilities and their raw mass, or the reason to abstain.

    Each option's probability sums every token in the top list that is the option with or
    without a leading space (or space marker); case-sensitive: "a" is not "A".
    """
    if not top:
        return "no log-probs returned"
    mass = [0.0] * len(options)
    for tok, lp in top.items():
        bare = tok.lstrip(_SPACES)
        if bare in options and (bare == tok or tok[0] in _SPACE_MARKS):
            mass[options.index(bare)] += math.exp(lp)
    total = sum(mass)
    if total <= 0:
        best = sorted(top, key=lambda t: -top[t])[:5]
        return f"no option token in the top {len(top)} (top: {', '.join(map(repr, best))})"
    return [m / total for m in mass], total


def principles_for(pair_id: str, constitution: Constitution, cfg: JudgeConfig) -> list[Principle]:
    return constitution.draw(pair_id, cfg.principles, seed=cfg.seed, salt=DRAW_SALT)


def fingerprint(backend: Backend, constitution: Constitution, templates: Templates, cfg: JudgeConfig) -> str:
    return stage_fingerprint("label", backend, constitution, templates, JUDGE_STAGES, cfg.to_dict())


# One (principle, order) judgement of a pair: its template context, and its result to fill in.
_Job = tuple[dict[str, Any], dict[str, Any]]


def _read(res: dict[str, Any], c: Completion, mode: str, clamp: tuple[float, float] | None, min_mass: float) -> None:
    """Fill a judgement's result ``res`` from an answer completion (p_a, p_b are for the pair's own a/b)."""
    res["mode"] = mode
    if mode == "choice":
        letter = c.text.strip()
        if letter not in OPTIONS:
            res["abstain"] = f"choice answer {c.text!r} is not an option"
            return
        probs, mass = [1.0, 0.0] if letter == "A" else [0.0, 1.0], 1.0
    else:
        got = option_probs(c.logprobs[0] if c.logprobs else None)
        if isinstance(got, str):
            res["abstain"] = got
            return
        probs, mass = got
        res["mass"] = round(mass, 6)
        if mass < min_mass:
            res["abstain"] = f"option mass {mass:.3g} below min_mass {min_mass}"
            return
    p_first = probs[0]
    if mode == "cot" and clamp is not None:
        res["raw_p_first"] = p_first
        p_first = min(max(p_first, clamp[0]), clamp[1])
    p_a = p_first if res["order"] == "ab" else 1.0 - p_first
    res.update(p_a=p_a, p_b=1.0 - p_a, abstain=None)


@dataclass
class JudgeStage:
    """Judge one pair: ``k`` principles x both orders, all sent at once; in CoT mode each
    judgement reasons first, then its answer is read. A judgement that fails fails the pair
    (its first failure, in judgement order, is the reason); a pair whose every judgement
    abstains is a failure too, never a tie."""

    constitution: Constitution
    templates: Templates
    cfg: JudgeConfig
    model_id: str

    def __post_init__(self) -> None:
        self.provenance = stage_provenance("label", self.model_id, self.constitution, self.templates, JUDGE_STAGES,
                                           judge=self.cfg.to_dict())

    def jobs(self, pair: Pair) -> list[_Job]:
        out = []
        for p in principles_for(pair.id, self.constitution, self.cfg):
            for order in ORDERS if self.cfg.both_orders else ORDERS[:1]:
                a, b = (pair.response_a, pair.response_b) if order == "ab" else (pair.response_b, pair.response_a)
                out.append(({"conversation": pair.prompt, "response_a": a, "response_b": b, "principle": p},
                            {"principle_id": p.id, "order": order}))
        return out

    async def __call__(self, pair: Pair, call: Call) -> list[Outcome]:
        cfg = self.cfg
        tokens = 0

        def failure(reason: str, **more: Any) -> list[Outcome]:
            return [Outcome(pair.id, reason=reason, tokens=tokens,
                            info={"source": pair.source, "origin": pair.origin, **more})]

        async def ask(todo: list[_Job], stage: str, sampling: Sampling, step: str = "judge") -> list[Completion]:
            nonlocal tokens
            done = await call.many([Request(tuple(self.templates.messages(stage, **ctx)), sampling, step=step)
                                    for ctx, _ in todo])
            tokens += sum(c.prompt_tokens + c.completion_tokens for c in done)
            return done

        def error(what: str, done: list[Completion]) -> str | None:
            return next((f"{what}: backend error: {c.error}" for c in done if c.error), None)

        if pair.error:
            return failure(pair.error)
        if pair.response_a.strip() == pair.response_b.strip():
            return failure("identical responses: nothing to judge")
        jobs = self.jobs(pair)
        if cfg.mode == "cot":
            done = await ask(jobs, "judge_cot", cfg.cot, "judge_reasoning")
            if why := error("judge reasoning", done):
                return failure(why)
            for (ctx, res), c in zip(jobs, done, strict=True):
                ctx["reasoning"] = res["reasoning"] = c.text.strip()
        stage = "judge_cot_answer" if cfg.mode == "cot" else "judge"
        done = await ask(jobs, stage, cfg.choice_sampling() if cfg.mode == "choice" else cfg.answer_sampling())
        if why := error("judge answer", done):
            return failure(why)
        again: list[_Job] = []
        for job, c in zip(jobs, done, strict=True):
            if cfg.mode != "choice" and cfg.fallback and c.logprobs is None:
                again.append(job)  # this server gave no log-probs: ask for a structured choice
            else:
                _read(job[1], c, cfg.mode, cfg.clamp, cfg.min_mass)
        if again:
            done = await ask(again, stage, cfg.choice_sampling())
            if why := error("judge choice fallback", done):
                return failure(why)
            for (_, res), c in zip(again, done, strict=True):
                _read(res, c, "choice", cfg.clamp, cfg.min_mass)
        row = aggregate(pair, [res for _, res in jobs], cfg)
        if row["p_a"] is None:
            reasons = sorted({str(j.get("abstain")) for j in row["judgements"]})
            return failure("all judgements abstained: " + "; ".join(reasons), judgements=row["judgements"])
        row["provenance"] = self.provenance
        return [Outcome(pair.id, row=row, tokens=tokens)]


def judge_chunk(pairs: Sequence[Pair], backend: Backend, constitution: Constitution, templates: Templates,
                cfg: JudgeConfig) -> list[Outcome]:
    """Judge ``pairs`` (no output file): one ``Outcome`` per pair, in order."""
    return run_rows(pairs, JudgeStage(constitution, templates, cfg, backend.model_id), backend)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate(pair: Pair, judgements: list[dict[str, Any]], cfg: JudgeConfig) -> dict[str, Any]:
    """The label row of a pair from its judgements (``p_a`` None when all abstained)."""
    per_p: dict[str, dict[str, float]] = {}
    for j in judgements:
        if j.get("abstain") is None and "p_a" in j:
            per_p.setdefault(j["principle_id"], {})[j["order"]] = j["p_a"]
    p_a = _mean([_mean(list(v.values())) for v in per_p.values()])  # type: ignore[misc]
    ab, ba = (_mean([v[o] for v in per_p.values() if o in v]) for o in ORDERS)
    consistent = (ab - 0.5) * (ba - 0.5) > 0 if cfg.both_orders and ab is not None and ba is not None else None
    both = [v for v in per_p.values() if len(v) == 2]
    agree = _mean([float((v["ab"] - 0.5) * (v["ba"] - 0.5) > 0) for v in both])
    modes = sorted({j["mode"] for j in judgements if "mode" in j})
    tie = p_a is not None and (abs(p_a - 0.5) < cfg.tie_threshold or p_a == 0.5)
    return {
        "id": pair.id,
        "prompt": pair.prompt,
        "response_a": pair.response_a,
        "response_b": pair.response_b,
        "p_a": p_a,
        "p_b": None if p_a is None else 1.0 - p_a,
        "label": None if p_a is None else "tie" if tie else "a" if p_a > 0.5 else "b",
        "tie": tie,
        "principle_ids": list(dict.fromkeys(j["principle_id"] for j in judgements)),
        "judgements": judgements,
        "abstentions": sum(1 for j in judgements if j.get("abstain")),
        "position_consistent": consistent,
        "position_agreement": agree,
        "label_mode": modes[0] if len(modes) == 1 else "mixed" if modes else cfg.mode,
        "human": pair.human,
        "origin": pair.origin,
        "source": pair.source,
        "gates": list(pair.flags),
    }
