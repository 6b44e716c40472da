"""`cai best-of-n` / ``pipeline.run_best_of_n`` on the fake backend with a scripted judge.

The policy's answers carry their quality (``q=1.5 ...``); the judge answers P(A) =
sigmoid(q(A) - q(B)) in either order (as in tests/test_reward.py), so the round robin's soft
win rates, the best and the worst are computed here from the qualities alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai import pipeline
from cai.backends.fake import FakeBackend
from cai.stages.best_of_n import pairs_path, to_pair
from cai.types import Completion, Request

REPO = Path(__file__).resolve().parent.parent
QUALITIES = [0.5, 2.0, -1.0, 1.0]  # sample i's quality: the best is 1, the worst 2


def _body(text: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.S)
    assert m is not None, text
    return m.group(1)


def quality(text: str) -> float:
    m = re.match(r"q=(-?[\d.]+)", text.strip())
    assert m is not None, text
    return float(m.group(1))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _user(req: Request) -> str:
    return str([m for m in req.messages if m["role"] == "user"][-1]["content"])


def respond(req: Request) -> Completion:
    user = _user(req)
    if "<response_a>" in user:
        p = sigmoid(quality(_body(user, "response_a")) - quality(_body(user, "response_b")))
        return Completion(["A"], logprobs=[{"A": math.log(p), " B": math.log(1 - p)}])
    texts = [f"q={q} answer {i} to {user}" for i, q in enumerate(QUALITIES[:req.sampling.n])]
    return Completion(texts, finish_reasons=["stop"] * len(texts))


def ignores_n(req: Request) -> Completion:
    """A server that ignores ``n``: one answer per request, its quality by the request's seed."""
    if "<response_a>" in _user(req):
        return respond(req)
    return Completion([f"q={(req.sampling.seed or 0) % 5 - 2} seeded {req.sampling.seed}"], finish_reasons=["stop"])


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i:02d}", "prompt": f"Question {i}: how?"}) + "\n"
                            for i in range(n)))
    return path


def test_n4_ranks_as_the_judge_dictates_and_a_rerun_is_free(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    out = tmp_path / "bon" / "best_of_n.jsonl"
    fake = FakeBackend(respond)
    res = pipeline.run_best_of_n(str(prompts), backend=fake, output=out, n=4, label_principles=2, progress=False)
    assert res.summary.written == 3 and res.summary.failed == 0
    # 1 sampling request + 6 matches x 2 principles x 2 orders, per prompt
    assert res.calls.sent == len(fake.calls) == 3 * (1 + 6 * 2 * 2)
    win = [sum(sigmoid(QUALITIES[i] - QUALITIES[j]) for j in range(4) if j != i) / 3 for i in range(4)]
    for row in res.rows:
        assert row["ranking"]["method"] == "round_robin" and len(row["ranking"]["matches"]) == 6
        assert (row["best"], row["worst"]) == (1, 2)
        assert row["ranking"]["scores"] == pytest.approx(win)
        assert [quality(s["text"]) for s in row["samples"]] == QUALITIES
        assert row["messages"] == [*row["prompt"], {"role": "assistant", "content": row["samples"][1]["text"]}]
        assert row["margin"] == pytest.approx(win[1] - win[2])
    pairs = [json.loads(x) for x in pairs_path(out).read_text().splitlines()]
    assert [p["id"] for p in pairs] == ["p00", "p01", "p02"]
    for row, pair in zip(res.rows, pairs, strict=True):
        assert pair == to_pair(row)
        assert quality(pair["chosen"][0]["content"]) == 2.0 and quality(pair["rejected"][0]["content"]) == -1.0
    before = out.read_bytes()

    again = pipeline.run_best_of_n(str(prompts), backend=FakeBackend(respond), output=out, n=4,
                                   label_principles=2, progress=False)
    assert again.calls.sent == 0 and again.summary.resumed == 3 and out.read_bytes() == before


def test_identical_answers_make_no_pair_and_ties_cost_no_call(tmp_path: Path) -> None:
    def same(req: Request) -> Completion:
        return respond(req) if "<response_a>" in _user(req) else Completion(["q=1 same"] * req.sampling.n)

    fake = FakeBackend(same)
    res = pipeline.run_best_of_n(["Hi?"], backend=fake, n=3, progress=False)
    (row,) = res.rows
    assert row["margin"] == 0 and row["ranking"]["scores"] == [0.5, 0.5, 0.5]
    assert len(fake.calls) == 1 and to_pair(row) is None


def test_a_server_that_ignores_n_gets_distinct_seeds(tmp_path: Path) -> None:
    fake = FakeBackend(ignores_n)
    res = pipeline.run_best_of_n(["Hi?"], backend=fake, n=4, label_principles=1, progress=False)
    (row,) = res.rows
    samples = [c for c in fake.calls if "<response_a>" not in _user(c)]
    assert [c.sampling.n for c in samples] == [4, 1, 1, 1]
    assert len({c.sampling.seed for c in samples}) == 4
    texts = [s["text"] for s in row["samples"]]
    assert len(set(texts)) == 4
    q = [quality(t) for t in texts]
    assert row["best"] == q.index(max(q)) and row["worst"] == len(q) - 1 - q[::-1].index(min(q))


def test_knockout_above_eight(tmp_path: Path) -> None:
    def many(req: Request) -> Completion:
        if "<response_a>" in _user(req):
            return respond(req)
        return Completion([f"q={(i * 7) % 10} answer {i}" for i in range(req.sampling.n)])

    res = pipeline.run_best_of_n(["Hi?"], backend=FakeBackend(many), n=10, label_principles=1, progress=False)
    (row,) = res.rows
    q = [quality(s["text"]) for s in row["samples"]]
    assert row["ranking"]["method"] == "knockout" and len(row["ranking"]["matches"]) < 45
    assert q[row["best"]] == max(q) and q[row["worst"]] == min(q)


def test_rows_and_pairs_are_trl_sft_and_dpo_rows(tmp_path: Path, model_dir: Path) -> None:
    """The SFT rows and the pairs in TRL's conversational formats: SFT's ``messages`` and DPO's
    explicit-prompt ``prompt``/``chosen``/``rejected``, rendered by TRL's own chat-template helper."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    data_utils = pytest.importorskip("trl.data_utils")
    out = tmp_path / "best_of_n.jsonl"
    pipeline.run_best_of_n(str(write_prompts(tmp_path / "p.jsonl", 2)), backend=FakeBackend(respond), output=out,
                           n=4, label_principles=1, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    sft = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert "messages" in sft.column_names and len(sft) == 2
    for ex in sft:
        assert data_utils.is_conversational({"messages": ex["messages"]})
        assert ex["messages"][-1]["role"] == "assistant"
        text = data_utils.maybe_apply_chat_template({"messages": ex["messages"]}, tok)["text"]
        assert ex["messages"][-1]["content"] in text
    dpo = datasets.load_dataset("json", data_files=str(pairs_path(out)), split="train",
                                cache_dir=str(tmp_path / "hf2"))
    assert {"prompt", "chosen", "rejected"} <= set(dpo.column_names) and len(dpo) == 2
    for ex in dpo:
        row = {k: ex[k] for k in ("prompt", "chosen", "rejected")}
        assert data_utils.is_conversational(row)
        rendered = data_utils.maybe_apply_chat_template(row, tok)
        assert set(rendered) >= {"prompt", "chosen", "rejected"}
        assert ex["chosen"][0]["content"] in rendered["chosen"]


def test_kill_9_mid_run_then_rerun_writes_every_id_once(tmp_path: Path) -> None:
    rows = 40
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out" / "best_of_n.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")} | {"CAI_FAKE_DELAY": "0.02"}
    cmd = [sys.executable, "-m", "cai.cli", "best-of-n", str(prompts), "-o", str(out), "--backend", "fake",
           "--n", "4", "-k", "1", "--concurrency", "8", "--no-progress"]
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        part = out.with_name(out.name + ".part")
        start = len(part.read_text().splitlines()) if part.exists() else 0
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if part.exists() and len(part.read_text().splitlines()) >= start + 3:
                break
            time.sleep(0.01)
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 1, "the run finished before any kill"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [f"p{i:02d}" for i in range(rows)]
    pairs = [json.loads(x)["id"] for x in pairs_path(out).read_text().splitlines()]
    assert len(pairs) == len(set(pairs)) and set(pairs) <= set(ids)
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith((".part", ".tmp"))]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "calls: 0 sent" in again.stderr, again.stderr


def test_a_truncated_best_is_gated_out_of_the_pairs(tmp_path: Path) -> None:
    def cut(req: Request) -> Completion:
        c = respond(req)
        if "<response_a>" in _user(req):
            return c
        return Completion(c.texts, finish_reasons=["length" if quality(t) == 2.0 else "stop" for t in c.texts])

    out = tmp_path / "best_of_n.jsonl"
    res = pipeline.run_best_of_n(["Hi?"], backend=FakeBackend(cut), output=out, n=4, label_principles=1,
                                 progress=False)
    (row,) = res.rows
    assert row["best"] == 1 and row["gates"] == ["truncated"] and to_pair(row) is not None
    assert pairs_path(out).read_text() == "" and res.preferences is not None and res.preferences.written == 0
    assert [r["id"] for r in map(json.loads, (tmp_path / "rejects.jsonl").read_text().splitlines())] == [row["id"]]
    kept = pipeline.run_best_of_n(["Hi?"], backend=FakeBackend(cut), output=tmp_path / "k" / "b.jsonl", n=4,
                                  label_principles=1, gates_truncated=False, progress=False)
    assert kept.preferences is not None and kept.preferences.written == 1
