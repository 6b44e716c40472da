"""Downstream proof: the exported splits, loaded back with `datasets` from the written folder,
train TRL's SFTTrainer, DPOTrainer and RewardTrainer for one real step on SmolLM2-135M (CPU),
exactly as they are: no column renaming, no conversion."""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import pytest
import torch

from cai import export as ex
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
    return cls(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=1,
               learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no",
               gradient_checkpointing=False, bf16=False, disable_tqdm=True, max_length=256,
               **kw)


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
