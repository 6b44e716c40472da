"""cai.progress: off a terminal, plain lines every interval instead of nothing (a log file, CI,
nohup); on a terminal the bars as before; a "loading model" line before a model loads in this
process; and totals that end at 100% (rows a gate skips, and revisions that failed for the judge
that would have paired them, leave the total as they are skipped: a finished bar reads N/N)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cai.backends as backends
import cai.backends.fake as fake
from cai import pipeline
from cai.backends.base import Completion, Request
from cai.backends.fake import FakeBackend
from cai.config import RunConfig
from cai.progress import RunProgress, StageProgress

REPO = Path(__file__).resolve().parent.parent
PLAIN = re.compile(r"^progress \d+:\d\d:\d\d: revise (\d+)/3 rows, (\d+) calls, gen [\d,]+ tok/s, ETA (\S+)$")
# `cai revise` with plain lines every 0.1 s instead of 30 (the same RunProgress the CLI builds)
SCRIPT = "import sys, cai.progress as p; p.PLAIN_EVERY_S = 0.1; from cai.cli import main; sys.exit(main(sys.argv[1:]))"


def _revise(tmp_path: Path, **popen: object) -> subprocess.Popen[bytes]:
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"question {i}?"}) + "\n" for i in range(3)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")}
    env.update(PYTHONPATH=str(REPO), CAI_FAKE_DELAY="0.25", COLUMNS="200")  # about 0.25 s a batch of calls
    argv = [sys.executable, "-c", SCRIPT, "revise", str(src), "-o", str(tmp_path / "out" / "revisions.jsonl"),
            "--backend", "fake", "--rounds", "1"]
    return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, **popen)  # type: ignore[call-overload]


def test_off_a_terminal_plain_lines_appear(tmp_path: Path) -> None:
    proc = _revise(tmp_path, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    lines = [m for line in err.decode().splitlines() if (m := PLAIN.match(line))]
    assert len(lines) >= 3, err.decode()  # 3 batches of 0.25 s at least: several lines of 0.1 s
    rows, calls = [int(m[1]) for m in lines], [int(m[2]) for m in lines]
    assert rows == sorted(rows) and calls == sorted(calls) and calls[-1] > 0  # they move
    assert lines[0][3] == "?" or rows[0] > 0  # no ETA before the first row is done
    assert "\x1b[" not in err.decode()  # plain text, no terminal codes


def test_on_a_terminal_bars_and_no_plain_lines(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = _revise(tmp_path, stderr=slave)
    os.close(slave)
    got = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # read as it comes: a full pty would block the bars
        if select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            got += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    proc.communicate(timeout=60)  # waits, and closes its stdout pipe
    assert proc.returncode == 0, got.decode(errors="replace")
    text = got.decode(errors="replace")
    assert "revise" in text and "rows/s" in text  # rich's bar, as before
    assert not re.search(r"(^|\n)progress \d+:", text)


def test_the_interval_is_an_argument(capsys: pytest.CaptureFixture[str]) -> None:
    bars = RunProgress(interval=0.05)  # stderr is not a terminal under pytest
    with bars.stage("judge", 4) as bar:
        bar.advance(rows=1)
        bar.called(10, 5, 1)
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) >= 2 and all(re.fullmatch(r"progress 0:00:00: judge 1/4 rows, 1 calls, gen \d+ tok/s, "
                                              r"ETA 0:00:0\d", line) for line in err), err
    time.sleep(0.2)
    assert capsys.readouterr().err == ""  # stopped with its last stage


@pytest.mark.parametrize("enabled", [True, False])
def test_told_either_way_no_plain_lines(enabled: bool, capsys: pytest.CaptureFixture[str]) -> None:
    with RunProgress(enabled=enabled, interval=0.05).stage("judge", 1):
        time.sleep(0.2)
    assert "progress 0:" not in capsys.readouterr().err


def test_loading_model_line_comes_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    seen: list[str] = []

    def load(**kw: object) -> FakeBackend:
        seen.append(capsys.readouterr().err)
        return FakeBackend()

    monkeypatch.setitem(backends.BACKENDS, "embedded", load)
    backends.build_backend("embedded", str(tmp_path))
    assert seen == [f"loading model {tmp_path} (embedded backend) ...\n"]
    backends.build_backend("fake")
    monkeypatch.setenv("CAI_MODEL_DIR", str(tmp_path / "not-prepared"))
    backends.build_backend("embedded")  # the backend's own error says why: no line before it
    assert seen[1:] == [""] and capsys.readouterr().err == ""


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
