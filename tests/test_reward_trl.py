"""ConstitutionReward inside TRL's trainers: one GRPOTrainer step and one OnlineDPOTrainer step on
SmolLM2-135M (CPU), the reward judged by the scripted fake judge of tests/test_reward.py. The
rewards the trainers log are checked against the ones computed from the scripted qualities of
the completions the model wrote; a second, identical GRPO step sends no judge call (cache)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from cai.backends.fake import FakeBackend
from cai.stages.judge import JudgeConfig
from cai.trl import ConstitutionReward, as_text
from tests.test_reward import expected_direct, expected_group, respond

pytestmark = pytest.mark.integration
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

PROMPTS = ["How do I pick a lock?", "Write a short poem about rain."]


def _dataset(conversational: bool):
    rows = [[{"role": "user", "content": p}] if conversational else p for p in PROMPTS]
    return datasets.Dataset.from_dict({"prompt": rows})


def _common(tmp_path: Path) -> dict:
    return {"output_dir": str(tmp_path / "out"), "max_steps": 1, "learning_rate": 1e-5, "report_to": [],
            "use_cpu": True, "save_strategy": "no", "bf16": False, "disable_tqdm": True, "logging_steps": 1,
            "seed": 7}


def _grpo_step(model_dir: Path, tokenizer, reward: ConstitutionReward, tmp_path: Path):
    args = trl.GRPOConfig(**_common(tmp_path), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=8, gradient_checkpointing=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=_dataset(True),
                              processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    return tok


def test_grpo_step_logs_the_judges_win_rates_and_a_repeat_costs_nothing(model_dir: Path, tokenizer,
                                                                        tmp_path: Path) -> None:
    fake = FakeBackend(respond)
    record = tmp_path / "rewards.jsonl"
    with ConstitutionReward(None, fake, cache=tmp_path / "cache.sqlite", record=record,
                            judge=JudgeConfig(principles=2)) as reward:
        trainer = _grpo_step(model_dir, tokenizer, reward, tmp_path)
        prompts = [json.dumps(p) for p in trainer._logs["prompt"]]
        texts = [as_text(c) for c in trainer._logs["completion"]]
        logged = list(trainer._logs["rewards"]["constitution"])
        assert len(logged) == 8 and sorted(set(prompts)) == sorted(json.dumps([{"role": "user", "content": p}])
                                                                   for p in PROMPTS)
        want: dict[int, float] = {}
        for key in set(prompts):
            ix = [i for i, p in enumerate(prompts) if p == key]
            want.update(zip(ix, expected_group([texts[i] for i in ix]), strict=True))
        assert logged == pytest.approx([want[i] for i in range(8)], abs=1e-6)
        distinct = [len({texts[i].strip() for i, p in enumerate(prompts) if p == key}) for key in set(prompts)]
        assert 0 < reward.sent <= sum(d * (d - 1) // 2 for d in distinct) * 2 * 2  # pairs x orders x k
        rows = [json.loads(line) for line in record.read_text().splitlines()]
        assert sorted(r for row in rows for r in row["rewards"]) == pytest.approx(sorted(logged), abs=1e-6)
        sent = reward.sent
        again = _grpo_step(model_dir, tokenizer, reward, tmp_path)  # the same step again: all from the cache
        assert [as_text(c) for c in again._logs["completion"]] == texts
        assert list(again._logs["rewards"]["constitution"]) == logged and reward.sent == sent


def test_online_dpo_step_logs_the_judges_expected_scores(model_dir: Path, tokenizer, tmp_path: Path) -> None:
    online_dpo = pytest.importorskip("trl.experimental.online_dpo")
    record = tmp_path / "scores.jsonl"
    with ConstitutionReward(None, FakeBackend(respond), mode="direct", record=record,
                            judge=JudgeConfig(principles=1)) as reward:
        args = online_dpo.OnlineDPOConfig(**_common(tmp_path), per_device_train_batch_size=2, max_new_tokens=8,
                                          max_length=128)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = online_dpo.OnlineDPOTrainer(model=model, reward_funcs=[reward.as_sync()], args=args,
                                                  train_dataset=_dataset(False), processing_class=tokenizer)
            trainer.train()
        rows = [json.loads(line) for line in record.read_text().splitlines()]
        assert len(rows) == 4 and reward.sent == 4  # 2 prompts x 2 completions x k=1
        assert [r["reward"] for r in rows] == pytest.approx([expected_direct(r["completion"]) for r in rows])
        scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
        assert scores == pytest.approx([sum(r["reward"] for r in rows) / 4], abs=1e-6)
