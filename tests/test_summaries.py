"""What the commands say at the end: rows unchanged, redone and new; pairs and ties in one
wording for `cai label` and `cai run`; why there are no pairs and the command that gets some;
why the naive judge failed; `cai diff` on an unchanged version; `cai validate` on many files."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cai.cli import main
from cai.cli.summary import plural, print_preferences
from cai.stages.preferences import PreferenceSummary

REPO = Path(__file__).resolve().parent.parent
HH = str(REPO / "examples" / "hh_red_team.jsonl")
FAST = ["-b", "fake", "--no-progress"]
PREFS = re.compile(r"preferences: (\d+) pairs? -> \S+; (\d+) ties? held out; \d+ of \d+ judgements? abstained "
                   r"\(judged by logprobs \d+\); \d+ position-inconsistent")


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def edit(src: Path, dst: Path, pid: str | None = None, version: str | None = None) -> None:
    """``src`` with principle ``pid``'s critique reworded (and ``version``), written to ``dst``."""
    data = yaml.safe_load(src.read_text())
    p = next(p for p in data["principles"] if pid in (None, p["id"]))
    p["critique"] = "Look again, carefully. " + p["critique"]
    if version is not None:
        data["version"] = version
    dst.write_text(yaml.safe_dump(data, sort_keys=False))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    got = capsys.readouterr()
    return code, got.out, got.err


def test_rerun_after_an_edit_says_unchanged_redone_new(tmp_path: Path, capsys) -> None:
    """After a constitution edit, the rows whose drawn principles did not change come back from
    the cache as they were: counted unchanged, not as a full redo ("8 rows written, 0 kept")."""
    const = tmp_path / "c.yaml"
    const.write_text((REPO / "principles.yaml").read_text())
    out = tmp_path / "o"
    args = ["run", "--input", HH, "-o", str(out), "--constitution", str(const), *FAST]
    code, _, err = cli(capsys, *args, "--limit", "8")
    assert code == 0 and "revise: 0 rows unchanged (cache), 0 redone, 8 new, 0 failed" in err, err
    first = rows(out / "revisions.jsonl")
    drawn = [r["principle_ids"] for r in first]
    edited = next(p for r in drawn for p in r if 0 < sum(p in d for d in drawn) < len(drawn))
    touched = sum(edited in d for d in drawn)
    edit(const, const, edited)
    code, _, err = cli(capsys, *args, "--limit", "9")
    assert code == 0, err
    same = 8 - touched
    assert (f"revise: {plural(same, 'row')} unchanged (cache), {touched} redone, 1 new, 0 failed" in err), err
    assert "kept from before" not in err and "rows written" not in err
    code, _, err = cli(capsys, *args, "--limit", "9")  # nothing changed: every row unchanged
    assert "revise: 9 rows unchanged (cache), 0 redone, 0 new, 0 failed" in err, err
    assert "label: 9 rows unchanged (cache), 0 redone, 0 new, 0 failed" in err, err


def test_singular_and_plural(capsys) -> None:
    print_preferences(PreferenceSummary(written=1, ties=1, judgements=1, modes={"logprobs": 1}), Path("p.jsonl"),
                      Path("missing.jsonl"), False, 0.05, None)
    err = capsys.readouterr().err
    assert "preferences: 1 pair -> p.jsonl; 1 tie held out; 0 of 1 judgement abstained" in err, err
    assert PREFS.search(err)
    assert plural(0, "pair") == "0 pairs" and plural(2, "tie") == "2 ties"


@pytest.mark.parametrize("command", ["label", "run"])
def test_zero_pairs_say_why_and_the_command_that_keeps_pairs(tmp_path: Path, capsys, command: str) -> None:
    """All ties: one line with the spread of p and a command that relabels from the cache with a
    threshold that keeps at least half of the pairs; that command does, with no call sent."""
    if command == "label":
        args = ["label", HH, "-o", str(tmp_path / "l" / "preferences.jsonl"), "-n", "6", "--tie-threshold", "0.45"]
        labels = tmp_path / "l" / "labels.jsonl"
    else:
        args = ["run", "--input", HH, "-o", str(tmp_path / "r"), "-n", "6", "--label-tie-threshold=0.45"]
        labels = tmp_path / "r" / "labels.jsonl"
    code, _, err = cli(capsys, *args, *FAST)
    assert code == 0, err
    m = PREFS.search(err)
    assert m and m.group(1) == "0" and m.group(2) == "6", err  # the same wording from both commands
    ties = [x for x in err.splitlines() if "ties: " in x and "judged pairs are ties" in x]
    assert len(ties) == 1, err
    ps = sorted(r["p_a"] for r in rows(labels))
    assert f"p min {ps[0]:.3f}" in ties[0] and f"max {ps[-1]:.3f}" in ties[0]
    suggested = shlex.split(ties[0].split("keeping at least half: ", 1)[1])
    assert suggested[0] == "cai" and suggested[-2] == "--label-tie-threshold"
    assert "0.45" not in suggested and "--label-tie-threshold=0.45" not in suggested
    code, _, err = cli(capsys, *suggested[1:])
    assert code == 0, err
    m = PREFS.search(err)
    assert m and int(m.group(1)) >= 3 and "calls: 0 sent" in err and "judged pairs are ties" not in err, err


def test_most_pairs_decided_prints_no_ties_line(tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, "label", HH, "-o", str(tmp_path / "p.jsonl"), "-n", "6", "--tie-threshold", "0",
                       *FAST)
    assert code == 0 and "judged pairs are ties" not in err, err


def test_eval_judge_says_why_the_naive_judge_failed_every_pair(capsys) -> None:
    code, _, err = cli(capsys, "eval-judge", HH, "-n", "3", *FAST)
    assert code == 0
    assert "naive judge: all 3 pairs failed (the fake backend's replies" in err, err


def test_diff_warns_when_principles_changed_but_version_did_not(tmp_path: Path, capsys) -> None:
    old = tmp_path / "old.yaml"
    old.write_text((REPO / "principles.yaml").read_text())
    same_version = tmp_path / "same.yaml"
    edit(old, same_version)
    code, out, err = cli(capsys, "diff", str(old), str(same_version))
    assert code == 0 and "changed" in out
    assert "warning: the principles changed but version: is still" in err, err
    bumped = tmp_path / "bumped.yaml"
    edit(old, bumped, version="99")
    code, out, err = cli(capsys, "diff", str(old), str(bumped))
    assert code == 0 and "v99" in out and "warning" not in err, err
    code, out, err = cli(capsys, "diff", str(old), str(old))
    assert code == 0 and "warning" not in err


def test_validate_checks_every_file_one_line_each(tmp_path: Path, capsys) -> None:
    """Every file is checked (not only up to the first bad one), a .j2 as a template."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nprinciples: [\n")
    bad_j2 = tmp_path / "bad.j2"
    bad_j2.write_text("{% if x %}\nhello\n")
    good_j2 = REPO / "prompts" / "critique.user.j2"
    files = [str(bad_yaml), str(REPO / "principles.yaml"), str(bad_j2), str(good_j2), str(tmp_path / "none.yaml"),
             str(tmp_path / "notes.txt")]
    code, out, err = cli(capsys, "validate", *files)
    assert code == 2
    assert out.splitlines() == [f"ok: {REPO / 'principles.yaml'}: harmless v1, 18 principles, hash "
                                + out.split("hash ")[1].splitlines()[0], f"ok: {good_j2}: template, compiles"]
    errors = err.strip().splitlines()
    assert len(errors) == 4, err
    assert errors[0].startswith(f"error: {bad_yaml}:") and "YAML syntax error" in errors[0]
    assert errors[1].startswith(f"error: {bad_j2}:") and "template syntax error" in errors[1]
    assert "YAML" not in errors[1]
    assert errors[2].startswith(f"error: {tmp_path / 'none.yaml'}") and "not found" in errors[2]
    assert errors[3].startswith(f"error: {tmp_path / 'notes.txt'}") and ".j2" in errors[3]
    code, out, _ = cli(capsys, "validate", str(good_j2), str(REPO / "principles.yaml"))
    assert code == 0 and out.count("ok: ") == 2
