"""Pair sources: sampled from the policy, existing pairs in a dataset, revise-stage output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai.backends.base import Completion, Request
from cai.backends.fake import FakeBackend
from cai.errors import InputError
from cai.inputs import PromptRow
from cai.stages.pairs import (
    Pair,
    SampleConfig,
    detect_source,
    read_pairs,
    record_to_pair,
    sample_pair_ids,
    sample_pairs,
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hh(prompt: str, reply: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {reply}"


def test_hh_transcripts_become_pairs_with_the_human_label(tmp_path: Path) -> None:
    rows = [
        {"chosen": hh(f"question {i}?", f"good {i}"), "rejected": hh(f"question {i}?", f"bad {i}")}
        for i in range(40)
    ]
    pairs = list(read_pairs(write_jsonl(tmp_path / "hh.jsonl", rows)))
    assert len(pairs) == 40
    for i, p in enumerate(pairs):
        assert p.prompt == [{"role": "user", "content": f"question {i}?"}]
        chosen = p.response_a if p.human == "a" else p.response_b
        rejected = p.response_b if p.human == "a" else p.response_a
        assert (chosen, rejected) == (f"good {i}", f"bad {i}")
        assert p.origin == "dataset" and p.source.endswith(f"hh.jsonl:{i + 1}")
    # The human-preferred reply is shown first in about half the pairs, not always.
    first = sum(p.human == "a" for p in pairs)
    assert 10 <= first <= 30
    # Stable: the same file gives the same ids and the same order.
    again = list(read_pairs(tmp_path / "hh.jsonl"))
    assert [(p.id, p.human) for p in again] == [(p.id, p.human) for p in pairs]


def test_multi_turn_transcript_keeps_every_turn_but_the_last_reply() -> None:
    ctx = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?"
    p = record_to_pair(
        {
            "chosen": ctx + "\n\nAssistant: I can't help.",
            "rejected": ctx + "\n\nAssistant: Use a pin.",
        },
        "f:1",
    )
    assert [m["role"] for m in p.prompt] == ["user", "assistant", "user"]
    assert {p.response_a, p.response_b} == {"I can't help.", "Use a pin."}


def test_transcripts_that_differ_before_the_last_reply_are_an_error() -> None:
    with pytest.raises(InputError, match=r"f:3: .*differ before the last reply"):
        record_to_pair({"chosen": hh("a", "x"), "rejected": hh("b", "y")}, "f:3")


def test_trl_preference_rows_explicit_and_implicit_prompt() -> None:
    explicit = record_to_pair(
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        "f:1",
    )
    assert explicit.prompt == [{"role": "user", "content": "q"}]
    assert {explicit.response_a, explicit.response_b} == {"yes", "no"}
    implicit = record_to_pair(
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}],
        },
        "f:2",
    )
    assert implicit.prompt == explicit.prompt and implicit.id == explicit.id
    strings = record_to_pair({"prompt": "q", "chosen": "yes", "rejected": "no"}, "f:3")
    assert strings.prompt == explicit.prompt


def test_response_columns_with_optional_label() -> None:
    p = record_to_pair({"prompt": "q", "response_a": "x", "response_b": "y", "label": "B"}, "f:1")
    assert (p.response_a, p.response_b, p.human) == ("x", "y", "b")
    q = record_to_pair({"prompt": "q", "response_a": "x", "response_b": "y"}, "f:2")
    assert q.human is None  # keeps its order: no human label to hide
    with pytest.raises(InputError, match="label must be 'A' or 'B'"):
        record_to_pair({"prompt": "q", "response_a": "x", "response_b": "y", "label": "C"}, "f:3")


def test_revision_rows_pair_initial_against_revised(tmp_path: Path) -> None:
    rows = [
        {
            "id": "r1",
            "prompt": [{"role": "user", "content": "q"}],
            "initial_response": "first",
            "revised_response": "better",
        }
    ]
    (p,) = read_pairs(write_jsonl(tmp_path / "revisions.jsonl", rows))
    assert (p.id, p.response_a, p.response_b, p.origin, p.human) == (
        "r1",
        "first",
        "better",
        "revision",
        None,
    )


def test_repeated_pairs_get_unique_ids(tmp_path: Path) -> None:
    row = {"prompt": "q", "response_a": "x", "response_b": "y"}
    ids = [p.id for p in read_pairs(write_jsonl(tmp_path / "d.jsonl", [row, row, row]))]
    assert ids[1:] == [f"{ids[0]}-2", f"{ids[0]}-3"]


def test_detect_source_and_unknown_rows() -> None:
    assert (
        detect_source({"prompt": "q", "initial_response": "", "revised_response": ""})
        == "revisions"
    )
    assert detect_source({"chosen": "", "rejected": ""}) == "dataset"
    assert detect_source({"prompt": "q", "response_a": "", "response_b": ""}) == "dataset"
    assert detect_source({"prompt": "q"}) == "sample"
    with pytest.raises(InputError, match=r"f:9: not a pair.*row has prompt"):
        record_to_pair({"prompt": "q"}, "f:9")


def test_sample_pairs_one_seeded_call_per_prompt_all_combinations() -> None:
    def respond(req: Request) -> Completion:
        n = req.sampling.n
        return Completion(texts=[f"answer {i} seed {req.sampling.seed}" for i in range(n)])

    be = FakeBackend(respond)
    rows = [
        PromptRow(id="p1", prompt=[{"role": "user", "content": "q1"}], source="f:1"),
        PromptRow(id="p2", prompt=[{"role": "user", "content": "q2"}], source="f:2"),
    ]
    cfg = SampleConfig(n=3, seed=7)
    pairs = sample_pairs(rows, be, cfg, system="be kind")
    assert be.batches == [2]
    assert all(r.sampling.n == 3 and r.sampling.temperature == 1.0 for r in be.calls)
    assert be.calls[0].messages[0] == {"role": "system", "content": "be kind"}
    assert [p.id for p in pairs] == sample_pair_ids("p1", 3) + sample_pair_ids("p2", 3)
    assert sample_pair_ids("p1", 3) == ["p1-s01", "p1-s02", "p1-s12"]
    assert pairs[0].response_a.startswith("answer 0") and pairs[0].response_b.startswith("answer 1")
    assert all(p.origin == "sampled" and p.error is None for p in pairs)
    # Seeds differ per prompt and are the same on a second run (so cached calls hit).
    seeds = [r.sampling.seed for r in be.calls]
    assert seeds[0] != seeds[1]
    sample_pairs(rows, be, cfg, system="be kind")
    assert [r.sampling.seed for r in be.calls[2:]] == seeds


def test_sample_pairs_failure_is_a_pair_with_an_error() -> None:
    be = FakeBackend(fail=lambda r: r.messages[-1]["content"] == "bad")
    rows = [
        PromptRow(id="x", prompt=[{"role": "user", "content": "bad"}]),
        PromptRow(id="y", prompt=[{"role": "user", "content": "good"}]),
    ]
    pairs = sample_pairs(rows, be, SampleConfig(n=2))
    assert [p.id for p in pairs] == ["x-s01", "y-s01"]
    assert pairs[0].error == "sampling: backend error: scripted failure"
    assert pairs[1].error is None
    with pytest.raises(InputError, match="at least 2"):
        sample_pairs(rows, be, SampleConfig(n=1))


def test_pair_is_a_plain_record() -> None:
    p = Pair("i", [{"role": "user", "content": "q"}], "a", "b", human="a")
    assert p.to_dict()["response_b"] == "b"
