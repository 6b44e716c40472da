"""Readable Markdown beside the JSONL outputs, for a person to skim what the model did."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..files import iter_jsonl, loads
from ..templates import format_conversation

REJECTS = "rejects.jsonl"  # cai.quality.REJECTS_FILE, read here without importing the gates


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def rejected_rows(folder: Path, stage: str = "revise") -> dict[str, list[str]] | None:
    """id -> reasons of one stage's rows in ``rejects.jsonl`` beside the outputs (None: no such file)."""
    if not (folder / REJECTS).is_file():
        return None
    out: dict[str, list[str]] = {}
    for row in iter_jsonl(folder / REJECTS):
        if row.get("stage") == stage:
            out.setdefault(str(row.get("id")), []).extend(str(r) for r in row.get("reasons") or [])
    return out


def _first_rows(path: Path, max_rows: int) -> Iterator[dict[str, Any] | None]:
    """``iter_jsonl(path)``, with ``None`` for each row past the first ``max_rows`` (not parsed)."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield loads(line) if max_rows > 0 else None
                max_rows -= 1


def write_revise_report(path: Path, max_rows: int = 200) -> Path:
    """Write ``NAME.md`` beside ``NAME.jsonl``: each prompt, the first answer, every round, and
    for the rows the quality gates kept out of the SFT data (``rejects.jsonl``), why."""
    report = path.with_suffix(".md")
    rejected = rejected_rows(path.parent)
    lines: list[str] = []
    n = 0
    for n, row in enumerate(_first_rows(path, max_rows), 1):
        if row is None:  # past max_rows: counted, not read
            continue
        reasons = (rejected or {}).get(str(row["id"]))
        mark = f" (rejected: {', '.join(reasons)})" if reasons else ""
        lines += [f"## {n}. row `{row['id']}`{mark}", "", "**Prompt**", "",
                  _quote(format_conversation(row["prompt"])), "",
                  "**Initial answer**", "", _quote(row["initial_response"]), ""]
        for r in row["rounds"]:
            lines += [f"**Round {r['round']}: principle `{r['principle_id']}`**", "",
                      "Critique:", "", _quote(r["critique"]), "",
                      "Revision:", "", _quote(r["revision"]), ""]
        final = (f"**Final revision: rejected ({', '.join(reasons)}), not in the SFT data**" if reasons
                 else "**Final (SFT target)**")
        lines += [final, "", _quote(row["revised_response"]), "", "---", ""]
    if n > max_rows:
        lines.append(f"_(first {max_rows} rows shown; the JSONL has them all)_")
    head = [f"# Critique and revision: {path.name}", ""]
    if rejected is not None:
        k = sum(1 for rid in rejected if rid)
        head += [f"Quality gates: {k} of {n} row{'s' if n != 1 else ''} rejected (kept out of the SFT data; "
                 f"see {REJECTS}){', marked below' if k else ''}.", ""]
    report.write_text("\n".join(head + lines), encoding="utf-8")
    return report
