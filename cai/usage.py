"""Tokens the model servers served, by stage and step, and what they cost at the user's prices.

A ``Usage`` sums the served calls of a run (cache hits cost nothing and are not in it) by
(stage, step): the stage that asked (``revise``, ``label``, ``best_of_n``...) and what the call
was for (``answer``, ``critique``, ``revision``, ``judge``, ``sample``...; ``Request.step``).
run.json holds it as ``{"prompt_tokens", "completion_tokens", "cached_prompt_tokens",
"by_stage": {stage: the same three}, "by_step": {step: the same three}}``; ``add_up`` sums such
shapes (the runs of a folder's history). There is no price table: ``cost`` uses the prices the
user gives (USD per million tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .types import Completion, Request

FIELDS = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
OTHER = "other"  # the stage or step of a request that does not say


class Usage:
    """Served tokens by (stage, step): ``cells[(stage, step)] = [prompt, completion, cached]``."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], list[int]] = {}

    def add(self, stage: str | None, step: str | None, prompt: int, completion: int, cached: int) -> None:
        cell = self.cells.setdefault((stage or OTHER, step or OTHER), [0, 0, 0])
        cell[0] += prompt
        cell[1] += completion
        cell[2] += cached

    def served(self, request: Request, c: Completion) -> None:
        """Count one call the model served (failed ones too: a server may bill them)."""
        self.add(request.stage, request.step, c.prompt_tokens, c.completion_tokens, c.cached_prompt_tokens)

    def merge(self, other: Usage) -> Usage:
        for (stage, step), cell in other.cells.items():
            self.add(stage, step, *cell)
        return self

    def __bool__(self) -> bool:
        return any(any(c) for c in self.cells.values())

    def to_json(self) -> dict[str, Any]:
        """run.json's shape: the totals, ``by_stage`` and ``by_step`` (each sorted by name)."""
        shapes = []
        for (stage, step), cell in self.cells.items():
            n = dict(zip(FIELDS, cell, strict=True))
            shapes.append(n | {"by_stage": {stage: n}, "by_step": {step: n}})
        return add_up(shapes)


def add_up(usages: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The sum of run.json ``usage`` shapes (the runs of a folder; ``None`` for a run before cai
    counted tokens): totals, ``by_stage`` and ``by_step``."""
    out: dict[str, Any] = dict.fromkeys(FIELDS, 0) | {"by_stage": {}, "by_step": {}}
    for u in usages:
        if not isinstance(u, Mapping):
            continue
        for f in FIELDS:
            out[f] += _int(u.get(f))
        for by in ("by_stage", "by_step"):
            for key, d in (u.get(by) or {}).items():
                if isinstance(d, Mapping):
                    into = out[by].setdefault(key, dict.fromkeys(FIELDS, 0))
                    for f in FIELDS:
                        into[f] += _int(d.get(f))
    for by in ("by_stage", "by_step"):
        out[by] = dict(sorted(out[by].items()))
    return out


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def price(tokens: Mapping[str, Any], price_input: float, price_output: float) -> float:
    """USD for ``tokens`` (prompt tokens at ``price_input``, completion tokens at ``price_output``,
    both per million; cached prompt tokens are prompt tokens, at the input price)."""
    prompt, completion = _int(tokens.get("prompt_tokens")), _int(tokens.get("completion_tokens"))
    return (prompt * price_input + completion * price_output) / 1e6


def cost(usage: Mapping[str, Any], price_input: float | None, price_output: float | None,
         sft_rows: int, pairs: int) -> dict[str, Any] | None:
    """run.json's ``cost`` (None without prices): the total, by stage, per accepted SFT row (the
    revise stage's cost over the rows the gates kept) and per preference pair (the label
    stage's cost over the pairs written). A price not given counts as 0."""
    if price_input is None and price_output is None:
        return None
    pi, po = price_input or 0.0, price_output or 0.0
    by_stage = {k: round(price(v, pi, po), 6) for k, v in (usage.get("by_stage") or {}).items()}
    return {"currency": "USD", "price_input": pi, "price_output": po, "total": round(price(usage, pi, po), 6),
            "by_stage": by_stage,
            "per_sft_row": round(by_stage.get("revise", 0.0) / sft_rows, 8) if sft_rows else None,
            "per_preference_pair": round(by_stage.get("label", 0.0) / pairs, 8) if pairs else None}


def tokens_line(usage: Mapping[str, Any], cost_: Mapping[str, Any] | None = None) -> str:
    """The summary's line: ``45210 tokens in (12000 cached), 9870 out over every run of this folder;
    cost $0.0383 ($0.000640 per SFT row, $0.000320 per preference pair)``."""
    line = (f"{_int(usage.get('prompt_tokens'))} tokens in ({_int(usage.get('cached_prompt_tokens'))} cached), "
            f"{_int(usage.get('completion_tokens'))} out over every run of this folder")
    if cost_:
        per = [f"${cost_[k]:.6f} per {what}" for k, what in (("per_sft_row", "SFT row"),
                                                            ("per_preference_pair", "preference pair"))
               if cost_.get(k) is not None]
        line += f"; cost ${cost_['total']:.4f}" + (f" ({', '.join(per)})" if per else "")
    return line
