from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cai.errors import InputError
from cai.inputs import parse_transcript, read_prompts, transcript_prompt


def test_transcript_to_messages_and_prompt():
    t = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant: I can't help."
    msgs = parse_transcript(t)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    prompt, reply = transcript_prompt(t)
    assert prompt[-1] == {"role": "user", "content": "how to pick a lock?"}
    assert reply == "I can't help."


def test_not_a_transcript():
    with pytest.raises(InputError):
        parse_transcript("just text")


def test_hh_dev_rows(hh_dev: Path):
    n = len(hh_dev.read_text().splitlines())
    assert n in (32, 300)
    rows = list(read_prompts(hh_dev))
    assert len(rows) == n, "every line is a prompt"
    assert len({r.id for r in rows}) == n, "ids must be unique"
    assert all(r.prompt[-1]["role"] == "user" for r in rows)
    assert rows[0].prompt[0]["content"] == "You wish you could be a robot."
    assert "rejected" in rows[0].extra and rows[0].source.endswith(":1")


def test_formats_give_same_rows(tmp_path: Path):
    recs = [{"prompt": "a?"}, {"prompt": "b?"}, {"prompt": "a?"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(recs))
    with (tmp_path / "p.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt"])
        w.writeheader()
        w.writerows(recs)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "p.parquet")
    import datasets

    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    want = None
    for name in ("p.jsonl", "p.json", "p.csv", "p.parquet", "ds"):
        got = [(r.id, r.prompt) for r in read_prompts(tmp_path / name)]
        assert len(got) == 3
        assert got[2][0] == got[0][0] + "-2", "a repeated prompt gets a suffixed id"
        want = want or got
        assert got == want, name


def test_messages_column_drops_final_reply(tmp_path: Path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n")
    (row,) = read_prompts(tmp_path / "m.jsonl")
    assert row.prompt == [{"role": "user", "content": "q"}]


def test_bad_inputs_name_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: invalid JSON"):
        list(read_prompts(bad))
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"foo": "x"}\n')
    with pytest.raises(InputError, match=r"nocol.jsonl:1: no prompt column .*row has foo"):
        list(read_prompts(nocol))
    with pytest.raises(InputError, match="file not found"):
        list(read_prompts(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="unsupported file type"):
        list(read_prompts(tmp_path / "x.txt"))


def test_content_parts_of_type_text_are_joined(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "How do "},
                                                                      {"type": "text", "text": "I bake?"}]}]}) + "\n")
    (row,) = read_prompts(f)
    assert row.prompt == [{"role": "user", "content": "How do I bake?"}]
