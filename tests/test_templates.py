from __future__ import annotations

from pathlib import Path

import pytest

from cai.constitution import load_constitution
from cai.errors import TemplateError
from cai.templates import Templates

CONV = [{"role": "user", "content": "How do I hotwire a car?"}]


def test_judge_messages_end_with_answer_prefix():
    p = load_constitution().principles[0]
    msgs = Templates().messages("judge", conversation=CONV, response_a="no", response_b="sure", principle=p)
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[-1]["content"] == "The answer is: ("
    assert p.comparison in msgs[0]["content"]
    assert "(A) no" in msgs[0]["content"] and "(B) sure" in msgs[0]["content"]
    assert "User: How do I hotwire a car?" in msgs[0]["content"]


def test_strict_undefined_names_file_and_line(tmp_path: Path):
    (tmp_path / "critique.user.j2").write_text("line one\n{{ respnse }}\n")
    t = Templates(tmp_path)
    p = load_constitution().principles[0]
    with pytest.raises(TemplateError) as e:
        t.messages("critique", conversation=CONV, response="x", principle=p, round=1)
    msg = str(e.value)
    assert "critique.user.j2:2:" in msg and "respnse" in msg and "variables available" in msg


def test_sandbox_blocks_attribute_escape(tmp_path: Path):
    (tmp_path / "critique.user.j2").write_text("{{ response.__class__.__mro__ }}")
    p = load_constitution().principles[0]
    with pytest.raises(TemplateError):
        Templates(tmp_path).messages("critique", conversation=CONV, response="x", principle=p, round=1)


def test_user_folder_overrides_one_file_and_changes_digest(tmp_path: Path):
    base = Templates()
    (tmp_path / "revise.user.j2").write_text("Rewrite: {{ response }} per {{ principle.revision }}")
    over = Templates(tmp_path)
    p = load_constitution().principles[0]
    msgs = over.messages("revise", conversation=CONV, response="r", critique="c", principle=p, round=1)
    assert msgs == [{"role": "user", "content": f"Rewrite: r per {p.revision}"}]
    # untouched stages still come from the shipped folder
    assert over.digest(("critique",)) == base.digest(("critique",))
    assert over.digest(("revise",)) != base.digest(("revise",))


def test_syntax_error_and_missing_folder(tmp_path: Path):
    (tmp_path / "judge.user.j2").write_text("ok\n{% if %}\n")
    with pytest.raises(TemplateError, match=r"judge.user.j2:2: template syntax error"):
        Templates(tmp_path).messages("judge", conversation=CONV, response_a="a", response_b="b",
                                     principle=load_constitution().principles[0])
    with pytest.raises(TemplateError, match="templates folder not found"):
        Templates(tmp_path / "nope")
