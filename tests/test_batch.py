"""Batch mode (`--batch`: the OpenAI Batch API; `--batch-files`: offline wave files) against the
Batch-API stub (tests/fake_batch.py), whose answers are a function of the request: a batch run
must write what a streaming run writes, row for row, never send a request twice, and resend only
the requests an expired or failed batch left unanswered."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cai.backends.waves import BatchState
from cai.cli import main
from cai.errors import EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_WAVE_WRITTEN
from cai.progress import RunProgress, _RateColumn
from tests.fake_batch import MODEL, BatchStub, answer_file

REPO = Path(__file__).resolve().parent.parent
OUTPUTS = ("revisions.jsonl", "labels.jsonl", "preferences.jsonl")
PROMPTS = 5
CALLS = 25  # per run of PROMPTS prompts: answer, critique, revision (5 each) and 2 judge orders (10)
POLL = ["--batch-poll-seconds", "0.05"]


def _args(inp: Path, out: Path, url: str) -> list[str]:
    return ["run", "--input", str(inp), "-o", str(out), "--backend", "openai", "--base-url", url, "--model", MODEL,
            "--revise-rounds", "1", "--label-principles", "1", "--no-progress"]


def _rows(folder: Path) -> dict[str, list[dict]]:
    """The outputs, less the one field that names the folder (a label row's source path)."""
    out = {}
    for name in OUTPUTS:
        rows = [json.loads(x) for x in (folder / name).read_text().splitlines()]
        for r in rows:
            if isinstance(r.get("source"), str):
                r["source"] = r["source"].rsplit("/", 1)[-1]
        out[name] = rows
    return out


@pytest.fixture(scope="module")
def inp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("in") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"How do I fix problem number {i} at home?"}) + "\n"
                         for i in range(PROMPTS)))
    return p


@pytest.fixture(scope="module")
def reference(inp: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The streaming run's outputs (POST /v1/chat/completions of the same stub, same answers)."""
    out = tmp_path_factory.mktemp("stream") / "run"
    with BatchStub() as s:
        assert main(_args(inp, out, s.base_url)) == 0
        assert s.chats == CALLS and not s.batches
    return _rows(out)


@pytest.fixture
def stub() -> Iterator[BatchStub]:
    with BatchStub() as s:
        yield s


def test_a_batch_run_writes_what_a_streaming_run_writes(stub: BatchStub, inp: Path, tmp_path: Path,
                                                       reference: dict[str, list[dict]],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_args(inp, out, stub.base_url) + ["--batch", *POLL]) == 0
    assert f"batches: {len(stub.batches)} sent this run ({CALLS} requests); state in {out / 'batches.sqlite'}" \
        in capsys.readouterr().err
    assert _rows(out) == reference
    assert stub.chats == 0  # every call went through a batch
    # the steps are waves: answers, critiques, revisions, judgements (both orders at once); a wave
    # goes once the requests stop coming for a moment, so a stalled machine may split one
    assert len(stub.batches) >= 4 and len(next(iter(stub.inputs.values()))) <= PROMPTS
    assert sum(stub.submitted.values()) == CALLS and max(stub.submitted.values()) == 1
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["backend"]["batch"]["waves"] == len(stub.batches)
    assert {b["status"] for b in manifest["backend"]["batch"]["batches"].values()} == {"completed"}
    # a rerun is served by the cache and sends nothing
    batches = len(stub.batches)
    assert main(_args(inp, out, stub.base_url) + ["--batch", *POLL]) == 0
    assert len(stub.batches) == batches


def test_busy_batch_api_calls_are_retried(stub: BatchStub, inp: Path, tmp_path: Path,
                                          reference: dict[str, list[dict]]) -> None:
    stub.flaky.update({"upload": 2, "create": 1, "get": 2, "content": 1})
    assert main(_args(inp, tmp_path / "run", stub.base_url) + ["--batch", *POLL]) == 0
    assert _rows(tmp_path / "run") == reference
    assert not +stub.flaky and max(stub.submitted.values()) == 1 and sum(stub.submitted.values()) == CALLS


def test_the_per_batch_limit_splits_a_wave(stub: BatchStub, inp: Path, tmp_path: Path,
                                           reference: dict[str, list[dict]]) -> None:
    out = tmp_path / "run"
    assert main(_args(inp, out, stub.base_url) + ["--batch", *POLL, "--batch-max-requests", "2"]) == 0
    assert _rows(out) == reference
    assert max(len(x) for x in stub.inputs.values()) <= 2 and sum(stub.submitted.values()) == CALLS


def test_a_wave_over_the_file_size_limit_is_split(stub: BatchStub, inp: Path, tmp_path: Path,
                                                  reference: dict[str, list[dict]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cai.backends.batch_api.MAX_FILE_BYTES", 2000)  # about 3 request lines a file
    assert main(_args(inp, tmp_path / "run", stub.base_url) + ["--batch", *POLL]) == 0
    assert _rows(tmp_path / "run") == reference
    inputs = [f for f in stub.files.values() if f.startswith(b'{"custom_id"')]
    assert all(len(f) <= 2000 or f.count(b"\n") == 1 for f in inputs)  # a longer line goes alone
    assert len(stub.batches) > 4 and sum(stub.submitted.values()) == CALLS


@pytest.mark.parametrize("when", ["polling", "creating", "uploading", "lost"])
def test_kill_9_while_polling_then_rerun_sends_no_request_twice(stub: BatchStub, inp: Path, tmp_path: Path,
                                                                 reference: dict[str, list[dict]], when: str) -> None:
    """Killed while polling: the rerun polls the same batch. ``creating``: as if killed between the
    upload and the batch id's record (the rerun finds the batch made of its file). ``lost``: the
    server no longer knows the batch (404): its requests are sent again, once. ``uploading``: as if
    killed before the file was uploaded: the wave is abandoned and its requests sent in a new one."""
    out = tmp_path / "run"
    stub.hold = True  # the first batch stays in_progress until the run is killed
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cai.cli", *_args(inp, out, stub.base_url), "--batch", *POLL]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    with proc:  # closes the stderr pipe
        try:
            deadline = time.monotonic() + 60
            while not (stub.polls and max(stub.polls.values()) >= 3):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the run never polled a batch"
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    first = next(iter(stub.batches))
    with sqlite3.connect(out / "batches.sqlite") as db:  # recorded as soon as it was made
        assert db.execute("SELECT batch_id, done FROM waves").fetchall() == [(first, 0)]
    if when == "creating":
        with sqlite3.connect(out / "batches.sqlite") as db:
            db.execute("UPDATE waves SET batch_id = NULL, status = 'uploaded'")
    if when == "uploading":
        with sqlite3.connect(out / "batches.sqlite") as db:
            db.execute("UPDATE waves SET batch_id = NULL, file_id = NULL, status = 'uploading'")
    if when == "lost":
        lost = stub.batches.pop(first)
    polls = stub.polls[first]
    stub.hold = False
    assert main(_args(inp, out, stub.base_url) + ["--batch", *POLL]) == 0
    assert _rows(out) == reference
    if when in ("lost", "uploading"):
        twice = {x["custom_id"] for x in stub.inputs[first]}
        assert {k for k, n in stub.submitted.items() if n > 1} == twice
        assert when == "uploading" or lost["status"] == "in_progress"
        with sqlite3.connect(out / "batches.sqlite") as db:
            assert db.execute("SELECT status FROM waves WHERE n = 1").fetchone()[0] == \
                ("abandoned" if when == "uploading" else "lost")
        assert max(stub.submitted.values()) == 2
        return
    assert stub.polls[first] > polls  # the rerun polled the same batch
    assert max(stub.submitted.values()) == 1 and sum(stub.submitted.values()) == CALLS


def test_an_expired_batch_resends_only_its_missing_requests(stub: BatchStub, inp: Path, tmp_path: Path,
                                                            reference: dict[str, list[dict]]) -> None:
    out = tmp_path / "run"
    stub.outcomes = [("expired", 2)]  # the first batch answers 2 of its 5 requests, then expires
    assert main(_args(inp, out, stub.base_url) + ["--batch", *POLL]) == 0
    assert _rows(out) == reference
    first = stub.inputs[next(iter(stub.batches))]
    missing = {x["custom_id"] for x in first[2:]}
    assert {k for k, n in stub.submitted.items() if n > 1} == missing
    assert max(stub.submitted.values()) == 2 and sum(stub.submitted.values()) == CALLS + len(missing)


def test_a_failed_batch_is_sent_again(stub: BatchStub, inp: Path, tmp_path: Path,
                                      reference: dict[str, list[dict]]) -> None:
    out = tmp_path / "run"
    stub.outcomes = [("failed",)]
    assert main(_args(inp, out, stub.base_url) + ["--batch", *POLL]) == 0
    assert _rows(out) == reference
    assert [b["status"] for b in stub.batches.values()][0] == "failed"
    assert sum(stub.submitted.values()) == CALLS + PROMPTS


def test_a_line_error_fails_its_row_as_in_streaming(inp: Path, tmp_path: Path) -> None:
    def fail(body: dict) -> int | None:  # the answer to prompt 3 is refused
        last = body["messages"][-1]["content"]
        return 400 if len(body["messages"]) <= 2 and "number 3 " in last else None

    reasons = []
    for mode in ([], ["--batch", *POLL]):
        out = tmp_path / ("batch" if mode else "stream")
        with BatchStub(fail_line=fail) as s:
            assert main(_args(inp, out, s.base_url) + mode) == EXIT_ROWS_FAILED
        failed = [json.loads(x) for x in (out / "revisions.failures.jsonl").read_text().splitlines()]
        assert len(failed) == 1 and "HTTP 400" in failed[0]["reason"]
        reasons.append(failed[0]["reason"])
    assert reasons[0] == reasons[1]


def test_fields_refused_by_name_are_dropped_and_sent_again(inp: Path, tmp_path: Path) -> None:
    """OpenAI's Batch API refuses vLLM's fields line by line (``--server auto`` sends them first):
    the batch run learns it as the streaming run does, and both write the same rows."""
    def strict(body: dict) -> tuple[int, str] | None:
        extra = sorted(f for f in ("repetition_penalty", "structured_outputs", "continue_final_message",
                                   "add_generation_prompt") if f in body)
        return (400, f"Unrecognized request argument supplied: {', '.join(extra)}") if extra else None

    got = []
    for mode in ([], ["--batch", *POLL]):
        out = tmp_path / ("batch" if mode else "stream")
        with BatchStub(fail_line=strict, owned_by="openai") as s:
            assert main(_args(inp, out, s.base_url) + mode) == 0
            if mode:
                assert max(s.submitted.values()) == 2  # refused once, then sent without the fields
        got.append(_rows(out))
    assert got[0] == got[1]


def test_batch_files_complete_a_run_in_waves(inp: Path, tmp_path: Path, reference: dict[str, list[dict]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out, waves = tmp_path / "run", tmp_path / "waves"
    args = _args(inp, out, "http://127.0.0.1:9/v1") + ["--batch-files", str(waves)]  # no server there
    for step in range(1, 20):
        code = main(args)
        if code == 0:
            break
        assert code == EXIT_WAVE_WRITTEN
        req = waves / f"wave-{step:03d}.requests.jsonl"
        line = capsys.readouterr().err
        assert "waiting:" in line and str(req) in line and f"wave-{step:03d}.output.jsonl" in line
        first = json.loads(req.read_text().splitlines()[0])
        assert first["method"] == "POST" and first["url"] == "/v1/chat/completions" and first["body"]["model"] == MODEL
        (waves / f"wave-{step:03d}.output.jsonl").write_bytes(answer_file(req.read_bytes()))
    assert code == 0 and step >= 5  # 4 waves (answers, critiques, revisions, judgements), then done
    assert _rows(out) == reference
    sent = [json.loads(x)["custom_id"] for p in sorted(waves.glob("*.requests.jsonl"))
            for x in p.read_text().splitlines()]
    assert len(sent) == len(set(sent)) == CALLS


def test_batch_files_a_rerun_without_output_writes_the_same_wave(inp: Path, tmp_path: Path) -> None:
    out, waves = tmp_path / "run", tmp_path / "waves"
    args = _args(inp, out, "http://127.0.0.1:9/v1") + ["--batch-files", str(waves)]
    assert main(args) == EXIT_WAVE_WRITTEN
    first = (waves / "wave-001.requests.jsonl").read_text()
    assert main(args) == EXIT_WAVE_WRITTEN
    assert sorted(p.name for p in waves.iterdir()) == ["wave-001.requests.jsonl"]
    assert (waves / "wave-001.requests.jsonl").read_text() == first
    # a partial output: the missing requests go into the next wave
    lines = answer_file(first.encode()).splitlines(keepends=True)
    (waves / "wave-001.output.jsonl").write_bytes(b"".join(lines[:3]))
    assert main(args) == EXIT_WAVE_WRITTEN
    ids = {json.loads(x)["custom_id"] for x in (waves / "wave-002.requests.jsonl").read_text().splitlines()}
    assert {json.loads(x)["custom_id"] for x in lines[3:]} <= ids


@pytest.mark.parametrize(("extra", "says"), [
    (["--batch", "--backend", "embedded"], "--batch sends the calls as OpenAI Batch API requests"),
    (["--batch", "--batch-files", "DIR"], "--batch and --batch-files contradict each other"),
    (["--batch-files", "DIR", "--model", ""], "--batch-files needs --model"),
])
def test_impossible_combinations_are_one_line(inp: Path, tmp_path: Path, extra: list[str], says: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(inp, tmp_path / "run", "http://127.0.0.1:9/v1")
    extra = [str(tmp_path / "w") if x == "DIR" else x for x in extra]
    assert main(args + extra) == EXIT_USAGE
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_progress_shows_each_batch_with_the_time_since_it_changed() -> None:
    bars = RunProgress()  # off a terminal: plain lines
    state = BatchState("wave 2", "finalizing", 4812, 5000, batch_id="batch_abc")
    state.changed -= 190
    bars.batch(state)
    assert bars._plain is not None
    assert "wave 2 (batch_abc) finalizing 0:03:10, 4,812/5,000" in bars._plain.line()
    task = bars._progress.tasks[0]  # on a terminal: the bar's counts, and the state with its time
    assert _RateColumn().render(task).plain == "(batch_abc) finalizing 0:03:10"
    assert (task.completed, task.total) == (4812, 5000)
    state.update("completed", 5000, 5000, 0)
    bars.batch(state)
    assert "wave 2" not in bars._plain.line()


@pytest.mark.parametrize(("line", "want"), [
    # OpenAI: an error line with the HTTP answer's body
    ({"response": {"status_code": 400, "body": {"error": {"message": "bad prompt"}}}, "error": None},
     ("request", "HTTP 400: bad prompt")),
    # vllm run-batch: the status, no body, the error as a string or as its ErrorResponse
    ({"response": {"status_code": 400, "request_id": "r", "body": None}, "error": "Request must not be streamed"},
     ("request", "HTTP 400: Request must not be streamed")),
    ({"response": {"status_code": 500, "body": None}, "error": {"error": {"message": "engine died", "code": 500}}},
     ("server", "HTTP 500: engine died")),
    ({"response": None, "error": {"code": "batch_expired", "message": "not run"}}, None),  # missing: sent again
    ({"response": None, "error": {"code": "server_error", "message": "boom"}}, ("server", "batch line error: boom")),
])
def test_error_lines_of_openai_and_vllm_are_read(line: dict, want: tuple[str, str] | None) -> None:
    from cai.backends.dialect import Learned
    from cai.backends.waves import read_answer
    from cai.types import Request

    req = Request(({"role": "user", "content": "hi"},))
    c = read_answer({"custom_id": "k", **line}, req, Learned("auto"), "m", None)
    assert (None if c is None else (c.failure.kind, c.failure.message)) == want  # type: ignore[union-attr]


def test_a_wave_waits_for_quiet_but_not_forever() -> None:
    from cai.backends.waves import GATHER, WaveBackend

    b = WaveBackend("m", lambda model, req: "k", quiet=1.0)
    b._oldest, b._last = 100.0, 130.0
    assert b.due() == 131.0  # one quiet second after the last request
    b._last = 100.0 + GATHER - 0.5  # requests kept trickling in: the wave goes GATHER quiet periods after the first
    assert b.due() == 100.0 + GATHER


def test_cai_label_in_batch_files_mode_equals_its_streaming_run(inp: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`cai label` (a labelling job over a pairs file) takes the batch settings too: its waves, answered
    by the stub's answer function, write the streaming label run's rows."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.",
                                         "rejected": f"A rude answer {i}!"}) + "\n" for i in range(4)))

    def label(out: Path, url: str, *extra: str) -> int:
        return main(["label", str(pairs), "-o", str(out / "preferences.jsonl"), "--backend", "openai", "--base-url",
                     url, "--model", MODEL, "--principles", "2", "--no-progress", *extra])

    with BatchStub() as s:
        assert label(tmp_path / "stream", s.base_url) == 0
    waves = tmp_path / "waves"
    for step in range(1, 5):
        if (code := label(tmp_path / "batch", "http://127.0.0.1:9/v1", "--batch-files", str(waves))) == 0:
            break
        assert code == EXIT_WAVE_WRITTEN
        req = waves / f"wave-{step:03d}.requests.jsonl"
        (waves / f"wave-{step:03d}.output.jsonl").write_bytes(answer_file(req.read_bytes()))
    assert code == 0 and step == 2  # one wave: every judgement of every pair at once
    capsys.readouterr()
    for name in ("labels.jsonl", "preferences.jsonl"):
        rows = [(tmp_path / d / name).read_text().replace(str(tmp_path / d), "") for d in ("stream", "batch")]
        assert rows[0] == rows[1] and rows[0]
