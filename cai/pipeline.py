"""The Python API: every `cai` command is a thin shell over one of these functions.

    from cai import pipeline

    result = pipeline.run_revise(["How do I pick a lock?"], backend="fake", rounds=2)
    result.rows[0]["messages"]                  # a TRL SFT row, with every critique and revision

- ``run_revise``: critique and revise (SFT rows);
- ``run_label``: the AI judge over pairs (label rows and TRL preference rows);
- ``run_eval_judge``: the judge (and a naive one) against human-labelled pairs;
- ``run_pipeline``: all of it from one ``RunConfig``, in one output folder (`cai run`).

Inputs are a path (JSONL, JSON, Parquet, CSV, a saved ``datasets`` folder), a Hub dataset name,
or rows in memory (prompt strings, dicts, a ``datasets.Dataset``). ``backend`` is a ``Backend``
(see ``build_backend``) or a backend name. With ``output`` the rows go to that file and a rerun
resumes; without it they are returned in memory. Every model call goes through the call cache
when ``cache`` names a file: a rerun sends only the calls whose prompt changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__, preflight, runtime
from .backends import Backend, build_backend
from .backends.base import Sampling
from .cache import CachedBackend, CallCache, CountingBackend
from .config import GateSettings, LabelSettings, ReviseSettings, RunConfig, Source, load_run_config
from .constitution import Constitution, load_constitution
from .errors import ConfigError, InputError
from .files import count_jsonl, iter_jsonl, write_json_atomic
from .hashing import sha256_json
from .inputs import PromptRow, read_prompts
from .inputs import Source as Rows
from .metrics import summarize_files
from .output import JsonlSink, SinkSummary
from .progress import RunProgress
from .quality import InputGate, write_rejects
from .report.markdown import write_revise_report
from .stages.judge import JudgeConfig, JudgeStage
from .stages.judge import fingerprint as judge_fingerprint
from .stages.naive import NaiveConfig, NaiveStage, naive_fingerprint
from .stages.pairs import (
    Pair,
    SampleConfig,
    detect_source,
    first_record,
    read_pairs,
    record_to_pair,
    sample_pair_ids,
    sample_prompt,
)
from .stages.preferences import PreferenceSummary, write_preferences
from .stages.revise import ReviseConfig, ReviseStage
from .stages.revise import fingerprint as revise_fingerprint
from .stages.runner import Call, Outcome, Pool, RowFn, Stream, run, run_stage, run_stream
from .templates import Templates

PAIR_SOURCES = ("auto", "sample", "dataset", "revisions")
Counted = CachedBackend | CountingBackend


@dataclass
class Calls:
    """Model calls of one function call: sent to the model, served from the cache, failed."""

    sent: int = 0
    cached: int = 0
    errors: int = 0


@dataclass
class StageResult:
    """One stage's outcome. ``rows`` are read from ``path`` on first use (or held in memory
    when no output file was asked for)."""

    summary: SinkSummary
    calls: Calls
    preferences: PreferenceSummary | None = None
    gates: dict[str, int] = field(default_factory=dict)  # "stage.reason" -> rows kept out (rejects.jsonl)
    _rows: list[dict[str, Any]] | None = None

    @property
    def path(self) -> Path:
        return self.summary.path

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = list(iter_jsonl(self.summary.path))
        return self._rows

    @property
    def failures(self) -> list[dict[str, Any]]:
        return list(iter_jsonl(self.summary.failures_path))


@dataclass
class RunResult:
    """What `cai run` did: each stage's summary, the preferences written, the calls, run.json."""

    output: Path
    stages: dict[str, SinkSummary] = field(default_factory=dict)
    preferences: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, int] = field(default_factory=dict)  # "stage.reason" -> rows kept out (rejects.jsonl)
    backend: dict[str, Any] | None = None  # what the backend says of itself: servers, capabilities, retries
    sent: int = 0
    cached: int = 0
    errors: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stages.values())


# --- shared plumbing ---------------------------------------------------------------------------


def _constitution(c: Constitution | str | Path | None) -> Constitution:
    return c if isinstance(c, Constitution) else load_constitution(c)


def _templates(t: Templates | str | Path | None) -> Templates:
    return t if isinstance(t, Templates) else Templates(t)


@contextmanager
def counted(backend: Backend | str, cache: str | Path | None = None) -> Iterator[Counted]:
    """``backend`` (or one built by name) behind the call cache at ``cache`` (or a counter).
    What this builds it closes; a backend passed in stays open for its owner."""
    if isinstance(backend, (CachedBackend, CountingBackend)):
        yield backend
        return
    inner = build_backend(backend) if isinstance(backend, str) else backend
    be: Counted = CachedBackend(inner, CallCache(cache)) if cache else CountingBackend(inner)
    try:
        yield be
    finally:
        if isinstance(be, CachedBackend):
            be.cache.close()
        if isinstance(backend, str):
            runtime.close(inner)


@contextmanager
def _calls(be: Counted) -> Iterator[Calls]:
    """The calls made inside the block (the backend may be shared with other stages)."""
    calls = Calls()
    before = (be.sent, be.hits, be.errors)
    try:
        yield calls
    finally:
        calls.sent, calls.cached, calls.errors = (a - b for a, b in
                                                  zip((be.sent, be.hits, be.errors), before, strict=True))


@contextmanager
def _output(path: str | Path | None, name: str) -> Iterator[tuple[Path, bool]]:
    """The file to write, and whether it is temporary (rows then come back in memory)."""
    if path is not None:
        yield Path(path), False
        return
    with tempfile.TemporaryDirectory(prefix="cai-") as tmp:
        yield Path(tmp) / name, True


DEFAULT_CONCURRENCY = 256


# --- critique and revise -----------------------------------------------------------------------


def run_revise(inputs: Rows, *, backend: Backend | str = "embedded", output: str | Path | None = None,
               constitution: Constitution | str | Path | None = None,
               templates: Templates | str | Path | None = None, settings: ReviseSettings | None = None,
               seed: int = 0, cache: str | Path | None = None, concurrency: int = DEFAULT_CONCURRENCY,
               limit: int | None = None, prompt_column: str | None = None, split: str = "train",
               progress: bool | None = False, gates: GateSettings | None = None, **overrides: Any) -> StageResult:
    """Critique and revise every prompt: one SFT row per prompt, with the full trace.

    ``settings`` (or keyword ``overrides`` of its fields: ``rounds=2``, ``max_tokens=128``...)
    set the stage; ``output`` also gets a readable ``.md`` beside it, and ``rejects.jsonl``
    (the rows the quality ``gates`` keep out of the training data). Each row runs its own chain
    of calls; ``concurrency`` requests are in flight at once.
    """
    rs = ReviseSettings.model_validate({**(settings.model_dump() if settings else {}), **overrides})
    const, tpl, rcfg = _constitution(constitution), _templates(templates), rs.resolve(seed)
    gates = gates or GateSettings.model_validate({})
    preflight.check_revise(inputs, output=output, cache=cache, prompt_column=prompt_column, split=split,
                           constitution=const, templates=tpl, gates=gates)
    gate = InputGate(gates)
    rows = gate(read_prompts(inputs, column=prompt_column, split=split, limit=limit))
    total = count_jsonl(inputs, limit) if isinstance(inputs, (str, Path)) else None
    with counted(backend, cache) as be, _calls(be) as calls, _output(output, "revisions.jsonl") as (path, tmp):
        summary = run_stage(path, revise_fingerprint(be, const, tpl, rcfg), rows,
                            ReviseStage(const, tpl, rcfg, be.model_id), backend=be, title="revise", total=total,
                            concurrency=concurrency, progress=progress)
        result = StageResult(summary, calls)
        result.gates = write_rejects(path.parent, gate.settings, gate.skipped, revisions=path.name)
        if tmp:
            result.rows  # noqa: B018 - read before the temporary folder goes
        else:
            write_revise_report(path)
    return result


# --- AI-judge labelling ------------------------------------------------------------------------


def labels_path(preferences: Path) -> Path:
    """Where every judged pair goes: ``labels.jsonl`` beside ``preferences.jsonl``."""
    if preferences.name == "preferences.jsonl":
        return preferences.with_name("labels.jsonl")
    return preferences.with_name(preferences.name.removesuffix(".jsonl") + ".labels.jsonl")


@dataclass
class LabelStage:
    """The label stage's row function: a pair is judged; a prompt (the `sample` source) gets
    ``sample.n`` answers from the policy first, and every two of them are judged as a pair."""

    judge: JudgeStage
    sample: SampleConfig
    system: str | None = None
    policy: Pool | None = None  # the policy's requests, when it is another backend than the judge's

    def ids(self, item: Pair | PromptRow) -> list[str]:
        return sample_pair_ids(item.id, self.sample.n) if isinstance(item, PromptRow) else [item.id]

    async def __call__(self, item: Pair | PromptRow, call: Call) -> list[Outcome]:
        if isinstance(item, Pair):
            return await self.judge(item, call)
        policy = Call(self.policy, call.bar) if self.policy is not None else call
        pairs = await sample_prompt(item, policy, self.sample, self.system)
        done = await asyncio.gather(*(self.judge(p, call) for p in pairs))
        return [o for outs in done for o in outs]


def run_label(inputs: Rows, *, backend: Backend | str = "embedded", output: str | Path | None = None,
              pairs: str = "auto", constitution: Constitution | str | Path | None = None,
              templates: Templates | str | Path | None = None, settings: LabelSettings | None = None,
              seed: int = 0, max_tokens: int = 256, policy: Backend | None = None,
              cache: str | Path | None = None, concurrency: int = DEFAULT_CONCURRENCY,
              limit: int | None = None, prompt_column: str | None = None, split: str = "train",
              progress: bool | None = False, gates: GateSettings | None = None, **overrides: Any) -> StageResult:
    """Judge pairs and write TRL preference rows to ``output`` (every judged pair, ties too, to
    ``labels.jsonl`` beside it). ``pairs``: ``dataset`` (existing pairs), ``revisions``
    (`cai revise` rows: initial vs revised), ``sample`` (``settings.samples`` answers per
    prompt from ``policy``, default the judge's backend), or ``auto`` (by the first row)."""
    ls = LabelSettings.model_validate({**(settings.model_dump() if settings else {}), **overrides})
    const, tpl, jcfg = _constitution(constitution), _templates(templates), ls.resolve(seed)
    preflight.check_label(inputs, output=output, cache=cache, pairs=pairs, mode=ls.mode,
                          prompt_column=prompt_column, split=split, constitution=const, templates=tpl)
    if pairs == "auto":
        pairs = detect_source(first_record(inputs, split))
    if pairs not in PAIR_SOURCES[1:]:
        raise InputError(f"unknown --pairs {pairs!r} ({', '.join(PAIR_SOURCES)})")
    with counted(backend, cache) as be, _calls(be) as calls, _output(output, "preferences.jsonl") as (prefs, tmp):
        fp = judge_fingerprint(be, const, tpl, jcfg)
        labels = labels_path(prefs)
        scfg = ls.sample_config(seed, max_tokens)
        items: Iterable[Pair | PromptRow]
        with counted(policy, cache) if policy is not None else _same(be) as pol, _calls(pol) as pcalls:
            n = count_jsonl(inputs, limit) if isinstance(inputs, (str, Path)) else None
            if pairs == "sample":
                fp = sha256_json([fp, pol.model_id, scfg.to_dict(), tpl.digest(("generate",))])
                items = read_prompts(inputs, column=prompt_column, split=split, limit=limit)
                n = None if n is None else n * len(sample_pair_ids("x", ls.samples))
            else:
                items = read_pairs(inputs, split=split, limit=limit)
            judge = JudgeStage(const, tpl, jcfg, be.model_id)

            async def go(pool: Pool) -> SinkSummary:
                stage = LabelStage(judge, scfg, tpl.render_text("generate", "system"),
                                   Pool(pol, concurrency) if pol is not be else None)
                with JsonlSink(labels, fp) as sink:
                    return await run_stream(Stream[Pair | PromptRow](sink, items, stage, "label", n, ids=stage.ids,
                                                   progress=progress), pool)

            summary = run(go, be, concurrency)
        if pol is not be:
            calls.sent, calls.cached = calls.sent + pcalls.sent, calls.cached + pcalls.cached
            calls.errors += pcalls.errors
        gs = gates or GateSettings.model_validate({})
        result = StageResult(summary, calls, write_preferences(labels, prefs, keep_ties=ls.keep_ties,
                                                               drop=gs.dropping() & {"truncated"},
                                                               debias_length=ls.debias_length))
        result.gates = write_rejects(prefs.parent, gs, revisions="", labels=labels.name)
        if tmp:
            result._rows = list(iter_jsonl(prefs))
    return result


@contextmanager
def _same(be: Counted) -> Iterator[Counted]:
    yield be


# --- the judge against people ------------------------------------------------------------------


@dataclass
class EvalResult:
    """Each judge's figures (``cai.metrics.summarize``) and its settings."""

    results: dict[str, dict[str, Any]]
    judge: dict[str, Any]
    naive: dict[str, Any] | None
    model: str


def run_eval_judge(file: Rows, *, backend: Backend | str = "embedded", output_dir: str | Path | None = None,
                   constitution: Constitution | str | Path | None = None,
                   templates: Templates | str | Path | None = None, settings: LabelSettings | None = None,
                   seed: int = 0, naive: bool = True, naive_max_tokens: int = 12,
                   concurrency: int = DEFAULT_CONCURRENCY, limit: int | None = None, split: str = "train",
                   progress: bool | None = False, **overrides: Any) -> EvalResult:
    """Relabel human-labelled pairs with the judge (and, with ``naive``, a judge that parses a
    generated letter) and measure each against the human labels. ``output_dir`` keeps the
    judged rows (``judge.jsonl``, ``naive.jsonl``) so that a rerun resumes."""
    ls = LabelSettings.model_validate({**(settings.model_dump() if settings else {}), **overrides})
    const, tpl, jcfg = _constitution(constitution), _templates(templates), ls.resolve(seed)
    ncfg = NaiveConfig(principles=ls.principles, seed=seed, tie_threshold=ls.tie_threshold,
                       sampling=Sampling(max_tokens=naive_max_tokens, seed=seed))
    preflight.check_eval_judge(file, output_dir=output_dir, split=split, mode=ls.mode, constitution=const,
                               templates=tpl)
    if not any(p.human for p in read_pairs(file, split=split, limit=limit)):
        raise InputError(f"{file}: no human labels (need chosen/rejected, or a label column A/B)")
    total = count_jsonl(file, limit) if isinstance(file, (str, Path)) else None
    results: dict[str, dict[str, Any]] = {}
    with counted(backend) as be, (_keep(output_dir) if output_dir else tempfile.TemporaryDirectory(
            prefix="cai-eval-")) as folder:
        judges: list[tuple[str, str, str, RowFn[Pair]]] = [
            (f"{jcfg.mode} judge" + ("" if jcfg.both_orders else " (one order)"), "judge.jsonl",
             judge_fingerprint(be, const, tpl, jcfg), JudgeStage(const, tpl, jcfg, be.model_id))]
        if naive:
            judges.append(("naive judge", "naive.jsonl", naive_fingerprint(be, const, tpl, ncfg),
                           NaiveStage(const, tpl, ncfg, be.model_id)))
        for name, fname, fp, stage in judges:
            t0 = time.monotonic()
            s = run_stage(Path(folder) / fname, fp, read_pairs(file, split=split, limit=limit), stage, backend=be,
                          title=name, total=total, concurrency=concurrency, progress=progress)
            results[name] = {**summarize_files(s.path, s.failures_path), "wall_s": time.monotonic() - t0,
                             "resumed": s.resumed}
    return EvalResult(results, jcfg.to_dict(), ncfg.to_dict() if naive else None, be.model_id)


@contextmanager
def _keep(folder: str | Path) -> Iterator[str]:
    yield str(folder)


# --- the whole pipeline ------------------------------------------------------------------------


def run_pipeline(cfg: RunConfig | str | Path, backend: Backend | None = None,
                 constitution: Constitution | None = None) -> RunResult:
    """Run (or resume) every enabled stage of a run config (a ``RunConfig`` or a YAML path) in
    ``cfg.output``, with ``run.json`` written last. Revise and label run side by side: a row's
    judge calls start as soon as its revision is written, in the same pool of requests.
    ``backend`` replaces the configured one (tests, dry runs)."""
    t0 = time.time()
    cfg = (load_run_config(cfg) if not isinstance(cfg, RunConfig) else cfg).check()
    const = constitution or load_constitution(cfg.constitution)
    tpl = Templates(cfg.templates)
    preflight.check_run(cfg, constitution=const, templates=tpl)  # before any file is made
    if backend is None:
        preflight.check_backend(cfg.backend, cfg.base_url)
    out = cfg.output
    rcfg, jcfg = cfg.revise.resolve(cfg.seed), cfg.label.resolve(cfg.seed)
    # The backend first: an unprepared model or an unreachable server leaves no run folder.
    inner = backend or build_backend(cfg.backend, cfg.model, **cfg.backend_options())
    res = RunResult(output=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        history = read_history(out / "run.json")
        # Until the run ends, run.json says so: `cai export` refuses a folder between two stages.
        write_json_atomic(out / "run.json", {"cai_version": __version__, "status": "running", "history": history})
        gate = InputGate(cfg.gates)
        with counted(inner, cfg.cache_path()) as be:
            res.stages = run(lambda pool: _run_streams(cfg, be, pool, const, tpl, rcfg, jcfg, gate), be,
                             cfg.concurrency)
            res.sent, res.cached, res.errors = be.sent, be.hits, be.errors
            model_id = be.model_id
            res.backend = describe(inner)
    finally:
        if backend is None:
            runtime.close(inner)
    return finish_run(cfg, const, tpl, res, model_id, t0, history, gate.skipped)


def finish_run(cfg: RunConfig, const: Constitution, tpl: Templates, res: RunResult, model_id: str, t0: float,
               history: list[dict[str, Any]], skipped: Iterable[dict[str, Any]] = (),
               extra: dict[str, Any] | None = None) -> RunResult:
    """The end of every `cai run` (local or on Ray): revisions.md, preferences.jsonl, the quality
    gates' rejects.jsonl, and run.json with this run appended to its history."""
    out = cfg.output
    if "revise" in res.stages:
        write_revise_report(out / "revisions.jsonl")
    if cfg.label.enabled:
        prefs = write_preferences(out / "labels.jsonl", out / "preferences.jsonl", keep_ties=cfg.label.keep_ties,
                                  drop=cfg.gates.dropping() & {"truncated"}, debias_length=cfg.label.debias_length)
        res.preferences = {"written": prefs.written, "ties": prefs.ties, "abstentions": prefs.abstentions,
                           "judgements": prefs.judgements, "position_inconsistent": prefs.inconsistent,
                           "gated": prefs.gated, "judged_by": prefs.modes}
    res.gates = write_rejects(out, cfg.gates, skipped)
    res.manifest = _manifest(cfg, const, tpl, cfg.revise.resolve(cfg.seed), cfg.label.resolve(cfg.seed), res,
                             model_id, time.time() - t0) | (extra or {})
    res.manifest["history"] = [*history, {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "elapsed_s": res.manifest["elapsed_s"],
        "calls": res.manifest["calls"],
        "counts": {k: {f: v[f] for f in ("written", "resumed", "failed", "dropped")}
                   for k, v in res.manifest["counts"].items() if k != "preferences"}}]
    write_json_atomic(out / "run.json", res.manifest)
    return res


def describe(backend: Backend) -> dict[str, Any] | None:
    """What a backend says of itself (a server client: the server kind, its capabilities, retries,
    and per server the calls answered and the time out of rotation), for run.json."""
    d = getattr(backend, "describe", None)
    return d() if callable(d) else None


def read_history(manifest: Path) -> list[dict[str, Any]]:
    """The runs recorded in an earlier run.json of this folder (oldest first)."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    history = data.get("history") if isinstance(data, dict) else None
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


async def _run_streams(cfg: RunConfig, be: Counted, pool: Pool, const: Constitution, tpl: Templates,
                       rcfg: ReviseConfig, jcfg: JudgeConfig, gate: InputGate) -> dict[str, SinkSummary]:
    """`cai run`'s stages as two streams in one pool: revisions feed the judge as they are written."""
    out, sources = cfg.output, cfg.sources
    revisions, labels = out / "revisions.jsonl", out / "labels.jsonl"
    rfp = revise_fingerprint(be, const, tpl, rcfg)
    bars = RunProgress(enabled=cfg.progress)
    total = count_jsonl(cfg.input, cfg.limit) if cfg.input else None
    fused = cfg.revise.enabled and cfg.label.enabled and "revisions" in sources
    done: dict[str, SinkSummary] = {}
    with contextlib.ExitStack() as files:
        queue: asyncio.Queue[Pair | None] = asyncio.Queue()
        jobs: list[Awaitable[None]] = []
        if cfg.revise.enabled:
            assert cfg.input is not None  # cfg.check()
            rsink = files.enter_context(JsonlSink(revisions, rfp))

            def written(row: PromptRow, lines: list[int]) -> None:
                if fused and lines:
                    queue.put_nowait(record_to_pair(rsink.read(row.id), f"{revisions}:{lines[0]}"))

            rows = gate(read_prompts(cfg.input, column=cfg.prompt_column, split=cfg.split, limit=cfg.limit))
            stream = Stream(rsink, rows, ReviseStage(const, tpl, rcfg, be.model_id), "revise", total,
                            written=written, prune=True, progress=cfg.progress)

            async def revise() -> None:
                try:
                    done["revise"] = await run_stream(stream, pool, group=bars)
                finally:
                    queue.put_nowait(None)

            jobs.append(revise())
        if cfg.label.enabled:
            scfg = cfg.label.sample_config(cfg.seed, cfg.revise.max_tokens)
            fp = sha256_json([judge_fingerprint(be, const, tpl, jcfg), label_upstream(cfg, rfp, scfg, tpl)])
            lsink = files.enter_context(JsonlSink(labels, fp))
            stage = LabelStage(JudgeStage(const, tpl, jcfg, be.model_id), scfg, tpl.render_text("generate", "system"))

            async def items() -> AsyncIterator[Pair | PromptRow]:
                if "revisions" in sources:
                    if fused:
                        while (pair := await queue.get()) is not None:
                            yield pair
                    elif not revisions.exists():
                        raise InputError(f"{revisions}: no revisions to pair (enable the revise stage)")
                    else:
                        for p in read_pairs(revisions):
                            yield p
                if "dataset" in sources and cfg.label.pairs:
                    for p in read_pairs(cfg.label.pairs, split=cfg.split, limit=cfg.limit):
                        yield p
                if "sample" in sources and cfg.input:
                    for r in read_prompts(cfg.input, column=cfg.prompt_column, split=cfg.split, limit=cfg.limit):
                        yield r

            ltotal = total if sources == ["revisions"] else None
            lstream = Stream[Pair | PromptRow](lsink, _unique(items()), stage, "label", ltotal, ids=stage.ids,
                                               prune=True, progress=cfg.progress)

            async def label() -> None:
                done["label"] = await run_stream(lstream, pool, group=bars)

            jobs.append(label())
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(job)  # type: ignore[arg-type]
    return {name: done[name] for name in ("revise", "label") if name in done}


async def _unique(items: AsyncIterator[Pair | PromptRow]) -> AsyncIterator[Pair | PromptRow]:
    """Pairs from several sources in one stream: a repeated id gets ``-2``, ``-3``..."""
    seen: dict[str, int] = {}
    async for item in items:
        if isinstance(item, Pair):
            n = seen[item.id] = seen.get(item.id, 0) + 1
            if n > 1:
                item = replace(item, id=f"{item.id}-{n}")
        yield item


def label_upstream(cfg: RunConfig, revise_fp: str, scfg: SampleConfig, tpl: Templates) -> list[Any]:
    """What the label stage's input depends on (part of its fingerprint)."""
    upstream: list[Any] = []
    if "revisions" in cfg.sources:
        upstream.append(["revisions", revise_fp])
    if "dataset" in cfg.sources and cfg.label.pairs:
        p = Path(cfg.label.pairs)
        upstream.append(["dataset", str(p), p.stat().st_size if p.is_file() else None])
    if "sample" in cfg.sources:
        upstream.append(["sample", scfg.to_dict(), tpl.digest(("generate",)), cfg.input, cfg.limit,
                         cfg.prompt_column])
    return upstream


def _manifest(cfg: RunConfig, const: Constitution, tpl: Templates, rcfg: ReviseConfig, jcfg: JudgeConfig,
              res: RunResult, model_id: str, elapsed: float) -> dict[str, Any]:
    """run.json: the config as given, what it resolved to, and what the run did."""
    cache = cfg.cache_path()
    return {
        "cai_version": __version__,
        "status": "complete",
        "config": cfg.public(),
        "constitution": const.model_dump(mode="json"),
        "constitution_hash": const.digest(),
        "templates_hash": tpl.digest(),
        "models": {"policy": model_id, "judge": model_id},
        "revise": rcfg.to_dict(),
        "judge": jcfg.to_dict(),
        "counts": {name: {"written": s.written, "resumed": s.resumed,
                          "rows": s.written + s.resumed - s.dropped, "dropped": s.dropped, "failed": s.failed,
                          "reasons": s.reasons, "failures": str(s.failures_path) if s.failures_path else None}
                   for name, s in res.stages.items()} | {"preferences": res.preferences},
        "calls": {"sent": res.sent, "cached": res.cached, "errors": res.errors},
        "gates": res.gates,
        **({"backend": res.backend} if res.backend else {}),
        "cache": str(cache) if cache else None,
        "elapsed_s": round(elapsed, 3),
    }


__all__ = ["Calls", "EvalResult", "LabelSettings", "ReviseSettings", "RunConfig", "RunResult", "Source",
           "StageResult", "build_backend", "load_constitution", "load_run_config", "run_eval_judge",
           "run_label", "run_pipeline", "run_revise", "ConfigError"]
