"""Crash-safe outputs: a rerun keeps a finished file final until it has a new row to write."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest

from cai.errors import InputError
from cai.files import bounded_lines
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


def test_a_duplicate_id_read_back_names_the_file_and_line(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    finished(out, ["a", "b"])
    out.write_text(out.read_text() + json.dumps({"id": "a", "x": 1}) + "\n")
    with pytest.raises(InputError, match=r"rows.jsonl:3: id 'a' again \(first on line 1\)"):
        JsonlSink(out, "fp")


class FullDisk(io.BytesIO):
    name = "full"

    def write(self, data: bytes) -> int:  # type: ignore[override]
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_kept_until_finish_and_nothing_is_made_final(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    told: list[OSError] = []
    with JsonlSink(out, "fp") as sink:
        sink.on_error = told.append
        assert sink.write({"id": "a"}) == 1
        sink.flush()
        assert sink._f is not None
        sink._f.close()
        sink._f = FullDisk()  # the disk fills up
        assert sink.write({"id": "b"}) == 0 and sink.write({"id": "c"}) == 0  # kept, not raised here
        sink.flush()
        assert len(told) == 1 and not sink.is_done("b")
        with pytest.raises(OSError, match="No space left on device") as e:
            sink.finish()
    assert e.value.filename == str(tmp_path / "rows.jsonl.part")
    assert not out.exists() and (tmp_path / "rows.jsonl.part").read_bytes() == b'{"id":"a"}\n'
    again = JsonlSink(out, "fp")  # the rerun resumes what was written whole
    assert again.summary.resumed == 1
    again.close()


def test_bounded_lines_never_holds_a_line_over_the_cap() -> None:
    data = b"short\n" + b"x" * 100 + b"\n" + b"12345\n" + b"y" * 7
    assert list(bounded_lines(io.BytesIO(data), 5)) == [b"short\n", None, b"12345\n", None]
    assert list(bounded_lines(io.BytesIO(data), None)) == data.splitlines(keepends=True)
