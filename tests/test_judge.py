"""The judge on scripted log-probs: option tokens, both orders, ensembles, ties, abstentions,
CoT clamp, the choice fallback; TRL orientation; the eval metrics and the naive judge; the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from cai.backends.base import Completion, Request
from cai.backends.fake import FakeBackend
from cai.cli import main
from cai.constitution import Constitution, Principle
from cai.eval.naive import NaiveConfig, naive_chunk, parse_letter
from cai.metrics import summarize
from cai.stages.judge import JudgeConfig, judge_chunk, option_probs
from cai.stages.pairs import Pair
from cai.stages.preferences import judged_by, to_preference, write_preferences
from cai.templates import Templates

CONST = Constitution(
    name="t",
    principles=tuple(
        Principle(
            id=f"p{i}", critique="c", revision="r", comparison=f"Question {i}: which is better?"
        )
        for i in range(1, 7)
    ),
)
TPL = Templates()
_SLOTS = re.compile(r"\(A\) (.*?)\n\n\(B\) (.*?)\n\n", re.S)


def lp(**probs: float) -> list[dict[str, float]]:
    return [{k.replace("_", " "): math.log(v) for k, v in probs.items()}]


def slots(req: Request) -> tuple[str, str]:
    m = _SLOTS.search(req.messages[0]["content"])
    assert m, req.messages[0]["content"]
    return m.group(1), m.group(2)


def principle_of(req: Request) -> str:
    return "p" + re.search(r"Question (\d):", req.messages[0]["content"]).group(1)


def prefers_good(p_good: float = 0.8):
    """A judge that gives P(option) = p_good to the slot holding the word 'good'."""

    def respond(req: Request) -> Completion:
        a, _ = slots(req)
        p = p_good if "good" in a else 1 - p_good
        return Completion(texts=["A"], logprobs=lp(A=p, B=1 - p))

    return respond


def pair(
    pid: str = "x", a: str = "good answer", b: str = "bad answer", human: str | None = None
) -> Pair:
    return Pair(pid, [{"role": "user", "content": "q?"}], a, b, human=human, origin="dataset")


def test_option_probs_reads_variants_and_is_case_sensitive() -> None:
    assert option_probs({"A": math.log(0.3), "B": math.log(0.1)}) == (
        pytest.approx([0.75, 0.25]),
        pytest.approx(0.4),
    )
    # "A" and " A" (and tokenizer space markers) are one option; their probabilities add up.
    probs, mass = option_probs(
        {
            "A": math.log(0.2),
            " A": math.log(0.2),
            "\u0120B": math.log(0.1),
            "a": math.log(0.4),
            "A)": math.log(0.05),
        }
    )
    assert probs == pytest.approx([0.8, 0.2]) and mass == pytest.approx(0.5)
    reason = option_probs({"a": -0.1, "b": -3.0, "The": -4.0})
    assert isinstance(reason, str) and "no option token in the top 3" in reason and "'a'" in reason
    assert option_probs(None) == "no log-probs returned"
    # One option missing from the top list: its probability is below the list, counted as 0.
    assert option_probs({"B": -0.2, "The": -2.0})[0] == [0.0, 1.0]


def test_one_token_forward_pass_per_principle_and_order() -> None:
    be = FakeBackend(prefers_good(0.8))
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig())
    assert len(be.calls) == 8 and be.batches == [8]  # 4 principles x 2 orders, one batch
    for r in be.calls:
        assert r.continues and r.messages[-1]["content"] == "The answer is: ("
        assert (r.sampling.max_tokens, r.sampling.temperature, r.sampling.logprobs) == (1, 0.0, 20)
    row = out.row
    assert row["p_a"] == pytest.approx(0.8) and row["label"] == "a" and not row["tie"]
    assert row["position_consistent"] is True and row["position_agreement"] == 1.0
    assert row["principle_ids"] == [p.id for p in CONST.draw("x", 4, salt="judge")]
    assert len(row["judgements"]) == 8
    assert {(j["principle_id"], j["order"]) for j in row["judgements"]} == {
        (p, o) for p in row["principle_ids"] for o in ("ab", "ba")
    }
    ba = next(j for j in row["judgements"] if j["order"] == "ba")
    assert ba["p_a"] == pytest.approx(0.8)  # stored for the pair's own a/b, not the slot
    prov = row["provenance"]
    assert prov["constitution"] == "t" and prov["constitution_hash"] == CONST.digest()
    assert prov["model"] == "fake" and prov["judge"]["principles"] == 4 and prov["cai_version"]
    assert len(prov["templates_hash"]) == 64


def test_requests_are_deterministic_for_the_cache() -> None:
    be1, be2 = FakeBackend(prefers_good()), FakeBackend(prefers_good())
    judge_chunk([pair()], be1, CONST, TPL, JudgeConfig(seed=3))
    judge_chunk([pair()], be2, CONST, TPL, JudgeConfig(seed=3))
    assert be1.calls == be2.calls


def test_position_bias_swap_disagreement_becomes_a_tie() -> None:
    be = FakeBackend(lambda r: Completion(texts=["A"], logprobs=lp(A=0.7, B=0.3)))  # always "A"
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig())
    row = out.row
    assert row["p_a"] == pytest.approx(0.5) and row["tie"] and row["label"] == "tie"
    assert row["position_consistent"] is False and row["position_agreement"] == 0.0
    assert to_preference(row) is None and to_preference(row, keep_ties=True)["tie"] is True


def test_single_order_judge() -> None:
    be = FakeBackend(lambda r: Completion(texts=["A"], logprobs=lp(A=0.7, B=0.3)))
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig(both_orders=False, principles=2))
    assert len(be.calls) == 2 and out.row["p_a"] == pytest.approx(0.7)
    assert out.row["position_consistent"] is None


def test_space_variants_sum_in_a_real_judgement() -> None:
    be = FakeBackend(lambda r: Completion(texts=["A"], logprobs=lp(A=0.3, _A=0.3, B=0.1, _B=0.1)))
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig(both_orders=False, principles=1))
    assert out.row["p_a"] == pytest.approx(0.75) and out.row["judgements"][0][
        "mass"
    ] == pytest.approx(0.8)


def test_abstentions_are_left_out_of_the_mean_and_recorded() -> None:
    drawn = [p.id for p in CONST.draw("x", 4, salt="judge")]

    def respond(req: Request) -> Completion:
        if principle_of(req) == drawn[0]:
            return Completion(texts=["I"], logprobs=[{"I": -0.1, "The": -2.5}])
        return prefers_good(0.9)(req)

    (out,) = judge_chunk([pair()], FakeBackend(respond), CONST, TPL, JudgeConfig())
    row = out.row
    assert row["abstentions"] == 2 and row["p_a"] == pytest.approx(0.9)
    gone = [j for j in row["judgements"] if j["abstain"]]
    assert {j["principle_id"] for j in gone} == {drawn[0]} and "no option token" in gone[0][
        "abstain"
    ]
    assert "p_a" not in gone[0]


def test_every_judgement_abstained_is_a_failure_not_a_tie() -> None:
    be = FakeBackend(lambda r: Completion(texts=["I"], logprobs=[{"I": -0.1}]))
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig())
    assert out.row is None and out.reason.startswith("all judgements abstained: no option token")
    assert len(out.info["judgements"]) == 8


def test_min_mass_abstains_on_a_thin_option_mass() -> None:
    be = FakeBackend(lambda r: Completion(texts=["I"], logprobs=lp(I=0.9, A=0.06, B=0.04)))
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig(min_mass=0.5))
    assert out.row is None and "below min_mass" in out.reason


def test_tie_threshold() -> None:
    be = FakeBackend(prefers_good(0.54))
    (tie,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig())
    (kept,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig(tie_threshold=0.03))
    assert tie.row["tie"] and not kept.row["tie"]


def test_backend_errors_and_identical_responses_fail_the_pair() -> None:
    be = FakeBackend(prefers_good(), fail=lambda r: "broken" in slots(r)[0] + slots(r)[1])
    out = judge_chunk(
        [pair("1", a="broken"), pair("2", a="same", b="same"), pair("3")],
        be,
        CONST,
        TPL,
        JudgeConfig(),
    )
    assert out[0].reason == "judge answer: backend error: scripted failure"
    assert out[1].reason == "identical responses: nothing to judge"
    assert out[2].row["p_a"] == pytest.approx(0.8)
    bad = Pair("4", [], "", "", error="sampling: backend error: down")
    assert (
        judge_chunk([bad], be, CONST, TPL, JudgeConfig())[0].reason
        == "sampling: backend error: down"
    )


def test_cot_reasons_first_then_reads_the_options_and_clamps() -> None:
    def respond(req: Request) -> Completion:
        if req.sampling.logprobs is None:  # the reasoning call
            assert req.messages[-1]["content"] == "Let's think step by step:"
            return Completion(texts=[f" because {slots(req)[0]} is first "])
        last = req.messages[-1]["content"]
        assert last.startswith("Let's think step by step: because ")
        assert last.endswith("is first\nTherefore, the answer is: (")
        return prefers_good(0.95)(req)

    be = FakeBackend(respond)
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig(mode="cot", principles=2))
    assert be.batches == [4, 4]
    row = out.row
    assert row["p_a"] == pytest.approx(0.6) and row["label_mode"] == "cot"
    assert all(
        j["raw_p_first"] in (pytest.approx(0.95), pytest.approx(0.05)) for j in row["judgements"]
    )
    assert row["judgements"][0]["reasoning"].startswith("because")
    (free,) = judge_chunk(
        [pair()],
        FakeBackend(respond),
        CONST,
        TPL,
        JudgeConfig(mode="cot", principles=2, clamp=None),
    )
    assert free.row["p_a"] == pytest.approx(0.95)


def test_choice_mode_and_fallback_for_servers_without_logprobs(tmp_path: Path) -> None:
    def respond(req: Request) -> Completion:
        if req.sampling.choices:
            assert req.sampling.choices == ("A", "B")
            return Completion(texts=["A" if "good" in slots(req)[0] else "B"])
        return Completion(texts=["B"], logprobs=None)  # a server that ignores logprobs

    be = FakeBackend(respond)
    (out,) = judge_chunk([pair()], be, CONST, TPL, JudgeConfig())
    assert be.batches == [8, 8] and out.row["p_a"] == 1.0 and out.row["label_mode"] == "choice"
    assert all(j["mode"] == "choice" for j in out.row["judgements"])
    be2 = FakeBackend(respond)
    (direct,) = judge_chunk([pair()], be2, CONST, TPL, JudgeConfig(mode="choice"))
    assert be2.batches == [8] and direct.row["p_a"] == 1.0
    (nofb,) = judge_chunk([pair()], FakeBackend(respond), CONST, TPL, JudgeConfig(fallback=False))
    assert nofb.row is None and "no log-probs returned" in nofb.reason
    # the summary says how the judgements were read: here by the fallback, not by log-probs
    (logp,) = judge_chunk([pair("lp")], FakeBackend(prefers_good(0.8)), CONST, TPL, JudgeConfig())
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in (out.row, logp.row)))
    s = write_preferences(labels, tmp_path / "preferences.jsonl")
    assert s.modes == {"choice": 8, "logprobs": 8} and judged_by(s.modes) == "choice 8, logprobs 8"


def test_trl_orientation_and_columns(tmp_path: Path) -> None:
    rows = [
        judge_chunk(
            [pair("w", a="bad one", b="good one")],
            FakeBackend(prefers_good(0.8)),
            CONST,
            TPL,
            JudgeConfig(),
        )[0].row,
        judge_chunk([pair("t")], FakeBackend(prefers_good(0.52)), CONST, TPL, JudgeConfig())[0].row,
    ]
    pref = to_preference(rows[0])
    assert list(pref)[:10] == [
        "id",
        "prompt",
        "chosen",
        "rejected",
        "p_chosen",
        "score_chosen",
        "score_rejected",
        "chosen_side",
        "tie",
        "principle_ids",
    ]
    assert pref["chosen"] == [{"role": "assistant", "content": "good one"}]
    assert pref["rejected"] == [{"role": "assistant", "content": "bad one"}]
    assert pref["p_chosen"] == pytest.approx(0.8) == pref["score_chosen"]
    assert pref["score_rejected"] == pytest.approx(0.2) and pref["chosen_side"] == "b"
    assert pref["prompt"] == [{"role": "user", "content": "q?"}]
    for key in ("judgements", "position_consistent", "label_mode", "provenance"):
        assert key in pref
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = write_preferences(labels, tmp_path / "preferences.jsonl")
    assert (s.written, s.ties, s.judgements) == (1, 1, 16)
    assert not (tmp_path / "preferences.jsonl.part").exists()
    s = write_preferences(labels, tmp_path / "preferences.jsonl", keep_ties=True)
    assert s.written == 2 and len((tmp_path / "preferences.jsonl").read_text().splitlines()) == 2


# --- eval-judge: naive judge and metrics ---------------------------------------------------


def test_parse_letter() -> None:
    assert parse_letter("(B) because it is kind") == "B"
    assert parse_letter("The answer is A.") == "A"
    assert parse_letter("Option B is better") == "B"
    assert parse_letter("A") == "A"
    assert parse_letter("a model should not") is None
    assert parse_letter("I cannot decide") is None


def test_naive_judge_parses_generated_text() -> None:
    def respond(req: Request) -> str:
        assert not req.continues and req.sampling.logprobs is None
        return "(A) sure" if principle_of(req) != "p1" else "hmm"

    out = naive_chunk([pair(human="b")], FakeBackend(respond), CONST, TPL, NaiveConfig())
    row = out[0].row
    assert row["p_a"] == 1.0 and row["label"] == "a" and row["position_consistent"] is None
    assert len(row["judgements"]) == 4 and all(j["order"] == "ab" for j in row["judgements"])


def test_summarize_metrics() -> None:
    def r(p_a: float, human: str, label: str, consistent: bool | None, abst: int = 0) -> dict:
        js = [
            {"order": "ab", "p_a": p_a, "abstain": None},
            {"order": "ba", "p_a": p_a, "abstain": None},
        ]
        js += [{"order": "ab", "abstain": "x"}] * abst
        return {
            "p_a": p_a,
            "human": human,
            "label": label,
            "tie": label == "tie",
            "position_consistent": consistent,
            "judgements": js,
        }

    rows = [
        r(0.9, "a", "a", True),
        r(0.2, "a", "b", True, abst=2),
        r(0.52, "b", "tie", False),
        r(0.3, "b", "b", None),
    ]
    s = summarize(rows, [{"id": "f", "reason": "x", "judgements": [{"abstain": "y"}]}])
    assert (s["pairs"], s["labelled"], s["failures"], s["decided"]) == (5, 4, 1, 3)
    assert s["agreement"] == pytest.approx(2 / 3) and s["coverage"] == pytest.approx(3 / 5)
    assert s["soft_agreement"] == pytest.approx((0.9 + 0.2 + 0.48 + 0.7) / 4)
    assert s["position_consistency"] == pytest.approx(2 / 3)
    assert s["abstention_rate"] == pytest.approx(3 / 11) and s["tie_rate"] == 0.25
    assert s["first_slot_rate"] == pytest.approx(0.5)


# --- CLI on the fake backend ---------------------------------------------------------------


def hh_file(tmp_path: Path, n: int = 6) -> Path:
    f = tmp_path / "hh.jsonl"
    f.write_text(
        "".join(
            json.dumps(
                {
                    "chosen": f"\n\nHuman: q{i}?\n\nAssistant: good {i}",
                    "rejected": f"\n\nHuman: q{i}?\n\nAssistant: bad {i}",
                }
            )
            + "\n"
            for i in range(n)
        )
    )
    return f


def test_cli_label_writes_preferences_labels_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run" / "preferences.jsonl"
    args = ["label", str(hh_file(tmp_path)), "-o", str(out), "--backend", "fake", "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    labels = [json.loads(x) for x in (out.parent / "labels.jsonl").read_text().splitlines()]
    prefs = [json.loads(x) for x in out.read_text().splitlines()]
    ties = sum(r["tie"] for r in labels)
    assert len(labels) == 6 and len(prefs) == 6 - ties
    assert f"preferences: {len(prefs)} pairs" in err and f"{ties} ties held out" in err
    n = sum(len(r["judgements"]) for r in labels)
    assert f"0 of {n} judgements abstained (judged by logprobs {n})" in err  # how they were read
    assert "0 failed" in err
    assert main(args) == 0  # a rerun keeps everything
    assert "6 rows unchanged (cache), 0 redone, 0 new" in capsys.readouterr().err


def test_cli_label_samples_pairs_from_prompts(tmp_path: Path, capsys) -> None:
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "p.jsonl"
    args = [
        "label",
        str(src),
        "-o",
        str(out),
        "--backend",
        "fake",
        "--samples",
        "3",
        "-k",
        "2",
        "--keep-ties",
        "--no-progress",
    ]
    assert main(args) == 0
    labels = [json.loads(x) for x in (tmp_path / "p.labels.jsonl").read_text().splitlines()]
    assert len(labels) == 9 and {r["origin"] for r in labels} == {"sampled"}
    assert len(out.read_text().splitlines()) == 9
    assert main(args) == 0 and "9 rows unchanged (cache), 0 redone, 0 new" in capsys.readouterr().err


def test_cli_eval_judge_json(tmp_path: Path, capsys) -> None:
    assert (
        main(["eval-judge", str(hh_file(tmp_path)), "--backend", "fake", "--json", "--no-progress"])
        == 0
    )
    res = json.loads(capsys.readouterr().out)["results"]
    assert set(res) == {"logprobs judge", "naive judge"}
    assert res["logprobs judge"]["pairs"] == 6 and res["logprobs judge"]["judgements"] == 48


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    f = tmp_path / "u.jsonl"
    f.write_text(json.dumps({"prompt": "q", "response_a": "x", "response_b": "y"}) + "\n")
    assert main(["eval-judge", str(f), "--backend", "fake"]) == 2
    assert "no human labels" in capsys.readouterr().err
    assert main(["label", str(f), "--backend", "fake", "--mode", "vibes"]) == 2
    err = capsys.readouterr().err
    assert "--mode" in err and "'vibes'" in err and len(err.strip().splitlines()) == 1
    assert main(["label", str(f), "--backend", "fake", "--clamp", "0.6,0.4"]) == 2
