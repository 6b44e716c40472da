"""Checks that run BEFORE a command creates any file: a bad input or an unusable output path is
one line (exit code 2) and leaves nothing behind: no ``cache.sqlite``, ``.part`` or
``.meta.json`` in the output folder, no model loaded for nothing.

Each check reads at most the first record of an input (so a 10 GB file costs nothing) and
never creates, opens for writing or deletes anything. What they cannot see (a bad row in the
middle of a file, a full disk) is still reported when it is met, one line, after the rows
before it were written (a rerun resumes).

- ``check_revise``, ``check_label``, ``check_eval_judge``, ``check_run``: everything one
  command or ``cai.pipeline`` function needs, in one call;
- ``check_prompts``, ``check_pairs``: the input is readable and its first record gives a
  prompt (a pair); an empty input is a ``UsageError`` (nothing to do);
- ``check_output_file``, ``check_output_dir``, ``check_cache``: an output path is usable;
- ``check_templates``: the templates a stage uses load and render (syntax, undefined names);
- ``check_backend``: the backend name is known and an ``openai`` server accepts connections.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BackendError, InputError, UsageError

if TYPE_CHECKING:
    from .config import GateSettings, RunConfig
    from .constitution import Constitution
    from .templates import Templates

SQLITE_MAGIC = b"SQLite format 3\x00"
REVISE_STAGES = ("generate", "critique", "revise")
PAIR_SOURCES = ("auto", "sample", "dataset", "revisions")


def judge_stages(mode: str) -> tuple[str, ...]:
    """The templates the judge renders in ``mode``."""
    return ("judge_cot", "judge_cot_answer") if mode == "cot" else ("judge",)


# --- inputs ------------------------------------------------------------------------------------


def _is_path_source(source: Any) -> bool:
    """A file, folder or Hub dataset name (rows in memory are not read ahead: a generator
    would be used up)."""
    return isinstance(source, (str, Path))


def _empty(source: Any, what: str) -> UsageError:
    return UsageError(f"{source}: no rows in the {what}: nothing to do (check the file, --split or --limit)")


def check_prompts(source: Any, *, column: str | None = None, split: str = "train", what: str = "input") -> None:
    """``source`` is readable and its first record holds a prompt. Empty: ``UsageError``.
    Rows in memory are checked only when they are an empty list or tuple."""
    from .inputs import read_prompts

    if isinstance(source, (list, tuple)) and not source:
        raise UsageError(f"no {what} rows: nothing to do")
    if not _is_path_source(source):
        return
    if next(iter(read_prompts(source, column=column, split=split, limit=1)), None) is None:
        raise _empty(source, what)


def first_record(source: Any, *, split: str = "train", what: str = "input") -> dict[str, Any] | None:
    """The first record of a file input (``None`` for rows in memory); empty: ``UsageError``."""
    from .inputs import iter_records

    if isinstance(source, (list, tuple)) and not source:
        raise UsageError(f"no {what} rows: nothing to do")
    if not _is_path_source(source):
        return None
    for rec, _ in iter_records(source, split):
        return rec
    raise _empty(source, what)


def check_pairs(source: Any, *, pairs: str = "auto", column: str | None = None, split: str = "train",
                what: str = "input") -> str | None:
    """The first record of ``source`` is a pair (``pairs``: dataset, revisions) or a prompt
    (sample); ``auto`` decides by that record, as ``cai label`` does. Returns the source kind
    (``None`` when it cannot tell: rows in memory with ``auto``)."""
    from .stages.pairs import detect_source, read_pairs

    if pairs not in PAIR_SOURCES:
        raise UsageError(f"unknown --pairs {pairs!r} ({', '.join(PAIR_SOURCES)})")
    rec = first_record(source, split=split, what=what)
    if pairs == "auto":
        if rec is None:
            return None
        pairs = detect_source(rec)
    if pairs == "sample":
        check_prompts(source, column=column, split=split, what=what)
    elif _is_path_source(source):
        next(iter(read_pairs(source, split=split, limit=1)), None)  # raises on a record that is no pair
    return pairs


# --- outputs -----------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(folder: Path, flag: str) -> None:
    """``folder`` exists as a writable folder, or can be made: the nearest existing folder
    above it is a folder, and writable."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        kind = "a file" if base.is_file() else "not a folder"
        raise InputError(f"{folder}: cannot make this folder: {base} is {kind}; pass another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{base}: no permission to write here; pass another {flag}")


def check_output_file(path: str | Path, *, flag: str = "--output", example: str = "out.jsonl") -> None:
    """``path`` can be written as a file: not a folder, its folder exists or can be made, and
    an existing file there is writable."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a folder; {flag} names a file (e.g. {p / example})")
    if str(path).endswith(("/", os.sep)):
        raise InputError(f"{path}: ends with a slash; {flag} names a file (e.g. {p / example})")
    if p.exists() and not p.is_file():
        raise InputError(f"{p}: not a regular file; pass another {flag}")
    _check_creatable(p.parent, flag)
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{p}: no permission to write it; pass another {flag}")


def check_output_dir(path: str | Path, *, flag: str = "--output") -> None:
    """``path`` is a writable folder, or can be made."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: is a file, not a folder; {flag} names a folder")
    _check_creatable(p, flag)


def check_cache(path: str | Path | None, *, flag: str = "--cache") -> None:
    """The call cache file can be used: ``None`` (no cache) is fine; an existing file must be
    an SQLite database (not, say, a JSONL file passed by mistake)."""
    if path is None:
        return
    p = Path(path)
    check_output_file(p, flag=flag, example="cache.sqlite")
    if p.is_file() and p.stat().st_size > 0:
        try:
            with p.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise InputError(f"{p}: cannot read ({e.strerror or e}); pass another {flag} or --no-cache") from None
        if head != SQLITE_MAGIC:
            raise InputError(f"{p}: not a cache database (not SQLite); pass another {flag} or --no-cache")


# --- backends ----------------------------------------------------------------------------------


def check_server(base_url: str, *, timeout: float = 5.0) -> None:
    """One TCP connection to the host and port of ``base_url`` (as the ``openai`` backend makes
    them: directly, no proxy): a server that is not running is a ``BackendError`` now, not a
    failed row per prompt after retries."""
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise BackendError(f"--base-url {base_url!r} is not an http(s) URL (e.g. http://localhost:8000/v1)")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        raise BackendError(f"--base-url {base_url!r}: bad port") from None
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise BackendError(f"cannot reach {base_url} ({why}): is the server running? Start one with `vllm serve "
                           "<model> --port <port>`, or pass --base-url") from None


def check_backend(name: str, base_url: str | Sequence[str] | None = None) -> None:
    """The backend name is known; for ``openai``, ``base_url`` accepts connections (of several
    servers, one is enough: the others may come back, and the run routes around them)."""
    from .backends import BACKENDS

    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if name != "openai" or not base_url:
        return
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    errors: list[BackendError] = []
    for url in urls:
        try:
            check_server(url)
            return
        except BackendError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    raise BackendError(f"none of the {len(urls)} servers can be reached ({', '.join(urls)}): are they running?")


# --- templates ---------------------------------------------------------------------------------


_SAMPLE_PROMPT = [{"role": "user", "content": "<prompt>"}]


def _stage_context(stage: str, principle: Any) -> dict[str, Any] | None:
    """The variables the stages pass to a template (``None``: only a system text, no variables)."""
    judge = {"conversation": _SAMPLE_PROMPT, "response_a": "<response A>", "response_b": "<response B>",
             "principle": principle}
    revise = {"conversation": _SAMPLE_PROMPT, "response": "<response>", "principle": principle, "round": 1}
    return {
        "generate": None,
        "critique": revise,
        "revise": {**revise, "critique": "<critique>"},
        "judge": judge,
        "judge_cot": judge,
        "judge_cot_answer": {**judge, "reasoning": "<reasoning>"},
    }[stage]


def check_templates(templates: Templates, constitution: Constitution, stages: Iterable[str]) -> None:
    """Render each stage's templates once, with the variables the stage passes: a syntax
    error or an undefined name is a ``TemplateError`` (file and line) before any work."""
    principle = constitution.principles[0] if constitution.principles else None
    for stage in dict.fromkeys(stages):
        ctx = _stage_context(stage, principle)
        if ctx is None:
            templates.render_text(stage, "system")
        else:
            templates.messages(stage, **ctx)


# --- one call per command ------------------------------------------------------------------------


def _stages_ok(constitution: Constitution | None, templates: Templates | None, stages: Sequence[str]) -> None:
    if constitution is not None and templates is not None:
        check_templates(templates, constitution, stages)


def check_revise(inputs: Any, *, output: str | Path | None, cache: str | Path | None = None,
                 prompt_column: str | None = None, split: str = "train",
                 constitution: Constitution | None = None, templates: Templates | None = None,
                 gates: GateSettings | None = None) -> None:
    """Everything `cai revise` / ``pipeline.run_revise`` needs, before any file is made."""
    if output is not None:
        check_output_file(output, example="revisions.jsonl")
    check_cache(cache)
    _stages_ok(constitution, templates, REVISE_STAGES)
    check_prompts(inputs, column=prompt_column, split=split)
    check_gates(gates)


def check_gates(gates: GateSettings | None) -> None:
    """The gates' own input: the decontamination file is there and of a kind it can read (it is
    read in full when the input gate starts, before any row is sent)."""
    if gates is None or not gates.decontaminate:
        return
    from .quality.dedup import EVAL_SUFFIXES  # numpy and datasketch: only when there is a set to read

    p = Path(gates.decontaminate)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "file not found"
        raise InputError(f"{p}: {what} (the decontamination set, --gates-decontaminate); give an evaluation "
                         "file (.jsonl, .json, .csv, .parquet or .txt)")
    if p.suffix.lower() not in EVAL_SUFFIXES:
        raise InputError(f"{p}: unsupported file type {p.suffix or '(none)'!r} for the decontamination set; "
                         "use .jsonl, .json, .csv, .tsv, .parquet or .txt (one prompt per line)")


def check_label(inputs: Any, *, output: str | Path | None, cache: str | Path | None = None,
                pairs: str = "auto", mode: str = "logprobs", prompt_column: str | None = None,
                split: str = "train", constitution: Constitution | None = None,
                templates: Templates | None = None) -> None:
    """Everything `cai label` / ``pipeline.run_label`` needs, before any file is made."""
    if output is not None:
        check_output_file(output, example="preferences.jsonl")
    check_cache(cache)
    kind = check_pairs(inputs, pairs=pairs, column=prompt_column, split=split)
    _stages_ok(constitution, templates, judge_stages(mode) + (("generate",) if kind == "sample" else ()))


def check_eval_judge(file: Any, *, output_dir: str | Path | None, split: str = "train",
                     mode: str = "logprobs", constitution: Constitution | None = None,
                     templates: Templates | None = None) -> None:
    """Everything `cai eval-judge` / ``pipeline.run_eval_judge`` needs, before any file is made."""
    if output_dir is not None:
        check_output_dir(output_dir)
    _stages_ok(constitution, templates, (*judge_stages(mode), "judge"))
    check_pairs(file, pairs="dataset", split=split, what="labelled pairs")


def check_run(cfg: RunConfig, *, constitution: Constitution | None = None,
              templates: Templates | None = None) -> None:
    """Everything `cai run` / ``pipeline.run_pipeline`` needs, before its output folder, cache
    or run.json is made. A run with every stage disabled is a ``UsageError``."""
    if not cfg.revise.enabled and not cfg.label.enabled:
        raise UsageError("nothing to do: both stages are disabled (--no-revise and --no-label, or "
                         "`enabled: false` in the config); enable one")
    cfg.check()
    check_output_dir(cfg.output)
    check_cache(cfg.cache_path())
    sources = cfg.sources if cfg.label.enabled else []
    stages: list[str] = []
    if cfg.revise.enabled:
        stages += REVISE_STAGES
    if cfg.label.enabled:
        stages += judge_stages(cfg.label.mode)
        if "sample" in sources:
            stages.append("generate")
    _stages_ok(constitution, templates, stages)
    if cfg.needs_input():
        check_prompts(cfg.input, column=cfg.prompt_column, split=cfg.split)
    if "dataset" in sources and cfg.label.pairs:
        check_pairs(cfg.label.pairs, pairs="dataset", split=cfg.split, what="label.pairs dataset")
    if cfg.needs_input():
        check_gates(cfg.gates)
    if "revisions" in sources and not cfg.revise.enabled:
        revisions = Path(cfg.output) / "revisions.jsonl"
        if not revisions.is_file():
            raise InputError(f"{revisions}: no revisions to pair (enable the revise stage, or run it first)")


def conflicting(flags: Mapping[str, bool]) -> None:
    """Flags given together that contradict each other: ``{"--no-cache": True, "--cache": True}``
    (each value: given on the command line) is a ``UsageError``."""
    given = [f for f, on in flags.items() if on]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} contradict each other; pass one")
