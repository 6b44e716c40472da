"""Quality gates end to end: a scripted fake model trips each gate once; the counts, rejects.jsonl,
preferences.jsonl and the export must come out exactly as expected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cai import export as ex
from cai.backends.base import Completion, Request
from cai.backends.fake import FakeBackend
from cai.config import RunConfig
from cai.pipeline import run_pipeline

LONG = ("please explain in detail how the old city library organises its collection of maps, letters and "
        "photographs from the nineteenth century so that visitors can find them")
PROMPTS = {
    "p0": LONG,
    "p1": LONG.upper() + "!",  # an exact duplicate once case and punctuation are ignored
    "p2": LONG.replace("visitors", "students"),  # a near duplicate
    "p3": "truncate my first answer",
    "p4": "give me a meta revision",
    "p5": "give me a looping revision",
    "p6": "make the judge prefer my first answer",
    "p7": "what is the capital of the evaluation set?",  # in the decontamination file
    "p8": "a clean question about gardening",
}


def respond(req: Request) -> Completion | str:
    text = json.dumps(req.messages)
    row = next(pid for pid in sorted(PROMPTS, key=lambda k: -len(PROMPTS[k])) if PROMPTS[pid][:30] in text)
    if req.sampling.logprobs:  # the judge: which side is the first answer?
        first = text.find(f"INITIAL {row}") < text.find(f"REVISED {row}")
        p_first = {"p6": 0.9 if first else 0.1, "p3": 0.1 if first else 0.9}.get(row, 0.5)
        return Completion(texts=["A"], logprobs=[{"A": math.log(p_first), "B": math.log(1 - p_first)}],
                          finish_reasons=["length"])
    last = req.messages[-1]["content"]
    if "Critique request" in last or "critique" in last.lower().split("\n")[-1]:
        return f"CRITIQUE {row}: could be kinder."
    if "Revision request" in last or "revis" in last.lower().split("\n")[-1]:
        if row == "p4":
            return "Here is the revised response:"
        if row == "p5":
            return "I cannot help with that. " * 20
        return f"Revised response: REVISED {row} with a kinder answer."
    if row == "p3":
        return Completion(texts=[f"INITIAL {row} cut off in the mid"], finish_reasons=["length"])
    return f"INITIAL {row} answer."


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in PROMPTS.items()))
    evals = tmp_path / "eval.txt"
    evals.write_text("What is the capital of the evaluation set\nSomething unrelated entirely\n")
    cfg = RunConfig.model_validate({
        "input": str(prompts), "output": str(tmp_path / "run"), "backend": "fake", "progress": False,
        "revise": {"rounds": 1}, "label": {"principles": 1}, "gates": {"decontaminate": str(evals)}})
    run_pipeline(cfg, backend=FakeBackend(respond))
    return tmp_path / "run"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_gate_trips_exactly_where_scripted(run: Path) -> None:
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["gates"] == {
        "input.contaminated": 1, "input.duplicate_exact": 1, "input.duplicate_near": 1,
        "label.truncated": 1, "revise.loop": 1, "revise.meta": 1, "revise.not_improved": 1,
        "revise.truncated": 1,
    }
    rejects = {(r["id"], r["stage"]): r["reasons"] for r in read_rows(run / "rejects.jsonl")}
    assert rejects == {
        ("p7", "input"): ["contaminated"], ("p1", "input"): ["duplicate_exact"],
        ("p2", "input"): ["duplicate_near"], ("p3", "label"): ["truncated"], ("p3", "revise"): ["truncated"],
        ("p4", "revise"): ["meta"], ("p5", "revise"): ["loop"], ("p6", "revise"): ["not_improved"],
    }
    revisions = {r["id"]: r for r in read_rows(run / "revisions.jsonl")}
    assert sorted(revisions) == ["p0", "p3", "p4", "p5", "p6", "p8"]  # skipped inputs cost no call
    # each reject carries what was rejected beside its reasons: no lookup by id needed
    rows = {(r["id"], r["stage"]): r for r in read_rows(run / "rejects.jsonl")}
    for (rid, stage), row in rows.items():
        assert list(row)[:3] == ["id", "stage", "reasons"]
        assert row["prompt"] == [{"role": "user", "content": PROMPTS[rid]}]
        if stage == "revise":
            assert row["text"] == revisions[rid]["revised_response"]
    assert rows[("p4", "revise")]["text"] == "Here is the revised response:"
    assert rows[("p5", "revise")]["text"].startswith("I cannot help with that. I cannot help")
    assert rows[("p3", "label")]["response_a"] == "INITIAL p3 cut off in the mid"
    assert rows[("p3", "label")]["response_b"] == revisions["p3"]["revised_response"]
    assert rows[("p7", "input")]["source"].endswith("prompts.jsonl:8")
    assert revisions["p0"]["revised_response"] == "REVISED p0 with a kinder answer."  # label line cleaned
    # the truncated pair (the judge preferred its revision) is left out of the preference data
    prefs = {r["id"] for r in read_rows(run / "preferences.jsonl")}
    assert "p3" not in prefs and "p6" in prefs


def test_export_leaves_rejects_out_unless_asked(run: Path) -> None:
    def sft_ids(**kw: bool) -> set[str]:
        dd = ex.build(run, test_fraction=0, **kw).dataset
        return set(dd["train_sft"]["id"])

    assert sft_ids() == {"p0", "p8"}
    assert sft_ids(include_rejects=True) == {"p0", "p3", "p4", "p5", "p6", "p8"}


def test_changing_a_gate_needs_no_model_call(run: Path, tmp_path: Path) -> None:
    """Verdicts come from the rows' flags: keep: all and a rerun sends nothing."""
    cfg = RunConfig.model_validate(json.loads((run / "run.json").read_text())["config"])
    be = FakeBackend(respond)
    res = run_pipeline(cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"keep": "all"})}), backend=be)
    assert be.calls == [] and "revise.not_improved" not in res.gates
