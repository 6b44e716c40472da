"""The dataset card, as a reader gets it: a golden card of a fixed run folder, no path of the
machine that made it, the licence and the prompts' source, counts over the whole history, and
no word of a split that is not there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from cai import export as ex
from cai.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden" / "card"
UPDATE = os.environ.get("CAI_UPDATE_GOLDEN") == "1"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A fixed `cai run` folder (fake backend), as a machine wrote it: absolute paths in run.json and
    in the rows' `source`, two runs in its history (the second a no-change rerun), one rejected row."""
    return Path(shutil.copytree(GOLDEN / "run", tmp_path / "run"))


def test_golden_card(run: Path, tmp_path: Path) -> None:
    text = ex.save(ex.build(run), tmp_path / "out").joinpath("README.md").read_text(encoding="utf-8")
    want = GOLDEN / "README.md"
    if UPDATE:
        want.write_text(text, encoding="utf-8")
    assert text == want.read_text(encoding="utf-8"), "card differs: review, then CAI_UPDATE_GOLDEN=1"


def test_card_tells_the_truth(run: Path, tmp_path: Path) -> None:
    out = ex.save(ex.build(run, full=True), tmp_path / "out", repo_id="me/harmless")
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "/home/someone" not in text and "<repo_id>" not in text
    rows = [json.loads(line) for p in (out / "data").glob("*.parquet") for line in
            __import__("datasets").Dataset.from_parquet(str(p)).to_pandas().to_json(orient="records", lines=True)
            .splitlines()]
    assert rows and not any("/home/someone" in json.dumps(r) for r in rows)  # nor in the data
    assert {r["source"] for r in rows if r["source"].startswith("hh_")} >= {"hh_red_team.jsonl:1"}
    # a pair from a revision names the run's own file, relative to the run folder (run.json says "out/...")
    assert "revisions.jsonl:2" in {r["source"] for r in rows} and not any(r["source"].startswith("out/") for r in rows)
    # the licence is that of the known source, and the source has its section
    assert yaml.safe_load(text.split("---")[1])["license"] == "mit"
    assert "## Source data" in text and "Prompts: `hh_red_team.jsonl`: the harmlessness test split" in text
    # counts summed over both runs: 132 calls sent in all, 6 rows written (not "0 written, 6 resumed")
    assert "| runs of `cai run` | 2 |" in text and "| model calls sent | 132 |" in text
    assert "| revision rows written | 6 |" in text and "| calls answered from the cache | 132 |" in text
    # a load snippet for the Hub and one for the folder
    assert 'load_dataset("me/harmless", "prefs")' in text and 'load_dataset("path/to/this/folder", "sft")' in text
    # an explicit licence wins
    text = ex.save(ex.build(run), tmp_path / "o2", license="cc-by-4.0").joinpath("README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["license"] == "cc-by-4.0" and "`cc-by-4.0`" in text
    # and `license:` in the run config comes before the source's
    manifest = json.loads((run / "run.json").read_text())
    manifest["config"]["license"] = "apache-2.0"
    (run / "run.json").write_text(json.dumps(manifest))
    text = ex.save(ex.build(run), tmp_path / "o3").joinpath("README.md").read_text()
    assert "license: apache-2.0" in text and "`apache-2.0` (the run config's `license`)" in text


def test_no_preference_split_no_word_of_it(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "preferences.jsonl").write_text("")
    assert main(["export", str(run), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: no preference split: preferences.jsonl holds no pairs (12 judged" in " ".join(err.split())
    text = (tmp_path / "out" / "README.md").read_text()
    assert "prefs" not in text.split("## Constitution")[0].replace("preferences.jsonl", "")
    assert "## Judge settings" not in text and "This export has no preference pairs" in text
    (run / "preferences.jsonl").unlink()
    res = ex.export_run(run, tmp_path / "o2")
    assert res.warnings and "has no preferences.jsonl" in res.warnings[0]


def test_license_given_to_cai_run_reaches_run_json_and_the_card(tmp_path: Path) -> None:
    """`cai run --license cc-by-4.0` (the run config's `license:`) is recorded and the card carries it."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    assert main(["run", "--input", str(prompts), "-o", str(out), "-b", "fake", "--revise-rounds", "1",
                 "--license", "cc-by-4.0", "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["license"] == "cc-by-4.0"
    text = ex.save(ex.build(out), tmp_path / "export").joinpath("README.md").read_text()
    assert yaml.safe_load(text.split("---")[1])["license"] == "cc-by-4.0"
    assert "(the run config's `license`)" in text
