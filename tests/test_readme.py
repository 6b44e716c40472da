"""The README's Python API example runs as written (from the repository root, fake backend)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- api-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md has no api-example block"
    return m.group(1)


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in ("examples", "constitution"):
        shutil.copytree(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert "Calls(sent=10, cached=0, errors=0)" in printed
    assert len(namespace["rows"]) == 4  # type: ignore[arg-type]
    assert (tmp_path / "out" / "api" / "revisions.jsonl").exists()
    assert (tmp_path / "out" / "api" / "run" / "run.json").exists()
