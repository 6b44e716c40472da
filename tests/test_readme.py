"""The README's Python API example runs as written (from the repository root, fake backend)."""

from __future__ import annotations

import contextlib
import io
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


def _shape(line: str) -> str:
    """A summary line with what varies run to run made generic: paths, numbers, plurals, gate reasons."""
    line = re.sub(r"\S*/\S*", "PATH", line.strip())
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    line = re.sub(r"\b(row|pair|tie|judgement)s\b", r"\1", line)
    return re.sub(r"N [a-z_ ]+ \((revise|label)\)(, N [a-z_ ]+ \((revise|label)\))*", "REASONS", line)


def test_readme_sample_output_has_the_shape_the_command_prints(tmp_path: Path) -> None:
    """The `cai run examples/run.yaml` block was copied from a real run on the shipped model; the same
    command on the fake backend must print lines of the same shape (a renamed or reworded line fails)."""
    from cai.cli import main

    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"```text\n\$ cai run examples/run.yaml [^\n]*\n(.*?)\n\$ ", text, re.S)
    assert m, "README.md has no `$ cai run examples/run.yaml` sample block"
    readme = {_shape(x).split(":")[0]: _shape(x) for x in m.group(1).splitlines()}
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        assert main(["run", str(REPO / "examples" / "run.yaml"), "--backend", "fake", "-o", str(tmp_path / "out"),
                     "--no-progress"]) == 0
    printed = {_shape(x).split(":")[0]: _shape(x) for x in buf.getvalue().splitlines() if x.strip()}
    for kind, shape in printed.items():
        assert readme.get(kind) == shape, (kind, shape, readme.get(kind))
    assert set(readme) - set(printed) <= {"tie"}, set(readme) - set(printed)  # `ties:` only when most pairs tie
