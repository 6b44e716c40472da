from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cai.backends.base import BackendBase, Completion, Request
from cai.backends.fake import FakeBackend
from cai.constitution import load_constitution
from cai.inputs import PromptRow, read_prompts
from cai.stages.revise import ReviseConfig, ReviseStage, clean_revision, fingerprint, principles_for, revise_chunk
from cai.stages.runner import run_stage
from cai.templates import Templates

CONST = load_constitution()
TPL = Templates()


def scripted(req: Request) -> str:
    """Answers that say which step asked, so the trace can be checked."""
    text = req.messages[-1]["content"]
    # the reply under work is in the critique request (which a revision continues)
    shown = next((m["content"] for m in reversed(req.messages) if "<response>\n" in m["content"]), "")
    if "Critique request:" in text:
        return "CRITIQUE of: " + shown.split("<response>\n", 1)[1].split("\n")[0]
    if "Revision request:" in text:
        return "Revision: REVISED(" + shown.split("<response>\n", 1)[1].split("\n")[0] + ")"
    return "INITIAL"


def rows(n: int) -> list[PromptRow]:
    return [PromptRow(id=f"r{i}", prompt=[{"role": "user", "content": f"question {i}"}]) for i in range(n)]


def test_rounds_chain_and_keep_every_step():
    be = FakeBackend(scripted)
    cfg = ReviseConfig(rounds=3)
    (o,) = revise_chunk(rows(1), be, CONST, TPL, cfg)
    row = o.row
    assert row is not None
    assert row["initial_response"] == "INITIAL"
    # each revision rewrites the previous one (label stripped), each critique sees the latest
    assert [r["critique"] for r in row["rounds"]] == [
        "CRITIQUE of: INITIAL", "CRITIQUE of: REVISED(INITIAL)", "CRITIQUE of: REVISED(REVISED(INITIAL))"]
    assert row["revised_response"] == "REVISED(REVISED(REVISED(INITIAL)))"
    assert row["messages"] == [{"role": "user", "content": "question 0"},
                               {"role": "assistant", "content": row["revised_response"]}]
    # the principle drawn for each round is the one in the prompt that was sent
    drawn = [p.id for p in principles_for("r0", CONST, cfg)]
    assert row["principle_ids"] == drawn and len(set(drawn)) == 3
    crit_prompts = [c.messages[-1]["content"] for c in be.calls if "Critique request:" in c.messages[-1]["content"]]
    for prompt, pid in zip(crit_prompts, drawn, strict=True):
        assert CONST.by_id()[pid].critique in prompt
    assert row["provenance"]["constitution_hash"] == CONST.digest()
    assert len(row["calls"]) == 1 + 2 * 3


class Gated(BackendBase):
    """Row 0's first answer is held until row 1 has sent its last call: under a per-step
    barrier (every row's step k before any row's step k+1) that never happens, and the
    wait times out."""

    model_id = "gated"

    def __init__(self) -> None:
        self.order: list[str] = []
        self.row1_done: asyncio.Event | None = None

    async def generate(self, request: Request) -> Completion:
        self.row1_done = self.row1_done or asyncio.Event()
        text = json.dumps(request.messages)
        row = "r0" if "question 0" in text else "r1"
        self.order.append(row)
        if row == "r0" and self.order.count("r0") == 1:
            await asyncio.wait_for(self.row1_done.wait(), timeout=10)
        if row == "r1" and self.order.count("r1") == 5:  # answer + 2 x (critique, revision)
            self.row1_done.set()
        return Completion(texts=[scripted(request)], finish_reasons=["stop"])


def test_rows_stream_through_their_steps_without_a_barrier():
    be = Gated()
    outs = revise_chunk(rows(2), be, CONST, TPL, ReviseConfig(rounds=2))
    assert all(o.row is not None for o in outs) and [o.id for o in outs] == ["r0", "r1"]
    # row 1 went through all five of its steps while row 0 waited on its first
    assert be.order[:6] == ["r0", "r1", "r1", "r1", "r1", "r1"]


def test_failed_call_fails_only_that_row():
    be = FakeBackend(scripted, fail=lambda r: any("question 3" in m["content"] for m in r.messages)
                     and "Revision request" in r.messages[-1]["content"])
    outs = revise_chunk(rows(5), be, CONST, TPL, ReviseConfig(rounds=1))
    bad = [o for o in outs if o.row is None]
    assert [o.id for o in bad] == ["r3"]
    assert bad[0].reason.startswith("round 1 revision: backend error")


def test_empty_output_is_a_failure_not_a_silent_row():
    be = FakeBackend(lambda r: Completion(texts=["  "], finish_reasons=["length"]))
    (o,) = revise_chunk(rows(1), be, CONST, TPL, ReviseConfig(rounds=1))
    assert o.row is None and "initial answer: empty output" in o.reason


def test_clean_revision():
    assert clean_revision("  Revision: Hello.") == "Hello."
    assert clean_revision("Revised response:\nHi") == "Hi"
    assert clean_revision("Revisions are good") == "Revisions are good"


def test_stage_run_resumes_and_writes_failures(tmp_path: Path, hh_dev: Path):
    out = tmp_path / "rev.jsonl"
    cfg = ReviseConfig(rounds=1)
    be = FakeBackend(fail=lambda r: "robot" in json.dumps(r.messages))
    fp = fingerprint(be, CONST, TPL, cfg)

    def run(limit: int) -> FakeBackend:
        b = FakeBackend(fail=be.fail)
        run_stage(out, fp, read_prompts(hh_dev, limit=limit), ReviseStage(CONST, TPL, cfg, b.model_id), backend=b,
                  title="t", total=limit, concurrency=4, progress=False)
        return b

    run(10)
    first = [json.loads(x) for x in out.read_text().splitlines()]
    failures = [json.loads(x) for x in (tmp_path / "rev.failures.jsonl").read_text().splitlines()]
    assert len(first) + len(failures) == 10 and failures, "row 1 mentions a robot and must fail"
    # a rerun over more rows only sends calls for the new rows and the failed one
    b2 = run(12)
    second = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in second[: len(first)]] == [r["id"] for r in first]
    assert len({r["id"] for r in second}) == len(second) == 12 - len(failures)
    # 3 calls for each new row; the failed row is retried and fails again at its first call
    assert len(b2.calls) == 3 * 2 + len(failures)
