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
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import dumps
from ..hashing import hash_int

HUMAN_FILE, LABELS_FILE = "human_labels.jsonl", "labels.jsonl"
LABELS = ("a", "b", "tie")
SIDES = ("a", "b")
SAMPLES = ("uncertainty", "uniform")
ORDER_TEXT = (
    "Pairs come hardest first: pairs the judge called a tie; then pairs whose two orders (A/B and "
    "B/A) disagree; then pairs whose principles disagree; then by how near the judge's p(A) is to 0.5.")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the judged pairs --------------------------------------------------------------------------


def load_pairs(run_dir: Path) -> list[dict[str, Any]]:
    """The judged pairs of a run folder (labels.jsonl), one error line when there are none."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise InputError(f"{run_dir}: no {LABELS_FILE}: review needs a labelled run folder "
                         "(make one with `cai run` or `cai label`)")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise InputError(f"{path}:{n}: a label row must be a JSON object with a string `id`")
            pairs.append(row)
    if not pairs:
        raise InputError(f"{path}: holds no judged pairs: nothing to review")
    return pairs


def principle_sides(row: dict[str, Any]) -> dict[str, float]:
    """Each principle's p(A), averaged over the orders it was judged in (abstentions left out)."""
    per: dict[str, list[float]] = {}
    for j in row.get("judgements") or []:
        if not j.get("abstain") and isinstance(j.get("p_a"), (int, float)):
            per.setdefault(str(j.get("principle_id")), []).append(float(j["p_a"]))
    return {k: sum(v) / len(v) for k, v in per.items()}


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
    rec = {"id": pair_id, "label": label, "shown_left": left, "reviewer": reviewer, "time": now()}
    return rec | ({"sample": sample} if sample else {})


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


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record, in file order. A line that is not a valid record (a line torn by a crash
    mid-write, a hand edit gone wrong) is left out; ``--import`` checks every line before it
    appends, and ``check`` says what is wrong with one."""
    out = []
    path = Path(run_dir) / HUMAN_FILE
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and not check(rec, None):
                    out.append(rec)
    return out


def current(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The label in effect per (id, reviewer): the last record, unless it is an undo."""
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        last[(r["id"], r["reviewer"])] = r
    return {k: r for k, r in last.items() if r["label"] is not None}


def consensus(labels: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per pair: the majority label of its reviewers (a split counts as a tie), the reviewers,
    and whether any of them labelled it as part of a uniform sample."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for (pid, _), r in labels.items():
        by_id.setdefault(pid, []).append(r)
    out = {}
    for pid, rs in by_id.items():
        votes = [r["label"] for r in rs]
        top = max(LABELS, key=votes.count)
        split = sum(votes.count(x) == votes.count(top) for x in LABELS) > 1
        out[pid] = {"label": "tie" if split else top, "reviewers": sorted(r["reviewer"] for r in rs),
                    "uniform": any(r.get("sample") == "uniform" for r in rs)}
    return out


def human_labels(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The human label of each reviewed pair of a run folder (see ``consensus``)."""
    return consensus(current(read_records(run_dir)))


# --- checking and importing --------------------------------------------------------------------


def check(rec: dict[str, Any], ids: set[str] | None) -> str | None:
    """What is wrong with a record (None: nothing); ``ids``: the pair ids it may name."""
    if not isinstance(rec.get("id"), str) or not rec["id"]:
        return "`id` must be a non-empty string (a pair id from labels.jsonl)"
    if ids is not None and rec["id"] not in ids:
        return f"no pair {rec['id']!r} in labels.jsonl"
    if rec.get("label", "") not in (*LABELS, None):
        return f"`label` must be \"a\", \"b\", \"tie\" or null (an undo), got {rec.get('label')!r}"
    if rec.get("shown_left") not in (*SIDES, None):
        return f"`shown_left` must be \"a\", \"b\" or null, got {rec.get('shown_left')!r}"
    if not isinstance(rec.get("reviewer"), str) or not rec["reviewer"].strip():
        return "`reviewer` must be a non-empty string"
    try:
        datetime.fromisoformat(str(rec.get("time")))
    except ValueError:
        return f"`time` must be an ISO 8601 date and time, got {rec.get('time')!r}"
    if rec.get("sample") not in (*SAMPLES, None):
        return f"`sample` must be \"uncertainty\", \"uniform\" or absent, got {rec.get('sample')!r}"
    return None


def _import_rows(path: Path, ids: set[str]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"not valid JSON ({e.msg})"
                continue
            if not isinstance(rec, dict):
                yield n, None, "a record must be a JSON object"
                continue
            if "label" not in rec:
                yield n, None, "no `label` (\"a\", \"b\", \"tie\", or null for an undo)"
                continue
            yield n, rec, check(rec, ids)


@dataclass
class Imported:
    added: int
    duplicates: int  # records already in the file, left out (importing twice changes nothing)


def import_labels(run_dir: Path, path: Path) -> Imported:
    """Check every record of ``path`` against the run's pairs; append them all, or none (an
    ``InputError`` with one ``file:line: what`` line per bad record)."""
    ids = {r["id"] for r in load_pairs(run_dir)}
    good, bad = [], []
    for n, rec, problem in _import_rows(path, ids):
        if problem:
            bad.append(f"{path}:{n}: {problem}")
        elif rec is not None:
            good.append({k: rec.get(k) for k in ("id", "label", "shown_left", "reviewer", "time")}
                        | ({"sample": rec["sample"]} if rec.get("sample") else {}))
    if bad:
        raise InputError("\n".join(bad + [f"{len(bad)} bad record(s) in {path}: nothing imported"]))
    seen = {dumps(r) for r in read_records(run_dir)}
    new = [r for r in good if dumps(r) not in seen]
    append(run_dir, new)
    return Imported(len(new), len(good) - len(new))
