"""Crash-safe outputs: a rerun keeps a finished file final until it has a new row to write."""

from __future__ import annotations

import json
from pathlib import Path

from cai.output import JsonlSink


def finished(path: Path, ids: list[str], fp: str = "fp") -> None:
    with JsonlSink(path, fp) as sink:
        for i in ids:
            sink.write({"id": i, "x": i})
        sink.finish()


def test_a_rerun_with_nothing_to_write_never_touches_the_final_file(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    finished(out, ["a", "b"])
    before = out.read_bytes()
    sink = JsonlSink(out, "fp")  # a rerun starts ... and is killed before writing anything
    assert sink.is_done("a") and sink.read("b") == {"id": "b", "x": "b"} and sink.line_of("b") == 2
    assert out.read_bytes() == before and not (tmp_path / "rows.jsonl.part").exists()
    assert json.loads((tmp_path / "rows.jsonl.meta.json").read_text())["complete"] is True
    assert not list(tmp_path.glob("*.part"))
    sink.close()
    again = JsonlSink(out, "fp")  # the next rerun still resumes every row
    assert again.summary.resumed == 2
    again.finish()
    assert out.read_bytes() == before


def test_the_first_new_row_moves_the_output_back_to_part(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    finished(out, ["a"])
    sink = JsonlSink(out, "fp")
    assert sink.write({"id": "b"}) == 2
    assert not out.exists() and (tmp_path / "rows.jsonl.part").exists()
    assert json.loads((tmp_path / "rows.jsonl.meta.json").read_text())["complete"] is False
    assert sink.read("a") == {"id": "a", "x": "a"}  # rows from before still readable
    sink.finish()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b"]


def test_another_fingerprint_starts_afresh(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    finished(out, ["a"])
    sink = JsonlSink(out, "other")
    assert sink.summary.resumed == 0 and not sink.is_done("a")
    sink.fail("z", "backend error: boom")
    sink.finish()
    assert out.read_text() == "" and (tmp_path / "rows.failures.jsonl").exists()
