"""`cai best-of-n` / ``pipeline.run_best_of_n`` on the fake backend with a scripted judge.

The policy's answers carry their quality (``q=1.5 ...``); the judge answers P(A) =
sigmoid(q(A) - q(B)) in either order (tests/scripted_judge.py), so the round robin's soft
win rates, the best and the worst are computed here from the qualities alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai import pipeline
from cai.backends.fake import FakeBackend
from cai.cli import main
from cai.config import RunConfig
from cai.errors import ConfigError
from cai.stages.best_of_n import pairs_path, to_pair
from cai.types import Completion, Request
from tests.scripted_judge import is_pairwise, judge_pair, quality, sigmoid, user_text

REPO = Path(__file__).resolve().parent.parent
QUALITIES = [0.5, 2.0, -1.0, 1.0]  # sample i's quality: the best is 1, the worst 2


def respond(req: Request) -> Completion:
    if is_pairwise(req):
        return judge_pair(req)
    user = user_text(req)
    texts = [f"q={q} answer {i} to {user}" for i, q in enumerate(QUALITIES[:req.sampling.n])]
    return Completion(texts, finish_reasons=["stop"] * len(texts))


def ignores_n(req: Request) -> Completion:
    """A server that ignores ``n``: one answer per request, its quality by the request's seed."""
    if is_pairwise(req):
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
        return respond(req) if is_pairwise(req) else Completion(["q=1 same"] * req.sampling.n)

    fake = FakeBackend(same)
    res = pipeline.run_best_of_n(["Hi?"], backend=fake, n=3, progress=False)
    (row,) = res.rows
    assert row["margin"] == 0 and row["ranking"]["scores"] == [0.5, 0.5, 0.5]
    assert len(fake.calls) == 1 and to_pair(row) is None


def test_a_server_that_ignores_n_gets_distinct_seeds(tmp_path: Path) -> None:
    fake = FakeBackend(ignores_n)
    res = pipeline.run_best_of_n(["Hi?"], backend=fake, n=4, label_principles=1, progress=False)
    (row,) = res.rows
    samples = [c for c in fake.calls if not is_pairwise(c)]
    assert [c.sampling.n for c in samples] == [4, 1, 1, 1]
    assert len({c.sampling.seed for c in samples}) == 4
    texts = [s["text"] for s in row["samples"]]
    assert len(set(texts)) == 4
    q = [quality(t) for t in texts]
    assert row["best"] == q.index(max(q)) and row["worst"] == len(q) - 1 - q[::-1].index(min(q))


def test_knockout_above_eight(tmp_path: Path) -> None:
    def many(req: Request) -> Completion:
        if is_pairwise(req):
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


@pytest.mark.parametrize("command", ["best-of-n", "run"])
def test_kill_9_mid_run_then_rerun_writes_every_id_once(tmp_path: Path, command: str) -> None:
    """`cai best-of-n`, and `cai run` with best_of_n (no revise stage), killed mid-run and rerun."""
    rows = 40
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out" / "best_of_n.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")} | {"CAI_FAKE_DELAY": "0.02"}
    args = ([str(prompts), "-o", str(out), "--n", "4"] if command == "best-of-n" else
            ["--input", str(prompts), "-o", str(out.parent), "--best-of-n", "--best-of-n-n", "4", "--no-revise"])
    cmd = [sys.executable, "-m", "cai.cli", command, *args, "--backend", "fake", "-k", "1", "--concurrency", "8",
           "--no-progress"]
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        if is_pairwise(req):
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


# --- `cai run` with best_of_n, label.policy_model, report and export ---------------------------


def run_config(tmp_path: Path, prompts: Path, **best: object) -> RunConfig:
    return RunConfig.model_validate({
        "input": str(prompts), "output": str(tmp_path / "run"), "backend": "fake", "progress": False,
        "revise": {"rounds": 1}, "label": {"principles": 2}, "best_of_n": {"enabled": True, "n": 4, **best}})


def win_rates() -> list[float]:
    return [sum(sigmoid(QUALITIES[i] - QUALITIES[j]) for j in range(4) if j != i) / 3 for i in range(4)]


def test_cai_run_with_best_of_n_replaces_the_label_stage(tmp_path: Path) -> None:
    """`cai run` with best_of_n: the revise stage and best-of-n side by side in one run folder;
    best-of-n's pairs replace the label stage's; run.json counts it; a rerun sends no call."""
    cfg = run_config(tmp_path, write_prompts(tmp_path / "p.jsonl", 3))
    fake = FakeBackend(respond)
    res = pipeline.run_pipeline(cfg, backend=fake)
    out = cfg.output
    assert set(res.stages) == {"revise", "best_of_n"} and res.stages["best_of_n"].written == 3
    assert not (out / "labels.jsonl").exists() and not (out / "preferences.jsonl").exists()
    rows = [json.loads(x) for x in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert [(r["best"], r["worst"]) for r in rows] == [(1, 2)] * 3
    assert rows[0]["ranking"]["scores"] == pytest.approx(win_rates())
    pairs = [json.loads(x) for x in (out / "best_of_n.pairs.jsonl").read_text().splitlines()]
    assert [quality(p["chosen"][0]["content"]) for p in pairs] == [2.0] * 3
    revise_calls = 3 * (1 + 2)  # answer, critique, revision per prompt
    assert res.calls.sent == revise_calls + 3 * (1 + 6 * 2 * 2)
    m = json.loads((out / "run.json").read_text())
    assert m["counts"]["best_of_n"]["written"] == 3 and m["counts"]["preferences"]["written"] == 3
    assert m["counts"]["preferences"]["from"] == "best_of_n" and m["best_of_n"]["n"] == 4
    assert m["models"] == {"policy": "fake", "judge": "fake"}
    assert m["history"][-1]["counts"]["best_of_n"]["written"] == 3
    before = (out / "best_of_n.jsonl").read_bytes()

    again = pipeline.run_pipeline(cfg, backend=FakeBackend(respond))
    assert again.calls.sent == 0 and again.stages["best_of_n"].resumed == 3
    assert (out / "best_of_n.jsonl").read_bytes() == before
    assert len(json.loads((out / "run.json").read_text())["history"]) == 2


def test_cai_run_best_of_n_summary_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    code = main(["run", "--input", str(prompts), "-o", str(tmp_path / "o"), "-b", "fake", "--no-revise",
                 "--best-of-n", "--best-of-n-n", "3", "-k", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "best_of_n: 0 rows unchanged (cache), 0 redone, 2 new, 0 failed" in err
    assert "pairs: " in err and "best_of_n.pairs.jsonl" in err and "revise:" not in err
    with contextlib.suppress(SystemExit):
        main(["run", "--help"])
    assert "replaces the label stage" in " ".join(capsys.readouterr().out.split())


def test_best_of_n_with_label_sources_is_one_config_error(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, write_prompts(tmp_path / "p.jsonl", 1)).model_copy(deep=True)
    cfg.label.sources = ["sample"]
    with pytest.raises(ConfigError, match="best_of_n replaces the label stage"):
        pipeline.run_pipeline(cfg, backend=FakeBackend(respond))
    assert not cfg.output.exists()


def test_policy_model_samples_and_model_judges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """label.policy_model answers (the n samples), model judges: each backend gets only its
    requests; the rows' provenance and run.json name both; another policy redoes the rows."""
    built: dict[str, list[FakeBackend]] = {}
    real = pipeline.build_backend

    def build(name: str, model: str | None = None, **kw: object) -> FakeBackend:
        be = real(name, model, **kw)
        built.setdefault(be.model_id, []).append(be)
        return be

    monkeypatch.setattr(pipeline, "build_backend", build)
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "bon" / "best_of_n.jsonl"
    res = pipeline.run_best_of_n(str(prompts), backend="fake", model="judge-m", label_policy_model="policy-m",
                                 output=out, n=3, label_principles=1, progress=False)
    assert res.summary.written == 2
    (judge,), (policy,) = built["judge-m"], built["policy-m"]
    assert policy.calls and not any(is_pairwise(c) for c in policy.calls)
    assert judge.calls and all(is_pairwise(c) for c in judge.calls)
    for row in res.rows:
        assert row["provenance"]["model"] == "judge-m" and row["provenance"]["policy_model"] == "policy-m"
    other = pipeline.run_best_of_n(str(prompts), backend="fake", model="judge-m", label_policy_model="other",
                                   output=out, n=3, label_principles=1, progress=False)
    assert other.summary.resumed == 0 and other.summary.written == 2

    cfg = run_config(tmp_path, prompts, n=3).model_copy(update={"model": "judge-m"}, deep=True)
    cfg.label.policy_model, cfg.revise.enabled = "policy-m", False
    pipeline.run_pipeline(cfg)
    m = json.loads((cfg.output / "run.json").read_text())
    assert m["models"] == {"policy": "policy-m", "judge": "judge-m", "samples": "policy-m"}


def test_report_of_a_best_of_n_folder(tmp_path: Path) -> None:
    """`cai report` on a `cai best-of-n` folder: rows, pairs, margins, where the best stood; the
    matches are judged pairs (origin ranking) with the scripted judge's consistency."""
    from cai.analysis import build_report
    from cai.report.html import write_report

    out = tmp_path / "bon" / "best_of_n.jsonl"
    pipeline.run_best_of_n(str(write_prompts(tmp_path / "p.jsonl", 3)), backend=FakeBackend(respond), output=out,
                           n=4, label_principles=2, progress=False)
    rep = build_report(out.parent)
    win = win_rates()
    b = rep["best_of_n"]
    assert b["rows"] == 3 and b["pairs"] == 3 and b["samples"] == {"4": 3} and b["best_at"] == {"1": 3}
    assert b["methods"] == {"round_robin": 3} and b["matches"] == 18 and b["undecided_matches"] == 0
    assert b["margin"]["mean"] == pytest.approx(win[1] - win[2], abs=1e-6)
    assert rep["headline"]["best_of_n_rows"] == 3 and rep["headline"]["best_of_n_pairs"] == 3
    assert rep["labels"]["by_origin"] == {"ranking": 18} and rep["labels"]["overall"]["position_consistency"] == 1.0
    assert rep["run"]["models"] == {"judge": "fake", "samples": "fake"}
    _, page = write_report(out.parent)
    html = page.read_text()
    assert "Best-of-n rows" in html and "best of 4" in html


def test_export_of_best_of_n_folders(tmp_path: Path) -> None:
    """`cai export`: the best rows are the SFT split, best-vs-worst the preference split (TRL's
    columns); the card says they are the best of n and their margin. In a `cai run` folder with
    the revise stage too, the revisions come first, then the best rows."""
    from cai import export as ex

    out = tmp_path / "bon" / "best_of_n.jsonl"
    pipeline.run_best_of_n(str(write_prompts(tmp_path / "p.jsonl", 4)), backend=FakeBackend(respond), output=out,
                           n=4, label_principles=1, progress=False)
    built = ex.build(out.parent, test_fraction=0)
    assert set(built.dataset) == {"train_sft", "train_prefs"}
    sft, prefs = built.dataset["train_sft"], built.dataset["train_prefs"]
    assert len(sft) == 4 and all(quality(r["messages"][-1]["content"]) == 2.0 for r in sft)
    assert prefs.column_names[:3] == ["prompt", "chosen", "rejected"] and len(prefs) == 4
    for r in prefs:
        assert quality(r["chosen"][-1]["content"]) == 2.0 and quality(r["rejected"][-1]["content"]) == -1.0
        assert r["score_chosen"] == pytest.approx(win_rates()[1]) and r["label_mode"] == "logprobs"
    card = (ex.save(built, tmp_path / "export") / "README.md").read_text()
    assert "4 SFT rows are the best of 4 answers per prompt and 4 pairs are best vs worst" in card
    assert f"| mean margin (best's soft win rate - worst's) | {win_rates()[1] - win_rates()[2]:.3f}" in card

    cfg = run_config(tmp_path, write_prompts(tmp_path / "q.jsonl", 3))
    pipeline.run_pipeline(cfg, backend=FakeBackend(respond))
    run = ex.build(cfg.output, test_fraction=0).dataset
    texts = [r["messages"][-1]["content"] for r in run["train_sft"]]
    assert len(texts) == 6 and [quality(t) for t in texts[3:]] == [2.0] * 3  # 3 revisions, then 3 best
    assert len(run["train_prefs"]) == 3


def test_a_truncated_best_stays_out_of_the_export(tmp_path: Path) -> None:
    def cut(req: Request) -> Completion:
        c = respond(req)
        if is_pairwise(req) or "Question 0" not in user_text(req):
            return c
        return Completion(c.texts, finish_reasons=["length" if quality(t) == 2.0 else "stop" for t in c.texts])

    from cai import export as ex

    out = tmp_path / "best_of_n.jsonl"
    res = pipeline.run_best_of_n(str(write_prompts(tmp_path / "p.jsonl", 2)), backend=FakeBackend(cut), output=out,
                                 n=4, label_principles=1, progress=False)
    assert res.gates == {"best_of_n.truncated": 1}
    (reject,) = map(json.loads, (tmp_path / "rejects.jsonl").read_text().splitlines())
    assert reject["stage"] == "best_of_n" and quality(reject["text"]) == 2.0
    ds = ex.build(tmp_path, test_fraction=0)
    assert [r["id"] for r in ds.dataset["train_sft"]] == ["p01"] and ds.info.rejected["sft"] == 1
    assert [r["id"] for r in ds.dataset["train_prefs"]] == ["p01"]
    assert len(ex.build(tmp_path, test_fraction=0, include_rejects=True).dataset["train_sft"]) == 2
