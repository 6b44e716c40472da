"""Read prompts from JSONL, JSON, Parquet, CSV, a saved ``datasets`` folder or a Hub dataset name.

Every row becomes a ``PromptRow``: a stable id and the prompt as chat messages. hh-rlhf style
transcripts (``\\n\\nHuman: ... \\n\\nAssistant: ...``) become messages; the prompt is the
conversation up to the last ``Assistant:`` turn. Rows are streamed, never all held at once.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

from .backends.base import Message
from .errors import InputError
from .files import bounded_lines, loads
from .hashing import short_id, unique_ids

# What the commands and the Python API read: a path (file or saved dataset folder), a Hub
# dataset name, or rows in memory (strings, dicts, a ``datasets.Dataset``).
Source = str | Path | Iterable[Any]

PROMPT_COLUMNS = ("prompt", "messages", "chosen", "question", "instruction", "text")
_BOM = b"\xef\xbb\xbf"
_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass
class PromptRow:
    id: str
    prompt: list[Message]
    extra: dict[str, Any] = field(default_factory=dict)  # the source row's other columns
    source: str = ""  # "file:line" for messages


def parse_transcript(text: str) -> list[Message]:
    """Split an hh-rlhf transcript into chat messages (turns keep their text, stripped)."""
    t = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    parts = _TURN.split(t)
    if len(parts) < 3 or parts[0].strip():
        raise InputError("not an hh-rlhf transcript (expected '\\n\\nHuman: ...')")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=False)]


def transcript_prompt(text: str) -> tuple[list[Message], str | None]:
    """The prompt of a transcript (all turns before the final assistant reply) and that reply."""
    msgs = parse_transcript(text)
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    return msgs, None


def to_messages(value: Any, column: str) -> list[Message]:
    """Turn a prompt cell (string, transcript or list of messages) into chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError(f"column {column!r} is empty")
        if value.startswith(("\n\nHuman:", "Human:")):
            return transcript_prompt(value)[0]
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        msgs = [{"role": _role(m["role"], column, i), "content": _content(m["content"], column, i)}
                for i, m in enumerate(value)]
        if column == "messages" and msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # SFT data: the prompt is everything before the final reply
        if not msgs:
            raise InputError(f"column {column!r} holds no messages")
        return msgs  # type: ignore[return-value]
    raise InputError(f"column {column!r} must be a string or a list of {{role, content}} messages")


ROLES = ("system", "user", "assistant", "tool")


def _role(role: Any, column: str, i: int) -> str:
    if role not in ROLES:
        raise InputError(f"column {column!r}, message {i + 1}: role {role!r} is not one of {', '.join(ROLES)}")
    return str(role)


def _content(content: Any, column: str, i: int) -> str:
    """A message's text: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InputError(f"column {column!r}, message {i + 1}: content must be text (a string, or content parts "
                     f"of type text), got {type(content).__name__}")


def _in_memory(rows: Iterable[Any]) -> Iterator[tuple[dict[str, Any], str]]:
    for i, rec in enumerate(rows, 1):
        if isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, Mapping):
            raise InputError(f"row {i}: expected a prompt string or a mapping of columns, got {type(rec).__name__}")
        yield dict(rec), f"<rows>:row {i}"


def iter_records(source: Source, split: str = "train", problems: Problems | None = None,
                 max_line: int | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Yield (record, location) from a file, a saved dataset folder, a Hub dataset name, or rows
    in memory (prompt strings, dicts, a ``datasets.Dataset``).

    Every problem reading a file (not UTF-8, not JSON, a corrupt Parquet file, no permission)
    is an ``InputError`` that names the file (and the line, where there is one) and what to do;
    with ``problems``, a bad line is added there and skipped (the plan lists them all at once).
    A JSON line longer than ``max_line`` bytes is such a problem (read past, never held whole).
    """
    if not isinstance(source, (str, Path)):
        yield from _in_memory(source)
        return
    path = Path(source)
    try:
        yield from _file_records(path, source, split, problems, max_line)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); re-save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}); check the path and its permissions") from None


def _file_records(path: Path, source: str | Path, split: str, problems: Problems | None,
                  max_line: int | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".jsonl", ".ndjson", ".json"):
        yield from _json_records(path, suffix, problems, max_line)
    elif path.is_file() and suffix == ".parquet":
        yield from _parquet_records(path)
    elif path.is_file() and suffix in (".csv", ".tsv"):
        yield from _csv_records(path, suffix)
    elif path.exists() and not path.is_dir():
        raise InputError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, .csv)")
    elif not path.is_dir() and ("/" not in str(source) or str(source).startswith((".", "/"))):
        raise InputError(f"{source}: file not found")
    else:  # a saved datasets folder, or a Hub dataset name (streamed)
        import datasets

        name = path if path.is_dir() else source
        try:
            ds = (datasets.load_from_disk(str(path)) if path.is_dir()
                  else datasets.load_dataset(str(source), split=split, streaming=True))
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds
            what = "not a saved datasets folder" if path.is_dir() else "cannot load dataset"
            raise InputError(f"{name}: {what} ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f"{path}: no split {split!r} (has {', '.join(ds)}); pass --split")
            ds = ds[split]
        for i, rec in enumerate(ds):
            yield rec, f"{name}[{split}]:row {i + 1}"


def _json_records(path: Path, suffix: str, problems: Problems | None = None,
                  max_line: int | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """JSON lines (one object a line), or for ``.json`` a JSON array of objects. Read as bytes
    and decoded line by line, so that a bad byte is reported with its line."""
    with path.open("rb") as f:
        head = f.read(64).removeprefix(_BOM).lstrip()
        f.seek(0)
        if suffix == ".json" and head.startswith(b"["):
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
            for i, rec in enumerate(items):
                if not isinstance(rec, dict):
                    raise InputError(f"{path}: item {i}: expected a JSON object of columns, got "
                                     f"{type(rec).__name__}")
                yield rec, f"{path}:item {i}"
            return
        for lineno, raw in enumerate(bounded_lines(f, max_line), 1):
            try:
                if raw is None:
                    raise InputError(f"{path}:{lineno}: over the line-size cap ({max_line} bytes); split the "
                                     "row, or pass a larger --max-line-bytes")
                rec = _json_line(path, suffix, lineno, raw)
            except InputError as e:
                if problems is None:
                    raise
                problems.add(str(e))
                continue
            if rec is not None:
                yield rec, f"{path}:{lineno}"


def _json_line(path: Path, suffix: str, lineno: int, raw: bytes) -> dict[str, Any] | None:
    try:
        line = (raw.removeprefix(_BOM) if lineno == 1 else raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason}); "
                         "re-save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        rec = loads(line)
    except json.JSONDecodeError as e:
        hint = ("; a .json file must be a JSON array of objects or one object per line"
                if suffix == ".json" and lineno == 1 else "; fix or remove the line")
        raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg}){hint}") from None
    if not isinstance(rec, dict):
        raise InputError(f"{path}:{lineno}: each line must be a JSON object, got {type(rec).__name__}")
    return rec


def _parquet_records(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield rec, f"{path}:row {n}"
    except (pa.ArrowException, OSError) as e:
        where = f" after row {n}" if n else ""
        raise InputError(f"{path}: not a readable Parquet file{where} ({e}); write it again or use "
                         "JSONL") from None


def _csv_records(path: Path, suffix: str) -> Iterator[tuple[dict[str, Any], str]]:
    # utf-8-sig: a byte-order mark (Excel's habit) is not part of the first column's name
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        try:
            for rec in reader:
                yield dict(rec), f"{path}:{reader.line_num}"
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text near line {reader.line_num + 1} ({e.reason}); "
                             "re-save it as UTF-8") from None
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: bad CSV ({e})") from None


def read_prompts(source: Source, *, column: str | None = None, split: str = "train", limit: int | None = None
                 ) -> Iterator[PromptRow]:
    """Stream ``PromptRow``s. The prompt column is ``column`` or the first of PROMPT_COLUMNS found.

    Row ids come from the ``id`` column when present, else from a hash of the prompt; a repeated
    prompt gets ``-2``, ``-3``... so that ids stay unique and stable under reordering.
    """
    rows = (prompt_row(rec, where, column) for rec, where in islice(iter_records(source, split), limit))
    return unique_ids(rows, lambda r: r.id, lambda r, new: replace(r, id=new))


def prompt_row(rec: dict[str, Any], where: str, column: str | None = None) -> PromptRow:
    """One input record as a prompt (its id not yet made unique); a bad one is an ``InputError``."""
    col = column or next((c for c in PROMPT_COLUMNS if c in rec), None)
    if col is None or col not in rec:
        have = ", ".join(rec) or "none"
        raise InputError(f"{where}: no prompt column (looked for {column or ', '.join(PROMPT_COLUMNS)}; "
                         f"row has {have}); pass --prompt-column")
    try:
        prompt = to_messages(rec[col], col)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    if prompt[-1]["role"] != "user":
        raise InputError(f"{where}: column {col!r}: the conversation must end with a user turn to answer (it "
                         f"ends with {prompt[-1]['role']!r})")
    rid = str(rec["id"]) if rec.get("id") not in (None, "") else short_id(prompt)
    return PromptRow(id=rid, prompt=prompt, extra={k: v for k, v in rec.items() if k != col}, source=where)


@dataclass
class Problems:
    """The bad records of an input, found in one pass: the first ``shown`` kept, the rest counted."""

    shown: int = 20
    count: int = 0
    lines: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.lines) < self.shown:
            self.lines.append(message)

    def check(self) -> None:
        """One ``InputError`` naming every problem (file:line each), if there was one."""
        if self.count == 1:
            raise InputError(self.lines[0])
        if self.count:
            more = f"; and {self.count - len(self.lines)} more" if self.count > len(self.lines) else ""
            raise InputError(f"{self.count} bad input records: " + "; ".join(self.lines) + more)
