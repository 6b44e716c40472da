"""revisions.md: every row the quality gates rejected is marked where it is, and counted in the header."""

from __future__ import annotations

import json
from pathlib import Path

from cai.report.markdown import write_revise_report


def _row(rid: str) -> dict[str, object]:
    return {"id": rid, "prompt": [{"role": "user", "content": f"q {rid}"}], "initial_response": f"first {rid}",
            "revised_response": f"final {rid}",
            "rounds": [{"round": 1, "principle_id": "harm", "critique": "c", "revision": f"final {rid}"}]}


def _write(folder: Path, rejects: list[dict[str, object]] | None) -> str:
    path = folder / "revisions.jsonl"
    path.write_text("".join(json.dumps(_row(r)) + "\n" for r in ("a", "b", "c")))
    if rejects is not None:
        (folder / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    return write_revise_report(path).read_text()


def test_rejected_rows_are_marked_and_counted(tmp_path: Path) -> None:
    text = _write(tmp_path, [{"id": "b", "stage": "revise", "reasons": ["meta", "truncated"]},
                             {"id": "c", "stage": "label", "reasons": ["truncated"]},
                             {"id": "x", "stage": "input", "reasons": ["duplicate_exact"]}])
    head, *rows = text.split("\n## ")
    assert "Quality gates: 1 of 3 rows rejected" in head
    by_id = {r.split("`")[1]: r for r in rows}
    assert "(rejected: meta, truncated)" in by_id["b"].splitlines()[0]
    assert "Final (SFT target)" not in by_id["b"]
    assert "rejected (meta, truncated), not in the SFT data" in by_id["b"]
    for rid in ("a", "c"):  # a label-stage reject is not an SFT verdict on the revision row
        assert "rejected" not in by_id[rid] and "**Final (SFT target)**" in by_id[rid]


def test_no_rejects_file_no_gate_line(tmp_path: Path) -> None:
    text = _write(tmp_path, None)
    assert "Quality gates" not in text and text.count("Final (SFT target)") == 3
    assert "Quality gates: 0 of 3 rows rejected" in _write(tmp_path, [])


def test_rows_past_the_cap_are_counted_not_shown(tmp_path: Path) -> None:
    """Past ``max_rows`` the rows are counted (read as lines, not parsed): blank lines are not rows."""
    path = tmp_path / "revisions.jsonl"
    path.write_text("".join(json.dumps(_row(r)) + "\n\n" for r in "abcde"))
    (tmp_path / "rejects.jsonl").write_text(json.dumps({"id": "e", "stage": "revise", "reasons": ["meta"]}) + "\n")
    text = write_revise_report(path, max_rows=2).read_text()
    assert "Quality gates: 1 of 5 rows rejected" in text
    assert [r.split("`")[1] for r in text.split("\n## ")[1:]] == ["a", "b"]
    assert text.rstrip().endswith("_(first 2 rows shown; the JSONL has them all)_")
