"""Crash-safe outputs: a rerun keeps a finished file final until it has a new row to write."""

from __future__ import annotations

import json
from pathlib import Path

from cai.output import RECENT_ROWS, JsonlSink


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


def test_read_gives_back_a_row_written_now_or_before(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    rows = [{"id": f"r{i}", "text": f"caf\u00e9 {i}", "n": [i, 1.5, None]} for i in range(RECENT_ROWS + 10)]
    with JsonlSink(path, "fp") as sink:
        for row in rows[:5]:
            sink.write(row)
        sink.finish()
    with JsonlSink(path, "fp") as sink:  # a rerun: the first rows are read from the file
        for row in rows[5:]:
            sink.write(row)
            assert sink.read(row["id"]) == row  # from memory, before any flush
        assert [sink.read(r["id"]) for r in rows] == rows  # the oldest from the file
        sink.finish()
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows
