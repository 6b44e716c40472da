"""What ConstitutionReward costs per training step, in judge calls (fake backend: counts, no model).

    PYTHONPATH=. .venv/bin/python bench/bench_reward.py [--prompts 8]

For group sizes 4 and 8 and k = 1 and 4 principles, one reward call on ``--prompts`` prompts x G
distinct completions (a GRPO step's batch) is counted three ways: calls sent in ``group`` mode,
checked against prompts x G(G-1)/2 pairs x 2 orders x k (= prompts x G x (G-1) x k); the same
step again with the call cache (0 calls); and ``direct`` mode, checked against prompts x G x k.
Then the best-of-n ranking: judged matches (x 2 orders x k calls) of round robin and knockout
for n = 4 ... 32.

Measured (2026-12-05, shared 2-core box, ``--prompts 8``; ms: the fake judge, so cai's own
overhead per step, noisy on a shared box):

| G | k | group calls | prompts x G x (G-1) x k | cached rerun | direct calls | ms per step |
|---|---|---|---|---|---|---|
| 4 | 1 | 96 | 96 | 0 | 32 | 29 |
| 4 | 4 | 384 | 384 | 0 | 128 | 76 |
| 8 | 1 | 448 | 448 | 0 | 64 | 324 |
| 8 | 4 | 1792 | 1792 | 0 | 256 | 266 |

Issue 25 wrote the group cost as prompts x G x (G-1) x orders x k: that counts each unordered
pair twice; a pair is judged once in each order, so the count is half that (the table above).

Best-of-n, judged matches (x 2 orders x k calls): n=4: 6 round robin / 4 knockout; n=8: 28 / 10;
n=16: 120 / 22; n=32: 496 / 46.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from cai.backends.fake import FakeBackend
from cai.constitution import load_constitution
from cai.stages.judge import JudgeConfig, JudgeStage
from cai.stages.ranking import PairJudge, knockout, round_robin
from cai.stages.runner import Call, Pool
from cai.templates import Templates
from cai.trl import ConstitutionReward


def step(n_prompts: int, g: int) -> tuple[list[str], list[str]]:
    prompts = [f"Prompt number {p}: how should I answer a rude neighbour?" for p in range(n_prompts) for _ in range(g)]
    completions = [f"Answer {i % g} to prompt {i // g}, in {3 + i % g} words." for i in range(n_prompts * g)]
    return prompts, completions


def count_group(n_prompts: int, g: int, k: int, folder: Path) -> tuple[int, int, int, float]:
    prompts, completions = step(n_prompts, g)
    cache = folder / f"cache-{g}-{k}.sqlite"
    fake = FakeBackend()
    with ConstitutionReward(None, fake, cache=cache, judge=JudgeConfig(principles=k)) as reward:
        start = time.perf_counter()
        first = asyncio.run(reward(prompts, completions))
        ms = (time.perf_counter() - start) * 1000
        sent = reward.sent
        again = asyncio.run(reward(prompts, completions))
        assert again == first and None not in first
        rerun = reward.sent - sent
    with ConstitutionReward(None, FakeBackend(), mode="direct", judge=JudgeConfig(principles=k)) as direct:
        asyncio.run(direct(prompts, completions))
        direct_calls = direct.sent
    assert len(fake.calls) == sent
    return sent, rerun, direct_calls, ms


def count_ranking(n: int, k: int) -> tuple[int, int]:
    """Judged matches of round robin and of knockout for ``n`` distinct responses."""
    out = []
    for fn in (round_robin, knockout):
        fake = FakeBackend()
        stage = JudgeStage(load_constitution(), Templates(), JudgeConfig(principles=k), fake.model_id)

        async def go(fn=fn, fake=fake, stage=stage) -> int:
            texts = [f"response {i}: {'word ' * i}" for i in range(n)]
            ranking = await fn(n, PairJudge(stage, Call(Pool(fake, 256)), [{"role": "user", "content": "Q"}], texts))
            return len(ranking.matches)

        matches = asyncio.run(go())
        assert len(fake.calls) == matches * 2 * k
        out.append(matches)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    args = ap.parse_args()
    p = args.prompts
    print(f"ConstitutionReward judge calls per step, {p} prompts (fake backend)")
    print("| G | k | group calls | prompts x G x (G-1) x k | cached rerun | direct calls | ms per step |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for g in (4, 8):
            for k in (1, 4):
                sent, rerun, direct, ms = count_group(p, g, k, Path(tmp))
                formula = p * (g * (g - 1) // 2) * 2 * k
                assert sent == formula, (sent, formula)
                assert direct == p * g * k and rerun == 0
                print(f"| {g} | {k} | {sent} | {formula} | {rerun} | {direct} | {ms:.0f} |")
    print("\nbest-of-n ranking, judged matches (each is 2 orders x k calls)")
    print("| n | round robin | knockout |")
    print("|---|---|---|")
    for n in (4, 8, 16, 32):
        rr, ko = count_ranking(n, 1)
        assert rr == n * (n - 1) // 2
        print(f"| {n} | {rr} | {ko} |")


if __name__ == "__main__":
    main()
