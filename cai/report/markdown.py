"""Readable Markdown beside the JSONL outputs, for a person to skim what the model did."""

from __future__ import annotations

import json
from pathlib import Path

from ..templates import format_conversation


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def write_revise_report(path: Path, max_rows: int = 200) -> Path:
    """Write ``NAME.md`` beside ``NAME.jsonl``: each prompt, the first answer, every round."""
    report = path.with_suffix(".md")
    lines = [f"# Critique and revision: {path.name}", ""]
    n = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if n >= max_rows:
                lines.append(f"_(first {max_rows} rows shown; the JSONL has them all)_")
                break
            row = json.loads(line)
            n += 1
            lines += [f"## {n}. row `{row['id']}`", "", "**Prompt**", "",
                      _quote(format_conversation(row["prompt"])), "",
                      "**Initial answer**", "", _quote(row["initial_response"]), ""]
            for r in row["rounds"]:
                lines += [f"**Round {r['round']}: principle `{r['principle_id']}`**", "",
                          "Critique:", "", _quote(r["critique"]), "",
                          "Revision:", "", _quote(r["revision"]), ""]
            lines += ["**Final (SFT target)**", "", _quote(row["revised_response"]), "", "---", ""]
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
