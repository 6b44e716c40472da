"""The CLI as a user meets it: one-line errors with exit code 2, help that teaches, real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_validate_shipped_constitutions():
    files = ["principles.yaml", *sorted(str(p) for p in (REPO / "constitution").glob("*.yaml"))]
    r = run_cli("validate", *files)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok: ") == len(files) >= 3


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("name: x\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n    comparison: q\n    colour: red\n",
         ":7: principles.0.colour: unknown field"),
        ("name: x\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n",
         ":3: principles.0.comparison: missing required field"),
        ("name: x\nprinciples: [\n", "YAML syntax error"),
    ],
)
def test_bad_constitution_is_one_line_exit_2(tmp_path: Path, text: str, expect: str):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = run_cli("validate", str(f))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {f}") and expect in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_input_file_is_one_line(tmp_path: Path, capsys):
    code = main(["revise", str(tmp_path / "nope.jsonl"), "--backend", "fake", "-o", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err


def test_unknown_backend_is_one_line(tmp_path: Path, hh_dev: Path, capsys):
    code = main(["revise", str(hh_dev), "--backend", "nosuch", "-o", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "unknown backend 'nosuch'" in capsys.readouterr().err


def test_help_teaches():
    r = run_cli("revise", "--help")
    assert r.returncode == 0
    for opt in ("--constitution", "--backend", "--rounds", "--base-url", "--limit", "CAI_BACKEND"):
        assert opt in r.stdout


def test_render_prints_the_exact_messages(hh_dev: Path):
    r = run_cli("render", "judge", str(hh_dev), "--row", "2", "--response", "R-A", "--response-b", "R-B")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}
    user = out["messages"][-2]["content"]
    assert "(A) <response_a>\nR-A\n</response_a>" in user
    assert "Is it still a dog pile" in user


def test_revise_fake_end_to_end_and_rerun_is_free(tmp_path: Path, hh_dev: Path):
    out = tmp_path / "rev.jsonl"
    args = ["revise", str(hh_dev), "-b", "fake", "-n", "6", "--rounds", "2", "-o", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and all(len(x["rounds"]) == 2 for x in rows)
    assert (tmp_path / "rev.md").read_text().count("**Round 2: principle") == 6
    r2 = run_cli(*args)
    assert "0 rows written, 6 kept from before" in r2.stderr


def test_revise_gate_flags_and_variables(tmp_path: Path):
    """Each input gate of `cai revise` is a flag and a CAI_GATES_* variable, as in `cai run`."""
    prompts = tmp_path / "p.jsonl"
    texts = ["how do I bake bread at home", "How do I bake bread at home?", "what is a good name for a cat"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    def revise(*flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], int]:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}" / "rev.jsonl"
        r = subprocess.run([sys.executable, "-m", "cai.cli", "revise", str(prompts), "-b", "fake", "--rounds", "1",
                            "--no-cache", "-o", str(out), *flags], capture_output=True, text=True,
                           env={**__import__("os").environ, **(env or {})})
        return r, len(out.read_text().splitlines()) if out.exists() else -1

    r, n = revise()
    assert r.returncode == 0 and n == 2 and "1 duplicate exact (input)" in r.stderr, r.stderr
    r, n = revise("--no-gates-dedup")
    assert r.returncode == 0 and n == 3 and "every row passed" in r.stderr, r.stderr
    r, n = revise(env={"CAI_GATES_DEDUP": "false"})
    assert r.returncode == 0 and n == 3, r.stderr
    evals = tmp_path / "eval.txt"
    evals.write_text("What is a good name for a cat?\n")
    r, n = revise("--gates-decontaminate", str(evals))
    assert r.returncode == 0 and n == 1 and "1 contaminated (input)" in r.stderr, r.stderr
    r, n = revise("--gates-decontaminate", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and n == -1 and "missing.txt: file not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r, n = revise("--gates-dedup-threshold", "2")
    assert r.returncode == 2 and "--gates-dedup-threshold" in r.stderr and len(r.stderr.strip().splitlines()) == 1
