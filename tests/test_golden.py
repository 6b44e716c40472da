"""Golden outputs: fixed runs on the fake backend compared byte for byte with files in tests/golden/.

They pin behaviour across refactors: the rows, their order, the resume fingerprints
(``*.meta.json``) and the manifest (``run.json`` minus its timing). A cache written by an earlier
version of cai (``tests/golden/cache.sqlite``) must still answer every call of the same run, so
that users' caches and resumable outputs stay valid.

The runs use the constitution and templates pinned in ``tests/golden/inputs/`` (copies of the
shipped ones when the goldens were made), so that editing the shipped prompts or principles
changes no golden file: these tests pin the code's behaviour.

To accept an intended change of output, rerun with ``CAI_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cai.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden"
REPO = GOLDEN.parent.parent
UPDATE = os.environ.get("CAI_UPDATE_GOLDEN") == "1"


PINNED = ["-c", "constitution.yaml", "-t", "templates"]


@pytest.fixture(autouse=True)
def pinned_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path (relative paths in run.json), with the pinned constitution and templates."""
    shutil.copy(GOLDEN / "inputs" / "constitution.yaml", tmp_path / "constitution.yaml")
    shutil.copytree(GOLDEN / "inputs" / "templates", tmp_path / "templates")
    monkeypatch.chdir(tmp_path)


def prompts(path: Path, n: int = 6) -> str:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: how do I fix thing {i}?"}) + "\n")
    return path.name


def pairs(path: Path, n: int = 4) -> str:
    src = (REPO / "examples" / "hh_red_team.jsonl").read_text().splitlines()[:n]
    path.write_text("\n".join(src) + "\n")
    return path.name


def normalised(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.name == "run.json":
        data = json.loads(text)
        data.pop("elapsed_s", None)
        for run in data.get("history", []):
            run.pop("elapsed_s", None)
            run.pop("started", None)
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return text


def compare(folder: Path, name: str, files: list[str]) -> None:
    want = GOLDEN / name
    if UPDATE:
        want.mkdir(parents=True, exist_ok=True)
        for f in files:
            (want / f).write_text(normalised(folder / f), encoding="utf-8")
        return
    for f in files:
        assert (want / f).exists(), f"missing golden file {want / f}: run with CAI_UPDATE_GOLDEN=1"
        assert normalised(folder / f) == (want / f).read_text(encoding="utf-8"), f"{name}/{f} differs"


RUN_FILES = ["revisions.jsonl", "revisions.jsonl.meta.json", "labels.jsonl", "labels.jsonl.meta.json",
             "preferences.jsonl", "revisions.md", "run.json"]


# the sampling the goldens were made with (the revise defaults then), so that a new default changes no golden
REVISE_PINNED = ["--revise-max-tokens", "256", "--revise-repetition-penalty", "1"]


def run_args(inp: str, out: str, *extra: str) -> list[str]:
    return ["run", "--input", inp, "-o", out, "--backend", "fake", "--revise-rounds", "2", *REVISE_PINNED,
            "--label-sources", "revisions,sample", "--no-progress", *PINNED, *extra]


def test_golden_run(tmp_path: Path) -> None:
    assert main(run_args(prompts(tmp_path / "prompts.jsonl"), "out")) == 0
    compare(tmp_path / "out", "run", RUN_FILES)
    if UPDATE and not (GOLDEN / "cache.sqlite").exists():  # written once, by an earlier cai: never replaced
        shutil.copy(tmp_path / "out" / "cache.sqlite", GOLDEN / "cache.sqlite")


def test_golden_cache_still_answers_every_call(tmp_path: Path) -> None:
    """A cache written by an earlier cai serves the whole run: no call is sent."""
    shutil.copy(GOLDEN / "cache.sqlite", tmp_path / "old.sqlite")
    assert main(run_args(prompts(tmp_path / "prompts.jsonl"), "out", "--cache", "old.sqlite")) == 0
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["calls"]["sent"] == 0
    assert manifest["calls"]["cached"] > 0


def test_golden_revise(tmp_path: Path) -> None:
    code = main(["revise", prompts(tmp_path / "prompts.jsonl"), "-o", "out/revisions.jsonl", "--backend", "fake",
                 "--rounds", "2", "--max-tokens", "256", "--repetition-penalty", "1", "--no-progress", *PINNED])
    assert code == 0
    compare(tmp_path / "out", "revise", ["revisions.jsonl", "revisions.jsonl.meta.json", "revisions.md"])


def test_golden_label(tmp_path: Path) -> None:
    code = main(["label", pairs(tmp_path / "pairs.jsonl"), "-o", "out/preferences.jsonl", "--backend", "fake",
                 "--no-progress", *PINNED])
    assert code == 0
    compare(tmp_path / "out", "label", ["preferences.jsonl", "labels.jsonl", "labels.jsonl.meta.json"])


def test_golden_eval_judge(tmp_path: Path) -> None:
    code = main(["eval-judge", pairs(tmp_path / "pairs.jsonl"), "-o", "out", "--backend", "fake", "--json",
                 "--no-progress", *PINNED])
    assert code == 0
    compare(tmp_path / "out", "eval_judge", ["judge.jsonl", "judge.jsonl.meta.json", "naive.jsonl",
                                             "naive.jsonl.meta.json", "naive.failures.jsonl"])
