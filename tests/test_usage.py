"""Tokens and cost (issue 23, item 3): run.json's ``usage`` equals what an OpenAI-style server
reported serving, by stage and step, summed over every run of the folder (a no-change rerun adds
0; a run killed with -9 and resumed counts what both were served); ``cost`` from the user's prices;
``usage.rejected`` from the rows the gates kept out; the summary's one usage line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cai.backends.dialect import parse_response
from cai.cli import main
from cai.types import Completion
from tests.fake_server import MODEL, FakeServer, answer

REPO = Path(__file__).resolve().parent.parent
FIELDS = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")


class UsageStub(FakeServer):
    """The strict OpenAI-style stub, reporting ``prompt_tokens_details.cached_tokens`` (a third of
    the prompt) and counting the tokens of every answer it served (``served``, and per prompt
    ``by_thing``: the ``thing N`` the messages name). With ``limit`` set, requests past the limit
    wait until ``release()`` and are then refused, uncounted (their client is gone)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(strict=True, **kw)
        self.tokens_served: Counter[str] = Counter()
        self.by_thing: dict[str, Counter[str]] = {}
        self.calls = 0
        self.limit: int | None = None
        self._release: asyncio.Event | None = None

    async def opened(self) -> None:
        self._release = asyncio.Event()

    def release(self) -> None:
        assert self._release is not None
        self.limit = None
        self._loop.call_soon_threadsafe(self._release.set)

    async def chat(self, request: web.Request) -> web.Response:
        if self.limit is not None and self.calls >= self.limit:
            assert self._release is not None
            await self._release.wait()
            return web.json_response({"error": {"message": "gone"}}, status=503)
        self.calls += 1
        resp = await super().chat(request)
        if resp.status != 200:
            return resp
        data = json.loads(resp.body)  # type: ignore[arg-type]
        usage = data["usage"]
        usage["prompt_tokens_details"] = {"cached_tokens": usage["prompt_tokens"] // 3}
        got = Counter({"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                       "cached_prompt_tokens": usage["prompt_tokens"] // 3})
        self.tokens_served.update(got)
        text = json.dumps(self.bodies[-1]["messages"])
        for n in range(10):
            if f"thing {n}?" in text:
                self.by_thing.setdefault(str(n), Counter()).update(got)
        return web.json_response(data)


def long_for_thing_1(body: dict[str, Any]) -> str:
    """A long answer to every call about prompt p1 (cut at max_tokens: the truncated gate drops it)."""
    if "thing 1?" in json.dumps(body["messages"]):
        return " ".join(f"point{i}" for i in range(40))
    return str(answer({k: v for k, v in body.items() if k != 'n'})['choices'][0]['message']['content'])


@pytest.fixture
def stub() -> Iterator[UsageStub]:
    with UsageStub(max_seconds=120) as s:
        yield s


def prompts(path: Path, n: int = 6) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: how do I fix thing {i}?"}) + "\n"
                            for i in range(n)))
    return path


def args(stub: UsageStub, tmp: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(prompts(tmp / "prompts.jsonl")), "-o", str(tmp / "out"), "--backend", "openai",
            "--base-url", stub.base_url, "--model", MODEL, "--server", "openai", "--revise-rounds", "1",
            "--label-principles", "1", "--concurrency", "4", "--no-progress", *extra]


def manifest(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "out" / "run.json").read_text())


def totals(usage: dict[str, Any]) -> dict[str, int]:
    return {f: usage[f] for f in FIELDS}


def summed(by: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f: sum(v[f] for v in by.values()) for f in FIELDS}


def test_usage_equals_what_the_server_served_by_stage_and_step(stub: UsageStub, tmp_path: Path) -> None:
    assert main(args(stub, tmp_path)) == 0
    usage = manifest(tmp_path)["usage"]
    assert totals(usage) == dict(stub.tokens_served) and stub.tokens_served["cached_prompt_tokens"] > 0
    assert summed(usage["by_step"]) == totals(usage) == summed(usage["by_stage"])
    assert set(usage["by_stage"]) == {"revise", "label"}
    assert {"answer", "critique", "revision", "judge"} <= set(usage["by_step"]) <= {
        "answer", "critique", "revision", "judge", "judge_reasoning", "sample"}
    # the one run in the history holds the same
    assert totals(manifest(tmp_path)["history"][-1]["usage"]) == totals(usage)


def test_a_no_change_rerun_adds_nothing(stub: UsageStub, tmp_path: Path) -> None:
    assert main(args(stub, tmp_path)) == 0
    first, calls = manifest(tmp_path)["usage"], stub.calls
    (tmp_path / "out" / "revisions.jsonl").unlink()  # rebuilt from the cache: no call is served
    assert main(args(stub, tmp_path)) == 0
    m = manifest(tmp_path)
    assert stub.calls == calls and m["calls"]["sent"] == 0 and m["calls"]["cached"] > 0
    assert m["usage"] == first and len(m["history"]) == 2
    assert totals(m["history"][-1]["usage"]) == dict.fromkeys(FIELDS, 0)


def test_a_resumed_run_adds_what_it_was_served(stub: UsageStub, tmp_path: Path) -> None:
    assert main(args(stub, tmp_path, "--limit", "3")) == 0
    assert main(args(stub, tmp_path)) == 0  # three more prompts
    m = manifest(tmp_path)
    assert totals(m["usage"]) == dict(stub.tokens_served)
    assert [totals(h["usage"])["prompt_tokens"] > 0 for h in m["history"]] == [True, True]


def ledger(cache: Path) -> int:
    try:
        with sqlite3.connect(cache, timeout=5) as db:
            return int(db.execute("SELECT COALESCE(SUM(prompt_tokens), 0) FROM usage").fetchone()[0])
    except sqlite3.Error:
        return -1


def test_killed_then_resumed_run_counts_everything_the_server_served(stub: UsageStub, tmp_path: Path) -> None:
    """kill -9 mid-run once the answers it got are committed (later requests wait at the server),
    then rerun: the totals equal the sum of what the server served to both processes."""
    stub.limit = 9
    cmd = [sys.executable, "-m", "cai.cli", *args(stub, tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        db = tmp_path / "out" / "cache.sqlite"
        while not (stub.calls >= 9 and ledger(db) == stub.tokens_served["prompt_tokens"]):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run did not reach the limit"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        if proc.stderr:
            proc.stderr.close()
    served_before = dict(stub.tokens_served)
    assert manifest(tmp_path)["running"]  # killed: run.json still says so
    stub.release()
    assert main(args(stub, tmp_path)) == 0
    m = manifest(tmp_path)
    assert stub.tokens_served["prompt_tokens"] > served_before["prompt_tokens"] > 0  # both processes were served
    assert totals(m["usage"]) == dict(stub.tokens_served)
    assert summed(m["usage"]["by_step"]) == totals(m["usage"])
    assert len(m["history"]) == 1  # the killed run never finished: its tokens went to its rerun's entry


def test_cost_from_the_prices_given_and_the_summary_line(stub: UsageStub, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(stub, tmp_path, "--price-input", "2.5", "--price-output", "10")) == 0
    err = capsys.readouterr().err
    m = manifest(tmp_path)
    usage, cost = m["usage"], m["cost"]
    p, c = stub.tokens_served["prompt_tokens"], stub.tokens_served["completion_tokens"]
    assert cost["total"] == round((p * 2.5 + c * 10) / 1e6, 6)
    stage = {k: round((v["prompt_tokens"] * 2.5 + v["completion_tokens"] * 10) / 1e6, 6)
             for k, v in usage["by_stage"].items()}
    assert cost["by_stage"] == stage
    rows = len((tmp_path / "out" / "revisions.jsonl").read_text().splitlines())
    assert cost["per_sft_row"] == round(stage["revise"] / (rows - usage["rejected"]["rows"]), 8)
    assert cost["per_preference_pair"] == round(stage["label"] / m["counts"]["preferences"]["written"], 8)
    line = next(x for x in err.splitlines() if x.strip().startswith("usage:"))
    cached = stub.tokens_served["cached_prompt_tokens"]
    assert f"{p} tokens in ({cached} cached), {c} out over every run of this folder" in line
    assert f"cost ${cost['total']:.4f}" in line and "per SFT row" in line and "per preference pair" in line
    # no prices: no cost section, and the line says no cost
    assert main(args(stub, tmp_path)) == 0
    assert "cost" not in manifest(tmp_path)
    assert "cost $" not in next(x for x in capsys.readouterr().err.splitlines() if "usage:" in x)


def test_rejected_rows_tokens(tmp_path: Path) -> None:
    """p1's answers are cut at max_tokens: the truncated gate keeps its row out, and
    ``usage.rejected`` holds the tokens its calls cost (what the server served for them)."""
    with UsageStub(reply=long_for_thing_1, max_seconds=120) as stub:
        assert main(args(stub, tmp_path, "--no-label", "--revise-max-tokens", "20")) == 0
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reasons"]) for r in rejects] == [("p1", ["truncated"])]
    rejected = manifest(tmp_path)["usage"]["rejected"]
    p1 = stub.by_thing["1"]
    assert rejected == {"rows": 1, "prompt_tokens": p1["prompt_tokens"], "completion_tokens": p1["completion_tokens"]}
    assert 0 < rejected["prompt_tokens"] < manifest(tmp_path)["usage"]["prompt_tokens"]


def test_cached_tokens_parsed_and_stored_as_an_optional_key() -> None:
    data = {"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 8}}}
    c = parse_response(data)
    assert (c.prompt_tokens, c.completion_tokens, c.cached_prompt_tokens) == (10, 2, 8)
    assert Completion.from_dict(c.to_dict()).cached_prompt_tokens == 8
    plain = parse_response({"choices": data["choices"], "usage": {"prompt_tokens": 10, "completion_tokens": 2}})
    assert plain.cached_prompt_tokens == 0
    # the cache's JSON shape is unchanged without cached tokens, and old rows still read
    assert list(plain.to_dict()) == ["texts", "prompt_tokens", "completion_tokens", "logprobs", "finish_reasons",
                                     "error"]
    old = {"texts": ["x"], "prompt_tokens": 3, "completion_tokens": 1, "logprobs": None, "finish_reasons": ["stop"],
           "error": None}
    assert Completion.from_dict(old).cached_prompt_tokens == 0


def test_runs_made_before_tokens_were_counted_are_named(tmp_path: Path) -> None:
    """A folder whose earlier run.json history has no usage (an older cai): its runs are
    ``uncounted_runs``, never counted as zero tokens silently."""
    run = ["run", "--input", str(prompts(tmp_path / "prompts.jsonl", 2)), "-o", str(tmp_path / "out"), "--backend",
           "fake", "--revise-rounds", "1", "--label-principles", "1", "--no-progress"]
    assert main(run) == 0
    m = manifest(tmp_path)
    assert m["usage"]["prompt_tokens"] > 0 and "uncounted_runs" not in m["usage"]
    for h in m["history"]:
        del h["usage"]
    del m["usage"]
    (tmp_path / "out" / "run.json").write_text(json.dumps(m))
    assert main(run) == 0  # nothing changed: no call served
    m = manifest(tmp_path)
    assert m["usage"]["uncounted_runs"] == 1 and m["usage"]["prompt_tokens"] == 0 and len(m["history"]) == 2


def test_card_and_report_show_tokens_and_cost(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", "--input", str(prompts(tmp_path / "prompts.jsonl", 3)), "-o", str(out), "--backend", "fake",
                 "--revise-rounds", "1", "--label-principles", "1", "--no-progress", "--price-input", "3",
                 "--price-output", "15"]) == 0
    m = json.loads((out / "run.json").read_text())
    assert main(["export", str(out), "-o", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    cost_section = card.split("## What the data cost", 1)[1].split("\n## ", 1)[0]
    assert f"| prompt tokens served | {m['usage']['prompt_tokens']} |" in cost_section
    assert f"| completion tokens served | {m['usage']['completion_tokens']} |" in cost_section
    assert f"| cost (USD; 3.0 / 15.0 per million tokens in / out) | {m['cost']['total']:.4f} |" in cost_section
    assert "cost per accepted SFT row" in cost_section and "cost per preference pair" in cost_section
    assert main(["report", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["usage"]["prompt_tokens"] == m["usage"]["prompt_tokens"]
    assert report["usage"]["cost"]["total"] == m["cost"]["total"]
    page = (out / "report.html").read_text()
    assert "Tokens in / out" in page and f"${m['cost']['total']:.4f}" in page
