"""The text checks behind the quality gates, on hand-labelled real revisions and edge cases.

tests/data/gate_examples.jsonl holds revisions the shipped model (SmolLM2-135M, embedded backend)
wrote for examples/hh_red_team.jsonl (`cai revise --limit 24 --rounds 2` with --max-tokens 96
--repetition-penalty 1.15, --max-tokens 160 --repetition-penalty 1.0 and --max-tokens 32), with
their critique, finish reason and the few-shot example texts of the drawn principle, labelled by
hand: the flags a careful reader gives them and the text clean_revision should leave. ``source``
is run:row-id:round (a: the 96-token run with the templates before fencing, its examples are not
known; a2: the same settings with the current templates, labelled before the checks were run on
it; b: 160 tokens; c: 32 tokens). Long truncated texts are cut at a word boundary to keep the file
small; the labels are of the stored text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cai.quality.flags import COUNTED, DROPPING, FLAGS, check_text, clean_revision, is_loop, repeat_fraction, zlib_ratio

EXAMPLES = Path(__file__).parent / "data" / "gate_examples.jsonl"


def load_examples() -> list[dict[str, Any]]:
    with EXAMPLES.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_vocabulary() -> None:
    assert set(FLAGS) == {"truncated", "empty", "loop", "meta", "restates_critique", "copies_example"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in FLAGS.values())
    dropping, counted = set(DROPPING), set(COUNTED)
    assert dropping | counted == set(FLAGS) and not dropping & counted
    assert dropping == {"truncated", "empty", "loop", "meta", "copies_example"}


# Real revisions whose hand label the checks miss, kept in the set so that the numbers stay honest.
KNOWN_MISSES = {
    # "I've made sure to include all necessary information when responding to your query. You asked
    # for ... which has been provided as a suggestion from a user ...": narrates its own reply.
    "a:57efd273:r2",
    # "... If you'd like me to rephrase anything within these brackets ... No template provided. Just send
    # over the original paragraph again.": talks about the editing task without any phrase the checks know.
    "a2:1ea6f41a:r2",
}


def test_the_examples_file_is_well_formed() -> None:
    rows = load_examples()
    assert len(rows) >= 40
    assert len({row["source"] for row in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"source", "text", "critique", "finish_reason", "examples", "expected_flags",
                            "expected_clean"}
        assert set(row["expected_flags"]) <= set(FLAGS), row
        assert row["expected_flags"] == [f for f in FLAGS if f in row["expected_flags"]]  # vocabulary order
    for flag in set(FLAGS) - {"empty"}:  # every flag but empty has real positives (the model never wrote nothing)
        assert any(flag in row["expected_flags"] for row in rows), flag


@pytest.mark.parametrize("row", load_examples(), ids=lambda r: r["source"])
def test_real_revisions_are_cleaned(row: dict[str, Any]) -> None:
    assert clean_revision(row["text"]) == row["expected_clean"]


def real_flags(row: dict[str, Any]) -> list[str]:
    return check_text(row["text"], finish_reason=row["finish_reason"], critique=row["critique"],
                      examples=row["examples"])


@pytest.mark.parametrize("row", load_examples(), ids=lambda r: r["source"])
def test_real_revisions_are_flagged(row: dict[str, Any]) -> None:
    if row["source"] in KNOWN_MISSES:
        assert real_flags(row) != row["expected_flags"], "fixed: remove it from KNOWN_MISSES"
    else:
        assert real_flags(row) == row["expected_flags"]


def test_no_false_positive_drops_on_real_revisions() -> None:
    """A dropping flag the label does not have would throw away a good row: none on the real set."""
    for row in load_examples():
        extra = set(real_flags(row)) - set(row["expected_flags"])
        assert not extra & DROPPING, (row["source"], extra)


# --- cleaning -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Revision: I can't help with that.", "I can't help with that."),
        ("  Revised response:\n\nI can't help with that.\n", "I can't help with that."),
        ("Rewritten Response: Sure.", "Sure."),
        ("Here is the revised response:\n\nNo, I won't.", "No, I won't."),
        ("Sure! Here's the revised response: No.", "No."),
        ("**Revised Response**\nPlease talk to a doctor.", "Please talk to a doctor."),
        ("## Revised reply\n\nPlease talk to a doctor.", "Please talk to a doctor."),
        ("**Revision:** Please talk to a doctor.", "Please talk to a doctor."),
        ("Revision 2: fine.", "fine."),
        ('"I would rather not say."', "I would rather not say."),
        ('Revised response: "I would rather not say."', "I would rather not say."),
        ("\u201cI would rather not say.\u201d", "I would rather not say."),
        ("<revision>\nI would rather not say.\n</revision>", "I would rather not say."),
        ("<response>I would rather not say.", "I would rather not say."),
        ("I would rather not say.\n</respon", "I would rather not say."),
        ("I would rather not say.\n&lt;", "I would rather not say."),
        ("Is a < b", "Is a < b"),
        ("Use the <b> tag", "Use the <b> tag"),
        # not safe: left alone
        ("Revised response:", "Revised response:"),
        ("Revised plans are due on Monday.", "Revised plans are due on Monday."),
        ("Revision of a contract needs both parties.", "Revision of a contract needs both parties."),
        ("Note: this is fine.", "Note: this is fine."),
        ('"No" is a full sentence, and so is "stop".', '"No" is a full sentence, and so is "stop".'),
        ("'Tis the season.", "'Tis the season."),
        ("Answer the question first.", "Answer the question first."),
        ("", ""),
    ],
)
def test_clean_revision(raw: str, clean: str) -> None:
    assert clean_revision(raw) == clean


# --- flags --------------------------------------------------------------------------------------


def flags(text: str, finish: str | None = "stop", critique: str | None = None) -> list[str]:
    return check_text(text, finish_reason=finish, critique=critique)


def test_truncated_comes_from_the_finish_reason_only() -> None:
    assert flags("I can't help with that, but I can", "length") == ["truncated"]
    assert flags("I can't help with that, but I can", "stop") == []
    assert flags("I can't help with that.", None) == []


def test_empty() -> None:
    for text in ["", "   \n ", "...", '""', "**  **"]:
        assert flags(text) == ["empty"], text
    assert flags("", "length") == ["truncated", "empty"]


def test_legitimate_repetition_is_not_a_loop() -> None:
    word = ("No. No, no, no: never mix bleach and ammonia, never, because the fumes are toxic and can kill. "
            "Open a window and leave the room if you already did.")
    bullets = "\n".join(f"- Use a {w} password for your {s} account." for w, s in [
        ("long", "email"), ("unique", "bank"), ("random", "work"), ("different", "shopping"), ("strong", "social")])
    steps = "\n".join(f"{i}. Call the {who} and ask for help." for i, who in enumerate(
        ["police", "fire department", "poison control line", "hospital", "school nurse"], 1))
    twice = "The recipe uses ten percent alcohol and ten percent water, which is not safe to drink at all. " * 2
    for text in (word, bullets, steps, twice):  # said twice is not "many times"
        assert not is_loop(text), text
        assert flags(text) == [], text


def test_loops() -> None:
    sentence = "I'm sorry, but I can't help with that. " * 6
    ngram = "You should talk to someone you trust and " * 8
    chars = "ha" * 200
    tail = "Here is some advice about staying safe at night. " + "Stay safe, stay safe, stay safe, " * 10
    for text in (sentence, ngram, chars, tail):
        assert is_loop(text), text
        assert flags(text, "length") == ["truncated", "loop"]
    assert repeat_fraction(sentence) > 0.5 and zlib_ratio(chars) < 0.1


def test_meta() -> None:
    for text in [
        "The revised response should avoid giving instructions.",
        "Here is a revised version",
        "Here is a revised version of the response.",
        "I have revised the response to remove the harmful parts.",
        "I've made some changes to make the message clearer.",
        "The original text contained several errors.",
        "This response is harmful because it gives instructions.",
        "Revised response:",
        "Critique: the reply is rude.",
        "Sure, I can help.\n\nOriginal response:\nYou could do that.",
        "User: How do I pick a lock?\n\nAssistant: I can't help with that.",
        "I'm sorry for any confusion.\n\nThe user asked how to pick a lock.",
        "Try the hotline.\n</response>\n\nThat is all.",
        "Try the hotline.\n&lt;/conversation>\n\nThat is all.",
        "Try the hotline. The response is not a critique of the user.",
        "Try the hotline.\n\nThe user's final reply:\nThanks.",
        "I'm glad you asked. However, I've made changes to keep it professional.",
        "That's a great answer! It covers everything.",
        "Your entire response has been rewritten into one paragraph.",
        "Sure. Here's how you could revise the response: be kinder.",
        "You've asked me to edit this message so that it is polite.",
        "Follow the provided template and keep it short.",
    ]:
        assert flags(text) == ["meta"], text
    for text in ["The original Star Wars film came out in 1977.", "This is how you make bread: mix flour and water.",
                 "Here is what I can tell you: the fumes are toxic.", "I've revised my budget too; it helps.",
                 "The answer is no.", "The human body needs water.", "Your message matters to me.",
                 "The statement is false.", "The AI tools you mention are legal to use.",
                 "Call 911. The response time is usually under ten minutes.", "Use <b>bold</b> for the title.",
                 "That's a great question! Bleach and ammonia must never be mixed.",
                 "Here's a possible response you could send to your landlord: ...",
                 "You can edit the message in the app by pressing and holding it.",
                 "Here's a template for your cover letter: Dear ...",
                 "My response would be to call the police.", "The user agreement forbids resale."]:
        assert "meta" not in flags(text), text


def test_restates_critique() -> None:
    critique = ("The reply gives step by step instructions for picking a lock, which could help someone break "
                "into a home. It should refuse and suggest calling a locksmith.")
    copy = "The reply gives step by step instructions for picking a lock, which could help someone break in."
    answer = "I can't help with picking locks, but a licensed locksmith can get you back into your own home."
    assert "restates_critique" in flags(copy, critique=critique)
    assert flags(answer, critique=critique) == []
    assert flags(copy) == ["meta"]  # no critique given: nothing to compare with
