"""One plan per run, validated once before the first call.

``Plan.build(config, inputs)`` checks everything a run needs before any file is made or model
loaded: the settings that span fields, the output paths and the cache, the templates the stages
render, EVERY input record (streamed: memory stays flat however long the file), the gates'
files and the backend (name; an ``openai`` server accepts connections). The problems of the
inputs are found in one pass and reported in one message (the first 20, each as file:line,
then a count), exit code 2. The plan then lists the work in order: ``prompts()`` and
``label_items()``. The CLI, the Python API (``cai.pipeline``) and Ray (``cai.scale``) all run one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .backends.urls import check_url, no_credentials, split_urls
from .config import RunConfig
from .constitution import Constitution, load_constitution
from .errors import BackendError, InputError, TemplateError, UsageError
from .inputs import Problems, PromptRow, iter_records, prompt_row, read_prompts
from .stages.pairs import Pair, detect_source, read_pairs, record_to_pair, sample_pair_ids
from .templates import MAX_CHARS, Templates

SQLITE_MAGIC = b"SQLite format 3\x00"
REVISE_STAGES = ("generate", "critique", "revise")
Kind = Literal["run", "revise", "label", "eval", "best_of_n"]
BEST_OF_N_FILE = "best_of_n.jsonl"  # cai.stages.best_of_n.ROWS_FILE


def judge_stages(mode: str) -> tuple[str, ...]:
    """The templates the judge renders in ``mode``."""
    return ("judge_cot", "judge_cot_answer") if mode == "cot" else ("judge",)


def labels_path(preferences: Path) -> Path:
    """Where every judged pair goes: ``labels.jsonl`` beside ``preferences.jsonl``."""
    if preferences.name == "preferences.jsonl":
        return preferences.with_name("labels.jsonl")
    return preferences.with_name(preferences.name.removesuffix(".jsonl") + ".labels.jsonl")


def unique_pair(p: Pair, seen: dict[str, int]) -> Pair:
    """Pairs from several sources in one stream: a repeated id gets ``-2``, ``-3``..."""
    n = seen[p.id] = seen.get(p.id, 0) + 1
    return p if n == 1 else replace(p, id=f"{p.id}-{n}")


# --- one pass over an input --------------------------------------------------------------------


@dataclass
class Scan:
    rows: int = 0
    human: bool = False  # a pair with a person's label was seen


def _scannable(source: Any) -> bool:
    """Paths are read ahead; rows in memory only when they can be read twice (a list)."""
    return isinstance(source, (str, Path, list, tuple))


def ragged(rec: dict[Any, Any], where: str) -> None:
    """A CSV row with more or fewer fields than its header (``csv.DictReader`` keeps the extra
    ones under ``None`` and fills missing ones with ``None``): an ``InputError``, not a prompt cut
    at an unquoted comma."""
    extra = rec.get(None) or []
    fields = [k for k in rec if k is not None]
    if extra or any(rec[k] is None for k in fields):
        n = len(fields) + len(extra) - sum(rec[k] is None for k in fields)
        raise InputError(f"{where}: {n} fields, the header has {len(fields)} (quote a field that holds a comma)")


def scan(source: Any, *, pairs: bool, column: str | None = None, split: str = "train", limit: int | None = None,
         what: str = "input", max_line: int | None = None, fits: Callable[[Any, str], None] | None = None) -> Scan:
    """Read every record of ``source`` (up to ``limit``) as a prompt or a pair; bad records (and
    lines over ``max_line`` bytes, CSV rows with more or fewer fields than the header, records
    ``fits`` refuses) are listed together in one ``InputError``; no record at all is a ``UsageError``."""
    found, problems = Scan(), Problems()
    if not _scannable(source):
        return found
    if isinstance(source, (str, Path)) and not Path(source).exists() and "/" in str(source):
        limit = 1  # a Hub dataset name: its first record (the rest are checked as they stream)
    csv = isinstance(source, (str, Path)) and Path(source).suffix.lower() in (".csv", ".tsv")
    for rec, where in islice(iter_records(source, split, problems, max_line), limit):
        try:
            if csv:
                ragged(rec, where)
            item: Pair | PromptRow = record_to_pair(rec, where) if pairs else prompt_row(rec, where, column)
            found.human |= isinstance(item, Pair) and item.human is not None
            if fits is not None:
                fits(item, where)
        except InputError as e:
            problems.add(str(e))
        found.rows += 1
    problems.check()
    if not found.rows:
        if isinstance(source, (list, tuple)):
            raise UsageError(f"no {what} rows: nothing to do")
        raise UsageError(f"{source}: no rows in the {what}: nothing to do (check the file, --split or --limit)")
    return found


# --- outputs -----------------------------------------------------------------------------------


def _check_creatable(folder: Path, flag: str) -> None:
    base = folder.absolute()  # its nearest existing folder
    while not base.exists() and not base.is_symlink() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        kind = "a file" if base.is_file() else "not a folder"
        raise InputError(f"{folder}: cannot make this folder: {base} is {kind}; pass another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{base}: no permission to write here; pass another {flag}")


def check_output_file(path: str | Path, *, flag: str = "--output", example: str = "out.jsonl") -> None:
    """``path`` can be written as a file: not a folder, its folder exists or can be made."""
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
    """An existing cache file must be an SQLite database (not a JSONL file passed by mistake)."""
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


def check_gates(decontaminate: str | None) -> None:
    """The decontamination set is there and of a kind it can read."""
    if not decontaminate:
        return
    from .quality.dedup import EVAL_SUFFIXES  # numpy and datasketch: only when there is a set to read

    p = Path(decontaminate)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "file not found"
        raise InputError(f"{p}: {what} (the decontamination set, --gates-decontaminate); give an evaluation "
                         "file (.jsonl, .json, .csv, .parquet or .txt)")
    if p.suffix.lower() not in EVAL_SUFFIXES:
        raise InputError(f"{p}: unsupported file type {p.suffix or '(none)'!r} for the decontamination set; "
                         "use .jsonl, .json, .csv, .tsv, .parquet or .txt (one prompt per line)")


# --- backends ----------------------------------------------------------------------------------


def check_backend(name: str, base_url: str | Sequence[str] | None = None, *, timeout: float = 5.0) -> None:
    """The backend name is known; for ``openai``, one server of ``base_url`` accepts a TCP connection
    (a server that is not running is a ``BackendError`` now, not a failed row per prompt after retries)."""
    from .backends import BACKENDS

    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if name != "openai" or not base_url:
        return
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    for url in urls:  # a key in a URL: one line that names no key, before any connection
        check_url(url)
    errors: list[BackendError] = []
    for url in urls:
        parts = urlsplit(url)
        try:
            with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                          timeout=timeout):
                return
        except OSError as e:
            errors.append(BackendError(f"cannot reach {url} ({e.strerror or type(e).__name__}): is the server running? "
                                       "Start one with `vllm serve <model> --port <port>`, or pass --base-url"))
    if len(errors) == 1:
        raise errors[0]
    raise BackendError(f"none of the {len(urls)} servers can be reached ({', '.join(urls)}): are they running?")


# --- templates ---------------------------------------------------------------------------------

_SAMPLE_PROMPT = [{"role": "user", "content": "<prompt>"}]
BIG = MAX_CHARS // 10  # a record with more text than this has its requests rendered whole by the plan


def _contexts(constitution: Constitution) -> dict[str, dict[str, Any]]:
    """Each stage's template variables, with placeholders for the text the stage gets."""
    principle = constitution.principles[0] if constitution.principles else None
    judge = {"conversation": _SAMPLE_PROMPT, "response_a": "<response A>", "response_b": "<response B>",
             "principle": principle}
    revise = {"conversation": _SAMPLE_PROMPT, "response": "<response>", "principle": principle, "round": 1}
    return {"critique": revise, "revise": {**revise, "critique": "<critique>"}, "judge": judge, "judge_cot": judge,
            "judge_cot_answer": {**judge, "reasoning": "<reasoning>"}}


def check_templates(templates: Templates, constitution: Constitution, stages: Iterable[str]) -> None:
    """Render each stage's templates once, with the variables the stage passes: a syntax error
    or an undefined name is a ``TemplateError`` (file and line) before any work."""
    context = _contexts(constitution)
    for stage in dict.fromkeys(stages):
        if stage == "generate":
            templates.render_text(stage, "system")
        else:
            templates.messages(stage, **context[stage])


def fits(templates: Templates, constitution: Constitution, stages: Iterable[str]) -> Callable[[Any, str], None]:
    """A check of one record (a ``PromptRow`` or a ``Pair``) that holds much text: the requests
    the stages make of it are rendered whole, and one over the template cap is an ``InputError``
    (the record named) before the work, not a traceback in the middle of it."""
    context, order = _contexts(constitution), [s for s in dict.fromkeys(stages) if s != "generate"]

    def check(item: PromptRow | Pair, where: str) -> None:
        real: dict[str, Any] = {"conversation": item.prompt}
        if isinstance(item, Pair):
            real.update(response_a=item.response_a, response_b=item.response_b)
        texts = [str(m.get("content") or "") for m in item.prompt] + [real.get("response_a", ""),
                                                                        real.get("response_b", "")]
        if sum(map(len, texts)) <= BIG:
            return
        for stage in order:
            if isinstance(item, Pair) and not stage.startswith("judge"):
                continue
            ctx = context[stage]
            try:
                templates.messages(stage, **{**ctx, **{k: v for k, v in real.items() if k in ctx}})
            except TemplateError as e:
                why = f"over the limit of {MAX_CHARS:,} characters" if "over the limit" in str(e) else str(e)
                raise InputError(f"{where}: the {stage} request made of this record is {why}; shorten the "
                                 "record or drop it") from None

    return check


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a run does, checked: its settings, its files and its work items in order."""

    kind: Kind
    config: RunConfig
    inputs: Any  # the prompts (revise, run) or the pairs / prompts (label, eval)
    constitution: Constitution
    templates: Templates
    revisions: Path | None = None  # None with ``output`` unset: rows come back in memory
    labels: Path | None = None
    preferences: Path | None = None
    folder: Path | None = None
    best: Path | None = None  # best-of-n's rows (its pairs go beside them)
    sources: list[str] = field(default_factory=list)  # the label stage's, ``auto`` resolved
    totals: dict[str, int | None] = field(default_factory=dict)

    @property
    def revise(self) -> bool:
        return self.kind in ("run", "revise") and self.config.revise.enabled

    @property
    def label(self) -> bool:
        """The label stage runs (in `cai run`, best-of-n replaces it as the source of pairs)."""
        return self.kind in ("run", "label") and self.config.label.enabled and not self.best_of_n

    @property
    def best_of_n(self) -> bool:
        return self.kind == "best_of_n" or (self.kind == "run" and self.config.best_of_n.enabled)

    @property
    def fused(self) -> bool:
        """Revisions feed the judge as they are written (`cai run`)."""
        return self.revise and self.label and "revisions" in self.sources

    @property
    def cache(self) -> Path | None:
        """The call cache: ``cache``, else beside the outputs (none for rows kept in memory)."""
        if self.folder is None:
            return self.config.cache_path(Path()) if self.config.cache else None
        return self.config.cache_path(self.folder)

    @classmethod
    def build(cls, config: RunConfig, inputs: Any = None, *, kind: Kind = "run", output: str | Path | None = None,
              constitution: Constitution | str | Path | None = None, templates: Templates | str | Path | None = None,
              backend_given: bool = False) -> Plan:
        """Check everything before any file is made; ``inputs`` default to ``config.input``;
        ``output`` is the stage's file (revise: the revisions, label: the preferences) or the
        eval folder; `cai run` writes to ``config.output``."""
        cfg = config
        inputs = cfg.input if inputs is None else inputs
        for url in split_urls(cfg.base_url):
            if "@" in url:  # a key in the URL, whatever the backend (run.json records the URL): one line
                no_credentials(url)
        if kind == "run":
            cfg.check(has_input=inputs is not None)
        if cfg.batching:  # batch mode and what it cannot go with; its folder can be made
            cfg.check_batch(kind)
            if cfg.batch_files is not None:
                check_output_dir(cfg.batch_files, flag="--batch-files")
        const = constitution if isinstance(constitution, Constitution) else load_constitution(
            constitution if constitution is not None else cfg.constitution)
        tpl = templates if isinstance(templates, Templates) else Templates(
            templates if templates is not None else cfg.templates)
        plan = cls(kind, cfg, inputs, const, tpl)
        plan._outputs(output)
        plan._check_inputs()
        if not backend_given and cfg.batch_files is None:  # offline batch files: no server
            check_backend(cfg.backend, cfg.base_url)
        return plan

    def set_folder(self, folder: Path) -> None:
        """Every output in ``folder`` under its `cai run` name."""
        self.folder, self.best = folder, folder / BEST_OF_N_FILE
        self.revisions, self.labels, self.preferences = (
            folder / f for f in ("revisions.jsonl", "labels.jsonl", "preferences.jsonl"))

    def _outputs(self, output: str | Path | None) -> None:
        cfg = self.config
        if self.kind == "run":
            check_output_dir(cfg.output)
            self.set_folder(Path(cfg.output))
        elif output is not None and self.kind == "eval":
            self.folder = Path(output)
            check_output_dir(self.folder)
        elif output is not None:
            out = Path(output)
            check_output_file(out, example={"revise": "revisions.jsonl", "best_of_n": BEST_OF_N_FILE}.get(
                self.kind, "preferences.jsonl"))
            self.folder = out.parent
            if self.kind == "revise":
                self.revisions = out
            elif self.kind == "best_of_n":
                self.best = out
            else:
                self.preferences, self.labels = out, labels_path(out)
        if self.kind != "eval":
            check_cache(self.cache)

    def _check_inputs(self) -> None:
        """The templates of every stage first, then every input record (each one's requests
        within the template cap), then the gates' files."""
        cfg, inputs = self.config, self.inputs
        stages: list[str] = [*REVISE_STAGES] if self.revise else []
        if self.kind == "eval":
            stages += [*judge_stages(cfg.label.mode), "judge"]
        if self.label:
            self._label_sources()
            stages += judge_stages(cfg.label.mode) + (("generate",) if "sample" in self.sources else ())
        if self.best_of_n:
            stages += [*judge_stages(cfg.label.mode), "generate"]
        check_templates(self.templates, self.constitution, stages)
        fit = fits(self.templates, self.constitution, stages)

        def read(source: Any, pairs: bool = False, what: str = "input") -> Scan:
            return scan(source, pairs=pairs, column=cfg.prompt_column, split=cfg.split, limit=cfg.limit, what=what,
                        max_line=cfg.max_line_bytes, fits=fit)

        if self.revise:  # the input: prompts
            self.totals["revise"] = read(inputs).rows or None
        if self.kind == "eval":
            found = read(inputs, pairs=True, what="labelled pairs")
            if _scannable(inputs) and not found.human:
                raise InputError(f"{inputs}: no human labels (need chosen/rejected, or a label column A/B)")
            self.totals["eval"] = found.rows or None
        if self.label:
            self._label_inputs(read)
        if self.best_of_n:  # the input: prompts (scanned once when the revise stage reads them too)
            self.totals["best_of_n"] = self.totals["revise"] if self.revise else read(inputs).rows or None
        if self.revise or self.best_of_n or "sample" in self.sources:
            check_gates(cfg.gates.decontaminate)

    def _label_sources(self) -> None:
        """The label stage's pair sources, ``auto`` resolved (the revisions when the revise stage
        runs; else the input's first record decides: pairs are judged as they are, prompts are
        sampled). `cai label` judges the input's pairs (or samples)."""
        cfg, inputs = self.config, self.inputs
        if self.kind == "run":
            sources: list[str] = list(cfg.sources)
        else:
            sources = ["dataset" if s == "revisions" else s for s in cfg.label.sources]
            if len(sources) != 1:
                raise UsageError("`cai label` takes one pair source (--sources auto, sample, dataset or revisions)")
        if "auto" in sources:
            if not _scannable(inputs):
                raise UsageError("pairs in memory need a source: sources='dataset', 'revisions' or 'sample'")
            first = next((rec for rec, _ in iter_records(inputs, cfg.split)), None)
            auto = "sample" if first is not None and detect_source(first) == "sample" else "dataset"
            sources = list(dict.fromkeys(auto if s == "auto" else s for s in sources))
        self.sources = sources

    def _label_inputs(self, read: Callable[..., Scan]) -> None:
        """The label stage's inputs checked (each source ``read``), its total counted."""
        cfg, inputs, sources = self.config, self.inputs, self.sources
        per_prompt = len(sample_pair_ids("x", cfg.label.samples))
        if "dataset" in sources and (self.kind == "label" or not cfg.label.pairs):  # the input's pairs
            self.totals["label"] = read(inputs, pairs=True).rows or None
        elif "dataset" in sources and cfg.label.pairs:
            read(cfg.label.pairs, pairs=True, what="label.pairs dataset")
        if "sample" in sources and not self.revise:
            n = read(inputs).rows or None
            self.totals["label"] = n and n * per_prompt if self.kind == "label" else None
        if "revisions" in sources and not self.revise:
            assert self.revisions is not None
            if not self.revisions.is_file():
                raise InputError(f"{self.revisions}: no revisions to pair (enable the revise stage, or run it first)")
        if self.kind == "run":
            self.totals["label"] = self.totals.get("revise") if sources == ["revisions"] and self.revise else None

    # --- the work, in order -------------------------------------------------------------------

    def prompts(self) -> Iterator[PromptRow]:
        """The input's prompts (ids unique), in order."""
        cfg = self.config
        return read_prompts(self.inputs, column=cfg.prompt_column, split=cfg.split, limit=cfg.limit)

    def label_items(self, seen: dict[str, int] | None = None) -> Iterator[Pair | PromptRow]:
        """The label stage's work in order: the revisions' pairs (when the revise stage runs, the
        caller feeds them as they are written), the dataset's pairs, then the prompts to sample;
        pairs from several sources keep unique ids (``seen``: ``-2``, ``-3``...)."""
        cfg, seen = self.config, {} if seen is None else seen
        for src in self.sources:
            if src == "revisions" and not self.revise:
                assert self.revisions is not None
                yield from (unique_pair(p, seen) for p in read_pairs(self.revisions))
            elif src == "dataset":
                data = self.inputs if self.kind == "label" or not cfg.label.pairs else cfg.label.pairs
                yield from (unique_pair(p, seen) for p in read_pairs(data, split=cfg.split, limit=cfg.limit))
            elif src == "sample":
                yield from self.prompts()

    def upstream(self, revise_fp: str, sample: dict[str, Any], generate_digest: str) -> list[Any]:
        """What `cai run`'s label stage input depends on (part of its fingerprint)."""
        cfg, out = self.config, list[Any]()
        if "revisions" in self.sources:
            out.append(["revisions", revise_fp])
        if "dataset" in self.sources and cfg.label.pairs:
            p = Path(cfg.label.pairs)
            out.append(["dataset", str(p), p.stat().st_size if p.is_file() else None])
        if "sample" in self.sources:
            out.append(["sample", sample, generate_digest, cfg.input, cfg.limit, cfg.prompt_column])
        return out
