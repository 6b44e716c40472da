"""Human labels read back (``RUN_DIR/human_labels.jsonl``, written by ``cai.review``) and the
judge-vs-human agreement on a run's own pairs (``report.json``'s ``human_review``).

Agreement is counted on the pairs both sides decided: the human label (the reviewers' majority,
see ``consensus``) is ``a`` or ``b`` and so is the judge's. Human ties and judge ties are
counted beside it, not in it (as ``cai eval-judge`` counts coverage). With it: a Wilson 95%
interval; Cohen's kappa for each two reviewers who labelled the same pairs; the same figures by
the judge's confidence (max(p, 1 - p)) and by principle (each principle's own verdict, its p(A)
averaged over orders, against the human's); and the AI labels in the unreviewed remainder
expected to flip at the error rate measured in their confidence bucket.

Pairs drawn in the review order (hardest first) make a pessimistic figure; ``cai review
--sample N`` draws pairs uniformly, and those pairs get a figure of their own (``uniform``).
The file's format is described in ``cai.review.labels``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import InputError
from .read import iter_rows, numbered

HUMAN_FILE, LABELS_FILE = "human_labels.jsonl", "labels.jsonl"
LABELS = ("a", "b", "tie")
SIDES = ("a", "b")
SAMPLES = ("uncertainty", "uniform")


def load_pairs(run_dir: Path) -> list[dict[str, Any]]:
    """The judged pairs of a run folder (labels.jsonl), one error line when there are none."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise InputError(f"{run_dir}: no {LABELS_FILE}: review needs a labelled run folder "
                         "(make one with `cai run` or `cai label`)")
    pairs = list(iter_rows(path, "labels", ("id",)))
    if bad := next((r["id"] for r in pairs if not isinstance(r["id"], str)), None):
        raise InputError(f"{path}: a label row's `id` must be a string, got {bad!r}")
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


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record, in file order. A line that is not a valid record (a line torn by a crash
    mid-write, a hand edit gone wrong) is left out; ``--import`` checks every line before it
    appends, and ``check`` says what is wrong with one."""
    path = Path(run_dir) / HUMAN_FILE
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [rec for _, rec in numbered(f) if isinstance(rec, dict) and not check(rec, None)]


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


Z95 = 1.959963984540054
BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion k/n (None when n is 0)."""
    if n <= 0:
        return None
    p, z2 = k / n, z * z
    mid, half = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (mid - half) / (1 + z2 / n)), min(1.0, (mid + half) / (1 + z2 / n))


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (None when chance agreement is 1)."""
    n = len(x)
    if n == 0 or n != len(y):
        return None
    po = sum(a == b for a, b in zip(x, y, strict=True)) / n
    pe = sum(x.count(c) * y.count(c) for c in set(x) | set(y)) / (n * n)
    return None if pe >= 1 else (po - pe) / (1 - pe)


def rate(k: int, n: int) -> dict[str, Any]:
    return {"n": n, "agree": k, "rate": k / n if n else None, "wilson95": wilson(k, n)}


def confidence(p_a: Any) -> float | None:
    return max(float(p_a), 1 - float(p_a)) if isinstance(p_a, (int, float)) else None


def bucket_of(c: float) -> int:
    return min(sum(c >= b for b in BUCKETS[1:]), len(BUCKETS) - 2)


def _agreement(pairs: dict[str, dict[str, Any]], human: dict[str, dict[str, Any]]) -> dict[str, Any]:
    decided = [(pairs[i]["label"], h["label"]) for i, h in human.items()
               if i in pairs and h["label"] in ("a", "b") and pairs[i].get("label") in ("a", "b")]
    out = rate(sum(j == h for j, h in decided), len(decided))
    out["human_ties"] = sum(h["label"] == "tie" for i, h in human.items() if i in pairs)
    out["judge_ties"] = sum(h["label"] in ("a", "b") and pairs[i].get("label") not in ("a", "b")
                            for i, h in human.items() if i in pairs)
    return out


def _kappas(labels: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    by_rev: dict[str, dict[str, str]] = {}
    for (pid, rev), r in labels.items():
        by_rev.setdefault(rev, {})[pid] = r["label"]
    out = []
    for r1, r2 in combinations(sorted(by_rev), 2):
        both = sorted(set(by_rev[r1]) & set(by_rev[r2]))
        if both:
            x, y = [by_rev[r1][i] for i in both], [by_rev[r2][i] for i in both]
            out.append({"reviewers": [r1, r2], "n": len(both), "agree": sum(a == b for a, b in zip(x, y, strict=True)),
                        "kappa": cohen_kappa(x, y)})
    return out


def _by_confidence(pairs: dict[str, dict[str, Any]], human: dict[str, dict[str, Any]],
                   overall: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for b in range(len(BUCKETS) - 1):
        inside = {i: p for i, p in pairs.items()
                  if (c := confidence(p.get("p_a"))) is not None and bucket_of(c) == b}
        fig = _agreement(inside, {i: h for i, h in human.items() if i in inside})
        rest = sum(p.get("label") in ("a", "b") and i not in human for i, p in inside.items())
        src, ref = ("bucket", fig) if fig["n"] else ("all reviewed pairs", overall)
        err = None if ref["rate"] is None else 1 - ref["rate"]
        ci = ref["wilson95"]
        rows.append({"bucket": f"{BUCKETS[b]:.1f}-{BUCKETS[b + 1]:.1f}", **fig, "unreviewed": rest,
                     "error_rate_from": src if err is not None else None,
                     "expected_flips": None if err is None else rest * err,
                     "expected_flips95": None if ci is None else (rest * (1 - ci[1]), rest * (1 - ci[0]))})
    return rows


def _by_principle(pairs: dict[str, dict[str, Any]], human: dict[str, dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, list[int]] = {}
    for i, h in human.items():
        if i in pairs and h["label"] in ("a", "b"):
            for pid, p in principle_sides(pairs[i]).items():
                if p != 0.5:
                    c = counts.setdefault(pid, [0, 0])
                    c[0] += ("a" if p > 0.5 else "b") == h["label"]
                    c[1] += 1
    return {pid: rate(k, n) for pid, (k, n) in sorted(counts.items())}


def summarize(pairs: Iterable[dict[str, Any]], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The agreement figures of judged pairs (labels.jsonl rows) and human label records."""
    by_id = {p["id"]: p for p in pairs}
    labels = {k: r for k, r in current(records).items() if k[0] in by_id}
    human = consensus(labels)
    overall = _agreement(by_id, human)
    uniform = {i: h for i, h in human.items() if h["uniform"]}
    flips = _by_confidence(by_id, human, overall)
    known = [f["expected_flips"] for f in flips if f["expected_flips"] is not None]
    return {
        "pairs": len(by_id), "reviewed": len(human), "labels": len(labels),
        "reviewers": sorted({r for _, r in labels}),
        "human": {x: sum(h["label"] == x for h in human.values()) for x in LABELS},
        "sample": ("uniform" if len(uniform) == len(human) else "mixed" if uniform else "uncertainty")
        if human else None,
        "agreement": overall,
        "uniform": _agreement(by_id, uniform) if uniform else None,
        "kappa": _kappas(labels),
        "by_confidence": flips,
        "expected_flips": sum(known) if known else None,
        "by_principle": _by_principle(by_id, human),
    }


def agreement_summary(run_dir: Path) -> dict[str, Any] | None:
    """``summarize`` of a run folder; None when it has no human labels."""
    records = read_records(run_dir)
    return summarize(load_pairs(run_dir), records) if records else None
