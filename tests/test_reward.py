"""ConstitutionReward (cai.trl) and the ranking core (cai.stages.ranking) on a scripted judge.

The fake judge knows a quality per response text; asked "A or B?" it answers with
P(A) = sigmoid(q(A) - q(B)) (so both orders agree and a pair's soft label is exactly that), and
asked for a 1-10 score it puts its mass on two score tokens. The expected rewards are computed
here from the qualities alone, not through cai's code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from pathlib import Path

import pytest

from cai.backends.fake import FakeBackend
from cai.constitution import load_constitution
from cai.stages.judge import JudgeConfig, JudgeStage
from cai.stages.ranking import PairJudge, knockout, pair_for, rank, round_robin
from cai.stages.runner import Call, Pool
from cai.templates import Templates
from cai.trl import ConstitutionReward, as_messages, as_text, expected_score
from cai.types import Completion, Message, Request
from tests.scripted_judge import body, is_pairwise, judge_pair, quality, sigmoid, user_text


def score_of(text: str) -> int:
    return min(9, max(1, round(5 + quality(text))))


def respond(req: Request) -> Completion:
    if is_pairwise(req):
        return judge_pair(req)
    s = score_of(body(user_text(req), "response"))  # 0.75 on s, 0.25 on s + 1
    return Completion([str(s)], logprobs=[{str(s): math.log(0.75), f" {s + 1}": math.log(0.25), "x": -1.0}])


def expected_group(texts: list[str], raw: bool = False) -> list[float]:
    win = [sum(0.5 if texts[i].strip() == texts[j].strip() else sigmoid(quality(texts[i]) - quality(texts[j]))
               for j in range(len(texts)) if j != i) / (len(texts) - 1) for i in range(len(texts))]
    mean = 0.0 if raw else sum(win) / len(win)
    return [w - mean for w in win]


def expected_direct(text: str) -> float:
    s = score_of(text)
    return (0.75 * s + 0.25 * (s + 1) - 1) / 9


TEXTS = ["q=2 kind and clear", "q=0.5 fine", "q=-1 rude", "q=1 helpful"]


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend(respond)


def test_group_rewards_are_centred_soft_win_rates(fake: FakeBackend, tmp_path: Path) -> None:
    with ConstitutionReward(None, fake, cache=tmp_path / "c.sqlite") as r:
        got = asyncio.run(r(prompts=["Help me."] * 4, completions=TEXTS))
        assert got == pytest.approx(expected_group(TEXTS))
        assert None not in got and sum(x for x in got if x is not None) == pytest.approx(0.0)
        assert r.sent == 4 * 3 // 2 * 2 * r.cfg.principles  # pairs x orders x k
    with ConstitutionReward(None, FakeBackend(respond), raw=True) as r:
        raw = asyncio.run(r(["Help me."] * 4, TEXTS))
        assert raw == pytest.approx(expected_group(TEXTS, raw=True))
        assert sum(x for x in raw if x is not None) == pytest.approx(2.0)


def test_order_within_a_group_changes_no_reward(fake: FakeBackend) -> None:
    with ConstitutionReward(None, fake) as r:
        base = dict(zip(TEXTS, asyncio.run(r(["Help me."] * 4, TEXTS)), strict=True))
        for perm in itertools.islice(itertools.permutations(TEXTS), 1, None, 5):
            got = asyncio.run(r(["Help me."] * 4, list(perm)))
            assert dict(zip(perm, got, strict=True)) == base  # exactly: the same requests, read the same way


def test_a_repeated_step_sends_no_call(tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite"
    prompts, comps = ["a"] * 3 + ["b"] * 3, TEXTS[:3] + TEXTS[1:]
    with ConstitutionReward(None, FakeBackend(respond), cache=cache) as r:
        first = asyncio.run(r(prompts, comps))
        sent = r.sent
        assert sent == 2 * 3 * 2 * r.cfg.principles
        assert asyncio.run(r(prompts, comps)) == first and r.sent == sent
    fresh = FakeBackend(respond)  # a new process: the cache file answers every call
    with ConstitutionReward(None, fresh, cache=cache) as r:
        assert asyncio.run(r(prompts, comps)) == first and r.sent == 0 and fresh.calls == []


def test_groups_are_the_completions_of_one_prompt_wherever_they_are(fake: FakeBackend) -> None:
    """Online DPO passes 2 * prompts: a prompt's completions are not next to each other."""
    with ConstitutionReward(None, fake) as r:
        got = r.as_sync()(["p1", "p2", "p1", "p2"], [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3]])
    e1, e2 = expected_group([TEXTS[0], TEXTS[2]]), expected_group([TEXTS[1], TEXTS[3]])
    assert got == pytest.approx([e1[0], e2[0], e1[1], e2[1]])


def test_conversational_and_plain_give_the_same_rewards(fake: FakeBackend) -> None:
    conv_p = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Help me."}]] * 4
    conv_c = [[{"role": "assistant", "content": t}] for t in TEXTS]
    with ConstitutionReward(None, fake, mode="direct") as r:
        plain = r.as_sync()(["Help me."] * 4, TEXTS)
        conv = r.as_sync()(conv_p, conv_c)
    assert plain == pytest.approx([expected_direct(t) for t in TEXTS]) == conv
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    parts = [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]
    assert as_text([{"role": "assistant", "content": parts}]) == "xy"


def test_direct_mode_is_the_expected_score_one_call_per_completion_and_principle(fake: FakeBackend) -> None:
    with ConstitutionReward(None, fake, mode="direct", judge=JudgeConfig(principles=1)) as r:
        got = asyncio.run(r(["Help me."] * 4, TEXTS))
        assert got == pytest.approx([expected_direct(t) for t in TEXTS]) and r.sent == 4
    assert expected_score({"\u258110": 0.0}) == (10.0, 1.0)
    with pytest.raises(ValueError, match="log-probs"):
        ConstitutionReward(None, fake, mode="direct", judge=JudgeConfig(mode="choice"))
    assert isinstance(expected_score({"A": 0.0}), str)


def test_unjudgeable_completions_get_none(tmp_path: Path) -> None:
    broken = FakeBackend(respond, fail=lambda req: "q=-1" in req.messages[-2]["content"])
    with ConstitutionReward(None, broken, mode="direct", record=tmp_path / "r.jsonl") as r:
        got = asyncio.run(r(["x"] * 3, TEXTS[:3]))
    assert got[2] is None and got[0] == pytest.approx(expected_direct(TEXTS[0]))
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [row["reward"] for row in rows] == got
    assert all("backend error" in j["abstain"] for j in rows[2]["judgements"])
    with ConstitutionReward(None, FakeBackend(respond)) as r:  # a group of one: nobody to beat
        assert asyncio.run(r(["alone", "pair", "pair"], TEXTS[:3]))[0] is None
    with ConstitutionReward(None, FakeBackend(respond, fail=lambda req: True)) as r:  # every match failed
        assert asyncio.run(r(["x"] * 3, TEXTS[:3])) == [None, None, None]


def test_record_holds_every_match(fake: FakeBackend, tmp_path: Path) -> None:
    rec = tmp_path / "rewards.jsonl"
    with ConstitutionReward(None, fake, record=rec) as r:
        got = asyncio.run(r(["a", "a", "a", "b", "b"], TEXTS[:3] + TEXTS[:2]))
    rows = [json.loads(line) for line in rec.read_text().splitlines()]
    assert [row["indices"] for row in rows] == [[0, 1, 2], [3, 4]]
    assert [len(row["matches"]) for row in rows] == [3, 1]
    assert rows[0]["rewards"] == got[:3] and rows[1]["prompt"] == [{"role": "user", "content": "b"}]
    m = rows[1]["matches"][0]
    assert m["p_i"] == pytest.approx(sigmoid(quality(TEXTS[0]) - quality(TEXTS[1])))
    assert len(m["label"]["judgements"]) == 2 * r.cfg.principles
    assert rows[0]["provenance"]["stage"] == "reward/group" and rows[0]["provenance"]["model"] == "fake"


def test_cai_report_shows_a_training_runs_rewards_by_step(fake: FakeBackend, tmp_path: Path) -> None:
    """record=DIR/rewards.jsonl, then `cai report DIR`: report.json's rewards and a table on the page
    hold what the trainer got, per step (a direct-mode step and a group-mode step here)."""
    from cai.analysis import build_report
    from cai.cli import main

    rec = tmp_path / "rewards.jsonl"
    with ConstitutionReward(None, fake, record=rec) as r:
        g1 = asyncio.run(r(["a", "a", "a", "b", "b"], TEXTS[:3] + TEXTS[:2], trainer_state=None))
    with ConstitutionReward(None, fake, record=rec, mode="direct") as d:
        g2 = asyncio.run(d.rewards(["a", "b"], TEXTS[:2], step=7))
    rw = build_report(tmp_path)["rewards"]
    steps = {s["step"]: s for s in rw["by_step"]}
    assert rw["completions"] == 7 and rw["mode"] == "direct, group"
    for step, got in ((None, g1), (7, g2)):
        known = [x for x in got if x is not None]
        assert steps[step]["scored"] == len(known) and steps[step]["mean"] == pytest.approx(sum(known) / len(known))
        assert steps[step]["max"] == pytest.approx(max(known))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "Rewards by training step" in page and f"{max(g2):.3f}" in page


def test_the_callers_loop_runs_while_the_judge_works() -> None:
    slow = FakeBackend(respond, delay=0.3)

    async def trainer_loop() -> tuple[list[float | None], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(tick())
        start = time.monotonic()
        got = await r(["p"] * 2, TEXTS[:2])
        assert time.monotonic() - start >= 0.3
        t.cancel()
        return got, ticks

    with ConstitutionReward(None, slow, judge=JudgeConfig(principles=1)) as r:
        got, ticks = asyncio.run(trainer_loop())
    assert got == pytest.approx(expected_group(TEXTS[:2])) and ticks >= 10


# --- ranking -------------------------------------------------------------------------------------


def _judge(fake: FakeBackend, k: int = 1) -> JudgeStage:
    return JudgeStage(load_constitution(), Templates(), JudgeConfig(principles=k), fake.model_id)


async def _rank(texts: list[str], fn=rank, fake: FakeBackend | None = None):
    fake = fake or FakeBackend(respond)
    pj = PairJudge(_judge(fake), Call(Pool(fake, 64)), [{"role": "user", "content": "Q"}], texts)
    return await fn(len(texts), pj), fake


def test_round_robin_best_and_worst() -> None:
    texts = ["q=0 a", "q=2 b", "q=-3 c", "q=1 d", "q=1 d"]
    ranking, fake = asyncio.run(_rank(texts))
    assert ranking.method == "round_robin" and (ranking.best, ranking.worst) == (1, 2)
    assert ranking.scores[3] == ranking.scores[4]  # identical responses: a 0.5 tie, no call
    assert len(ranking.matches) == 10 and len(fake.calls) == 9 * 2  # 9 judged pairs x both orders
    assert ranking.margin is not None and ranking.margin > 0.5


def test_ranking_ignores_the_order_of_the_responses() -> None:
    texts = [f"q={q} r{q}" for q in (0.3, -1, 2.5, 0, 1.2, -0.4)]
    base, _ = asyncio.run(_rank(texts))
    for perm in [texts[::-1], texts[2:] + texts[:2]]:
        got, _ = asyncio.run(_rank(perm))
        assert perm[got.best] == texts[base.best] and perm[got.worst] == texts[base.worst]
        assert [got.scores[perm.index(t)] for t in texts] == base.scores


@pytest.mark.parametrize("n", [9, 12, 16])
def test_knockout_above_eight_finds_best_and_worst_with_fewer_matches(n: int) -> None:
    qs = [((i * 7) % n) - n / 2 for i in range(n)]
    texts = [f"q={q} r{i}" for i, q in enumerate(qs)]
    ranking, fake = asyncio.run(_rank(texts))
    assert ranking.method == "knockout"
    assert (ranking.best, ranking.worst) == (qs.index(max(qs)), qs.index(min(qs)))
    assert len(ranking.matches) <= 2 * (n - 1) - n // 2 < n * (n - 1) // 2
    assert len(fake.calls) == 2 * len(ranking.matches)


def test_a_pair_is_the_same_whichever_comes_first() -> None:
    p: list[Message] = [{"role": "user", "content": "Q"}]
    (a, x_first), (b, y_first) = pair_for(p, "one", "two"), pair_for(p, "two", "one")
    assert a == b and x_first != y_first


def test_knockout_and_round_robin_agree_on_two() -> None:
    rr, _ = asyncio.run(_rank(["q=1 x", "q=0 y"], round_robin))
    ko, _ = asyncio.run(_rank(["q=1 x", "q=0 y"], knockout))
    assert (rr.best, rr.worst) == (ko.best, ko.worst) == (0, 1) and rr.scores == ko.scores
    tie, _ = asyncio.run(_rank(["same", "same"], knockout))
    assert (tie.best, tie.worst) == (0, 1) and tie.margin == 0
