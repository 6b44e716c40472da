"""Downstream proof: the exported splits, loaded back with `datasets` from the written folder,
train TRL's SFTTrainer, DPOTrainer and RewardTrainer for one real step on SmolLM2-135M (CPU),
exactly as they are: no column renaming, no conversion. So do the outputs of `cai best-of-n --n 4`
(fake backend, scripted judge: the ranking is known): its best rows (exported) train one SFT
step, its best-vs-worst pairs file one DPO step as it is."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import pytest
import torch

from cai import export as ex
from cai import pipeline
from cai.backends.fake import FakeBackend
from cai.stages.best_of_n import pairs_path
from tests.scripted_judge import quality
from tests.test_best_of_n import QUALITIES, respond, write_prompts
from tests.test_export import make_run

pytestmark = pytest.mark.integration
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default export and a --full export (trace as JSON columns) of one small run."""
    root = tmp_path_factory.mktemp("trl")
    run = make_run(root / "run", prompts=6, pairs_per_prompt=1)
    return {
        "default": ex.save(ex.build(run, test_fraction=0.2), root / "export"),
        "full": ex.save(ex.build(run, test_fraction=0.2, full=True), root / "export_full"),
    }


def _load(folder: Path, config: str, split: str, tmp_path: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(folder), config, split=split, cache_dir=str(tmp_path / "hf"))


def _args(cls: type, tmp_path: Path, **kw):
    return cls(**{"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 1,
                  "learning_rate": 1e-4, "report_to": [], "use_cpu": True, "save_strategy": "no",
                  "gradient_checkpointing": False, "bf16": False, "disable_tqdm": True, "max_length": 256, **kw})


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()
               if n in before)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def test_sft_one_step(exported, model_dir: Path, tokenizer, tmp_path: Path) -> None:
    ds = _load(exported["default"], "sft", "train_sft", tmp_path)
    assert ds.column_names[0] == "messages"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    before = _snapshot(model)
    trainer = trl.SFTTrainer(model=model, args=_args(trl.SFTConfig, tmp_path), train_dataset=ds,
                             processing_class=tokenizer)
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert _changed(trainer.model, before) > len(before) // 2


def test_dpo_one_step(exported, model_dir: Path, tokenizer, tmp_path: Path) -> None:
    ds = _load(exported["default"], "prefs", "train_prefs", tmp_path)
    assert ds.column_names[:3] == ["prompt", "chosen", "rejected"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = trl.DPOTrainer(model=model, args=_args(trl.DPOConfig, tmp_path),
                                 train_dataset=ds, processing_class=tokenizer)
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert _changed(trainer.model, before) > len(before) // 2


def test_reward_one_step_on_full_export(exported, model_dir: Path, tokenizer, tmp_path) -> None:
    """The --full export (JSON trace columns beside TRL's) trains as it is, too."""
    ds = _load(exported["full"], "prefs", "train_prefs", tmp_path)
    assert {"judgements", "provenance"} <= set(ds.column_names)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    before = _snapshot(model)
    trainer = trl.RewardTrainer(model=model, args=_args(trl.RewardConfig, tmp_path),
                                train_dataset=ds, processing_class=tokenizer)
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert _changed(trainer.model, before) > len(before) // 2


BEST, WORST = max(QUALITIES), min(QUALITIES)


@pytest.fixture(scope="module")
def best_of_n(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cai best-of-n --n 4` over 4 prompts on the fake backend with the scripted judge."""
    root = tmp_path_factory.mktemp("bon")
    out = root / "bon" / "best_of_n.jsonl"
    res = pipeline.run_best_of_n(str(write_prompts(root / "p.jsonl", 4)), backend=FakeBackend(respond), output=out,
                                 n=4, label_principles=1, progress=False)
    assert res.summary.written == 4 and res.preferences is not None and res.preferences.written == 4
    return out


def test_sft_one_step_on_the_best_of_n(best_of_n: Path, model_dir: Path, tokenizer, tmp_path: Path) -> None:
    """The best answers, exported, train one SFT step that takes every row in one batch."""
    folder = ex.save(ex.build(best_of_n.parent, test_fraction=0), tmp_path / "export")
    ds = _load(folder, "sft", "train_sft", tmp_path)
    assert len(ds) == 4 and [quality(m[-1]["content"]) for m in ds["messages"]] == [BEST] * 4
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    before = _snapshot(model)
    trainer = trl.SFTTrainer(model=model, args=_args(trl.SFTConfig, tmp_path, per_device_train_batch_size=4),
                             train_dataset=ds, processing_class=tokenizer)
    seen = [tokenizer.decode(x) for x in trainer.train_dataset["input_ids"]]
    assert len(seen) == 4 and all(m[-1]["content"] in t for m, t in zip(ds["messages"], seen, strict=True))
    out = trainer.train()
    assert out.global_step == 1 and trainer.state.epoch == 1.0  # one step, all 4 rows
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert _changed(trainer.model, before) > len(before) // 2


def test_dpo_one_step_on_the_best_vs_worst_pairs(best_of_n: Path, model_dir: Path, tokenizer, tmp_path: Path) -> None:
    """best_of_n.pairs.jsonl, loaded as it is, trains one DPO step on every pair: chosen the best
    (q=2), rejected the worst (q=-1), as the scripted judge ranked them."""
    ds = datasets.load_dataset("json", data_files=str(pairs_path(best_of_n)), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 4
    assert [(quality(c[-1]["content"]), quality(r[-1]["content"])) for c, r in zip(
        ds["chosen"], ds["rejected"], strict=True)] == [(BEST, WORST)] * 4
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = trl.DPOTrainer(model=model, args=_args(trl.DPOConfig, tmp_path, per_device_train_batch_size=4),
                                 train_dataset=ds, processing_class=tokenizer)
    chosen = [tokenizer.decode(x) for x in trainer.train_dataset["chosen_ids"]]
    rejected = [tokenizer.decode(x) for x in trainer.train_dataset["rejected_ids"]]
    assert [quality(t) for t in chosen] == [BEST] * 4 and [quality(t) for t in rejected] == [WORST] * 4
    out = trainer.train()
    assert out.global_step == 1 and trainer.state.epoch == 1.0  # one step, all 4 pairs
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert _changed(trainer.model, before) > len(before) // 2
