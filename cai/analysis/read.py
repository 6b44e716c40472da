"""One streaming pass over a finished run folder (``load_run``): the manifest and the rows, checked
with one-line errors naming file and line, counted into ``RunData``, and the first rows kept
whole (texts cut) for the page's table. A best-of-n folder is read the same way (see the package
doc): its matches are judged pairs, like ``labels.jsonl`` rows."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import stats
from ..errors import InputError
from ..eval.refusal import MARKER_NAMES, markers
from ..quality.flags import clean_revision
from ..stages.best_of_n import ROWS_FILE as BEST_OF_N_FILE
from ..stages.best_of_n import pairs_path
from .counts import BestOfN, Group, Lengths, Side

MAX_ROWS = 2000  # rows embedded in the page's table
MAX_CHARS = 2000  # characters kept of each text in the table
MAX_TABLE_CHARS = 6_000_000  # and no more rows once the table's texts reach this many characters
RUN_FILES = ("run.json", "revisions.jsonl", "labels.jsonl", BEST_OF_N_FILE, "rewards.jsonl")
REVISION_KEYS = ("id", "prompt", "initial_response", "revised_response", "rounds")
LABEL_KEYS = ("id", "response_a", "response_b", "p_a")
BEST_OF_N_KEYS = ("id", "prompt", "best_response", "worst_response", "samples", "ranking")
FAILURES = {"revisions": "revision", "labels": "label", "best_of_n": "best-of-n"}  # failures file -> its stage


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a finished run folder (``{}`` when it has none), or an ``InputError``."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder; pass the output folder of `cai run`")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        raise InputError(f"{run_dir}: not a cai run folder (no run.json, revisions.jsonl, labels.jsonl or "
                         "rewards.jsonl); pass the folder `cai run` wrote")
    if parts := sorted(p.name for p in run_dir.glob("*.jsonl.part")):
        raise InputError(f"{run_dir / parts[0]}: a stage is still running or crashed; wait for it, or rerun it "
                         "with the same settings to finish it (it resumes)")
    path = run_dir / "run.json"
    if not path.is_file():  # `cai revise -o DIR/...` or `cai label -o DIR/...` write no run.json
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({one_line(e)}); rerun `cai run` to rewrite it") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: not a JSON object; rerun `cai run` to rewrite it")
    if (status := manifest.get("status", "complete")) != "complete":
        raise InputError(f"{path}: the run is not finished (status {status!r}); wait for `cai run` to end, "
                         "or rerun it with the same config to resume it")
    if not any((run_dir / name).is_file() for name in RUN_FILES[1:]):
        raise InputError(f"{run_dir}: no revisions.jsonl or labels.jsonl (nor {BEST_OF_N_FILE}); this run wrote "
                         "no rows (enable the revise or label stage and rerun `cai run`)")
    return manifest


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def numbered(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, the parsed JSON value, or the ``ValueError`` it raised) of each non-blank line."""
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except ValueError as e:
                yield n, e


def iter_rows(path: Path, kind: str, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file, with one-line errors naming file and line."""
    if not path.is_file():
        return
    try:
        with path.open(encoding="utf-8") as f:
            for n, row in numbered(f):
                if isinstance(row, ValueError):
                    raise InputError(f"{path}:{n}: not valid JSON ({one_line(row)}); the file is damaged: "
                                     "rerun `cai run` to rewrite it")
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{n}: not a JSON object; is this a cai {kind} file?")
                if missing := [k for k in required if k not in row]:
                    raise InputError(f"{path}:{n}: a {kind} row needs {', '.join(map(repr, missing))}; "
                                     f"is this a cai {kind} file?")
                yield row
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({one_line(e)}); rerun `cai run` to rewrite it") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({one_line(e)})") from None


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.strip().encode("utf-8", "surrogatepass"), digest_size=12).digest()


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def conversation(prompt: Any) -> str:
    """Chat messages (or a plain string) as a transcript, tolerant of odd roles."""
    if not isinstance(prompt, list):
        return as_text(prompt)
    return "\n\n".join(f"{str(m.get('role', '?')).capitalize()}: {as_text(m.get('content'))}"
                       if isinstance(m, dict) else as_text(m) for m in prompt)


def cut(text: str, limit: int = MAX_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit:,} more characters]"


def gates_of(row: dict[str, Any]) -> list[str]:
    g = row.get("gates")
    return [str(x) for x in g] if isinstance(g, list) else [g] if isinstance(g, str) and g else []


def marked(found: dict[str, bool]) -> list[str]:
    """The names of the markers found."""
    return [k for k, v in found.items() if v]


def as_dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


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
    failures: dict[str, Counter[str]] = field(  # reasons of the rows in each stage's failures file
        default_factory=lambda: {name: Counter[str]() for name in FAILURES})
    rounds: list[Lengths] = field(default_factory=list)  # index 0: the initial answers
    whole: Lengths = field(default_factory=Lengths)  # the final answers, grown from the initial ones
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> first row's
    revise_principles: dict[str, dict[str, Any]] = field(default_factory=dict)
    revise_gates: Counter[str] = field(default_factory=Counter)
    label_gates: Counter[str] = field(default_factory=Counter)
    overall: Group | None = None
    per_principle: dict[str, Group] = field(default_factory=dict)
    origins: Counter[str] = field(default_factory=Counter)
    unmatched: int = 0
    length_rows: list[dict[str, Any]] = field(default_factory=list)
    revision_length_rows: list[dict[str, Any]] = field(default_factory=list)
    chosen: Lengths = field(default_factory=Lengths)  # the chosen and rejected answers of decided pairs
    rejected: Lengths = field(default_factory=Lengths)
    best_of_n: BestOfN | None = None  # best_of_n.jsonl's counts, when the folder has one
    table: list[dict[str, Any]] = field(default_factory=list)
    table_index: dict[str, int] = field(default_factory=dict)
    table_total: int = 0
    table_chars: int = 0
    marker_cache: dict[bytes, int] = field(default_factory=dict)

    def principle(self, pid: str) -> dict[str, Any]:
        """The counts of one revision principle: rounds drawn, growth, the judge's view of its revisions."""
        return self.revise_principles.setdefault(pid, {"rounds": 0, "growth": [0, 0], "side": Side()})

    def markers_of(self, text: str, keep: bool = True) -> dict[str, bool]:
        """``cai.eval.refusal.markers`` of a text, remembered (as a bit mask, by digest) for the
        initial and final answers, which come back as the two sides of revision pairs."""
        key = digest(text)  # markers() strips the text too
        mask = self.marker_cache.get(key)
        if mask is not None:
            return {name: bool(mask >> i & 1) for i, name in enumerate(MARKER_NAMES)}
        found = markers(text)
        if keep:
            self.marker_cache[key] = sum(1 << i for i, name in enumerate(MARKER_NAMES) if found.get(name))
        return found


def _tie_threshold(manifest: dict[str, Any]) -> float:
    for where in (manifest.get("judge"), (manifest.get("config") or {}).get("label")):
        if isinstance(where, dict) and number(where.get("tie_threshold")) is not None:
            return float(where["tie_threshold"])
    return 0.05


def load_run(run_dir: Path, *, unit: str = "chars", max_rows: int = MAX_ROWS) -> RunData:
    """Read a finished run folder once (``InputError`` for anything that is not one)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    stats.length_of(unit)  # a bad unit fails before any reading
    data = RunData(run_dir=run_dir, manifest=manifest, tie_threshold=_tie_threshold(manifest), unit=unit)
    data.overall = Group(data.tie_threshold)
    _read_revisions(data, max_rows)
    _read_labels(data, max_rows)
    _read_best_of_n(data, max_rows)
    for stage in FAILURES:
        for row in iter_rows(run_dir / f"{stage}.failures.jsonl", "failures"):
            full = str(row.get("reason", "unknown"))
            at = data.table_index.get(str(row.get("id")))
            if at is not None and data.table[at].get("label") is None:
                data.table[at]["failure"] = cut(f"{FAILURES[stage]}: {full}", 300)
            data.failures[stage][full.split(":")[0]] += 1
    return data


def _read_revisions(data: RunData, max_rows: int) -> None:
    for row in iter_rows(data.run_dir / "revisions.jsonl", "revisions", REVISION_KEYS):
        rid = str(row["id"])
        data.revise_rows += 1
        rounds = [r for r in as_list(row["rounds"]) if isinstance(r, dict)]
        principles = [str(r.get("principle_id", "?")) for r in rounds]
        data.revised[rid] = _Revised(digest(as_text(row["initial_response"])),
                                     digest(as_text(row["revised_response"])), list(dict.fromkeys(principles)))
        _provenance(data, "revise", row)
        texts = [as_text(row["initial_response"]).strip()]  # the answer after each round, as the stage kept it
        for r in rounds:
            texts.append(clean_revision(as_text(r.get("revision"))) or texts[-1])
        found = [data.markers_of(text, keep=k == 0 or k == len(texts) - 1) for k, text in enumerate(texts)]
        for k, text in enumerate(texts):
            if len(data.rounds) <= k:
                data.rounds.append(Lengths())
            data.rounds[k].add(text, texts[k - 1] if k else None, found[k])
            if k:
                per = data.principle(principles[k - 1])
                per["rounds"] += 1
                if len(texts[k - 1]):
                    per["growth"][0] += len(texts[k - 1])
                    per["growth"][1] += len(text)
        data.whole.add(texts[-1], texts[0] if len(texts) > 1 else None, found[-1])
        gates = gates_of(row)
        data.revise_gates.update(gates)
        if _room(data, max_rows):
            _add_row(data, {
                "id": rid, "kind": "revision", "prompt": cut(conversation(row["prompt"])),
                "initial": cut(texts[0]), "final": cut(as_text(row["revised_response"])),
                "rounds": [{"round": r.get("round", i + 1), "principle": str(r.get("principle_id", "?")),
                            "critique": cut(as_text(r.get("critique")).strip()),
                            "revision": cut(as_text(r.get("revision")).strip())} for i, r in enumerate(rounds)],
                "revise_principles": principles, "judge_principles": [], "gates": gates,
                "markers_initial": marked(found[0]), "markers_final": marked(found[-1]),
                "label": None, "p": None, "human": None,
            })


def _provenance(data: RunData, stage: str, row: dict[str, Any]) -> None:
    """The first row's provenance of each stage (``run`` info of folders without run.json)."""
    if isinstance(row.get("provenance"), dict) and row["provenance"]:
        data.provenance.setdefault(stage, row["provenance"])


def _chars(obj: Any) -> int:
    if isinstance(obj, dict):
        obj = list(obj.values())
    return len(obj) if isinstance(obj, str) else sum(map(_chars, obj)) if isinstance(obj, list) else 0


def _room(data: RunData, max_rows: int) -> bool:
    """Count a row of the table; True while the table has room to keep it (``_add_row``)."""
    data.table_total += 1
    return len(data.table) < max_rows and data.table_chars < MAX_TABLE_CHARS


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
    pair = (digest(as_text(row["response_a"])), digest(as_text(row["response_b"])))
    return "a" if pair == (rev.revised, rev.initial) else "b" if pair == (rev.initial, rev.revised) else None


def _principle_views(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per judge principle of a label row: p_a per order (non-abstained) and counts."""
    views: dict[str, dict[str, Any]] = {}
    for j in [j for j in as_list(row.get("judgements")) if isinstance(j, dict)]:
        v = views.setdefault(str(j.get("principle_id", "?")), {"orders": {}, "n": 0, "abstained": 0})
        v["n"] += 1
        p = number(j.get("p_a"))
        if j.get("abstain") or p is None:
            v["abstained"] += 1
        else:
            v["orders"][str(j.get("order", "ab"))] = p
    return views


def _read_labels(data: RunData, max_rows: int) -> None:
    for row in iter_rows(data.run_dir / "labels.jsonl", "labels", LABEL_KEYS):
        _add_label(data, row, max_rows)


def _add_label(data: RunData, row: dict[str, Any], max_rows: int, table: bool = True) -> None:
    """One judged pair (a labels.jsonl row, or a best-of-n match's) into the label figures."""
    assert data.overall is not None
    size = stats.length_of(data.unit)
    if (p_a := number(row.get("p_a"))) is None:
        return  # the judge stage writes such pairs to the failures file; nothing to count
    rid = str(row["id"])
    _provenance(data, "label", row)
    origin = str(row.get("origin") or "unknown")
    data.origins[origin] += 1
    rev = data.revised.get(rid)
    side = _revised_side(row, rev)
    if origin.startswith("revision") and side is None:
        data.unmatched += 1
    human = row.get("human") if row.get("human") in ("a", "b") else None
    views = _principle_views(row)
    judgements = as_list(row.get("judgements"))
    abstained = sum(1 for j in judgements if isinstance(j, dict) and j.get("abstain"))
    consistent = row.get("position_consistent")
    label = data.overall.add(p_a, len(judgements), abstained,
                             consistent if isinstance(consistent, bool) else None, side, human, row.get("label"))
    for pid, v in views.items():
        g = data.per_principle.setdefault(pid, Group(data.tie_threshold))
        orders = v["orders"]
        for order, p in orders.items():
            g.vote(order, p)
            data.overall.vote(order, p)
        if not orders:
            g.judgements += v["n"]
            g.abstained += v["abstained"]
            g.pairs_with_abstention += 1
            continue
        g.add(sum(orders.values()) / len(orders), v["n"], v["abstained"],
              (orders["ab"] - 0.5) * (orders["ba"] - 0.5) > 0 if "ab" in orders and "ba" in orders else None,
              side, human)
    a, b = as_text(row["response_a"]), as_text(row["response_b"])
    len_a, len_b = size(a), size(b)
    data.length_rows.append({"id": rid, "p_a": p_a, "label": label, "len_a": len_a, "len_b": len_b})
    flip = side == "b"
    p_rev = 1.0 - p_a if flip else p_a  # the revision's, in a revision pair
    if side is not None:
        data.revision_length_rows.append({
            "id": rid, "p_a": p_rev, "label": {"a": "b", "b": "a"}.get(label, label) if flip else label,
            "len_a": len_b if flip else len_a, "len_b": len_a if flip else len_b})
        for pid in rev.principles if rev is not None else ():
            data.principle(pid)["side"].add(p_rev, label == "tie")
    if label in ("a", "b"):
        chosen, rejected = (a, b) if label == "a" else (b, a)
        data.chosen.add(chosen, None, data.markers_of(chosen))
        data.rejected.add(rejected, None, data.markers_of(rejected))
    gates = gates_of(row)
    data.label_gates.update(gates)
    verdict = label if side is None else (
        "tie" if label == "tie" else "revision" if label == side else "initial")
    entry = {"label": verdict, "p": p_rev, "human": human,
             "judge_principles": list(views), "position_consistent": consistent}
    if not table:
        return
    if rid in data.table_index:
        t = data.table[data.table_index[rid]]
        t.update(entry)
        t["gates"] = list(dict.fromkeys([*t["gates"], *gates]))
        return
    if side is not None:
        return  # a revision pair whose revision row was past the table's cap
    if _room(data, max_rows):
        _add_row(data, {
            "id": rid, "kind": "pair", "origin": origin, "prompt": cut(conversation(row.get("prompt"))),
            "response_a": cut(a), "response_b": cut(b), "rounds": [], "revise_principles": [],
            "gates": gates, "markers_a": marked(data.markers_of(a)), "markers_b": marked(data.markers_of(b)),
            **entry})


def _read_best_of_n(data: RunData, max_rows: int) -> None:
    """best_of_n.jsonl: its rows' counts, its matches as judged pairs, one table row per prompt
    (A: the best answer, B: the worst)."""
    path = data.run_dir / BEST_OF_N_FILE
    if not path.is_file():
        return
    bon = data.best_of_n = BestOfN(pairs_file=sum(1 for _ in iter_rows(pairs_path(path), "best-of-n pairs")))
    for row in iter_rows(path, "best-of-n", BEST_OF_N_KEYS):
        _provenance(data, "best_of_n", row)
        ranking = as_dict(row["ranking"])
        matches = [m for m in as_list(ranking.get("matches")) if isinstance(m, dict)]
        best, worst = as_text(row["best_response"]), as_text(row["worst_response"])
        gates = gates_of(row)
        bon.add(len(as_list(row["samples"])), str(ranking.get("method") or "?"), row.get("best"),
                number(row.get("margin")), [m.get("p_i") is not None for m in matches], gates)
        bon.best.add(best, None, data.markers_of(best))
        bon.worst.add(worst, None, data.markers_of(worst))
        for m in matches:
            if isinstance(m.get("label"), dict):
                _add_label(data, m["label"], max_rows, table=False)
        if _room(data, max_rows):
            _add_row(data, {
                "id": str(row["id"]), "kind": "pair", "origin": f"best of {len(as_list(row['samples']))}",
                "prompt": cut(conversation(row["prompt"])), "response_a": cut(best), "response_b": cut(worst),
                "rounds": [], "revise_principles": [], "judge_principles": [], "gates": gates,
                "markers_a": marked(data.markers_of(best)), "markers_b": marked(data.markers_of(worst)),
                "label": "a" if (number(row.get("margin")) or 0) > 0 else "tie", "p": None, "human": None,
                "position_consistent": None})
