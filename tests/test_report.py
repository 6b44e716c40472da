"""The diagnostics report: statistics on hand-computed values, exact figures of a small written
run folder, bad inputs, atomic writing, and a real pipeline run (fake backend) through it."""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cai import analysis, stats
from cai.analysis import build_report
from cai.errors import InputError
from cai.eval.refusal import marker_rates
from cai.report.html import write_report

REPO = Path(__file__).resolve().parent.parent

# --- statistics -------------------------------------------------------------------------------


def test_brier_ece_reliability_on_hand_computed_values():
    p, y = [0.9, 0.2, 0.6, 0.65], [1, 0, 0, 1]
    assert stats.brier(p, y) == pytest.approx((0.01 + 0.04 + 0.36 + 0.1225) / 4)
    # bins: 0.9 -> 9 (|0.9 - 1|), 0.2 -> 2 (|0.2 - 0|), 0.6 and 0.65 -> 6 (|0.625 - 0.5|)
    assert stats.ece(p, y) == pytest.approx(0.25 * 0.1 + 0.25 * 0.2 + 0.5 * 0.125)
    rel = stats.reliability(p, y)
    assert len(rel) == 10 and sum(b["count"] for b in rel) == 4
    assert rel[6] == {"lo": 0.6, "hi": 0.7, "count": 2, "mean_p": pytest.approx(0.625), "rate": 0.5}
    assert rel[0]["count"] == 0 and rel[0]["mean_p"] is None and rel[0]["rate"] is None
    assert stats.ece([1.0, 0.0], [1, 0], bins=10) == 0.0  # 1.0 falls in the last bin
    assert stats.ece([0.3, 0.7], [0, 1], bins=1) == pytest.approx(0.0)
    assert stats.brier([], []) is None and stats.ece([], []) is None
    assert stats.brier([None, 0.5, float("nan")], [1, 1, 0]) == 0.25  # non-numbers are left out


def test_correlations_and_degenerate_input():
    assert stats.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # mid-ranks for ties
    assert stats.pearson([1, 2], [1, 2]) is None  # n < 3
    assert stats.pearson([1, 2, 3], [5, 5, 5]) is None  # no variance
    assert stats.logistic_fit([1, 2, 3], [1, 1, 1]) is None  # one class only
    assert stats.logistic_fit([2, 2, 2], [0, 1, 0]) is None  # constant x
    with pytest.raises(ValueError):
        stats.brier([0.5], [1, 0])


def _pair(i: int, len_a: int, len_b: int, p_a: float, tie: float = 0.05) -> dict[str, Any]:
    label = "tie" if abs(p_a - 0.5) < tie else "a" if p_a > 0.5 else "b"
    return {"id": f"p{i}", "response_a": "x" * len_a, "response_b": "y" * len_b, "p_a": p_a, "label": label}


def test_length_bias_shares_and_length_controlled_rate():
    rows = [_pair(0, 30, 10, 0.9), _pair(1, 10, 30, 0.8), _pair(2, 50, 20, 0.7), _pair(3, 20, 20, 0.9),
            _pair(4, 10, 40, 0.2), _pair(5, 15, 10, 0.52)]
    lb = stats.length_bias(rows)
    # decided: 0 (longer A chosen), 1 (shorter A chosen), 2 (longer), 3 (equal, left out), 4 (B longer, chosen)
    assert (lb["n"], lb["decided"], lb["equal_length"]) == (6, 5, 1)
    assert lb["longer_chosen"] == pytest.approx(3 / 4)
    assert lb["raw_rate"] == pytest.approx(sum(r["p_a"] for r in rows) / 6)
    assert stats.length_bias(rows, soft=False)["raw_rate"] == pytest.approx(4 / 5)
    assert stats.length_bias(rows, unit="words")["longer_chosen"] is None  # every answer is one word

    # A is always the revision, longer by d chars; the judge likes length and nothing else:
    # the raw win rate is high, the length-controlled one about 0.5.
    biased = [_pair(i, 100 + d, 100, 1 / (1 + math.exp(-d / 40))) for i, d in enumerate(range(-40, 200, 6))]
    lb = stats.length_bias(biased)
    assert lb["raw_rate"] > 0.75 and lb["slope"] > 0 and lb["pearson"] > 0.8
    assert lb["lc_rate"] == pytest.approx(0.5, abs=0.02) and lb["lc_rate"] < lb["raw_rate"] - 0.2
    # The judge prefers A for its content (log-odds 1) and ignores length: no length control needed.
    fair = [_pair(i, 100 + d, 100, 1 / (1 + math.exp(-1.0))) for i, d in enumerate(range(-40, 200, 6))]
    lb = stats.length_bias(fair)
    assert lb["lc_rate"] == pytest.approx(lb["raw_rate"], abs=1e-6) and lb["slope"] == pytest.approx(0, abs=1e-6)
    # Hard labels separate perfectly by length: the fit stays finite.
    hard = stats.length_bias([_pair(i, 10 + i, 10, 0.9 if i > 0 else 0.1) for i in range(-5, 6)], soft=False)
    assert hard["lc_rate"] is not None and math.isfinite(hard["slope"])


def test_length_bias_degenerate_input_gives_none():
    empty = stats.length_bias([])
    assert empty["n"] == 0 and empty["longer_chosen"] is None and empty["lc_rate"] is None
    two = stats.length_bias([_pair(0, 10, 5, 0.9), _pair(1, 5, 10, 0.2)])
    assert two["longer_chosen"] == 1.0 and two["pearson"] is None and two["lc_rate"] is None
    same = stats.length_bias([_pair(i, 10, 10, 0.6 + i / 10) for i in range(3)])
    assert same["lc_rate"] is None and same["pearson"] is None and same["equal_length"] == 3
    assert stats.length_bias([{"id": "x", "p_a": None, "response_a": "a", "response_b": "b"}])["n"] == 0
    assert stats.debiased_labels([]) is None
    assert stats.debiased_labels([_pair(0, 10, 5, 0.9), _pair(1, 5, 10, 0.2)]) is None
    with pytest.raises(ValueError):
        stats.length_bias([], unit="tokens")


def test_debiased_labels_take_out_the_length_term():
    rows = [_pair(i, 100 + d, 100, 1 / (1 + math.exp(-(0.5 + d / 50)))) for i, d in enumerate(range(-90, 200, 10))]
    rows.append(_pair(99, 100, 100, 0.8))
    out = stats.debiased_labels(rows)
    assert out is not None and set(out) == {r["id"] for r in rows}
    assert out["p99"] == pytest.approx(0.8)  # equal lengths: unchanged
    after = stats.length_bias([{**r, "p_a": out[r["id"]]} for r in rows])
    before = stats.length_bias(rows)["slope"]
    assert before > 1 and abs(after["slope"]) < 0.05 * before
    assert all(0 < v < 1 for v in out.values())


# --- a small run folder with known figures ----------------------------------------------------

SYC, REF = "Great question! ", "I'm sorry, but I can't"
# id: (initial answer, [(principle, revision)], side of the revision in the pair,
#      {principle: (p(revision) in order ab, in order ba)} of the judge)
REVISIONS: dict[str, tuple[str, list[tuple[str, str]], str, dict[str, tuple[float, float]]]] = {
    "r1": (SYC + "Mix bleach and ammonia in a bucket.",
           [("harm", REF + " help with mixing those. The fumes are toxic."),
            ("honest", REF + " help with mixing those. The fumes are toxic. Store the two apart and air the room.")],
           "b", {"harm": (0.9, 0.9), "honest": (0.8, 0.6)}),  # revision wins (0.8)
    "r2": (REF + " answer that.",
           [("harm", "Here is a safe plan: lock the door."),
            ("honest", "Here is a safe plan: lock the door and call a friend you trust.")],
           "a", {"harm": (0.8, 0.8), "honest": (0.65, 0.55)}),  # revision wins (0.7)
    "r3": ("Take the loan today.",
           [("honest", "Compare the interest rates of three banks first."),
            ("harm", "Compare the interest rates of three banks first, and read the fine print.")],
           "b", {"harm": (0.3, 0.3), "honest": (0.7, 0.3)}),  # initial wins (0.4)
    "r4": (SYC + "Drink water.",
           [("harm", "Drink water and rest."),
            ("honest", "Drink water and rest. See a doctor when the fever lasts three days.")],
           "a", {"harm": (0.44, 0.44), "honest": (0.57, 0.57)}),  # tie (0.505)
}
# Human-labelled dataset pairs: judge p(A) and the human's choice.
HUMAN = {"d1": (0.9, "a"), "d2": (0.2, "b"), "d3": (0.6, "b"), "d4": (0.65, "a")}


def _label_row(rid: str, a: str, b: str, per: dict[str, tuple[float, float]], *, origin: str,
               human: str | None = None, abstain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A label row as `cai.judge.aggregate` writes it, from p(A) per principle and order."""
    judgements = [{"principle_id": pid, "order": o, "mode": "logprobs", "p_a": p, "p_b": 1 - p, "abstain": None}
                  for pid, ps in per.items() for o, p in zip(("ab", "ba"), ps, strict=True)]
    judgements += [{"principle_id": pid, "order": o, "mode": "logprobs", "abstain": "no option token in the top 20"}
                   for pid in abstain for o in ("ab", "ba")]
    p_a = sum(sum(ps) / 2 for ps in per.values()) / len(per)
    means = [sum(ps[i] for ps in per.values()) / len(per) for i in (0, 1)]
    tie = abs(p_a - 0.5) < 0.05
    return {"id": rid, "prompt": [{"role": "user", "content": f"question {rid}"}], "response_a": a, "response_b": b,
            "p_a": p_a, "p_b": 1 - p_a, "label": "tie" if tie else "a" if p_a > 0.5 else "b", "tie": tie,
            "principle_ids": list(per), "judgements": judgements, "abstentions": 2 * len(abstain),
            "position_consistent": (means[0] - 0.5) * (means[1] - 0.5) > 0, "position_agreement": None,
            "label_mode": "logprobs", "human": human, "origin": origin, "source": f"x.jsonl:{rid}"}


def write_run(folder: Path, status: str = "complete") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"cai_version": "0.1.0", "status": status, "models": {"policy": "fake", "judge": "fake"},
                "config": {"label": {"sources": ["revisions", "dataset"], "mode": "logprobs", "tie_threshold": 0.05}},
                "judge": {"mode": "logprobs", "tie_threshold": 0.05},
                "constitution": {"name": "tiny", "principles": [
                    {"id": "harm", "comparison": "Which is less harmful?"},
                    {"id": "honest", "comparison": "Which is more honest?"}]}}
    (folder / "run.json").write_text(json.dumps(manifest))
    revs, labels = [], []
    for rid, (initial, rounds, side, per) in REVISIONS.items():
        row: dict[str, Any] = {
            "id": rid, "prompt": [{"role": "user", "content": f"question {rid}"}], "initial_response": initial,
            "revised_response": rounds[-1][1], "principle_ids": [p for p, _ in rounds],
            "rounds": [{"round": i + 1, "principle_id": p, "critique_request": "?", "critique": f"critique {i + 1}",
                        "revision_request": "?", "revision": text} for i, (p, text) in enumerate(rounds)],
            "calls": [], "source": f"in.jsonl:{rid}", "extra": {}, "provenance": {}}
        if rid == "r2":
            row["gates"] = ["too_long"]
        revs.append(row)
        final = rounds[-1][1]
        a, b = (final, initial) if side == "a" else (initial, final)
        # p(A) from p(revision)
        per_a = {pid: ps if side == "a" else (1 - ps[0], 1 - ps[1]) for pid, ps in per.items()}
        labels.append(_label_row(rid, a, b, per_a, origin="revision", abstain=("kind",) if rid == "r3" else ()))
    for rid, (p, human) in HUMAN.items():
        row = _label_row(rid, f"answer A of {rid}", f"answer B, longer, of {rid}", {"harm": (p, p)},
                         origin="dataset", human=human)
        if rid == "d1":
            row["gates"] = ["refusal_mismatch"]
        labels.append(row)
    (folder / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in revs))
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    (folder / "labels.failures.jsonl").write_text(
        json.dumps({"id": "z", "reason": "all judgements abstained: no log-probs returned"}) + "\n")
    return folder


def test_figures_of_a_known_run(tmp_path: Path):
    rep = build_report(write_run(tmp_path / "run"))
    assert json.loads(json.dumps(rep, allow_nan=False)) == rep  # JSON as it is
    lab = rep["labels"]
    assert lab["pairs"] == 8 and lab["failures"] == 1 and lab["failure_reasons"] == {"all judgements abstained": 1}
    assert lab["by_origin"] == {"revision": 4, "dataset": 4} and lab["unmatched_revision_pairs"] == 0
    o = lab["overall"]
    # revision pairs: r1 0.8 (won), r2 0.7 (won), r3 0.4 (lost), r4 0.505 (tie)
    assert o["revision"] == {"pairs": 4, "win_rate": 0.5, "tie_rate": 0.25, "loss_rate": 0.25,
                             "decided_win_rate": pytest.approx(2 / 3, abs=1e-6),
                             "mean_p": pytest.approx((0.8 + 0.7 + 0.4 + 0.505) / 4)}
    assert o["labels"] == {"a": 5, "b": 2, "tie": 1}  # r1 b, r2 a, r3 a, r4 tie; d1 a, d2 b, d3 a, d4 a
    assert o["judgements"] == 4 * 4 + 2 + 4 * 2 and o["abstentions"] == 2 and o["pairs_with_abstention"] == 1
    assert o["abstention_rate"] == pytest.approx(2 / 26, abs=1e-6)
    # per principle: harm p(revision) .9 .8 .3 .44 -> 2 won, 2 lost; honest .7 .6 .5 .57 -> 3 won, 1 tie
    harm, honest = lab["per_principle"]["harm"], lab["per_principle"]["honest"]
    assert harm["revision"]["win_rate"] == 0.5 and harm["revision"]["loss_rate"] == 0.5
    assert honest["revision"]["win_rate"] == 0.75 and honest["revision"]["tie_rate"] == 0.25
    assert honest["position_consistency"] == 0.75 and harm["position_consistency"] == 1.0  # r3 (0.7, 0.3)
    assert lab["per_principle"]["kind"]["pairs"] == 0 and lab["per_principle"]["kind"]["abstentions"] == 2
    # human-labelled pairs: p(A) .9 .2 .6 .65 against A, B, B, A
    h = o["human"]
    assert h["pairs"] == 4 and h["decided"] == 4 and h["agreement"] == 0.75 and h["coverage"] == 1.0
    assert h["brier"] == pytest.approx((0.01 + 0.04 + 0.36 + 0.1225) / 4, abs=1e-6)
    assert h["ece"] == pytest.approx(0.1375, abs=1e-6)
    assert harm["human"]["agreement"] == 0.75 and "reliability" not in harm["human"]
    assert [b["count"] for b in h["reliability"]] == [0, 0, 1, 0, 0, 0, 2, 0, 0, 1]
    assert rep["headline"]["revision_win_rate"] == 0.5 and rep["headline"]["failures"] == 1

    # lengths: decided revision pairs r1, r2 chose the (longer) revision, r3 the shorter initial answer
    rb = rep["length_bias"]["revision"]
    assert rb["n"] == 4 and rb["decided"] == 3 and rb["longer_chosen"] == pytest.approx(2 / 3, abs=1e-6)
    assert rb["raw_rate"] == pytest.approx((0.8 + 0.7 + 0.4 + 0.505) / 4)
    # all pairs as they are: the dataset pairs' B is the longer; d1, d3, d4 chose A, d2 chose B
    assert rep["length_bias"]["all"]["longer_chosen"] == pytest.approx(3 / 7, abs=1e-6)
    assert rep["lengths"]["chosen"]["n"] == 7 and sum(rep["lengths"]["histogram"]["chosen"]) == 7

    # revise: lengths per round and markers
    rv = rep["revise"]
    texts = [[init] + [t for _, t in rounds] for init, rounds, _, _ in REVISIONS.values()]
    assert rv["rows"] == 4 and rv["rounds"] == 2 and rv["gates"] == {"too_long": 1}
    for k in range(3):
        assert rv["by_round"][k]["mean"] == pytest.approx(sum(len(t[k]) for t in texts) / 4)
    # growth: the ratio of mean lengths (as the plotted means move), the median per-row ratio beside it
    assert rv["by_round"][1]["growth"] == pytest.approx(sum(len(t[1]) for t in texts) / sum(len(t[0]) for t in texts),
                                                        abs=1e-6)
    assert rv["lengths"]["growth"] == pytest.approx(sum(len(t[2]) for t in texts) / sum(len(t[0]) for t in texts),
                                                    abs=1e-6)
    assert rv["lengths"]["median_row_ratio"] == pytest.approx(statistics.median(len(t[2]) / len(t[0]) for t in texts),
                                                              abs=1e-6)
    assert rep["headline"]["length_growth"] == rv["lengths"]["growth"]
    m0, m2 = rv["by_round"][0]["markers"], rv["by_round"][2]["markers"]
    assert (m0["sycophancy"], m0["refusal"]) == (0.5, 0.25)  # r1, r4 flatter; r2 refuses
    assert (m2["sycophancy"], m2["refusal"]) == (0.0, 0.25)  # r1's revision refuses
    assert rv["markers"]["initial"] == pytest.approx(marker_rates(t[0] for t in texts), abs=1e-6)
    assert rv["markers"]["revised"] == pytest.approx(marker_rates(t[2] for t in texts), abs=1e-6)
    # the final revision of rows whose rounds used `harm` (all four): r1, r2 won, r3 lost, r4 tie
    assert rv["per_principle"]["harm"]["rounds"] == 4 and rv["per_principle"]["harm"]["judged"]["win_rate"] == 0.5
    # chosen vs rejected (decided pairs: r1, r2, r3 and the four dataset pairs)
    mk = rep["markers"]
    assert mk["pairs"] == 7
    assert mk["chosen"]["refusal"] == pytest.approx(1 / 7, abs=1e-6)  # r1's revision
    assert mk["rejected"]["refusal"] == pytest.approx(1 / 7, abs=1e-6)  # r2's initial answer
    assert mk["rejected"]["sycophancy"] == pytest.approx(1 / 7, abs=1e-6) and mk["chosen"]["sycophancy"] == 0


def test_write_report_and_page(tmp_path: Path):
    run = write_run(tmp_path / "run")
    j, h = write_report(run)
    assert (j, h) == (run / "report.json", run / "report.html")
    assert json.loads(j.read_text()) == build_report(run) | {"run": json.loads(j.read_text())["run"]}
    page = h.read_text()
    assert page.count("<svg") >= 5 and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page and " src=" not in page  # nothing fetched
    assert "too_long" in page and "refusal_mismatch" in page
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    out = tmp_path / "elsewhere" / "deep"
    assert write_report(run, out) == (out / "report.json", out / "report.html")


def test_hostile_text_is_escaped(tmp_path: Path):
    run = write_run(tmp_path / "run")
    evil = "</script><script>window.pwned=1</script><img src=x onerror=alert(1)> & </svg>"
    rows = [json.loads(x) for x in (run / "revisions.jsonl").read_text().splitlines()]
    rows[0]["prompt"][0]["content"] = evil
    rows[0]["rounds"][0]["critique"] = evil
    rows[0]["gates"] = [evil]
    (run / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = json.loads((run / "run.json").read_text())
    manifest["constitution"]["principles"][0]["id"] = evil
    (run / "run.json").write_text(json.dumps(manifest))
    _, h = write_report(run)
    page = h.read_text()
    assert "<img" not in page and "window.pwned=1</script>" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data and the code, nothing else
    data = re.search(r'<script type="application/json" id="cai-rows">(.*?)</script>', page, re.S)
    assert data is not None and json.loads(data.group(1))[0]["prompt"].endswith(evil)


def test_table_is_capped(tmp_path: Path):
    run = write_run(tmp_path / "run")
    data = analysis.load_run(run, max_rows=3)
    assert len(data.table) == 3 and data.table_total == 8
    assert data.table[0]["label"] == "revision" and data.table[2]["label"] == "initial"
    _, h = write_report(run, max_rows=3)
    assert "first 3 of 8 rows" in h.read_text()


@pytest.mark.parametrize("damage, message", [
    (lambda d: [p.unlink() for p in d.iterdir()], "not a cai run folder"),
    (lambda d: (d / "labels.jsonl.part").write_text(""), "labels.jsonl.part: a stage is still running"),
    (lambda d: (d / "run.json").write_text('{"cai_version": "0.1.0", "status": "running"}'), "not finished"),
    (lambda d: (d / "run.json").write_text("{half"), "run.json: not readable JSON"),
    (lambda d: (d / "labels.jsonl").write_text((d / "labels.jsonl").read_text()[:-40] + "\n"),
     "labels.jsonl:8: not valid JSON"),
    (lambda d: (d / "revisions.jsonl").write_text('{"id": "x"}\n'), "revisions.jsonl:1: a revisions row needs"),
    (lambda d: (d / "labels.jsonl").write_text("[1, 2]\n"), "labels.jsonl:1: not a JSON object"),
    (lambda d: (d / "revisions.jsonl").write_bytes(b"\xff\xfe\n"), "revisions.jsonl: not UTF-8"),
    (lambda d: [(d / n).unlink() for n in ("revisions.jsonl", "labels.jsonl")], "no revisions.jsonl or labels.jsonl"),
])
def test_bad_inputs_give_one_line_errors(tmp_path: Path, damage, message):
    run = write_run(tmp_path / "run")
    damage(run)
    with pytest.raises(InputError) as e:
        write_report(run)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (run / "report.json").exists() and not (run / "report.html").exists()


def test_a_folder_without_run_json(tmp_path: Path):
    run = write_run(tmp_path / "run")
    (run / "run.json").unlink()  # as `cai revise -o DIR/revisions.jsonl` + `cai label -o DIR/...` leave it
    rep = build_report(run)
    assert rep["labels"]["overall"]["revision"]["win_rate"] == 0.5 and rep["run"]["constitution"] is None
    write_report(run)


def test_not_a_folder(tmp_path: Path):
    with pytest.raises(InputError, match="not a folder"):
        build_report(tmp_path / "nothing")


def test_nothing_is_written_when_the_page_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = write_run(tmp_path / "run")
    (run / "report.json").write_text("old")
    import cai.report.html as page

    def boom(*_: object) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr(page, "render", boom)
    with pytest.raises(RuntimeError):
        write_report(run)
    assert (run / "report.json").read_text() == "old" and not (run / "report.html").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_only_revisions_or_only_labels(tmp_path: Path):
    run = write_run(tmp_path / "a")
    (run / "labels.jsonl").unlink()
    rep = build_report(run)
    assert rep["revise"]["rows"] == 4 and rep["labels"]["pairs"] == 0 and rep["headline"]["revision_win_rate"] is None
    run = write_run(tmp_path / "b")
    (run / "revisions.jsonl").unlink()
    rep = build_report(run)
    # without revisions.jsonl the revision side is unknown: counted, not guessed
    assert rep["labels"]["unmatched_revision_pairs"] == 4 and rep["labels"]["overall"]["revision"]["pairs"] == 0
    write_report(run)


# --- a real pipeline run (fake backend) -------------------------------------------------------

_PLAIN = ["Lock the door and keep your phone close.", "Write down what happened and when.",
          "Talk to someone you trust about it.", "Call the local helpline; they answer at night.",
          "Check the label before you mix any cleaning products.", "Keep receipts for everything you buy."]


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    if i < 0:
        return ""
    i += len(start)
    j = text.find(end, i)
    return text[i:j if j >= 0 else None]


def realistic_respond(req: Any) -> Any:
    """A scripted fake model that answers like a small chat model: some answers flatter or
    refuse, revisions drop the flattery and grow, and the judge likes longer answers."""
    from cai.backends.base import Completion

    last = req.messages[-1]["content"] if req.messages else ""
    user = next((m["content"] for m in reversed(req.messages) if m["role"] == "user"), "")
    if req.sampling.logprobs or req.sampling.choices:
        a = _between(user, "(A) ", "\n\n(B) ")
        b = _between(user, "\n\n(B) ", "\n\nAnswer with")
        score = (len(a) - len(b)) / 90
        score += 0.8 * ((REF in b) - (REF in a)) + 0.6 * (("Great question" in b) - ("Great question" in a))
        score += 0.6 * (("important to note" in b) - ("important to note" in a))
        score += ((_h(user) % 1000) / 1000 - 0.5) * 3
        p = min(max(1 / (1 + math.exp(-score)), 1e-4), 1 - 1e-4)
        if _h(user, "abstain") % 41 == 0:
            return Completion(texts=["The"], logprobs=[{"The": -0.2, "I": -2.0}], prompt_tokens=50,
                              completion_tokens=1)
        if req.sampling.choices:
            return Completion(texts=["A" if p >= 0.5 else "B"], prompt_tokens=50, completion_tokens=1)
        return Completion(texts=["A" if p >= 0.5 else "B"], logprobs=[{"A": math.log(p), "B": math.log(1 - p)}],
                          prompt_tokens=50, completion_tokens=1)
    if "Critique request:" in last:
        reply = _between(last, "<response>\n", "\n</response>")
        issues = ["It flatters the user instead of answering." if "Great question" in reply else "",
                  "It refuses without offering any safe help." if REF in reply else "",
                  "It gives no safety context."]
        return " ".join(x for x in issues if x)
    if "Revision request:" in last:  # the revision continues the critique's chat: the reply is shown there
        shown = next(m["content"] for m in reversed(req.messages) if "<response>\n" in m["content"])
        reply = _between(shown, "<response>\n", "\n</response>").replace("Great question! ", "")
        if REF in reply and _h(reply) % 2:
            reply = "I can help with the safe part of this. " + _PLAIN[_h(reply) % len(_PLAIN)]
        extra = _PLAIN[_h(reply, "x") % len(_PLAIN)]
        text = reply if extra in reply else f"{reply} {extra}"
        if _h(reply, "note") % 4 == 0:
            text += " It's important to note that laws differ by place."
        return ("Revision: " if _h(reply) % 7 == 0 else "") + text
    k = _h(user) % 6
    body = " ".join(_PLAIN[(_h(user) + i) % len(_PLAIN)] for i in range(1 + _h(user, "n") % 3))
    return [SYC + body, REF + " help with that.", "It depends, but you might try this. " + body, body,
            "Definitely do this: " + body, SYC + body][k]


def realistic_run(folder: Path, limit: int = 32) -> Path:
    """A finished run folder: the shipped red-team prompts revised for 2 rounds, and both the
    revision pairs and the prompts' human-labelled pairs judged, by the scripted fake model."""
    from cai.backends.fake import FakeBackend
    from cai.config import RunConfig
    from cai.pipeline import run_pipeline

    data = REPO / "examples" / "hh_red_team.jsonl"
    cfg = RunConfig.model_validate({
        "input": str(data), "output": str(folder), "backend": "fake", "progress": False, "cache": "off",
        "limit": limit, "revise": {"rounds": 2},
        "label": {"sources": ["revisions", "dataset"], "pairs": str(data)}})
    run_pipeline(cfg, backend=FakeBackend(realistic_respond))
    return folder


def test_report_of_a_real_pipeline_run(tmp_path: Path):
    run = realistic_run(tmp_path / "run")
    rows = [json.loads(x) for x in (run / "revisions.jsonl").read_text().splitlines()]
    labels = [json.loads(x) for x in (run / "labels.jsonl").read_text().splitlines()]
    j, h = write_report(run)
    rep = json.loads(j.read_text())
    assert rep["revise"]["rows"] == len(rows) == 32 and rep["revise"]["rounds"] == 2
    assert rep["labels"]["pairs"] == len(labels) - sum(r["p_a"] is None for r in labels)
    origins = rep["labels"]["by_origin"]
    assert origins == dict(Counter(r["origin"] for r in labels if r["p_a"] is not None))
    assert rep["labels"]["unmatched_revision_pairs"] == 0
    # the scripted revisions drop the flattery and add a sentence; the judge likes length
    assert rep["revise"]["markers"]["initial"]["sycophancy"] > 0 == rep["revise"]["markers"]["revised"]["sycophancy"]
    assert rep["revise"]["lengths"]["growth"] > 1.2
    assert rep["headline"]["revision_win_rate"] > 0.5 and rep["length_bias"]["revision"]["pearson"] > 0.3
    assert rep["labels"]["overall"]["human"]["pairs"] == origins["dataset"] > 20
    assert rep["headline"]["brier"] is not None and rep["labels"]["overall"]["abstentions"] > 0
    assert h.stat().st_size < 2_000_000


# --- what a reader sees: revise-only, label-only and full folders ------------------------------


def cli_folders(tmp: Path) -> dict[str, Path]:
    """A `cai revise` folder and a `cai label` folder (no run.json: the rows' provenance tells), and
    a full `cai run` folder, all on the fake backend."""
    from cai.cli import main

    data = str(REPO / "examples" / "hh_red_team.jsonl")
    out = {"revise": tmp / "revise", "label": tmp / "label", "run": tmp / "run"}
    assert main(["revise", data, "--limit", "6", "--rounds", "2", "-o", str(out["revise"] / "revisions.jsonl"),
                 "--backend", "fake", "--no-progress", "--cache", "off"]) == 0
    assert main(["label", data, "--limit", "6", "-o", str(out["label"] / "preferences.jsonl"), "--backend", "fake",
                 "--no-progress", "--cache", "off"]) == 0
    realistic_run(out["run"], limit=12)
    return out


def text_problems(text: str, header: str | None) -> list[str]:
    """What misleads a reader of a page's text: n/a, unknowns in the header, empty sentences."""
    return ([f"n/a: {m.group(0)!r}" for m in re.finditer(r".{0,40}n/a.{0,20}", text)]
            + (["? in the header"] if header is None or "?" in header else [])
            + [f"empty sentence: {m.group(0)!r}" for m in re.finditer(r"\w[\w ]*:\s*\.", text)]
            + [f"empty value: {m.group(0)!r}" for m in re.finditer(r"(?:×|%|\d)\s*(?:,\s*){2,}", text)])


def page_problems(page: str) -> list[str]:
    header = re.search(r'<p class="meta">(.*?)</p>', page, re.S)
    text = re.sub(r"<script.*?</script>|<style.*?</style>|<[^>]+>", " ", page, flags=re.S)
    return text_problems(text, header.group(1) if header else None)


def test_pages_of_revise_only_label_only_and_full_folders(tmp_path: Path):
    folders = cli_folders(tmp_path)
    pages = {k: write_report(f)[1].read_text() for k, f in folders.items()}
    for kind, page in pages.items():
        assert page_problems(page) == [], kind
        meta = re.search(r'<p class="meta">(.*?)</p>', page, re.S).group(1)  # type: ignore[union-attr]
        assert "constitution harmless v1" in meta and "cai 0.1" in meta, (kind, meta)
    assert "policy: fake" in pages["revise"] and "judge mode logprobs" in pages["label"]
    # tiles that do not apply are left out
    assert "Pairs labelled" not in pages["revise"] and "Rows revised" not in pages["label"]
    assert "Length growth" not in pages["label"] and "Ties" not in pages["revise"]
    # revise and judge principles apart: two tables, two chip groups
    assert "<h2>Revision principles</h2>" in pages["run"] and "<h2>Judge principles</h2>" in pages["run"]
    assert "<h2>Judge principles</h2>" not in pages["revise"] and "<h2>Revision principles</h2>" not in pages["label"]


def test_length_growth_is_the_ratio_of_mean_lengths(tmp_path: Path):
    """One short first answer must not make a shrinking revision look like growth."""
    run = write_run(tmp_path / "run")
    rows = [json.loads(x) for x in (run / "revisions.jsonl").read_text().splitlines()][:2]
    rows[0]["initial_response"], rows[0]["rounds"][-1]["revision"] = "x" * 19, "y" * 190
    rows[1]["initial_response"], rows[1]["rounds"][-1]["revision"] = "x" * 700, "y" * 300
    for r in rows:
        r["rounds"] = r["rounds"][-1:]
        r["revised_response"] = r["rounds"][0]["revision"]
    (run / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = build_report(run)
    assert rep["headline"]["length_growth"] == pytest.approx(490 / 719, abs=1e-6)  # the mean fell
    assert rep["headline"]["length_growth_median_ratio"] == pytest.approx((10 + 300 / 700) / 2, abs=1e-6)
    page = write_report(run)[1].read_text()
    assert "\u00d70.68" in page and "Median per-row length ratio" in page


def test_per_principle_count_labels_fit():
    from cai.report.svg import PLOT_W, stacked_bars_svg

    svg = str(stacked_bars_svg([("harm", 1.0, 0.0, 0.0, 12345), ("x", 0.5, 0.2, 0.3, 7)], "t"))
    label = re.search(r'x="([\d.]+)"[^>]*>100% \(n=12345\)', svg)
    assert label and float(label.group(1)) + 7 * len("100% (n=12345)") <= PLOT_W
