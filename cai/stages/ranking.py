"""Ranking several responses to one prompt with the pairwise judge (best-of-n, GRPO groups).

A *match* between responses ``i`` and ``j`` is one judged pair (``JudgeStage``: k principles,
both orders) and gives ``p(i beats j)``, or None when the judge could not decide (every
judgement abstained, a backend error). The pair is built in a canonical order (the two texts
sorted by their hash, the pair id from the prompt and both texts), so a match asks the same
requests whichever of the two comes first: the order of the responses never changes a result,
and a repeated match is a cache hit.

- ``round_robin``: every unordered pair once, ``n (n - 1) / 2`` matches; a response's score is
  its soft win rate (the mean of its ``p(beats)`` over its decided matches). For ``n <= 8``.
- ``knockout``: a single-elimination bracket for the best and a loser's bracket for the worst
  (first round shared): about ``1.5 n`` matches instead of ``n^2 / 2``. For larger ``n``.
- ``rank``: round robin up to ``ROUND_ROBIN_MAX`` responses, knockout above; the best and worst
  (West-of-N: best-vs-worst makes the preference pair).

Identical responses (after stripping) tie at 0.5 with no call.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..hashing import short_id
from ..types import Message
from .judge import JudgeStage
from .pairs import Pair
from .runner import Call

ROUND_ROBIN_MAX = 8
TIE = 0.5

# p(i beats j) for responses i and j (None: undecided), and the judge's row when one was judged
MatchFn = Callable[[int, int], Awaitable["Match"]]


@dataclass(frozen=True)
class Match:
    i: int
    j: int
    p_i: float | None  # p(i beats j); None when the judge could not decide
    p_j: float | None  # p(j beats i): 1 - p_i, computed once from the canonical pair (bit for bit the same)
    row: dict[str, Any] | None = None  # the judge's label row (None for identical responses)
    reason: str | None = None  # why undecided

    def to_dict(self) -> dict[str, Any]:
        return {"i": self.i, "j": self.j, "p_i": self.p_i, "p_j": self.p_j, "reason": self.reason, "label": self.row}


@dataclass
class Ranking:
    """The outcome of ranking ``n`` responses: ``scores[i]`` is response i's soft win rate over
    its decided matches (None: none decided), ``best``/``worst`` their indices (None when no match
    was decided), ``matches`` every match played."""

    n: int
    scores: list[float | None]
    best: int | None
    worst: int | None
    method: str
    matches: list[Match] = field(default_factory=list)

    @property
    def margin(self) -> float | None:
        """Score of the best minus score of the worst (0 when every response tied)."""
        if self.best is None or self.worst is None:
            return None
        b, w = self.scores[self.best], self.scores[self.worst]
        return None if b is None or w is None else b - w

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "method": self.method, "scores": self.scores, "best": self.best,
                "worst": self.worst, "matches": [m.to_dict() for m in self.matches]}


def pair_for(prompt: Sequence[Message], x: str, y: str) -> tuple[Pair, bool]:
    """The canonical judged pair of responses ``x`` and ``y`` to ``prompt``, and whether ``x`` is
    its response A: the same pair (id, A and B) for (x, y) and (y, x)."""
    hx, hy = short_id(["response", x]), short_id(["response", y])
    x_first = (hx, x) <= (hy, y)
    a, b = (x, y) if x_first else (y, x)
    pid = "m-" + short_id(["match", list(prompt), a, b])
    return Pair(pid, list(prompt), a, b, origin="ranking"), x_first


class PairJudge:
    """Matches between responses to one prompt, judged by ``stage`` through ``call``; a match
    already played in this judge (either order) is not asked again."""

    def __init__(self, stage: JudgeStage, call: Call, prompt: Sequence[Message], responses: Sequence[str]) -> None:
        self.stage, self.call, self.prompt, self.responses = stage, call, list(prompt), list(responses)
        self._played: dict[tuple[int, int], asyncio.Future[Match]] = {}

    async def __call__(self, i: int, j: int) -> Match:
        key = (min(i, j), max(i, j))
        fut = self._played.get(key)
        if fut is None:
            fut = self._played[key] = asyncio.ensure_future(self._play(*key))
        m = await asyncio.shield(fut)
        return m if m.i == i else Match(i, j, m.p_j, m.p_i, m.row, m.reason)

    async def _play(self, i: int, j: int) -> Match:
        x, y = self.responses[i], self.responses[j]
        if x.strip() == y.strip():
            return Match(i, j, TIE, TIE)
        pair, x_first = pair_for(self.prompt, x, y)
        out = (await self.stage(pair, self.call))[0]
        if out.row is None:
            return Match(i, j, None, None, None, out.reason)
        p_a, p_b = float(out.row["p_a"]), float(out.row["p_b"])
        return Match(i, j, *((p_a, p_b) if x_first else (p_b, p_a)), out.row)


def _scores(n: int, matches: Sequence[Match]) -> list[float | None]:
    won: list[list[float]] = [[] for _ in range(n)]
    for m in matches:
        if m.p_i is not None and m.p_j is not None:
            won[m.i].append(m.p_i)
            won[m.j].append(m.p_j)
    return [math.fsum(sorted(w)) / len(w) if w else None for w in won]  # summed in one order: any order of play


def _extremes(scores: Sequence[float | None]) -> tuple[int | None, int | None]:
    """The best (highest score, first on ties) and worst (lowest, last on ties) indices."""
    known = [(s, -i) for i, s in enumerate(scores) if s is not None]
    return (-max(known)[1], -min(known)[1]) if known else (None, None)


async def round_robin(n: int, match: MatchFn) -> Ranking:
    """Every unordered pair of the ``n`` responses, all at once."""
    matches = list(await asyncio.gather(*(match(i, j) for i, j in itertools.combinations(range(n), 2))))
    scores = _scores(n, matches)
    return Ranking(n, scores, *_extremes(scores), "round_robin", matches)


async def _bracket(entrants: list[int], match: MatchFn, keep_winner: bool, played: list[Match]) -> int | None:
    """The last one standing when each match's winner (or loser) advances; an odd one out gets
    a bye; an undecided or tied match sends on the lower index (winners) or the higher (losers)."""
    while len(entrants) > 1:
        pairs = list(zip(entrants[::2], entrants[1::2], strict=False))
        results = await asyncio.gather(*(match(i, j) for i, j in pairs))
        played.extend(results)
        nxt = []
        for (i, j), m in zip(pairs, results, strict=True):
            if m.p_i is None or m.p_i == TIE:  # the winners' side keeps the lower index, the losers' the higher
                nxt.append(min(i, j) if keep_winner else max(i, j))
            else:
                nxt.append(i if (m.p_i > TIE) == keep_winner else j)
        entrants = nxt + ([entrants[-1]] if len(entrants) % 2 else [])
    return entrants[0] if entrants else None


async def knockout(n: int, match: MatchFn) -> Ranking:
    """A winner's bracket for the best and a loser's bracket for the worst, run side by side
    (their first round is the same matches: each is judged once)."""
    played: list[Match] = []
    best, worst = await asyncio.gather(_bracket(list(range(n)), match, True, played),
                                       _bracket(list(range(n)), match, False, played))
    unique = list({(m.i, m.j): m for m in played}.values())
    if not any(m.p_i is not None for m in unique):
        best = worst = None
    return Ranking(n, _scores(n, unique), best, worst, "knockout", unique)


async def rank(n: int, match: MatchFn, round_robin_max: int = ROUND_ROBIN_MAX) -> Ranking:
    """Round robin for ``n <= round_robin_max``, knockout above."""
    return await (round_robin(n, match) if n <= round_robin_max else knockout(n, match))
