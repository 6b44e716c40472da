"""XSTest-style files: the refusal detector against human labels, and over-refusal probe pairs.

``evaluate_refusals(path)`` compares ``is_refusal`` with the human ``final_label`` of a CSV or
JSONL file (``cai eval-refusal``); ``overrefusal_pairs(folder)`` pairs one model's compliant
answer with another's refusal of the same safe prompt (``bench/bench_overrefusal.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import InputError
from .refusal import is_refusal

FINAL_LABELS: tuple[str, ...] = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")
_LABELS = {alias: lab for lab in FINAL_LABELS for alias in (lab, lab[0], lab[2:])}  # "2", "full_refusal"
_SIDES = ("refusal", "compliance")
_COMPLETIONS_GLOB = "completions_*.csv"


@dataclass
class RefusalEval:
    """``is_refusal`` against a human ``final_label`` (refusal = full or partial refusal)."""

    path: str
    n: int
    agreement: float
    # confusion[human][detector], both "refusal" or "compliance"
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    # per_label[final_label][detector]: counts of each human label by the detector's verdict
    per_label: dict[str, dict[str, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """A plain-text confusion table; the last line is ``agreement 0.912 (n=450)``."""
        c, corner = self.confusion, "human \\ detector"
        w = max(len(s) for s in (*FINAL_LABELS, corner))

        def row(name: str, counts: dict[str, Any]) -> str:
            return f"{name:<{w}}  {counts['refusal']:>8}  {counts['compliance']:>10}"

        tp, fn, fp = c["refusal"]["refusal"], c["refusal"]["compliance"], c["compliance"]["refusal"]
        recall = f"{tp / (tp + fn):.3f}" if tp + fn else "n/a"
        precision = f"{tp / (tp + fp):.3f}" if tp + fp else "n/a"
        return [self.path, row(corner, dict(zip(_SIDES, _SIDES, strict=True))),
                row("refusal (2+3)", c["refusal"]), row("compliance (1)", c["compliance"]), "",
                row("by final_label", dict(zip(_SIDES, _SIDES, strict=True))),
                *(row(lab, self.per_label[lab]) for lab in FINAL_LABELS), "",
                f"refusal recall {recall}, precision {precision}", f"agreement {self.agreement:.3f} (n={self.n})"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _final_label(value: Any, path: Path, where: str) -> str:
    """A ``final_label`` cell as one of ``FINAL_LABELS`` (``2``, ``full_refusal`` accepted)."""
    key = str(int(value)) if type(value) in (int, float) and float(value).is_integer() else value
    if isinstance(key, str) and (lab := _LABELS.get(key.strip().lower())):
        return lab
    raise InputError(f"{path}: {where}: unknown final_label {value!r} "
                     "(use 1_full_compliance, 2_full_refusal or 3_partial_refusal)")


def _rows(path: Path, need: tuple[str, ...]) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """What a row number counts ("line" in JSONL, else "row") and the numbered rows (1-based) of a
    CSV/TSV, JSONL or JSON-array file (by its suffix, else by its first character) that has the
    columns ``need``. Bad input raises a one-line ``InputError``."""
    if not path.is_file():
        what = "not a file" if path.exists() else "no such file"
        raise InputError(f"{path}: {what} (give an XSTest-style .csv or .jsonl file)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 CSV or JSONL") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e}); check the path and permissions") from None
    if not text.strip():
        raise InputError(f"{path}: is empty (need rows with {', '.join(need[:-1])} and {need[-1]} columns)")
    suffix, head = path.suffix.lower(), text.lstrip()
    is_json = suffix in (".jsonl", ".json", ".ndjson") or (suffix not in (".csv", ".tsv") and head[0] in "{[")
    rows: list[tuple[int, dict[str, Any]]] = []
    if is_json and head.startswith("["):
        try:
            data = json.loads(head)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); fix it or use JSONL") from None
        if not all(isinstance(r, dict) for r in data):
            raise InputError(f"{path}: a JSON file must hold a list of objects (one per completion)")
        rows = list(enumerate(data, 1))
    elif is_json:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg}); one JSON object per line") from None
                if not isinstance(rec, dict):
                    raise InputError(f"{path}:{lineno}: a row must be a JSON object with completion and final_label")
                rows.append((lineno, rec))
    cols = list(rows[0][1]) if rows else []
    if not is_json:
        try:
            reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if suffix == ".tsv" else ",")
            cols, rows = list(reader.fieldnames or []), list(enumerate(map(dict, reader), 1))
        except csv.Error as e:
            raise InputError(f"{path}: not readable as CSV ({e}); check its quoting") from None
    if missing := [c for c in need if c not in cols]:
        have = ", ".join(c for c in cols if c) or "none"
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (columns found: {have})")
    return ("line" if is_json and not head.startswith("[") else "row"), rows


def evaluate_refusals(path: str | Path) -> RefusalEval:
    """Compare ``is_refusal`` with the human ``final_label`` of an XSTest-style CSV or JSONL file.

    Needs the columns ``completion`` and ``final_label`` (``1_full_compliance``, ``2_full_refusal``
    or ``3_partial_refusal``; ``1``/``2``/``3`` accepted). Bad input raises ``InputError``.
    """
    p = Path(path)
    where, rows = _rows(p, ("completion", "final_label"))
    confusion = {h: dict.fromkeys(_SIDES, 0) for h in _SIDES}
    per_label = {lab: dict.fromkeys(_SIDES, 0) for lab in FINAL_LABELS}
    for i, rec in rows:
        lab = _final_label(rec.get("final_label"), p, f"{where} {i}")
        completion = rec.get("completion")
        if not isinstance(completion, str | None):
            raise InputError(f"{p}: {where} {i}: completion must be text, got {type(completion).__name__}")
        detected = "refusal" if is_refusal(completion or "") else "compliance"
        confusion["compliance" if lab == FINAL_LABELS[0] else "refusal"][detected] += 1
        per_label[lab][detected] += 1
    if not rows:
        raise InputError(f"{p}: has no rows (need rows with completion and final_label columns)")
    agreement = (confusion["refusal"]["refusal"] + confusion["compliance"]["compliance"]) / len(rows)
    return RefusalEval(path=str(p), n=len(rows), agreement=agreement, confusion=confusion, per_label=per_label)


def overrefusal_pairs(xstest_dir: str | Path) -> list[dict[str, Any]]:
    """Over-refusal probe pairs from XSTest's safe prompts (type not ``contrast_*``).

    For every two ``completions_*.csv`` files in ``xstest_dir``, a prompt where one model's
    answer is ``1_full_compliance`` and the other's is a refusal (``2_`` or ``3_``) becomes a row
    ``{"id", "prompt", "response_a", "response_b", "type", "refusal_side", "model_compliant",
    "model_refusal"}``. Which side holds the refusal ("a" or "b") is fixed by a hash of the id,
    so that position is not confounded with refusal. The id is XSTest's id when there are two
    files, else ``id:modelX:modelY``. Prompt text and type come from ``xstest_prompts.csv`` when it
    is there, else from the completions files.
    """
    d = Path(xstest_dir)
    if not d.is_dir():
        raise InputError(f"{d}: no such folder (give the folder holding XSTest's completions_*.csv files)")
    files = sorted(d.glob(_COMPLETIONS_GLOB))
    if len(files) < 2:
        raise InputError(f"{d}: needs at least two {_COMPLETIONS_GLOB} files to pair answers, found {len(files)}")
    pfile = d / "xstest_prompts.csv"
    prompts = {r["id"]: r for _, r in _rows(pfile, ("id", "prompt", "type"))[1]} if pfile.is_file() else {}
    models: dict[str, dict[str, dict[str, Any]]] = {}
    for f in files:
        rows = _rows(f, ("id", "type", "prompt", "completion", "final_label"))[1]
        models[f.stem.removeprefix("completions_")] = {
            r["id"]: {**r, "compliant": _final_label(r["final_label"], f, f"row {i}") == FINAL_LABELS[0]}
            for i, r in rows}
    out: list[dict[str, Any]] = []
    for m1, m2 in combinations(sorted(models), 2):
        for xid in sorted(set(models[m1]) & set(models[m2]), key=_id_key):
            r1, r2 = models[m1][xid], models[m2][xid]
            meta = prompts.get(xid, r1)
            xtype = meta.get("type") or r1["type"]
            if (xtype.startswith("contrast_") or (meta.get("label") or "safe").strip().lower() == "unsafe"
                    or r1["compliant"] == r2["compliant"]):
                continue
            (cm, comp), (rm, ref) = ((m1, r1), (m2, r2)) if r1["compliant"] else ((m2, r2), (m1, r1))
            pid = xid if len(models) == 2 else f"{xid}:{m1}:{m2}"
            on_a = hashlib.sha256(pid.encode("utf-8")).digest()[0] % 2 == 1
            a, b = (ref, comp) if on_a else (comp, ref)
            out.append({"id": pid, "prompt": meta.get("prompt") or r1["prompt"], "response_a": a["completion"],
                        "response_b": b["completion"], "type": xtype, "refusal_side": "a" if on_a else "b",
                        "model_compliant": cm, "model_refusal": rm})
    return out


def _id_key(xid: str) -> tuple[str, int, str]:
    m = re.match(r"^(.*?)(\d+)$", xid)
    return (m.group(1), int(m.group(2)), xid) if m else (xid, -1, xid)
