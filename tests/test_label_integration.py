"""The judge on real models: the embedded SmolLM2 and a real vLLM (CPU) server. Kept small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.backends import make_backend
from cai.backends.base import Backend, BackendBase, Completion, Request, Sampling
from cai.cli import main
from cai.constitution import load_constitution
from cai.eval.naive import NaiveConfig, naive_chunk
from cai.inputs import PromptRow
from cai.runtime import closing
from cai.stages.judge import JudgeConfig, judge_chunk
from cai.stages.pairs import Pair, SampleConfig, read_pairs, sample_pairs
from cai.templates import Templates

pytestmark = pytest.mark.integration

CONST = load_constitution()
TPL = Templates()


class Recording(BackendBase):
    """Wraps a backend and keeps every completion, to look at the raw top log-probs."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.model_id = inner, inner.model_id
        self.done: list[tuple[Request, Completion]] = []

    async def generate(self, request: Request) -> Completion:
        out = await self.inner.generate(request)
        self.done.append((request, out))
        return out


def dev_pairs(hh_dev: Path, n: int) -> list[Pair]:
    return list(read_pairs(hh_dev, limit=n))


def check_logprob_rows(rec: Recording, outcomes: list, n_judgements: int) -> None:
    for _, c in rec.done:
        assert c.error is None and c.logprobs and len(c.logprobs) == 1
        top = c.logprobs[0]
        # After "The answer is: (" the option is the bare letter, with no leading space.
        assert max(top, key=lambda t: top[t]) in ("A", "B"), top
        assert "A" in top and "B" in top
    for o in outcomes:
        assert o.row is not None, o.reason
        assert len(o.row["judgements"]) == n_judgements and o.row["abstentions"] == 0
        assert 0.0 < o.row["p_a"] < 1.0 and isinstance(o.row["position_consistent"], bool)
        assert all(j["mass"] > 0.5 for j in o.row["judgements"])


# --- embedded ------------------------------------------------------------------------------


def test_embedded_logprob_judge(embedded, hh_dev: Path) -> None:
    rec = Recording(embedded)
    out = judge_chunk(dev_pairs(hh_dev, 2), rec, CONST, TPL, JudgeConfig(principles=2))
    assert len(rec.done) == 8
    check_logprob_rows(rec, out, 4)
    assert out[0].row["provenance"]["model"].endswith("@embedded")


def test_embedded_cot_choice_and_naive(embedded, hh_dev: Path) -> None:
    pairs = dev_pairs(hh_dev, 1)
    cot = JudgeConfig(mode="cot", principles=1, cot=Sampling(max_tokens=12, stop=("Therefore",)))
    (o,) = judge_chunk(pairs, embedded, CONST, TPL, cot)
    assert o.row is not None, o.reason
    assert all(j["reasoning"] and 0.4 <= j["p_a"] <= 0.6 for j in o.row["judgements"])
    (c,) = judge_chunk(pairs, embedded, CONST, TPL, JudgeConfig(mode="choice", principles=1))
    assert c.row["label_mode"] == "choice"
    assert {j["p_a"] for j in c.row["judgements"]} <= {0.0, 1.0}
    (n,) = naive_chunk(
        pairs, embedded, CONST, TPL, NaiveConfig(principles=1, sampling=Sampling(max_tokens=6))
    )
    assert n.row is not None or n.reason.startswith("all judgements abstained")


def test_embedded_sampled_pairs_are_judged(embedded) -> None:
    rows = [PromptRow(id="p", prompt=[{"role": "user", "content": "Name a fruit."}])]
    cfg = SampleConfig(n=2, sampling=Sampling(max_tokens=12, temperature=1.0))
    (pair,) = sample_pairs(rows, embedded, cfg)
    assert pair.error is None and pair.response_a and pair.response_b
    assert sample_pairs(rows, embedded, cfg) == [pair]  # seeded: the same answers again
    (o,) = judge_chunk([pair], embedded, CONST, TPL, JudgeConfig(principles=1))
    if pair.response_a != pair.response_b:
        assert o.row is not None and o.row["origin"] == "sampled"


def test_cli_label_on_the_embedded_model(model_dir: Path, hh_dev: Path, tmp_path: Path) -> None:
    src = tmp_path / "two.jsonl"
    src.write_text("".join(hh_dev.read_text().splitlines(keepends=True)[:2]))
    out = tmp_path / "preferences.jsonl"
    args = ["label", str(src), "-o", str(out), "--backend", "embedded", "--model", str(model_dir),
            "-k", "1", "--keep-ties", "--no-progress"]
    assert main(args) == 0
    prefs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(prefs) == 2 and all(len(p["judgements"]) == 2 for p in prefs)
    assert all(p["chosen"][0]["role"] == "assistant" for p in prefs)


# --- real vLLM server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(vllm_server: str):
    with closing(make_backend("openai", base_url=vllm_server, model="smollm2")) as be:
        yield be


def test_vllm_logprob_judge_matches_embedded(served, embedded, hh_dev: Path) -> None:
    pairs = dev_pairs(hh_dev, 2)
    rec = Recording(served)
    cfg = JudgeConfig(principles=2)
    out = judge_chunk(pairs, rec, CONST, TPL, cfg)
    check_logprob_rows(rec, out, 4)
    local = judge_chunk(pairs, embedded, CONST, TPL, cfg)
    for o, e in zip(out, local, strict=True):
        for j, k in zip(o.row["judgements"], e.row["judgements"], strict=True):
            assert (j["principle_id"], j["order"]) == (k["principle_id"], k["order"])
            assert j["p_a"] == pytest.approx(k["p_a"], abs=0.03)


def test_vllm_choice_and_cot(served, hh_dev: Path) -> None:
    pairs = dev_pairs(hh_dev, 1)
    (c,) = judge_chunk(pairs, served, CONST, TPL, JudgeConfig(mode="choice", principles=1))
    assert c.row is not None, c.reason
    assert {j["p_a"] for j in c.row["judgements"]} <= {0.0, 1.0}
    cot = JudgeConfig(mode="cot", principles=1, cot=Sampling(max_tokens=12, stop=("Therefore",)))
    (o,) = judge_chunk(pairs, served, CONST, TPL, cot)
    assert o.row is not None, o.reason
    assert all(0.4 <= j["p_a"] <= 0.6 for j in o.row["judgements"])
