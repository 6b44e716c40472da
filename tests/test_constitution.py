"""Constitutions: the shipped files load, bad files give one precise error, draws are stable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cai.constitution import Constitution, Principle, draw_ids, load_constitution
from cai.errors import ConfigError
from cai.resources import data_path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / "principles.yaml", *sorted((ROOT / "constitution").glob("*.yaml"))]

# A small valid file; the tests below change one line of it and know the line numbers.
GOOD_LINES = [
    "name: test",  # 1
    'version: "1"',  # 2
    "principles:",  # 3
    "  - id: first",  # 4
    "    critique: Identify ways the response is rude.",  # 5
    "    revision: Please rewrite the response to remove rudeness.",  # 6
    "    comparison: Which response is less rude?",  # 7
    "  - id: second",  # 8
    "    critique: Identify ways the response is false.",  # 9
    "    revision: Please rewrite the response to remove falsehoods.",  # 10
    "    comparison: Which response is more accurate?",  # 11
    "  - id: third",  # 12
    "    critique: Identify ways the response is dangerous.",  # 13
    "    revision: Please rewrite the response to remove danger.",  # 14
    "    comparison: Which response is less dangerous?",  # 15
    "    weight: 2",  # 16
]


def write(tmp_path: Path, lines: list[str], name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def edited(line_no: int, new: str | None) -> list[str]:
    """GOOD_LINES with 1-based line ``line_no`` replaced (``None``: deleted)."""
    lines = list(GOOD_LINES)
    if new is None:
        del lines[line_no - 1]
    else:
        lines[line_no - 1] = new
    return lines


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    err = info.value
    assert "\n" not in str(err), "the message must be one line"
    assert err.file == str(path)
    return err


def assert_where(err: ConfigError, path: Path, line: int | None, field: str | None) -> None:
    assert err.line == line, str(err)
    assert err.field == field, str(err)
    where = f"{path}:{line}: " if line else f"{path}: "
    what = f"{field}: " if field else ""
    assert str(err).startswith(where + what), str(err)


# --- shipped constitutions -----------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_constitution_loads(path: Path) -> None:
    c = load_constitution(path)
    ids = [p.id for p in c.principles]
    assert len(ids) == len(set(ids))
    for p in c.principles:
        assert p.id.islower() and " " not in p.id
        assert p.critique.startswith("Identify specific ways in which the assistant's last")
        assert p.revision.startswith("Please rewrite the assistant response to remove")
        assert p.comparison.startswith("Which of these assistant responses is")
        assert "Choose the response " in p.comparison
        for text in (p.critique, p.revision, p.comparison):
            assert len(text) < 320, f"{p.id}: keep principle texts to one or two sentences"


def test_shipped_set() -> None:
    assert len(SHIPPED) >= 3
    harmless = load_constitution(ROOT / "principles.yaml")
    assert harmless.name == "harmless"
    assert len(harmless.principles) >= 16
    assert all(p.examples for p in harmless.principles), "every shipped principle has a few-shot example"
    assert any(p.judge_examples for p in harmless.principles)
    answers = [ex.answer for p in harmless.principles for ex in p.judge_examples]
    assert set(answers) == {"A", "B"}, "balance the judge examples' answers"
    ids = {p.id for p in harmless.principles}
    assert {"not_preachy", "not_evasive"} <= ids  # harmless, but still helpful
    assert len(load_constitution(ROOT / "constitution" / "helpful_honest.yaml").principles) >= 8
    assert len(load_constitution(ROOT / "constitution" / "concise.yaml").principles) >= 6


def test_default_is_principles_yaml() -> None:
    assert load_constitution() == load_constitution(data_path("principles.yaml"))
    assert load_constitution().digest() == load_constitution(ROOT / "principles.yaml").digest()


def test_good_fixture_loads(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path, GOOD_LINES))
    assert [p.id for p in c.principles] == ["first", "second", "third"]
    assert c.principles[2].weight == 2


# --- bad files: file, line and field -------------------------------------------------------


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, edited(9, "    critique: Identify: ways: the response is false."))
    err = load_error(path)
    assert_where(err, path, 9, None)
    assert "YAML syntax error" in str(err)


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, edited(10, "   revision: Please rewrite the response."))
    err = load_error(path)
    assert_where(err, path, 10, None)
    assert "YAML syntax error" in str(err)


def test_yaml_unclosed_quote_points_at_the_quote(tmp_path: Path) -> None:
    path = write(tmp_path, edited(13, '    critique: "Identify ways the response is dangerous.'))
    err = load_error(path)
    assert_where(err, path, 13, None)


def test_unknown_field_typo(tmp_path: Path) -> None:
    path = write(tmp_path, edited(13, "    critque: Identify ways the response is dangerous."))
    err = load_error(path)
    assert_where(err, path, 13, "principles.2.critque")
    assert "unknown field" in str(err)
    assert "'critique'" in str(err)  # did you mean


def test_unknown_top_level_field(tmp_path: Path) -> None:
    path = write(tmp_path, [*GOOD_LINES[:2], "author: me", *GOOD_LINES[2:]])
    err = load_error(path)
    assert_where(err, path, 3, "author")
    assert "unknown field" in str(err)


def test_missing_field(tmp_path: Path) -> None:
    path = write(tmp_path, edited(10, None))  # second principle loses its revision
    err = load_error(path)
    assert_where(err, path, 8, "principles.1.revision")
    assert "missing required field" in str(err)


def test_missing_name(tmp_path: Path) -> None:
    path = write(tmp_path, edited(1, "# no name"))
    err = load_error(path)
    assert_where(err, path, 2, "name")
    assert "missing" in str(err)


def test_duplicate_id(tmp_path: Path) -> None:
    path = write(tmp_path, edited(12, "  - id: first"))
    err = load_error(path)
    assert_where(err, path, 12, "principles.2.id")
    assert "duplicate principle id 'first'" in str(err)
    assert "line 4" in str(err)


def test_duplicate_id_after_whitespace_strip(tmp_path: Path) -> None:
    path = write(tmp_path, edited(8, '  - id: "first "'))
    err = load_error(path)
    assert_where(err, path, 8, "principles.1.id")


def test_empty_text(tmp_path: Path) -> None:
    path = write(tmp_path, edited(9, '    critique: "  "'))
    err = load_error(path)
    assert_where(err, path, 9, "principles.1.critique")
    assert "must not be empty" in str(err)


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    lines = [*GOOD_LINES[:10], "    revision: A second revision.", *GOOD_LINES[10:]]
    path = write(tmp_path, lines)
    err = load_error(path)
    assert_where(err, path, 11, "revision")
    assert "twice" in str(err)


def test_wrong_type_weight(tmp_path: Path) -> None:
    path = write(tmp_path, edited(16, '    weight: "heavy"'))
    err = load_error(path)
    assert_where(err, path, 16, "principles.2.weight")
    assert "more problem" not in str(err)


@pytest.mark.parametrize("value", ["0", "-1", ".inf", "true"])
def test_bad_weight_values(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, edited(16, f"    weight: {value}"))
    err = load_error(path)
    assert_where(err, path, 16, "principles.2.weight")


def test_bad_id(tmp_path: Path) -> None:
    path = write(tmp_path, edited(8, "  - id: has spaces"))
    err = load_error(path)
    assert_where(err, path, 8, "principles.1.id")


def test_bad_example(tmp_path: Path) -> None:
    lines = [
        *GOOD_LINES,
        "    examples:",  # 17
        "      - prompt: Hi",  # 18
        "        response: Go away.",  # 19
        "        critique: Rude.",  # 20
    ]
    path = write(tmp_path, lines)
    err = load_error(path)
    assert_where(err, path, 18, "principles.2.examples.0.revision")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_examples_are_short_and_every_principle_has_one(path: Path) -> None:
    for p in load_constitution(path).principles:
        assert p.examples, f"{p.id}: give it a short hand-written example"
        for ex in p.examples:
            for text in (ex.prompt, ex.response, ex.critique, ex.revision):
                assert len(text) < 400, f"{p.id}: keep examples short"
        for jx in p.judge_examples:
            assert jx.response_a != jx.response_b and jx.answer in ("A", "B")


JUDGE_EXAMPLE = [
    "    judge_examples:",  # 17
    "      - prompt: How do I pick a lock?",  # 18
    "        response_a: Here is how pin tumbler locks work.",  # 19
    "        response_b: No.",  # 20
    "        answer: a",  # 21
]


def test_judge_examples_load_and_the_answer_is_normalised(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path, [*GOOD_LINES, *JUDGE_EXAMPLE, "        reasoning: (A) explains."]))
    (ex,) = c.by_id()["third"].judge_examples
    assert ex.answer == "A" and ex.reasoning == "(A) explains." and ex.prompt == "How do I pick a lock?"
    assert c.by_id()["first"].judge_examples == ()


@pytest.mark.parametrize("line, lineno, field, message", [
    ("        answer: C", 21, "principles.2.judge_examples.0.answer", "answer must be A or B"),
    ("        answr: A", 21, "principles.2.judge_examples.0.answr", "unknown field"),
    ("        response_b: Here is how pin tumbler locks work.", 18, "principles.2.judge_examples.0", "the same"),
])
def test_bad_judge_example(tmp_path: Path, line: str, lineno: int, field: str, message: str) -> None:
    lines = [*GOOD_LINES, *JUDGE_EXAMPLE]
    lines[19 if "response_b" in line else 20] = line
    path = write(tmp_path, lines)
    err = load_error(path)
    assert_where(err, path, lineno, field)
    assert message in str(err)


def test_a_file_without_judge_examples_dumps_and_hashes_as_before(tmp_path: Path) -> None:
    """judge_examples is left out of the dump while empty: the hash of an existing constitution
    (recorded in its runs' rows and manifests) does not change with the new field."""
    c = load_constitution(write(tmp_path, GOOD_LINES))
    assert all("judge_examples" not in p for p in c.model_dump()["principles"])
    with_ex = load_constitution(write(tmp_path, [*GOOD_LINES, *JUDGE_EXAMPLE], "b.yaml"))
    assert "judge_examples" in with_ex.model_dump()["principles"][2]
    assert Constitution.model_validate(with_ex.model_dump()) == with_ex
    assert with_ex.digest() != c.digest()
    golden = load_constitution(ROOT / "tests" / "golden" / "inputs" / "constitution.yaml")
    assert golden.digest() == "403bc716984ff476b09370e9fd3ffdd97f0206c06772764d62c5268520912440"


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, [])
    err = load_error(path)
    assert_where(err, path, None, None)
    assert "empty" in str(err)


def test_comments_only_file(tmp_path: Path) -> None:
    path = write(tmp_path, ["# nothing here", ""])
    err = load_error(path)
    assert_where(err, path, None, None)
    assert "empty" in str(err)


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, ["# a list, not a mapping", "- id: first", "- id: second"])
    err = load_error(path)
    assert_where(err, path, 2, None)
    assert "top level must be a mapping" in str(err)


@pytest.mark.parametrize("value", ["", "[]", "5", "just text"])
def test_principles_not_a_list_of_principles(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, ["name: test", f"principles: {value}".rstrip()])
    err = load_error(path)
    assert_where(err, path, 2, "principles")


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    err = load_error(path)
    assert_where(err, path, None, None)
    assert "file not found" in str(err)


# --- drawing principles --------------------------------------------------------------------


def make(n: int, weights: dict[str, float] | None = None) -> list[Principle]:
    weights = weights or {}
    return [
        Principle(
            id=f"p{i:02d}",
            critique=f"Critique {i}.",
            revision=f"Revision {i}.",
            comparison=f"Comparison {i}?",
            weight=weights.get(f"p{i:02d}", 1.0),
        )
        for i in range(n)
    ]


KEYS = [f"row-{i}" for i in range(2000)]


def test_draw_is_deterministic() -> None:
    c = load_constitution()
    again = load_constitution()
    for key in KEYS[:200]:
        assert c.draw(key, 3) == again.draw(key, 3)
        assert draw_ids(c.principles, key, 3) == draw_ids(again.principles, key, 3)
    # seed and salt give different, but still deterministic, draws
    firsts = [draw_ids(c.principles, k, 1)[0] for k in KEYS[:200]]
    seeded = [draw_ids(c.principles, k, 1, seed=1)[0] for k in KEYS[:200]]
    salted = [draw_ids(c.principles, k, 1, salt="judge")[0] for k in KEYS[:200]]
    assert firsts != seeded and firsts != salted
    assert seeded == [draw_ids(c.principles, k, 1, seed=1)[0] for k in KEYS[:200]]


def test_draw_gives_k_distinct_ids() -> None:
    c = load_constitution()
    n = len(c.principles)
    for key in KEYS[:50]:
        for k in (1, 2, 4, n):
            ids = draw_ids(c.principles, key, k)
            assert len(ids) == k == len(set(ids))
        assert [p.id for p in c.draw(key, 4)] == draw_ids(c.principles, key, 4)
    assert draw_ids(c.principles, "x", 0) == []
    # more than there are: the ranking wraps around
    assert draw_ids(c.principles, "x", n + 2)[n:] == draw_ids(c.principles, "x", 2)


def test_draw_uses_every_principle() -> None:
    c = load_constitution()
    seen = Counter(draw_ids(c.principles, key, 1)[0] for key in KEYS)
    assert set(seen) == {p.id for p in c.principles}


def test_editing_text_changes_no_draw() -> None:
    c = load_constitution()
    edited_c = Constitution(
        name=c.name,
        principles=tuple(
            p.model_copy(
                update={
                    "critique": p.critique + " Be thorough.",
                    "revision": "Reworded: " + p.revision,
                    "comparison": p.comparison.upper(),
                    "examples": (),
                }
            )
            for p in c.principles
        ),
    )
    assert edited_c.digest() != c.digest()
    for key in KEYS:
        assert draw_ids(edited_c.principles, key, 3) == draw_ids(c.principles, key, 3)


def test_reordering_changes_no_draw() -> None:
    ps = make(16)
    for key in KEYS[:300]:
        assert draw_ids(ps, key, 3) == draw_ids(list(reversed(ps)), key, 3)


def test_adding_a_principle_moves_only_the_rows_it_wins() -> None:
    old, new = make(16), make(17)
    changed = 0
    for key in KEYS:
        before, after = draw_ids(old, key, 1)[0], draw_ids(new, key, 1)[0]
        if before != after:
            changed += 1
            assert after == "p16", "a changed row must now draw the new principle"
    assert 0.03 <= changed / len(KEYS) <= 0.10  # expected 1/17, about 5.9%


def test_weights_skew_frequencies() -> None:
    ps = make(4, weights={"p00": 3.0})
    firsts = Counter(draw_ids(ps, key, 1)[0] for key in KEYS)
    # expected shares: p00 3/6, the others 1/6 each
    light = [firsts[f"p{i:02d}"] for i in range(1, 4)]
    ratio = firsts["p00"] / (sum(light) / 3)
    assert 2.2 <= ratio <= 4.0, firsts
    assert 0.42 <= firsts["p00"] / len(KEYS) <= 0.58, firsts
    for count in light:
        assert 0.11 <= count / len(KEYS) <= 0.23, firsts
