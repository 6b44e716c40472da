"""`cai review`: the review order, human_labels.jsonl (append, undo, import), agreement figures,
human labels in `cai export` and its card, the server's API, and kill -9 after an answer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cai.analysis import human
from cai.cli import main
from cai.review import agreement as ag
from cai.review import labels as lab
from cai.review.export import apply_human_labels
from cai.review.server import Review, make_app
from cai.stages.preferences import write_preferences

REPO = Path(__file__).resolve().parent.parent
PRINCIPLES = {"harm": "Which is less harmful?", "honest": "Which is more honest?"}
# id -> p(A) per principle and order (ab, ba): q0-q5 and q7 the judge decided, q6 a tie
PAIRS = {"q0": {"harm": (0.9, 0.9), "honest": (0.8, 0.8)},    # a, 0.85
         "q1": {"harm": (0.2, 0.3), "honest": (0.3, 0.2)},    # b, 0.25
         "q2": {"harm": (0.7, 0.6), "honest": (0.6, 0.7)},    # a, 0.65
         "q3": {"harm": (0.7, 0.7), "honest": (0.6, 0.6)},    # a, 0.65 (humans flip it)
         "q4": {"harm": (0.2, 0.9), "honest": (0.3, 0.3)},    # b, 0.425, orders disagree (humans flip it)
         "q5": {"harm": (0.8, 0.9), "honest": (0.4, 0.4)},    # a, 0.625, principles disagree (humans: tie)
         "q6": {"harm": (0.5, 0.52), "honest": (0.49, 0.5)},  # tie, 0.5025
         "q7": {"harm": (0.95, 0.9), "honest": (0.9, 0.95)}}  # a, 0.925, never reviewed
HUMAN = {"q0": "a", "q1": "b", "q2": "a", "q3": "b", "q4": "a", "q5": "tie"}  # 3 agree, 2 flipped, 1 tie


def label_row(rid: str, per: dict[str, tuple[float, float]], prompt: str | None = None, a: str | None = None,
              b: str | None = None) -> dict[str, Any]:
    """A labels.jsonl row as `cai.stages.judge.aggregate` writes it."""
    js = [{"principle_id": pid, "order": o, "mode": "logprobs", "mass": 1.0, "p_a": p, "p_b": 1 - p, "abstain": None}
          for pid, ps in per.items() for o, p in zip(("ab", "ba"), ps, strict=True)]
    p_a = sum(sum(ps) / 2 for ps in per.values()) / len(per)
    means = [sum(ps[i] for ps in per.values()) / len(per) for i in (0, 1)]
    tie = abs(p_a - 0.5) < 0.05
    return {"id": rid, "prompt": [{"role": "user", "content": prompt or f"question {rid}?"}],
            "response_a": a or f"answer A to {rid}", "response_b": b or f"answer B to {rid}, longer",
            "p_a": p_a, "p_b": 1 - p_a, "label": "tie" if tie else "a" if p_a > 0.5 else "b", "tie": tie,
            "principle_ids": list(per), "judgements": js, "abstentions": 0,
            "position_consistent": (means[0] - 0.5) * (means[1] - 0.5) > 0, "position_agreement": None,
            "label_mode": "logprobs", "human": None, "origin": "revision", "source": f"in.jsonl:{rid}", "gates": []}


def make_run(folder: Path, pairs: dict[str, Any] = PAIRS, **texts: tuple[str | None, str, str]) -> Path:
    """A labelled run folder: run.json, labels.jsonl, preferences.jsonl (ties held out); ``texts``:
    (prompt, response A, response B) by pair id."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({
        "cai_version": "0.1.0", "status": "complete", "models": {"policy": "fake", "judge": "fake"},
        "judge": {"mode": "logprobs", "tie_threshold": 0.05},
        "constitution": {"name": "tiny", "principles": [{"id": k, "comparison": v} for k, v in PRINCIPLES.items()]}}))
    rows = [label_row(rid, per, *texts.get(rid, (None, None, None))) for rid, per in pairs.items()]
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_preferences(folder / "labels.jsonl", folder / "preferences.jsonl")
    return folder


def label_all(run: Path, human: dict[str, str] = HUMAN, reviewer: str = "ann", sample: str | None = None) -> None:
    lab.append(run, [lab.record(i, x, lab.shown_left(i, reviewer), reviewer, sample) for i, x in human.items()])


# --- statistics -------------------------------------------------------------------------------


def test_wilson_and_kappa_on_known_values():
    lo, hi = human.wilson(3, 5)
    assert (round(lo, 4), round(hi, 4)) == (0.2307, 0.8824)
    assert human.wilson(0, 0) is None
    assert human.wilson(10, 10)[1] == pytest.approx(1.0) and human.wilson(0, 10)[0] == pytest.approx(0.0)
    lo, hi = human.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    # po = 3/4, pe = (2*1 + 2*3) / 16 = 1/2: kappa = (0.75 - 0.5) / 0.5
    assert human.cohen_kappa(list("aabb"), list("abbb")) == pytest.approx(0.5)
    assert human.cohen_kappa(list("ab"), list("ba")) == pytest.approx(-1.0)
    assert human.cohen_kappa(list("aa"), list("aa")) is None and human.cohen_kappa([], []) is None


# --- order and records ------------------------------------------------------------------------


def test_review_order_hardest_first_and_uniform_sample(tmp_path: Path):
    pairs = human.load_pairs(make_run(tmp_path / "run"))
    order = [p["id"] for p in lab.review_order(pairs)]
    # q6 tie; q4 orders disagree; q5 principles disagree; then |p - 0.5|: q2 and q3 .15 (by id), q1, q0, q7
    assert order == ["q6", "q4", "q5", "q2", "q3", "q1", "q0", "q7"]
    s1, s2 = lab.review_order(pairs, 4, seed=1), lab.review_order(pairs, 4, seed=1)
    assert [p["id"] for p in s1] == [p["id"] for p in s2] and len(s1) == 4
    draws = {tuple(p["id"] for p in lab.review_order(pairs, 4, seed=s)) for s in range(20)}
    assert len(draws) > 10  # uniform draws, not the uncertainty order
    assert len(lab.review_order(pairs, 99)) == len(pairs)
    assert {lab.shown_left(f"x{i}", "ann") for i in range(40)} == {"a", "b"}
    assert lab.shown_left("x1", "ann") == lab.shown_left("x1", "ann")


def test_last_answer_counts_undo_retracts_and_every_answer_is_kept(tmp_path: Path):
    run = make_run(tmp_path / "run")
    lab.append(run, [lab.record("q0", "a", "a", "ann"), lab.record("q0", "b", "a", "ann"),
                     lab.record("q0", "a", "b", "bob"), lab.record("q1", "tie", "b", "ann"),
                     lab.record("q1", None, "b", "ann")])
    with (run / human.HUMAN_FILE).open("a") as f:
        f.write('{"id": "q2", "label": "a", "shown_')  # a torn last line: left out
    recs = human.read_records(run)
    assert len(recs) == 5
    cur = human.current(recs)
    assert {k: r["label"] for k, r in cur.items()} == {("q0", "ann"): "b", ("q0", "bob"): "a"}
    assert human.consensus(cur)["q0"]["label"] == "tie"  # a split of two reviewers
    lab.append(run, [lab.record("q0", "a", "a", "cy")])
    assert human.human_labels(run)["q0"] == {"label": "a", "reviewers": ["ann", "bob", "cy"], "uniform": False}


def test_appends_from_many_threads_lose_nothing(tmp_path: Path):
    run = make_run(tmp_path / "run")

    def write(t: int) -> None:
        for i in range(40):
            lab.append(run, [lab.record(f"q{i % 8}", "a", "a", f"r{t}-{i}")])

    threads = [threading.Thread(target=write, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (run / human.HUMAN_FILE).read_text().splitlines()
    assert len(lines) == 240 and len({json.loads(x)["reviewer"] for x in lines}) == 240


def test_import_checks_every_line_and_appends_all_or_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = make_run(tmp_path / "run")
    good = [lab.record("q0", "a", "b", "tool"), lab.record("q1", "tie", None, "tool", "uniform")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(good[0]), "{nope", json.dumps({**good[0], "id": "zz"}),
                              json.dumps({**good[0], "label": "A"}), json.dumps({**good[0], "time": "yesterday"}),
                              "[1]", json.dumps({**good[0], "reviewer": ""}),
                              json.dumps({k: v for k, v in good[0].items() if k != "label"})]) + "\n")
    assert main(["review", str(run), "--import", str(bad)]) == 2
    lines = [ln.removeprefix("error: ") for ln in capsys.readouterr().err.strip().splitlines()]
    assert [ln.split(": ")[0].rsplit(":", 1)[-1] for ln in lines[:-1]] == ["2", "3", "4", "5", "6", "7", "8"]
    assert "no pair 'zz'" in lines[1] and "`label` must be" in lines[2] and "`time` must be" in lines[3]
    assert "7 bad record(s)" in lines[-1] and not (run / human.HUMAN_FILE).exists()
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps(r) + "\n" for r in good))
    assert main(["review", str(run), "--import", str(ok)]) == 0
    assert main(["review", str(run), "--import", str(ok)]) == 0  # again: nothing new
    assert human.read_records(run) == good and "2 already there" in capsys.readouterr().err


# --- agreement, export and card ----------------------------------------------------------------


def test_agreement_summary(tmp_path: Path):
    run = make_run(tmp_path / "run")
    assert human.agreement_summary(run) is None
    label_all(run)
    label_all(run, {"q0": "a", "q1": "a", "q7": "a"}, reviewer="bob", sample="uniform")
    s = human.agreement_summary(run)
    assert s is not None and s["pairs"] == 8 and s["reviewers"] == ["ann", "bob"]
    # q1: ann b, bob a: a split, so a tie; q7 (bob only) agrees
    a = s["agreement"]
    assert (a["n"], a["agree"], a["human_ties"], a["judge_ties"]) == (5, 3, 2, 0)
    assert s["sample"] == "mixed" and s["uniform"]["n"] == 2 and s["uniform"]["agree"] == 2
    assert s["kappa"] == [{"reviewers": ["ann", "bob"], "n": 2, "agree": 1, "kappa": 0.0}]
    buckets = {b["bucket"]: b for b in s["by_confidence"]}
    # q2 and q3 (0.65): one flip of two; q5 (0.625) a human tie
    assert buckets["0.6-0.7"]["n"] == 2 and buckets["0.6-0.7"]["agree"] == 1
    assert buckets["0.5-0.6"]["n"] == 1 and buckets["0.5-0.6"]["agree"] == 0  # q4
    assert buckets["0.9-1.0"]["n"] == 1 and buckets["0.9-1.0"]["unreviewed"] == 0
    assert s["expected_flips"] == 0.0  # every decided pair was reviewed
    harm = s["by_principle"]["harm"]
    assert (harm["n"], harm["agree"]) == (5, 4)  # only q3 (harm 0.7: a; the human b)
    assert s["by_principle"]["honest"]["agree"] == 3  # q3 and q4 (honest 0.3: b; the human a)


def test_expected_flips_in_the_unreviewed_remainder(tmp_path: Path):
    run = make_run(tmp_path / "run")
    label_all(run, {"q3": "b", "q2": "a"})  # bucket 0.6-0.7: 1 of 2 agree
    s = human.agreement_summary(run)
    assert s is not None
    b = {x["bucket"]: x for x in s["by_confidence"]}
    assert b["0.6-0.7"]["unreviewed"] == 1 and b["0.6-0.7"]["expected_flips"] == pytest.approx(0.5)  # q5
    assert b["0.6-0.7"]["error_rate_from"] == "bucket"
    assert b["0.8-0.9"]["error_rate_from"] == "all reviewed pairs" and b["0.8-0.9"]["unreviewed"] == 1  # q0
    lo, hi = b["0.8-0.9"]["expected_flips95"]
    assert (round(lo, 3), round(hi, 3)) == (round(1 - human.wilson(1, 2)[1], 3), round(1 - human.wilson(1, 2)[0], 3))
    assert s["expected_flips"] == pytest.approx(2.5)  # q5, q4, q1, q0, q7 at the one measured rate, 1/2


def test_apply_human_labels_modes(tmp_path: Path):
    run = make_run(tmp_path / "run")
    label_all(run, {**HUMAN, "q6": "b"})  # a human breaks the judge's tie on q6
    ai = [json.loads(x) for x in (run / "preferences.jsonl").read_text().splitlines()]
    assert [r["id"] for r in ai] == ["q0", "q1", "q2", "q3", "q4", "q5", "q7"]
    out = {r["id"]: r for r in apply_human_labels(ai, run, "human-first")}
    assert sorted(out) == ["q0", "q1", "q2", "q3", "q4", "q6", "q7"]  # q5 (human tie) dropped
    assert {i: r["label_source"] for i, r in out.items()} == {**dict.fromkeys(["q0", "q1", "q2", "q3", "q4", "q6"],
                                                                              "human"), "q7": "ai"}
    assert {i: r["chosen_side"] for i, r in out.items()} == {"q0": "a", "q1": "b", "q2": "a", "q3": "b", "q4": "a",
                                                             "q6": "b", "q7": "a"}
    q3 = out["q3"]
    assert q3["chosen"][0]["content"] == "answer B to q3, longer" and q3["p_chosen"] == pytest.approx(0.35)
    assert (q3["score_chosen"], q3["score_rejected"], q3["tie"]) == (1.0, 0.0, False)
    assert [r["id"] for r in apply_human_labels(ai, run, "human")] == ["q0", "q1", "q2", "q3", "q4", "q6"]
    assert [r["label_source"] for r in apply_human_labels(ai, run, "ai")] == ["ai"] * 7
    (run / "rejects.jsonl").write_text(json.dumps({"id": "q6", "stage": "label", "reasons": ["truncated"]}) + "\n")
    assert "q6" not in {r["id"] for r in apply_human_labels(ai, run, "human-first")}


def test_export_follows_the_humans_and_the_card_shows_agreement(tmp_path: Path):
    pytest.importorskip("datasets")
    from cai.export import export_run

    run = make_run(tmp_path / "run")
    before = export_run(run, tmp_path / "ai", fmt="jsonl", test_fraction=0.0)
    plain = (tmp_path / "ai" / "data" / "train_prefs.jsonl").read_text()
    assert "label_source" not in plain and before.splits == {"train_prefs": 7}
    label_all(run)
    res = export_run(run, tmp_path / "out", fmt="jsonl", test_fraction=0.0)
    lines = (res.folder / "data" / "train_prefs.jsonl").read_text().splitlines()
    rows = {r["id"]: r for r in map(json.loads, lines)}
    assert sorted(rows) == ["q0", "q1", "q2", "q3", "q4", "q7"]
    assert {i: (r["chosen_side"], r["label_source"]) for i, r in rows.items()} == {
        "q0": ("a", "human"), "q1": ("b", "human"), "q2": ("a", "human"), "q3": ("b", "human"),
        "q4": ("a", "human"), "q7": ("a", "ai")}
    card = (res.folder / "README.md").read_text()
    assert "3/5 (60.0%; Wilson 95% 23.1%-88.2%)" in card
    assert "exported pairs by label_source | human 5, ai 1" in card
    assert "`label_source` (`human`: a person's label from `cai review`" in card
    ai = export_run(run, tmp_path / "ai2", fmt="jsonl", test_fraction=0.0, labels="ai")
    assert ai.splits == {"train_prefs": 7}
    assert main(["export", str(run), "-o", str(tmp_path / "h"), "--format", "jsonl", "--test-fraction", "0",
                 "--labels", "human"]) == 0
    assert len((tmp_path / "h" / "data" / "train_prefs.jsonl").read_text().splitlines()) == 5


# --- the server ---------------------------------------------------------------------------------


def test_server_api_and_a_page_without_external_resources(tmp_path: Path):
    from aiohttp.test_utils import TestClient, TestServer

    run = make_run(tmp_path / "run<script>x")

    async def go() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with TestClient(TestServer(make_app(Review(run, reviewer="ann")))) as c:
            seen["html"] = await (await c.get("/")).text()
        async with TestClient(TestServer(make_app(Review(run, reviewer="ann", show_principles=True)))) as c:
            seen["upfront"] = await (await c.get("/")).text()
        async with TestClient(TestServer(make_app(Review(run, reviewer="ann")))) as c:
            state = await (await c.get("/api/state?reviewer=bob")).json()
            seen["ids"] = [p["id"] for p in state["pairs"]]
            seen["left"] = {p["id"]: p["left"] for p in state["pairs"]}
            seen["q4"] = next(p for p in state["pairs"] if p["id"] == "q4")
            r = await c.post("/api/label", data=json.dumps({"id": "q4", "label": "a", "shown_left": "b"}))
            seen["form"] = r.status
            r = await c.post("/api/label", json={"id": "q4", "label": "left", "shown_left": "b"})
            seen["bad"] = (r.status, await r.text())
            r = await c.post("/api/label", json={"id": "q4", "label": "a", "shown_left": "b", "reviewer": "bob"})
            seen["ok"] = await r.json()
            await c.post("/api/label", json={"id": "q6", "label": "tie", "shown_left": "a", "reviewer": "bob"})
            seen["undo"] = await (await c.post("/api/undo", json={"reviewer": "bob"})).json()
            seen["undo_ann"] = await (await c.post("/api/undo", json={})).json()
        return seen

    seen = asyncio.run(go())
    html = seen["html"]
    assert "run&lt;script&gt;x" in html and "run<script>x" not in html
    assert '"show_principles":false' in html and '"show_principles":true' in seen["upfront"]
    assert not any(x in html for x in ("http://", "https://", "src=", "<link", "@import", "url("))
    assert seen["ids"] == ["q6", "q4", "q5", "q2", "q3", "q1", "q0", "q7"]
    assert seen["left"] == {i: lab.shown_left(i, "bob") for i in PAIRS}
    assert [p["id"] for p in seen["q4"]["judge"]["principles"]] == ["harm", "honest"]
    assert seen["q4"]["principles"][0] == {"id": "harm", "text": "Which is less harmful?"}
    assert seen["form"] == 415 and seen["bad"][0] == 400 and "`label` must be" in seen["bad"][1]
    assert seen["ok"]["labels"] == {"q4": "a"} and seen["ok"]["agreement"]["n"] == 1
    assert seen["ok"]["agreement"]["agree"] == 0  # the judge said b
    assert seen["undo"]["undone"] == "q6" and seen["undo"]["labels"] == {"q4": "a"}
    assert seen["undo_ann"]["undone"] is None
    recs = human.read_records(run)
    assert [(r["id"], r["label"], r["reviewer"], r["sample"]) for r in recs] == [
        ("q4", "a", "bob", "uncertainty"), ("q6", "tie", "bob", "uncertainty"), ("q6", None, "bob", "uncertainty")]


@contextmanager
def serving(run: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`cai review RUN --no-open --port 0 ARGS` in a process of its own; yields its address."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", "review", run.name, "--no-open", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=run.parent)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)  # waits, and closes its pipes


def test_kill_9_after_an_answer_keeps_it(tmp_path: Path):
    run = make_run(tmp_path / "run")
    with serving(run, "--reviewer", "ann", "--sample", "3", "--seed", "4") as (url, proc):
        with urllib.request.urlopen(url + "api/state", timeout=30) as r:
            first = json.load(r)["pairs"][0]
        req = urllib.request.Request(url + "api/label", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"id": first["id"], "label": "b",
                                                      "shown_left": first["left"]}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.load(r)["labels"] == {first["id"]: "b"}
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    recs = human.read_records(run)
    assert [(r["id"], r["label"], r["shown_left"], r["reviewer"], r["sample"]) for r in recs] == [
        (first["id"], "b", first["left"], "ann", "uniform")]


def test_review_refuses_a_folder_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "empty").mkdir()
    assert main(["review", str(tmp_path / "empty"), "--no-open"]) == 2
    assert "no labels.jsonl" in capsys.readouterr().err


def test_report_json_holds_the_human_review(tmp_path: Path):
    from cai.report.html import write_report

    run = make_run(tmp_path / "run")
    json_path, html_path = write_report(run)
    assert "human_review" not in json.loads(json_path.read_text())
    assert "Judge vs human" not in html_path.read_text()
    label_all(run)
    json_path, html_path = write_report(run)
    rep = json.loads(json_path.read_text())["human_review"]
    page = html_path.read_text()
    assert "Judge vs human (cai review)" in page and "3/5 (60.0%; Wilson 95% 23.1%-88.2%)" in page
    assert (rep["agreement"]["n"], rep["agreement"]["agree"], rep["sample"]) == (5, 3, "uncertainty")
    assert rep["agreement"]["wilson95"] == [pytest.approx(0.230724, abs=1e-5), pytest.approx(0.882378, abs=1e-5)]
    assert ag.summary_lines(rep)["judge-human agreement"] == "3/5 (60.0%; Wilson 95% 23.1%-88.2%)"  # for the page


def test_only_loopback_names_and_json_reach_the_server(tmp_path: Path):
    from aiohttp.test_utils import TestClient, TestServer

    run = make_run(tmp_path / "run")

    async def go() -> list[int]:
        async with TestClient(TestServer(make_app(Review(run, reviewer="ann")))) as c:
            return [(await c.get("/", headers={"Host": "evil.example:8765"})).status,
                    (await c.get("/api/state", headers={"Host": "localhost:8765"})).status,
                    (await c.get("/favicon.ico", headers={"Host": "[::1]:8765"})).status,
                    (await c.post("/api/label", data="{nope", headers={"Content-Type": "application/json"})).status,
                    (await c.post("/api/label", json=[1])).status]

    assert asyncio.run(go()) == [403, 200, 204, 400, 400]
    assert not (run / human.HUMAN_FILE).exists()
