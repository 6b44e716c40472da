"""Human labels as data: ``RUN_DIR/human_labels.jsonl``, the review order, and reading it back.

One JSON object per answer, appended and fsynced at once (so a closed tab, a killed server or a
reload loses nothing)::

    {"id": "p3", "label": "a", "shown_left": "b", "reviewer": "ann", "time": "2026-12-05T16:20:00+00:00",
     "sample": "uncertainty"}

``id`` is the pair's id in labels.jsonl; ``label`` is ``"a"``, ``"b"`` or ``"tie"`` with ``a``/``b``
as labels.jsonl's ``response_a``/``response_b`` (never the side it was shown on), or ``null``: an
undo, which retracts that reviewer's label of that pair. ``shown_left`` (``"a"``, ``"b"``, or
``null`` when unknown, e.g. from another tool) is the response shown on the left. ``sample`` (optional)
says how the pair was drawn: ``"uncertainty"`` (the review order) or ``"uniform"`` (``--sample N``).

Every answer is kept; for each (id, reviewer) the last line counts. Writers append whole lines
under an exclusive ``flock``, so two tabs, two servers or an import never overwrite each other.
"""

from __future__ import annotations

import fcntl
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..analysis.human import HUMAN_FILE, SIDES, check, load_pairs, principle_sides, read_records
from ..analysis.read import numbered
from ..errors import InputError
from ..files import dumps
from ..hashing import hash_int

ORDER_TEXT = (
    "Pairs come hardest first: pairs the judge called a tie; then pairs whose two orders (A/B and "
    "B/A) disagree; then pairs whose principles disagree; then by how near the judge's p(A) is to 0.5.")


# --- the judged pairs --------------------------------------------------------------------------


def uncertainty(row: dict[str, Any]) -> tuple[int, int, int, float]:
    """The review order's key (smaller: less sure): tie (or no verdict), orders disagree,
    principles disagree, distance of p(A) from 0.5."""
    p = row.get("p_a")
    sides = {v > 0.5 for v in principle_sides(row).values() if v != 0.5}
    return (0 if row.get("label") in ("tie", None) else 1,
            0 if row.get("position_consistent") is False else 1,
            0 if len(sides) > 1 else 1,
            abs(float(p) - 0.5) if isinstance(p, (int, float)) else 0.0)


def review_order(pairs: list[dict[str, Any]], sample: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The pairs hardest first, or (``sample``) a uniform draw of that many in random order."""
    if sample is None:
        return sorted(pairs, key=lambda r: (uncertainty(r), r["id"]))
    return random.Random(seed).sample(sorted(pairs, key=lambda r: r["id"]), min(sample, len(pairs)))


def shown_left(pair_id: str, reviewer: str) -> str:
    """The response shown on the left: a coin flip per (pair, reviewer), stable across reloads."""
    return SIDES[hash_int(f"{reviewer}\x1fleft\x1f{pair_id}", 8) & 1]


# --- human_labels.jsonl ------------------------------------------------------------------------


def record(pair_id: str, label: str | None, left: str | None, reviewer: str, sample: str | None = None
           ) -> dict[str, Any]:
    return {"id": pair_id, "label": label, "shown_left": left, "reviewer": reviewer,
            "time": datetime.now(UTC).isoformat(timespec="seconds")} | ({"sample": sample} if sample else {})


def append(run_dir: Path, records: list[dict[str, Any]]) -> int:
    """Append records to human_labels.jsonl as whole lines under an exclusive lock, then fsync."""
    data = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
    if not data:
        return 0
    fd = os.open(Path(run_dir) / HUMAN_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":  # a line torn by a crash: end it, keep ours whole
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock
    return len(records)


# --- checking and importing --------------------------------------------------------------------


@dataclass
class Imported:
    added: int
    duplicates: int  # records already in the file, left out (importing twice changes nothing)


def import_labels(run_dir: Path, path: Path) -> Imported:
    """Check every record of ``path`` against the run's pairs; append them all, or none (an
    ``InputError`` with one ``file:line: what`` line per bad record)."""
    ids = {r["id"] for r in load_pairs(run_dir)}
    good, bad = [], []
    problem: str | None
    with path.open(encoding="utf-8") as f:
        for n, rec in numbered(f):
            if isinstance(rec, ValueError):
                problem = f"not valid JSON ({getattr(rec, 'msg', rec)})"
            elif not isinstance(rec, dict):
                problem = "a record must be a JSON object"
            elif "label" not in rec:
                problem = "no `label` (\"a\", \"b\", \"tie\", or null for an undo)"
            else:
                problem = check(rec, ids)
            if problem:
                bad.append(f"{path}:{n}: {problem}")
            else:
                good.append({k: rec.get(k) for k in ("id", "label", "shown_left", "reviewer", "time")}
                            | ({"sample": rec["sample"]} if rec.get("sample") else {}))
    if bad:
        raise InputError("\n".join(bad + [f"{len(bad)} bad record(s) in {path}: nothing imported"]))
    seen = {dumps(r) for r in read_records(run_dir)}
    new = [r for r in good if dumps(r) not in seen]
    append(run_dir, new)
    return Imported(len(new), len(good) - len(new))
