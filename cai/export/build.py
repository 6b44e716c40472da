"""Export a run folder as TRL-ready datasets, saved locally and optionally pushed to the Hub.

The export is a ``DatasetDict`` with ``train_sft``/``test_sft`` (TRL's conversational
``messages``) and ``train_prefs``/``test_prefs`` (``prompt``/``chosen``/``rejected``, explicit
prompt), split by prompt: a hash of the prompt messages decides its side, so SFT and preference
rows with one prompt land on the same side and no prompt is in both train and test.

On disk (and on the Hub) it is one folder: ``data/<split>.parquet`` (or ``.jsonl``) and a
``README.md`` dataset card whose YAML ``configs`` name the files: config ``sft`` (default) and
config ``prefs``. They are two configs because the Hub loads one config's splits with one
schema (``cai.export.hub`` writes, checks and pushes it).

A best-of-n folder (`cai best-of-n`, or `cai run` with ``best_of_n``) adds its files to the same
splits: the best answers (``best_of_n.jsonl``) to the SFT split and the best-vs-worst pairs
(``best_of_n.pairs.jsonl``; scores: the best's and the worst's soft win rates) to the preference
split, after the revise and label stages' rows; ``RunInfo.best_of_n`` tells the card how many
came from there and their margins.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, List, Value

from ..errors import InputError
from ..hashing import hash_int, short_id
from ..quality.gates import rejected_ids
from ..review.export import with_human_labels

SFT_FILE, PREFS_FILE, LABELS_FILE, MANIFEST = (
    "revisions.jsonl", "preferences.jsonl", "labels.jsonl", "run.json")
KINDS = {"sft": SFT_FILE, "prefs": PREFS_FILE}
BEST_OF_N = {"sft": "best_of_n.jsonl", "prefs": "best_of_n.pairs.jsonl"}  # cai.stages.best_of_n's files
FORMATS = ("parquet", "jsonl")
CARD_MARK = "<!-- written by cai export -->"

_MSGS = List({"role": Value("string"), "content": Value("string")})
_STRS = List(Value("string"))
# TRL's columns first. SFT rows carry no `prompt` column: SFTTrainer reads a row with `prompt`
# as prompt-completion data and then needs `completion` (the prompt is in `messages` anyway).
FEATURES = {
    "sft": Features({
        "messages": _MSGS, "id": Value("string"), "prompt_id": Value("string"),
        "initial_response": Value("string"), "principle_ids": _STRS, "source": Value("string"),
    }),
    "prefs": Features({
        "prompt": _MSGS, "chosen": _MSGS, "rejected": _MSGS, "score_chosen": Value("float64"),
        "score_rejected": Value("float64"), "id": Value("string"), "prompt_id": Value("string"),
        "p_chosen": Value("float64"), "chosen_side": Value("string"), "tie": Value("bool"),
        "principle_ids": _STRS, "position_consistent": Value("bool"),
        "label_mode": Value("string"), "source": Value("string"),
    }),
}
# Kept only with --full, as JSON text (their shapes vary: user columns, per-judge fields).
TRACE = {"sft": ("rounds", "calls", "extra", "provenance"), "prefs": ("judgements", "provenance")}
_SECRET_KEY = re.compile(r"^(.*[_-])?(api[_-]?key|token|secret|password|auth)$", re.IGNORECASE)


@dataclass
class RunInfo:
    """What the dataset card says about the run: manifest, provenance, diagnostics."""

    folder: Path
    manifest: dict[str, Any] | None = None
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> first row's
    hashes: dict[str, set[str]] = field(default_factory=dict)  # kind -> constitution hashes
    constitutions: list[dict[str, Any]] = field(default_factory=list)  # full dumps known
    rows: dict[str, int] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # file name -> rows
    rejected: dict[str, int] = field(default_factory=dict)  # kind -> rows left out by the quality gates
    best_of_n: dict[str, Any] = field(default_factory=dict)  # rows read from the best-of-n files, margins
    test_fraction: float = 0.1
    seed: int = 0
    full: bool = False


@dataclass
class Export:
    dataset: DatasetDict
    info: RunInfo


# --- reading the run folder --------------------------------------------------------------------


def check_run_folder(folder: Path) -> None:
    """Refuse a missing, empty or unfinished run folder with one line saying what to do."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such run folder (make one with `cai run`, or `cai revise "
                         f"-o {folder}/{SFT_FILE}` / `cai label -o {folder}/{PREFS_FILE}`)")
    parts = sorted(p.name for p in folder.glob("*.jsonl.part"))
    unfinished = [p.name for p in folder.glob("*.jsonl.meta.json") if not _field(p, "complete", True)]
    if what := ", ".join(parts or sorted(unfinished)):
        raise InputError(f"{folder}: run is unfinished ({what} still in progress or crashed); "
                         "rerun the same stage command to finish it (it resumes), then export")
    if _field(folder / "run.json", "status", None) == "running":
        raise InputError(f"{folder}: `cai run` has not finished here (run.json says running); "
                         "rerun the same `cai run` command to finish it (it resumes), then export")
    if not any((folder / f).exists() for f in (*KINDS.values(), *BEST_OF_N.values())):
        raise InputError(f"{folder}: no {SFT_FILE} or {PREFS_FILE}: not a cai run folder "
                         "(make one with `cai run`, `cai revise` or `cai label`)")


def _field(path: Path, key: str, default: Any) -> Any:
    """A key of a JSON file's object; ``default`` when the file is missing or unreadable (no evidence
    either way)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key, default)
    except (OSError, ValueError, AttributeError):
        return default


def _lines(path: Path, secrets: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    first: dict[Any, int] = {}  # id -> its line: a row twice is an error, never exported twice
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if any(s and s in line for s in secrets):
                raise InputError(f"{path}:{n}: holds your Hugging Face token; remove it before "
                                 "exporting (nothing was written or pushed)")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg}); was the file edited "
                                 "or cut short?") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}: a row must be a JSON object")
            if (m := first.setdefault(row.get("id"), n)) != n and row.get("id") is not None:
                raise InputError(f"{path}:{n}: id {row['id']!r} again (first on line {m}): two runs wrote "
                                 "here at once; keep one line per id, then export")
            yield n, row


def _messages(v: Any, where: str, name: str, last: str | None = None) -> list[dict[str, str]]:
    if not (isinstance(v, list) and v and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)):
        raise InputError(f"{where}: `{name}` must be a non-empty list of chat messages "
                         "({role, content} strings), as cai revise/label write it")
    if last and v[-1]["role"] != last:
        raise InputError(f"{where}: `{name}` must end with an {last} message")
    return [{"role": m["role"], "content": m["content"]} for m in v]


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def scrub(obj: Any) -> Any:
    """Hide values under secret-looking keys (api_key, token, ...) in nested settings."""
    if isinstance(obj, dict):
        return {k: "<redacted>" if _SECRET_KEY.search(str(k)) and v else scrub(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(x) for x in obj]
    return obj


def portable(value: Any, output: str | None = None) -> Any:
    """Paths as an export may show them, in nested settings too: relative to the run folder
    (``output``: the run folder as run.json records it), a ``path:line`` source keeps its
    line, and an absolute path (or one climbing out with ``..``) keeps its file name only."""
    if isinstance(value, dict):
        return {k: portable(v, output) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, output) for v in value]
    if not isinstance(value, str) or "://" in value:
        return value
    path, sep, line = value.rpartition(":")
    if not (sep and path and line.isdigit()):
        path, sep, line = value, "", ""
    out = (output or "").rstrip("/\\")
    if out and (path == out or path.startswith(out + "/")):
        path = path[len(out):].lstrip("/") or "."
    if path.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", path) or ".." in re.split(r"[\\/]", path):
        path = re.split(r"[\\/]", path.rstrip("/\\"))[-1]
    return path + sep + line


def _source(src: str, output: str | None) -> str:
    """A row's ``source`` relative to the run folder: a file of the run itself by its name."""
    src = portable(src, output)
    path, sep, line = src.rpartition(":")
    name = re.split(r"[\\/]", path)[-1]
    return name + sep + line if sep and name in (*KINDS.values(), LABELS_FILE) else src


def _row(kind: str, raw: dict[str, Any], where: str, full: bool) -> dict[str, Any]:
    """The exported row: TRL's columns, light metadata, the prompt's id (and the trace)."""
    src = raw.get("source")
    pids = raw.get("principle_ids") or []
    common = {"id": str(raw.get("id", "")), "source": portable(src) if isinstance(src, str) else "",
              "principle_ids": [str(p) for p in pids] if isinstance(pids, list) else []}
    if kind == "sft":
        msgs = _messages(raw.get("messages"), where, "messages", last="assistant")
        prompt = _messages(raw["prompt"], where, "prompt") if raw.get("prompt") else msgs[:-1]
        if not prompt:
            raise InputError(f"{where}: `messages` holds no prompt before the answer")
        ini = raw.get("initial_response")
        row: dict[str, Any] = {"messages": msgs, **common,
               "initial_response": ini if isinstance(ini, str) else None}
    else:
        prompt = _messages(raw.get("prompt"), where, "prompt")
        chosen = _messages(raw.get("chosen"), where, "chosen", last="assistant")
        rejected = _messages(raw.get("rejected"), where, "rejected", last="assistant")
        pc = raw.get("position_consistent")
        side, mode = raw.get("chosen_side"), raw.get("label_mode")
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
               "score_chosen": _float(raw.get("score_chosen")),
               "score_rejected": _float(raw.get("score_rejected")), **common,
               "p_chosen": _float(raw.get("p_chosen")),
               "chosen_side": side if isinstance(side, str) else None,
               "tie": bool(raw.get("tie", False)),
               "position_consistent": pc if isinstance(pc, bool) else None,
               "label_mode": mode if isinstance(mode, str) else None}
    row["prompt_id"] = short_id([[m["role"], m["content"]] for m in prompt])  # a stable id of the prompt messages
    if "label_source" in raw:  # human labels (cai.review): "human" or "ai"
        row["label_source"] = raw["label_source"]
    if full:
        for c in TRACE[kind]:
            v = portable(scrub(raw.get(c))) if c == "provenance" else raw.get(c)
            row[c] = None if v is None else json.dumps(v, ensure_ascii=False, default=str)
    return row


SCORES = ("raw", "length-debiased")


def read_kind(folder: Path, kind: str, name: str, info: RunInfo, full: bool, secrets: Sequence[str], score: str,
              labels: str) -> list[dict[str, Any]]:
    """The rows of one file (``name``) of a run folder as rows of ``kind``."""
    path = folder / name
    judged = path.name == PREFS_FILE  # the label stage's pairs (human labels and length-debiased scores apply)
    output = ((info.manifest or {}).get("config") or {}).get("output")
    output = output if isinstance(output, str) else None
    rows: list[dict[str, Any]] = []
    hashes = info.hashes.setdefault(kind, set())
    numbered: Iterable[tuple[str, dict[str, Any]]] = ((f"{path}:{n}", raw) for n, raw in _lines(path, secrets))
    for where, raw in with_human_labels(numbered, folder, labels) if judged else numbered:
        if judged and score == "length-debiased" and raw.get("label_source") != "human":
            p = _float(raw.get("p_chosen_length_debiased"))
            if p is None:
                raise InputError(f"{where}: no p_chosen_length_debiased; label with label.debias_length "
                                 "(--label-debias-length / --debias-length) to export length-debiased scores")
            raw = {**raw, "score_chosen": p, "score_rejected": 1.0 - p}
        row = _row(kind, raw, where, full)
        row["source"] = _source(row["source"], output)
        rows.append(row)
        if isinstance(prov := raw.get("provenance"), dict) and prov:
            info.provenance.setdefault(kind, prov)
            if prov.get("constitution_hash"):
                hashes.add(str(prov["constitution_hash"]))
    return rows


def read_run(folder: Path, *, full: bool = False, constitutions: Sequence[dict[str, Any]] = (),
             secrets: Sequence[str] = (), include_rejects: bool = False, score: str = "raw",
             labels: str = "human-first") -> tuple[dict[str, list[dict[str, Any]]], RunInfo]:
    """Read and check every row of a finished run folder; the SFT rows the quality gates kept
    out (rejects.jsonl) stay out unless ``include_rejects``."""
    folder = Path(folder)
    check_run_folder(folder)
    info = RunInfo(folder=folder, full=full)
    mpath = folder / MANIFEST
    if mpath.exists():
        text = mpath.read_text(encoding="utf-8")
        if any(s and s in text for s in secrets):
            raise InputError(f"{mpath}: holds your Hugging Face token; remove it before exporting")
        try:
            info.manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{mpath}: not valid JSON ({e.msg})") from None
        if not isinstance(info.manifest, dict):
            raise InputError(f"{mpath}: must be a JSON object (the run manifest)")
        if isinstance(info.manifest.get("constitution"), dict):
            info.constitutions.append(info.manifest["constitution"])
    info.constitutions += list(constitutions)
    rows: dict[str, list[dict[str, Any]]] = {}
    for kind, name in [*KINDS.items(), *BEST_OF_N.items()]:  # the best-of-n rows after the stages' own
        if not (folder / name).exists():
            continue
        got = read_kind(folder, kind, name, info, full, secrets, score, labels)
        bon = name in BEST_OF_N.values()
        if kind == "sft" and (bon or not include_rejects):  # the rows the gates kept out, unless asked
            out = set() if include_rejects else rejected_ids(folder, "best_of_n" if bon else "revise")
            kept = [r for r in got if r["id"] not in out]
            info.rejected[kind] = info.rejected.get(kind, 0) + len(got) - len(kept)
            got = kept
        if bon:
            info.best_of_n[kind] = len(got)
        rows[kind] = rows.get(kind, []) + got
    if info.best_of_n:
        info.best_of_n |= best_of_n_summary(folder / BEST_OF_N["sft"])
    for f in sorted(folder.glob("*.failures.jsonl")):
        with f.open(encoding="utf-8") as fh:
            info.failures[f.name] = sum(1 for line in fh if line.strip())
    if not any(rows.values()):
        fails = sum(info.failures.values())
        names = " and ".join(n for k, n in KINDS.items() if k in rows)
        tail = f"; {fails} rows failed, see the *.failures.jsonl files" if fails else ""
        raise InputError(f"{folder}: {names} hold no rows: nothing to export{tail}")
    return rows, info


def best_of_n_summary(path: Path) -> dict[str, Any]:
    """What the card says of best_of_n.jsonl: answers per prompt, ranking, margins."""
    n: set[int] = set()
    methods: set[str] = set()
    margins: list[float] = []
    for _, raw in _lines(path, ()) if path.is_file() else ():
        n.add(len(raw.get("samples") or []))
        methods.add(str((raw.get("ranking") or {}).get("method")))
        if (m := _float(raw.get("margin"))) is not None:
            margins.append(m)
    return {"samples": sorted(n), "methods": sorted(methods), "margins": margins}


# --- split and build ---------------------------------------------------------------------------


def _unit(pid: str, seed: int) -> float:
    return hash_int(f"{seed}\x1fsplit\x1f{pid}", 8) / 2**64


def assign_test(rows: dict[str, list[dict[str, Any]]], fraction: float, seed: int) -> set[str]:
    """The prompt ids that go to test: those whose hash falls under ``fraction``.

    One assignment for all kinds, so a prompt is on the same side in SFT and preferences. With
    very few prompts a kind could get no test (or no train) prompt; then its lowest-hash
    (highest-hash) prompt is moved, so each kind with two or more prompts has both splits.
    """
    if fraction <= 0:
        return set()
    test = {r["prompt_id"] for rs in rows.values() for r in rs
            if _unit(r["prompt_id"], seed) < fraction}
    for rs in rows.values():
        pids = sorted({r["prompt_id"] for r in rs}, key=lambda p: _unit(p, seed))
        if len(pids) < 2:
            continue
        if not test.intersection(pids):
            test.add(pids[0])
        if test.issuperset(pids):
            test.discard(pids[-1])
    return test


def build(folder: Path, *, test_fraction: float = 0.1, seed: int = 0, full: bool = False,
          constitutions: Sequence[dict[str, Any]] = (), secrets: Sequence[str] = (),
          include_rejects: bool = False, score: str = "raw", labels: str = "human-first") -> Export:
    """Read a finished run folder into the four-split ``DatasetDict`` (empty splits left out)."""
    if not 0 <= test_fraction < 1:
        raise InputError(f"test fraction must be in [0, 1), got {test_fraction}")
    if score not in SCORES:
        raise InputError(f"unknown score {score!r} (one of {', '.join(SCORES)})")
    rows, info = read_run(folder, full=full, constitutions=constitutions, secrets=secrets,
                          include_rejects=include_rejects, score=score, labels=labels)
    info.test_fraction, info.seed = test_fraction, seed
    test = assign_test(rows, test_fraction, seed)
    dd = DatasetDict()
    for kind, rs in rows.items():
        feats = Features(dict(FEATURES[kind]))
        if full:
            feats.update({c: Value("string") for c in TRACE[kind]})
        if any("label_source" in r for r in rs):
            feats["label_source"] = Value("string")
        info.rows[kind] = len(rs)
        info.prompts[kind] = len({r["prompt_id"] for r in rs})
        for side in ("train", "test"):
            part = [r for r in rs if (r["prompt_id"] in test) == (side == "test")]
            if part:
                dd[f"{side}_{kind}"] = Dataset.from_list(part, features=feats)
    return Export(dataset=dd, info=info)
