"""Progress totals end at 100%: rows a gate skips (and revisions that failed, for the judge that
would have paired them) leave the total as they are skipped, so a finished bar reads N/N."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cai.backends.fake as fake
from cai import pipeline
from cai.backends.base import Completion, Request
from cai.config import RunConfig
from cai.progress import RunProgress, StageProgress


class Recording(RunProgress):
    bars: list[StageProgress] = []

    def stage(self, description: str, total: int | None) -> StageProgress:
        bar = super().stage(description, total)
        Recording.bars.append(bar)
        return bar


def test_drop_shrinks_an_open_bar_and_one_not_yet_open():
    group = RunProgress(enabled=False)
    with group.stage("revise", 10) as bar:
        group.drop("revise", 2)
        group.drop("label", 3)  # its bar is not open yet
        bar.advance(8)
        assert (bar.total, bar.rows) == (8, 8)
    with group.stage("label", 10) as later:
        assert later.total == 7
    with group.stage("eval", None) as unknown:
        group.drop("eval", 1)
        assert unknown.total is None


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prompts: list[str]) -> dict[str, tuple]:
    Recording.bars = []
    monkeypatch.setattr(pipeline, "RunProgress", Recording)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = RunConfig.model_validate({"input": str(tmp_path / "p.jsonl"), "output": str(tmp_path / "out"),
                                    "backend": "fake", "progress": False, "revise": {"rounds": 1},
                                    "label": {"principles": 1}})
    pipeline.run_pipeline(cfg)
    return {b.description: (b.rows, b.total) for b in Recording.bars}


def test_a_run_whose_gate_skips_duplicates_ends_at_n_of_n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    prompts = [f"Question {i}: how do I fix thing {i}?" for i in range(6)]
    got = _run(tmp_path, monkeypatch, [*prompts, prompts[1], prompts[4]])  # 8 rows, 2 skipped
    assert got == {"revise": (6, 6), "label": (6, 6)}
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sum(r["stage"] == "input" for r in rejects) == 2  # the skipped rows are listed, not processed


def test_a_failed_revision_leaves_the_judges_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = fake.default_respond

    def respond(r: Request) -> Completion:
        if any("FAIL-ME" in m["content"] for m in r.messages):
            return Completion(texts=[], error="scripted failure")
        return real(r)

    monkeypatch.setattr(fake, "default_respond", respond)
    got = _run(tmp_path, monkeypatch, ["Tell me a joke.", "FAIL-ME please", "What is 2+2?"])
    assert got == {"revise": (3, 3), "label": (2, 2)}
    assert "scripted failure" in (tmp_path / "out" / "revisions.failures.jsonl").read_text()
