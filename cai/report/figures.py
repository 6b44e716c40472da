"""The diagnostics report of a `cai run` folder: figures (``report.json``) and a page (``report.html``).

``build_report(run_dir)`` reads ``run.json`` (optional: `cai revise`/`cai label` with
``-o DIR/...`` write none), ``revisions.jsonl``, ``labels.jsonl`` and their
``*.failures.jsonl`` (one pass each, streaming: only the first ``max_rows`` rows are kept whole,
for the page's table) and returns the figures as one JSON-ready dict:

- ``headline``: the few numbers to read first (also what a dataset card can quote).
- ``revise``: rows, failures, answer length per round (round 0 is the initial answer) and its
  growth, marker rates (``cai.refusal``) per round, and per revision principle how often it
  was drawn, how much its revisions grew the answer, and how often the judge then preferred
  the final revision.
- ``labels``: ``overall`` and ``per_principle`` (the judge's principles, read from each
  pair's judgements): pairs, mean soft label, ties, abstentions, position consistency, the
  judge's preference for the revision (pairs from the ``revisions`` source, oriented by
  matching their texts with ``revisions.jsonl``) and, when pairs carry a human label,
  agreement, Brier score, ECE and a reliability table.
- ``length_bias``: ``cai.report.stats.length_bias`` on all pairs and on the revision pairs
  oriented so that A is the revision (so there ``lc_rate`` is the length-controlled
  revision win rate).
- ``lengths``: histograms of the chosen and rejected answers' lengths on shared bins.
- ``markers``: marker rates of chosen and rejected answers (decided pairs).
- ``gates``: counts of each gate flag (rows' optional ``gates`` list), per file.

Definitions, all over the rows that have the figure's inputs:
- revision win rate: pairs where the label is the revised answer / revision pairs (ties count
  as not won; ``decided_win_rate`` leaves them out). ``mean_p``: mean soft label of the revision.
- a tie: ``|p - 0.5| < tie_threshold`` (the run's judge setting), as ``cai.judge`` decides.
- position consistency: share of pairs whose two orders (A/B and B/A) prefer the same answer
  (``position_consistent`` of the label rows; per principle, from that principle's judgements).
- abstention rate: abstained judgements / judgements; failures: rows in ``*.failures.jsonl``.
- human agreement: as `cai eval-judge` (``cai.metrics``): pairs where the judge's label equals
  the human's / human-labelled pairs the judge decided (``coverage``: decided / all;
  ``agreement_all`` counts a tie as a disagreement). Brier and ECE are of ``p_a`` against "the
  human preferred A" (see ``cai.report.stats``).
- first-slot rate: share of judgements (not exactly 0.5) that prefer the answer shown first.
- length growth: mean over rows of len(round k) / len(round k-1), characters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..eval.refusal import MARKER_NAMES, markers
from ..stages.revise import clean_revision
from . import stats

REPORT_VERSION = 1
MAX_ROWS = 2000  # rows embedded in the page's table
MAX_CHARS = 2000  # characters kept of each text in the table
MAX_TABLE_CHARS = 6_000_000  # and no more rows once the table's texts reach this many characters
HIST_BINS = 20
RUN_FILES = ("run.json", "revisions.jsonl", "labels.jsonl")
REVISION_KEYS = ("id", "prompt", "initial_response", "revised_response", "rounds")
LABEL_KEYS = ("id", "response_a", "response_b", "p_a")


# --- reading a run folder ---------------------------------------------------------------------


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder; pass the output folder of `cai run`")
    present = [name for name in RUN_FILES if (run_dir / name).is_file()]
    if not present:
        raise InputError(f"{run_dir}: not a cai run folder (no run.json, revisions.jsonl or labels.jsonl); "
                         "pass the folder `cai run` wrote")
    parts = sorted(p.name for p in run_dir.glob("*.jsonl.part"))
    if parts:
        raise InputError(f"{run_dir / parts[0]}: a stage is still running or crashed; wait for it, or rerun it "
                         "with the same settings to finish it (it resumes)")
    path = run_dir / "run.json"
    if not path.is_file():  # `cai revise -o DIR/...` or `cai label -o DIR/...` write no run.json
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({_one_line(e)}); rerun `cai run` to rewrite it") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a JSON object; rerun `cai run` to rewrite it")
    status = manifest.get("status", "complete")
    if status != "complete":
        raise InputError(f"{path}: the run is not finished (status {status!r}); wait for `cai run` to end, "
                         "or rerun it with the same config to resume it")
    if not any((run_dir / name).is_file() for name in RUN_FILES[1:]):
        raise InputError(f"{run_dir}: no revisions.jsonl or labels.jsonl; this run wrote no rows "
                         "(enable the revise or label stage and rerun `cai run`)")
    return manifest


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _iter_rows(path: Path, kind: str, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file, with one-line errors naming file and line."""
    if not path.is_file():
        return
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({_one_line(e)}); the file is damaged: "
                                     "rerun `cai run` to rewrite it") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{n}: not a JSON object; is this a cai {kind} file?")
                missing = [k for k in required if k not in row]
                if missing:
                    raise InputError(f"{path}:{n}: a {kind} row needs {', '.join(map(repr, missing))}; "
                                     f"is this a cai {kind} file?")
                yield row
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({_one_line(e)}); rerun `cai run` to rewrite it") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({_one_line(e)})") from None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.strip().encode("utf-8", "surrogatepass"), digest_size=12).digest()


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _conversation(prompt: Any) -> str:
    """Chat messages (or a plain string) as a transcript, tolerant of odd roles."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        return _text(prompt)
    parts = []
    for m in prompt:
        if isinstance(m, dict):
            parts.append(f"{str(m.get('role', '?')).capitalize()}: {_text(m.get('content'))}")
        else:
            parts.append(_text(m))
    return "\n\n".join(parts)


def _cut(text: str, limit: int = MAX_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f" [... {len(text) - limit:,} more characters]"


def _gates(row: dict[str, Any]) -> list[str]:
    g = row.get("gates")
    if isinstance(g, list):
        return [str(x) for x in g]
    if isinstance(g, str) and g:
        return [g]
    return []


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


# --- accumulators -----------------------------------------------------------------------------


class _Markers:
    """Marker rates over a stream of texts (as ``cai.refusal.marker_rates``, counted as we go
    from each text's ``cai.refusal.markers``)."""

    def __init__(self) -> None:
        self.n = 0
        self.counts: Counter[str] = Counter()

    def record(self, found: dict[str, bool]) -> dict[str, bool]:
        self.n += 1
        self.counts.update(k for k, v in found.items() if v)
        return found

    def rates(self) -> dict[str, float]:
        return {k: (self.counts[k] / self.n if self.n else 0.0) for k in MARKER_NAMES}


@dataclass
class _Side:
    """The judge's view of one side (the revision) over many pairs, with a tie threshold."""

    n: int = 0
    won: int = 0
    tied: int = 0
    p_sum: float = 0.0

    def add(self, p: float, tie: bool) -> None:
        self.n += 1
        self.p_sum += p
        self.tied += tie
        self.won += (not tie) and p > 0.5

    def summary(self) -> dict[str, Any]:
        if not self.n:
            return {"pairs": 0, "win_rate": None, "tie_rate": None, "loss_rate": None,
                    "decided_win_rate": None, "mean_p": None}
        lost = self.n - self.won - self.tied
        decided = self.won + lost
        return {"pairs": self.n, "win_rate": self.won / self.n, "tie_rate": self.tied / self.n,
                "loss_rate": lost / self.n, "decided_win_rate": self.won / decided if decided else None,
                "mean_p": self.p_sum / self.n}


@dataclass
class _Human:
    """Judge against human labels: probabilities of A, the human's A/B, the judge's label."""

    p: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    agree: int = 0
    decided: int = 0
    decided_agree: int = 0

    def add(self, p_a: float, human: str, label: str | None) -> None:
        self.p.append(p_a)
        self.y.append(1.0 if human == "a" else 0.0)
        self.agree += label == human
        if label in ("a", "b"):
            self.decided += 1
            self.decided_agree += label == human

    def summary(self, bins: int = 10, with_bins: bool = True) -> dict[str, Any] | None:
        """As `cai eval-judge` counts (``cai.metrics``): ``agreement`` over decided pairs, with
        ``coverage`` the decided share; ``agreement_all`` counts a tie as a disagreement."""
        if not self.p:
            return None
        n = len(self.p)
        out: dict[str, Any] = {
            "pairs": n, "decided": self.decided,
            "agreement": self.decided_agree / self.decided if self.decided else None,
            "coverage": self.decided / n, "agreement_all": self.agree / n,
            "soft_agreement": sum(p if y else 1.0 - p for p, y in zip(self.p, self.y, strict=True)) / n,
            "brier": stats.brier(self.p, self.y), "ece": stats.ece(self.p, self.y, bins),
        }
        if with_bins:
            out["reliability"] = stats.reliability(self.p, self.y, bins)
        return out


@dataclass
class _Group:
    """Label figures over a group of pairs (all pairs, or one judge principle's)."""

    tie_threshold: float
    pairs: int = 0
    p_sum: float = 0.0
    ties: int = 0
    judgements: int = 0
    abstained: int = 0
    pairs_with_abstention: int = 0
    consistent: int = 0
    consistency_known: int = 0
    first_slot: int = 0
    voted: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    revision: _Side = field(default_factory=_Side)
    human: _Human = field(default_factory=_Human)

    def vote(self, order: str, p_a: float) -> None:
        """One judgement: did it prefer whichever answer was shown first? (0.5 is no vote.)"""
        if p_a != 0.5:
            self.voted += 1
            self.first_slot += (p_a > 0.5) == (order == "ab")

    def is_tie(self, p: float) -> bool:
        return abs(p - 0.5) < self.tie_threshold or p == 0.5

    def add(self, p_a: float, judgements: int, abstained: int, consistent: bool | None,
            revised_side: str | None, human: str | None, label: str | None = None) -> None:
        if label not in ("a", "b", "tie"):
            label = "tie" if self.is_tie(p_a) else "a" if p_a > 0.5 else "b"
        tie = label == "tie"
        self.pairs += 1
        self.p_sum += p_a
        self.ties += tie
        self.labels[label] += 1
        self.judgements += judgements
        self.abstained += abstained
        self.pairs_with_abstention += abstained > 0
        if consistent is not None:
            self.consistency_known += 1
            self.consistent += consistent
        if revised_side is not None:
            self.revision.add(p_a if revised_side == "a" else 1.0 - p_a, tie)
        if human in ("a", "b"):
            self.human.add(p_a, human, label)

    def summary(self, with_bins: bool = True) -> dict[str, Any]:
        n = self.pairs
        return {
            "pairs": n,
            "mean_p_a": self.p_sum / n if n else None,
            "labels": {k: self.labels.get(k, 0) for k in ("a", "b", "tie")},
            "tie_rate": self.ties / n if n else None,
            "judgements": self.judgements,
            "abstentions": self.abstained,
            "abstention_rate": self.abstained / self.judgements if self.judgements else None,
            "pairs_with_abstention": self.pairs_with_abstention,
            "position_consistency": self.consistent / self.consistency_known if self.consistency_known else None,
            "first_slot_rate": self.first_slot / self.voted if self.voted else None,
            "revision": self.revision.summary(),
            "human": self.human.summary(with_bins=with_bins),
        }


@dataclass
class _Revised:
    """What the label stage needs to know of a revision row."""

    initial: bytes
    revised: bytes
    principles: list[str]


@dataclass
class RunData:
    """One pass over a run folder: the figures' inputs and the first rows for the table."""

    run_dir: Path
    manifest: dict[str, Any]
    tie_threshold: float
    unit: str
    revised: dict[str, _Revised] = field(default_factory=dict)
    revise_rows: int = 0
    revise_failures: int = 0
    revise_reasons: Counter[str] = field(default_factory=Counter)
    label_failures: int = 0
    label_reasons: Counter[str] = field(default_factory=Counter)
    round_lengths: list[list[int]] = field(default_factory=list)
    round_growth: list[list[float]] = field(default_factory=list)
    whole_growth: list[float] = field(default_factory=list)
    final_lengths: list[int] = field(default_factory=list)
    final_markers: _Markers = field(default_factory=_Markers)
    round_markers: list[_Markers] = field(default_factory=list)
    revise_principles: dict[str, dict[str, Any]] = field(default_factory=dict)
    revise_gates: Counter[str] = field(default_factory=Counter)
    label_gates: Counter[str] = field(default_factory=Counter)
    overall: _Group | None = None
    per_principle: dict[str, _Group] = field(default_factory=dict)
    origins: Counter[str] = field(default_factory=Counter)
    unmatched: int = 0
    length_rows: list[dict[str, Any]] = field(default_factory=list)
    revision_length_rows: list[dict[str, Any]] = field(default_factory=list)
    chosen_lengths: list[int] = field(default_factory=list)
    rejected_lengths: list[int] = field(default_factory=list)
    chosen_markers: _Markers = field(default_factory=_Markers)
    rejected_markers: _Markers = field(default_factory=_Markers)
    table: list[dict[str, Any]] = field(default_factory=list)
    table_index: dict[str, int] = field(default_factory=dict)
    table_total: int = 0
    table_chars: int = 0
    marker_cache: dict[bytes, int] = field(default_factory=dict)

    def markers_of(self, text: str, keep: bool = True) -> dict[str, bool]:
        """``cai.refusal.markers`` of a text, remembered (as a bit mask, by digest) for the
        initial and final answers, which come back as the two sides of revision pairs."""
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).digest()
        mask = self.marker_cache.get(key)
        if mask is not None:
            return {name: bool(mask >> i & 1) for i, name in enumerate(MARKER_NAMES)}
        found = markers(text)
        if keep:
            self.marker_cache[key] = sum(1 << i for i, name in enumerate(MARKER_NAMES) if found.get(name))
        return found


def _tie_threshold(manifest: dict[str, Any]) -> float:
    for where in (manifest.get("judge"), (manifest.get("config") or {}).get("label")):
        if isinstance(where, dict) and _number(where.get("tie_threshold")) is not None:
            return float(where["tie_threshold"])
    return 0.05


def load_run(run_dir: Path, *, unit: str = "chars", max_rows: int = MAX_ROWS) -> RunData:
    """Read a finished run folder once (``InputError`` for anything that is not one)."""
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    stats.length_of(unit)  # a bad unit fails before any reading
    data = RunData(run_dir=run_dir, manifest=manifest, tie_threshold=_tie_threshold(manifest), unit=unit)
    data.overall = _Group(data.tie_threshold)
    _read_revisions(data, max_rows)
    _read_labels(data, max_rows)
    for stage in ("revisions", "labels"):
        path = run_dir / f"{stage}.failures.jsonl"
        for row in _iter_rows(path, "failures"):
            full = str(row.get("reason", "unknown"))
            reason = full.split(":")[0]
            at = data.table_index.get(str(row.get("id")))
            if at is not None and data.table[at].get("label") is None:
                data.table[at]["failure"] = _cut(f"{stage[:-1]}: {full}", 300)
            if stage == "revisions":
                data.revise_failures += 1
                data.revise_reasons[reason] += 1
            else:
                data.label_failures += 1
                data.label_reasons[reason] += 1
    return data


def _round_texts(row: dict[str, Any], clean: Callable[[str], str]) -> list[str]:
    """The answer after each round (index 0: the initial answer), as the revise stage kept it."""
    current = _text(row["initial_response"]).strip()
    texts = [current]
    for r in row["rounds"] if isinstance(row["rounds"], list) else []:
        if isinstance(r, dict):
            current = clean(_text(r.get("revision"))) or current
            texts.append(current)
    return texts


def _read_revisions(data: RunData, max_rows: int) -> None:
    clean = clean_revision
    path = data.run_dir / "revisions.jsonl"
    for row in _iter_rows(path, "revisions", REVISION_KEYS):
        rid = str(row["id"])
        data.revise_rows += 1
        rounds = [r for r in row["rounds"] if isinstance(r, dict)] if isinstance(row["rounds"], list) else []
        principles = [str(r.get("principle_id", "?")) for r in rounds]
        data.revised[rid] = _Revised(_digest(_text(row["initial_response"])),
                                     _digest(_text(row["revised_response"])), list(dict.fromkeys(principles)))
        texts = _round_texts(row, clean)
        if len(texts) > 1 and texts[0]:
            data.whole_growth.append(len(texts[-1]) / len(texts[0]))
        found: list[dict[str, bool]] = []
        for k, text in enumerate(texts):
            while len(data.round_lengths) <= k:
                data.round_lengths.append([])
                data.round_growth.append([])
                data.round_markers.append(_Markers())
            data.round_lengths[k].append(len(text))
            if k and len(texts[k - 1]):
                data.round_growth[k].append(len(text) / len(texts[k - 1]))
            found.append(data.round_markers[k].record(
                data.markers_of(text, keep=k == 0 or k == len(texts) - 1)))
            if k:
                pid = principles[k - 1]
                per = data.revise_principles.setdefault(pid, {"rounds": 0, "growth": [], "side": _Side()})
                per["rounds"] += 1
                if len(texts[k - 1]):
                    per["growth"].append(len(text) / len(texts[k - 1]))
        data.final_lengths.append(len(texts[-1]))
        data.final_markers.record(found[-1])
        gates = _gates(row)
        data.revise_gates.update(gates)
        data.table_total += 1
        if _room(data, max_rows):
            _add_row(data, {
                "id": rid, "kind": "revision", "prompt": _cut(_conversation(row["prompt"])),
                "initial": _cut(texts[0]), "final": _cut(_text(row["revised_response"])),
                "rounds": [{"round": r.get("round", i + 1), "principle": str(r.get("principle_id", "?")),
                            "critique": _cut(_text(r.get("critique")).strip()),
                            "revision": _cut(_text(r.get("revision")).strip())} for i, r in enumerate(rounds)],
                "revise_principles": principles, "judge_principles": [], "gates": gates,
                "markers_initial": [k for k, v in found[0].items() if v],
                "markers_final": [k for k, v in found[-1].items() if v],
                "label": None, "p": None, "human": None,
            })


def _room(data: RunData, max_rows: int) -> bool:
    return len(data.table) < max_rows and data.table_chars < MAX_TABLE_CHARS


def _chars(obj: Any) -> int:
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_chars(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_chars(v) for v in obj)
    return 0


def _add_row(data: RunData, entry: dict[str, Any]) -> None:
    data.table_index[entry["id"]] = len(data.table)
    data.table.append(entry)
    data.table_chars += _chars(entry)


def _revised_side(row: dict[str, Any], rev: _Revised | None) -> str | None:
    """Which side of a label row is the revised answer: 'a', 'b', or None when not a revision
    pair (or its revision row is not in this run's revisions.jsonl)."""
    for key in ("revised_side", "revision_side"):
        if row.get(key) in ("a", "b"):
            return str(row[key])
    if rev is None:
        return None
    a, b = _digest(_text(row["response_a"])), _digest(_text(row["response_b"]))
    if a == rev.revised and b == rev.initial:
        return "a"
    if b == rev.revised and a == rev.initial:
        return "b"
    return None


def _principle_views(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per judge principle of a label row: p_a per order (non-abstained) and counts."""
    views: dict[str, dict[str, Any]] = {}
    judgements = row.get("judgements")
    for j in judgements if isinstance(judgements, list) else []:
        if not isinstance(j, dict):
            continue
        v = views.setdefault(str(j.get("principle_id", "?")), {"orders": {}, "n": 0, "abstained": 0})
        v["n"] += 1
        p = _number(j.get("p_a"))
        if j.get("abstain") or p is None:
            v["abstained"] += 1
        else:
            v["orders"][str(j.get("order", "ab"))] = p
    return views


def _read_labels(data: RunData, max_rows: int) -> None:
    assert data.overall is not None
    path = data.run_dir / "labels.jsonl"
    size = stats.length_of(data.unit)
    for row in _iter_rows(path, "labels", LABEL_KEYS):
        p_a = _number(row["p_a"])
        if p_a is None:
            continue  # the judge stage writes such pairs to the failures file; nothing to count
        rid = str(row["id"])
        origin = str(row.get("origin") or "unknown")
        data.origins[origin] += 1
        rev = data.revised.get(rid)
        side = _revised_side(row, rev)
        if origin.startswith("revision") and side is None:
            data.unmatched += 1
        human = row.get("human") if row.get("human") in ("a", "b") else None
        views = _principle_views(row)
        judgements = _list(row.get("judgements"))
        abstained = sum(1 for j in judgements if isinstance(j, dict) and j.get("abstain"))
        consistent = row.get("position_consistent")
        label = row.get("label") if row.get("label") in ("a", "b", "tie") else None
        data.overall.add(p_a, len(judgements), abstained, consistent if isinstance(consistent, bool) else None,
                         side, human, label)
        label = label or ("tie" if data.overall.is_tie(p_a) else "a" if p_a > 0.5 else "b")
        for pid, v in views.items():
            g = data.per_principle.setdefault(pid, _Group(data.tie_threshold))
            orders = v["orders"]
            for order, p in orders.items():
                g.vote(order, p)
                data.overall.vote(order, p)
            if not orders:
                g.judgements += v["n"]
                g.abstained += v["abstained"]
                g.pairs_with_abstention += 1
                continue
            both = ("ab" in orders and "ba" in orders)
            g.add(sum(orders.values()) / len(orders), v["n"], v["abstained"],
                  (orders["ab"] - 0.5) * (orders["ba"] - 0.5) > 0 if both else None, side, human)
        a, b = _text(row["response_a"]), _text(row["response_b"])
        len_a, len_b = size(a), size(b)
        lrow = {"id": rid, "p_a": p_a, "label": label, "len_a": len_a, "len_b": len_b}
        data.length_rows.append(lrow)
        if side is not None:
            flip = side == "b"
            data.revision_length_rows.append({
                "id": rid, "p_a": 1.0 - p_a if flip else p_a,
                "label": {"a": "b", "b": "a"}.get(label, label) if flip else label,
                "len_a": len_b if flip else len_a, "len_b": len_a if flip else len_b})
            if rev is not None:
                for pid in rev.principles:
                    per = data.revise_principles.setdefault(pid, {"rounds": 0, "growth": [], "side": _Side()})
                    per["side"].add(1.0 - p_a if flip else p_a, label == "tie")
        if label in ("a", "b"):
            chosen, rejected = (a, b) if label == "a" else (b, a)
            data.chosen_lengths.append(len(chosen))
            data.rejected_lengths.append(len(rejected))
            data.chosen_markers.record(data.markers_of(chosen))
            data.rejected_markers.record(data.markers_of(rejected))
        gates = _gates(row)
        data.label_gates.update(gates)
        oriented_p = None if side is None else (p_a if side == "a" else 1.0 - p_a)
        verdict = label if side is None else (
            "tie" if label == "tie" else "revision" if label == side else "initial")
        entry = {"label": verdict, "p": oriented_p if side is not None else p_a, "human": human,
                 "judge_principles": list(views), "position_consistent": consistent}
        if rid in data.table_index:
            t = data.table[data.table_index[rid]]
            t.update(entry)
            t["gates"] = list(dict.fromkeys([*t["gates"], *gates]))
            continue
        if side is not None:
            continue  # a revision pair whose revision row was past the table's cap
        data.table_total += 1
        if _room(data, max_rows):
            _add_row(data, {
                "id": rid, "kind": "pair", "origin": origin, "prompt": _cut(_conversation(row.get("prompt"))),
                "response_a": _cut(a), "response_b": _cut(b), "rounds": [], "revise_principles": [],
                "gates": gates, "markers_a": [k for k, v in data.markers_of(a).items() if v],
                "markers_b": [k for k, v in data.markers_of(b).items() if v], **entry})


# --- the figures ------------------------------------------------------------------------------


def _describe(xs: list[int] | list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "mean": None, "median": None}
    return {"n": len(xs), "mean": float(statistics.fmean(xs)), "median": float(statistics.median(xs))}


def _histograms(chosen: list[int], rejected: list[int], bins: int = HIST_BINS) -> dict[str, Any]:
    """Counts of chosen and rejected lengths on at most ``bins`` shared equal-width bins of a
    round width, up to the 99th percentile (longer answers go in the last bin, so one outlier
    does not flatten the plot)."""
    both = chosen + rejected
    if not both:
        return {"edges": [], "chosen": [], "rejected": []}
    top = max(float(np.percentile(both, 99)) if len(both) >= 50 else float(max(both)), 1.0)
    mag = 10 ** math.floor(math.log10(top / bins))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag * bins >= top)  # round bin edges
    edges = np.arange(0, bins + 1) * step
    bins = max(1, math.ceil(top / step - 1e-9))
    edges = edges[:bins + 1]
    top = float(edges[-1])

    def count(xs: list[int]) -> list[int]:
        clipped = np.minimum(np.asarray(xs, dtype=np.float64), top)
        return [int(c) for c in np.histogram(clipped, bins=edges)[0]] if xs else [0] * (len(edges) - 1)

    return {"edges": [float(e) for e in edges], "chosen": count(chosen), "rejected": count(rejected)}


def _rounded(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v, digits) for v in obj]
    return obj


def figures(data: RunData) -> dict[str, Any]:
    """The report's figures from a loaded run (what ``report.json`` holds)."""
    assert data.overall is not None
    m = data.manifest
    label_cfg = _dict(_dict(m.get("config")).get("label"))
    const = _dict(m.get("constitution"))
    principles = [p for p in _list(const.get("principles")) if isinstance(p, dict)]
    judge = _dict(m.get("judge"))
    by_round = []
    for k, lengths in enumerate(data.round_lengths):
        growth = data.round_growth[k]
        by_round.append({"round": k, **_describe(lengths), "growth": statistics.fmean(growth) if growth else None,
                         "markers": data.round_markers[k].rates()})
    first, last = (data.round_lengths[0] if data.round_lengths else []), data.final_lengths
    whole = data.whole_growth
    revise = {
        "rows": data.revise_rows, "failures": data.revise_failures, "failure_reasons": dict(data.revise_reasons),
        "rounds": max(len(data.round_lengths) - 1, 0),
        "lengths": {"unit": "chars", "initial": _describe(first), "revised": _describe(last),
                    "growth": statistics.fmean(whole) if whole else None},
        "by_round": by_round,
        "markers": {"initial": data.round_markers[0].rates() if data.round_markers else None,
                    "revised": data.final_markers.rates() if data.final_markers.n else None},
        "per_principle": {pid: {"rounds": v["rounds"],
                                "growth": statistics.fmean(v["growth"]) if v["growth"] else None,
                                "judged": v["side"].summary()}
                          for pid, v in sorted(data.revise_principles.items())},
        "gates": dict(data.revise_gates),
    }
    overall = data.overall.summary()
    labels = {
        "pairs": data.overall.pairs, "failures": data.label_failures,
        "failure_reasons": dict(data.label_reasons), "by_origin": dict(data.origins),
        "unmatched_revision_pairs": data.unmatched, "tie_threshold": data.tie_threshold,
        "overall": overall,
        "per_principle": {pid: g.summary(with_bins=False) for pid, g in sorted(data.per_principle.items())},
        "gates": dict(data.label_gates),
    }
    bias = {"all": stats.length_bias(data.length_rows, unit=data.unit) if data.length_rows else None,
            "revision": stats.length_bias(data.revision_length_rows, unit=data.unit)
            if data.revision_length_rows else None}
    rev = _dict(overall["revision"])
    human = _dict(overall["human"])
    lead = _dict(bias["revision"] or bias["all"])
    headline = {
        "rows_revised": data.revise_rows, "pairs_labelled": data.overall.pairs,
        "failures": data.revise_failures + data.label_failures,
        "revision_win_rate": rev["win_rate"],
        "revision_win_rate_length_controlled": _dict(bias["revision"]).get("lc_rate"),
        "mean_p_revision": rev["mean_p"],
        "mean_p_a": overall["mean_p_a"],
        "tie_rate": overall["tie_rate"], "abstention_rate": overall["abstention_rate"],
        "position_consistency": overall["position_consistency"],
        "first_slot_rate": overall["first_slot_rate"],
        "longer_chosen": _dict(bias["all"]).get("longer_chosen"),
        "length_pearson": lead.get("pearson"),
        "length_growth": statistics.fmean(whole) if whole else None,
        "human_pairs": human.get("pairs", 0), "human_agreement": human.get("agreement"),
        "human_coverage": human.get("coverage"),
        "brier": human.get("brier"), "ece": human.get("ece"),
    }
    report = {
        "report_version": REPORT_VERSION,
        "run": {
            "dir": str(data.run_dir), "cai_version": m.get("cai_version"), "status": m.get("status", "complete"),
            "models": m.get("models"), "constitution": const.get("name"),
            "principles": {str(p.get("id")): _text(p.get("comparison") or p.get("critique")) for p in principles},
            "label_mode": judge.get("mode") or label_cfg.get("mode"),
            "sources": label_cfg.get("sources"),
            "length_unit": data.unit, "table_rows": len(data.table), "table_total": data.table_total,
            "text_chars": MAX_CHARS,
        },
        "headline": headline,
        "revise": revise,
        "labels": labels,
        "length_bias": bias,
        "lengths": {"unit": "chars", "chosen": _describe(data.chosen_lengths),
                    "rejected": _describe(data.rejected_lengths),
                    "histogram": _histograms(data.chosen_lengths, data.rejected_lengths)},
        "markers": {"pairs": data.chosen_markers.n, "chosen": data.chosen_markers.rates(),
                    "rejected": data.rejected_markers.rates()},
    }
    out: dict[str, Any] = _rounded(report)
    return out


def build_report(run_dir: Path, *, unit: str = "chars") -> dict[str, Any]:
    """The figures of a finished run folder (``InputError`` when it is not one); see the module doc."""
    return figures(load_run(Path(run_dir), unit=unit, max_rows=0))


def _write_all(files: dict[Path, str]) -> None:
    """Write every file to a ``.tmp`` beside it first, then rename each into place: an error
    while building or writing leaves the old files (or none), never a half-written one."""
    tmps: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmps.append((tmp, path))
            with tmp.open("w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


def write_report(run_dir: Path, out_dir: Path | None = None, *, unit: str = "chars",
                 max_rows: int = MAX_ROWS) -> tuple[Path, Path]:
    """Write ``report.json`` (the figures) and ``report.html`` (the page) into ``out_dir``
    (default: the run folder); return their paths."""
    from .html import render

    run_dir = Path(run_dir)
    data = load_run(run_dir, unit=unit, max_rows=max_rows)
    report = figures(data)
    page = render(report, data.table)
    out = Path(out_dir) if out_dir is not None else run_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the report folder ({_one_line(e)})") from None
    json_path, html_path = out / "report.json", out / "report.html"
    try:
        _write_all({json_path: json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                    html_path: page})
    except OSError as e:
        raise InputError(f"{out}: cannot write the report ({_one_line(e)})") from None
    return json_path, html_path
