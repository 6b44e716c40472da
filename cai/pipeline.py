"""The Python API: every `cai` command is a thin shell over one of these functions.

    from cai import pipeline

    result = pipeline.run_revise(["How do I pick a lock?"], backend="fake", rounds=2)
    result.rows[0]["messages"]                  # a TRL SFT row, with every critique and revision

- ``run_revise``: critique and revise (SFT rows): `cai run` with the label stage off;
- ``run_label``: the AI judge over pairs (label rows and TRL preference rows): `cai run`
  with the revise stage off;
- ``run_eval_judge``: the judge (and a naive one) against human-labelled pairs;
- ``run_best_of_n``: n answers per prompt ranked by the judge: the best (SFT), best-vs-worst (pairs);
- ``run_pipeline``: all of it from one ``RunConfig``, in one output folder (`cai run`).

Settings are the settings tree's (``RunConfig``): pass ``config=`` and/or its leaves as keywords
(``revise_rounds=2``, ``limit=4``; in ``run_revise`` also ``rounds=2``, in ``run_label`` and
``run_eval_judge`` ``principles=4``). Inputs are a path (JSONL, JSON, Parquet, CSV, a saved
``datasets`` folder), a Hub dataset name, or rows in memory (prompt strings, dicts, a
``datasets.Dataset``). ``backend`` is a ``Backend`` (see ``build_backend``) or a backend name.
With ``output`` the rows go to that file (and the call cache beside it) and a rerun resumes;
without it they are returned in memory. Each function builds one ``Plan`` (every check before
the first call) and runs it through one code path (``execute``).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import lock, runtime
from . import manifest as run_json
from .backends import Backend, build_backend, build_batch_backend
from .backends.base import Sampling
from .cache import Counted, counted, request_key, served
from .config import LabelSettings, NaiveSettings, ReviseSettings, RunConfig, Source, configure, load_run_config
from .constitution import Constitution, load_constitution
from .errors import ConfigError
from .eval.naive import NaiveConfig, NaiveStage, naive_fingerprint
from .files import iter_jsonl, write_json_atomic
from .hashing import sha256_json
from .inputs import PromptRow
from .inputs import Source as Rows
from .manifest import Calls, RunResult, constitution_record, describe, manifest, mark_running
from .metrics import summarize_files
from .output import JsonlSink, SinkSummary
from .plan import Kind, Plan, labels_path, unique_pair
from .progress import RunProgress
from .quality.gates import InputGate, write_rejects
from .report.markdown import write_revise_report
from .stages import best_of_n
from .stages.judge import JudgeConfig, JudgeStage
from .stages.judge import fingerprint as judge_fingerprint
from .stages.pairs import Pair, SampleConfig, read_pairs, record_to_pair, sample_pair_ids, sample_prompt
from .stages.preferences import PreferenceSummary, write_preferences
from .stages.revise import ReviseConfig, ReviseStage
from .stages.revise import fingerprint as revise_fingerprint
from .stages.runner import Call, Outcome, Pool, RowFn, Stream, run, run_stage, run_stream
from .templates import Templates


@dataclass
class StageResult:
    """One stage's outcome. ``rows`` are read from ``path`` on first use (or held in memory
    when no output file was asked for)."""

    summary: SinkSummary
    calls: Calls
    preferences: PreferenceSummary | None = None
    gates: dict[str, int] = field(default_factory=dict)  # "stage.reason" -> rows kept out (rejects.jsonl)
    backend: dict[str, Any] | None = None  # what the backend says of itself (manifest.describe)
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


# --- the API -----------------------------------------------------------------------------------


def run_revise(inputs: Rows, *, backend: Backend | str | None = None, output: str | Path | None = None,
               constitution: Constitution | str | Path | None = None, templates: Templates | str | Path | None = None,
               config: RunConfig | None = None, **settings: Any) -> StageResult:
    """Critique and revise every prompt: one SFT row per prompt, with the full trace. ``output``
    also gets a readable ``.md`` beside it, and ``rejects.jsonl`` (the rows the quality gates
    keep out of the training data)."""
    return _stage("revise", inputs, backend, output, constitution, templates, config, settings)


def run_label(inputs: Rows, *, backend: Backend | str | None = None, output: str | Path | None = None,
              constitution: Constitution | str | Path | None = None, templates: Templates | str | Path | None = None,
              config: RunConfig | None = None, **settings: Any) -> StageResult:
    """Judge pairs and write TRL preference rows to ``output`` (every judged pair, ties too, to
    ``labels.jsonl`` beside it). ``sources``: ``dataset`` or ``revisions`` (pairs as they are),
    ``sample`` (``samples`` answers per prompt from the policy), or ``auto`` (by the first row)."""
    return _stage("label", inputs, backend, output, constitution, templates, config, settings)


def run_pipeline(cfg: RunConfig | str | Path, backend: Backend | None = None,
                 constitution: Constitution | None = None) -> RunResult:
    """Run (or resume) every enabled stage of a run config (a ``RunConfig`` or a YAML path) in
    ``cfg.output``, with ``run.json`` written last. Revise and label run side by side: a row's
    judge calls start as soon as its revision is written, in the same pool of requests. With
    ``best_of_n.enabled``, best-of-n replaces the label stage as the source of pairs (beside the
    revise stage, on the same prompts, in the same pool).
    ``backend`` replaces the configured one (tests, dry runs)."""
    cfg = load_run_config(cfg) if not isinstance(cfg, RunConfig) else cfg
    return execute(Plan.build(cfg, constitution=constitution, backend_given=backend is not None), backend)


def run_best_of_n(inputs: Rows, *, backend: Backend | str | None = None, output: str | Path | None = None,
                  constitution: Constitution | str | Path | None = None,
                  templates: Templates | str | Path | None = None, config: RunConfig | None = None,
                  **settings: Any) -> StageResult:
    """Best-of-n (`cai best-of-n`): ``n`` answers per prompt ranked by the judge (``label.*``); the
    best as SFT rows in ``output``, best-vs-worst as TRL preference rows beside it
    (``best_of_n.pairs.jsonl``; ``best_of_n.to_pair(row)`` for rows in memory)."""
    return _stage("best_of_n", inputs, backend, output, constitution, templates, config, settings)


def _plan(kind: Kind, inputs: Rows, backend: Backend | str | None, output: str | Path | None,
          constitution: Constitution | str | Path | None, templates: Templates | str | Path | None,
          config: RunConfig | None, settings: dict[str, Any]) -> tuple[Plan, Backend | None]:
    """The plan of a stage command, and the backend given (a backend name is a setting)."""
    if isinstance(backend, str):  # a name: the tree's backend, built with the tree's options
        settings, backend = {**settings, "backend": backend}, None
    cfg = configure(config, "label" if kind == "eval" else kind, **settings)
    return Plan.build(cfg, inputs, kind=kind, output=output, constitution=constitution, templates=templates,
                      backend_given=backend is not None), backend


def _stage(kind: Kind, *args: Any) -> StageResult:
    res = execute(*_plan(kind, *args))
    return StageResult(res.stages[kind], res.calls, res.written, res.gates, res.backend, res.rows)


# --- one code path for every run ---------------------------------------------------------------


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
        policy = Call(self.policy, call.bar, stage=call.stage) if self.policy is not None else call
        pairs = await sample_prompt(item, policy, self.sample, self.system)
        done = await asyncio.gather(*(self.judge(p, call) for p in pairs))
        return [o for outs in done for o in outs]


@contextmanager
def _opened(plan: Plan, backend: Backend | None) -> Iterator[tuple[Backend, bool]]:
    """The backend (``backend``, else the plan's, closed at the end) and whether the rows come back
    in memory: then in a temporary folder; else the output folder, held by its one writer."""
    cfg = plan.config
    # The backend first: an unprepared model or an unreachable server leaves no output folder.
    inner = backend or (build_batch_backend(cfg.model, request_key, folder=plan.folder, **cfg.batch_options())
                        if cfg.batching else build_backend(cfg.backend, cfg.model, **cfg.backend_options()))
    try:
        with contextlib.ExitStack() as held:
            memory = plan.folder is None
            if plan.folder is None:
                plan.set_folder(Path(held.enter_context(tempfile.TemporaryDirectory(prefix="cai-"))))
            else:  # one writer per folder, before anything is written there
                held.enter_context(lock.writer(plan.folder))
            yield inner, memory
    finally:
        if backend is None:
            runtime.close(inner)


@contextmanager
def _policy(plan: Plan, be: Counted, cache: Path | None) -> Iterator[Counted]:
    """The backend that answers for the `sample` source and best-of-n: the judge's, or ``label.policy_model``'s."""
    cfg = plan.config
    if not ((plan.label and "sample" in plan.sources or plan.best_of_n) and cfg.label.policy_model):
        yield be
        return
    with runtime.closing(build_backend(cfg.backend, cfg.label.policy_model, **cfg.backend_options())) as inner, \
            counted(inner, cache) as pol:
        yield pol


def execute(plan: Plan, backend: Backend | None = None) -> RunResult:
    """Run a checked plan: its streams in one pool of requests, then the files made at the end
    (revisions.md, preferences.jsonl, rejects.jsonl; run.json for `cai run`)."""
    t0, cfg, cache = time.time(), plan.config, plan.cache
    # batch mode: every row in flight (the waves are the steps of all rows' chains)
    rows = max(cfg.concurrency, cfg.batch_max_requests) if cfg.batching else cfg.concurrency
    gate = InputGate(cfg.gates)
    with _opened(plan, backend) as (inner, memory):
        assert plan.folder is not None
        if (bind := getattr(inner, "bind_folder", None)) is not None:
            bind(plan.folder)  # batch mode: batches.sqlite in the run folder
        res, history = RunResult(output=plan.folder), []
        if plan.kind == "run":
            history = mark_running(plan.folder / "run.json")
        with counted(inner, cache) as be, _policy(plan, be, cache) as pol:
            if plan.kind == "run":  # the served tokens go to the cache's ledger as they come
                be.run_id = pol.run_id = run_json.running_id(plan.folder / "run.json")
            res.stages = run(lambda pool: _streams(plan, be, pol, pool, gate), be, rows)
            res.sent, res.cached, res.errors = (sum(x) for x in zip(
                *{id(b): (b.sent, b.hits, b.errors) for b in (be, pol)}.values(), strict=True))
            res.usage = served(be, pol)
            model_id = be.model_id
            res.backend = describe(inner)
            models = {"policy": model_id if plan.revise else pol.model_id, "judge": model_id} | (
                {"samples": pol.model_id} if pol is not be else {})  # label.policy_model's answers
        _finish(plan, res, gate, memory)
        if plan.kind == "run":
            finish_run(plan, res, model_id, t0, history, {"models": models} | (
                {"best_of_n": best_of_n.BestOfNConfig.of(cfg).to_dict()} if plan.best_of_n else {}))
    return res


async def _streams(plan: Plan, be: Counted, pol: Counted, pool: Pool, gate: InputGate) -> dict[str, SinkSummary]:
    """The plan's stages as streams in one pool: revisions feed the judge as they are written."""
    cfg, const, tpl = plan.config, plan.constitution, plan.templates
    rcfg = ReviseConfig.of(cfg.revise, cfg.seed)
    rfp = revise_fingerprint(be, const, tpl, rcfg)
    bars, prune = RunProgress(enabled=cfg.progress), plan.kind == "run" and cfg.prune
    if (watch := getattr(getattr(be, "inner", None), "watch", None)) is not None:
        watch(bars.batch)  # batch mode: each batch's state on the progress display
    done: dict[str, SinkSummary] = {}
    me, sinks = asyncio.current_task(), list[JsonlSink]()

    def stop(_: OSError) -> None:  # a full disk: the run stops, finish() raises the error
        if me is not None:
            me.cancel()

    def sink(path: Path, fp: str) -> JsonlSink:
        s = files.enter_context(JsonlSink(path, fp))
        s.on_error = stop
        sinks.append(s)
        return s

    async def job(name: str, stream: Stream[Any], seen: set[str], then: Callable[[], object] = lambda: None) -> None:
        """Run one stage's stream, then count what an earlier run kept (``kept``)."""
        try:
            done[name] = kept(await run_stream(stream, pool, group=bars), stream.sink, seen)
        finally:
            then()

    with contextlib.ExitStack() as files:
        queue: asyncio.Queue[Pair | None] = asyncio.Queue()
        jobs: list[Coroutine[Any, Any, None]] = []
        if plan.revise:
            assert plan.revisions is not None
            rsink, rseen = sink(plan.revisions, rfp), set[str]()

            def written(row: PromptRow, lines: list[int]) -> None:
                if plan.fused and lines and rsink.error is None:
                    queue.put_nowait(record_to_pair(rsink.read(row.id), f"{plan.revisions}:{lines[0]}"))
                elif plan.fused:  # a failed revision: nothing to judge
                    bars.drop("label", 1)

            def skipped(rows: int) -> None:  # rows the gate skips leave the totals (the bars end at N/N)
                for title in ("revise", "label") if plan.fused else ("revise",):
                    bars.drop(title, rows)

            prompts = noting(gate(plan.prompts(), skipped), rseen)
            stream = Stream(rsink, prompts, ReviseStage(const, tpl, rcfg, be.model_id), "revise",
                            plan.totals.get("revise"), written=written, prune=prune, progress=cfg.progress)
            jobs.append(job("revise", stream, rseen, lambda: queue.put_nowait(None)))
        if plan.label:
            assert plan.labels is not None
            jcfg, scfg = JudgeConfig.of(cfg.label, cfg.seed), SampleConfig.of(cfg)
            lsink, lseen = sink(plan.labels, label_fingerprint(plan, be, pol.model_id, rfp)), set[str]()
            stage = LabelStage(JudgeStage(const, tpl, jcfg, be.model_id), scfg, tpl.render_text("generate", "system"),
                               Pool(pol, cfg.concurrency) if pol is not be else None)

            async def items() -> AsyncIterator[Pair | PromptRow]:
                seen: dict[str, int] = {}
                if plan.fused:
                    while (pair := await queue.get()) is not None:
                        lseen.add((pair := unique_pair(pair, seen)).id)
                        yield pair
                for item in plan.label_items(seen):
                    lseen.update(stage.ids(item))
                    yield item

            lstream = Stream[Pair | PromptRow](lsink, items(), stage, "label", plan.totals.get("label"),
                                               ids=stage.ids, prune=prune, progress=cfg.progress)
            jobs.append(job("label", lstream, lseen))
        if plan.best_of_n:
            assert plan.best is not None
            bgate = InputGate(cfg.gates) if plan.revise else gate  # the revise stage's gate has seen the prompts
            bfp = best_of_n.fingerprint(be, const, tpl, JudgeConfig.of(cfg.label, cfg.seed),
                                        best_of_n.BestOfNConfig.of(cfg), pol.model_id)
            bsink, bseen = sink(plan.best, bfp), set[str]()
            bprompts = noting(bgate(plan.prompts(), lambda n: bars.drop("best-of-n", n)), bseen)
            bstream = best_of_n.make_stream(cfg, const, tpl, bsink, be, bprompts, total=plan.totals.get("best_of_n"),
                                            policy=Pool(pol, cfg.concurrency) if pol is not be else None, prune=prune)
            jobs.append(job("best_of_n", bstream, bseen))
        try:
            async with asyncio.TaskGroup() as group:
                for coro in jobs:
                    group.create_task(coro)
        except asyncio.CancelledError:
            if error := next((s.error for s in sinks if s.error is not None), None):
                raise error from None  # one line (the CLI's), not a cancelled run
            raise
        except BaseExceptionGroup as group_error:  # a stage's error mid-run (a request over the template
            raise group_error.exceptions[0] from None  # cap): its own one line, not a group's traceback
    return {name: done[name] for name in ("revise", "label", "best_of_n") if name in done}


def noting(rows: Iterable[PromptRow], seen: set[str]) -> Iterator[PromptRow]:
    """``rows``, each id noted in ``seen`` (the ids this input lists)."""
    for row in rows:
        seen.add(row.id)
        yield row


def kept(summary: SinkSummary, sink: JsonlSink, seen: set[str]) -> SinkSummary:
    """Count the rows of an earlier run this input (``seen``) no longer lists (kept when not pruned)."""
    summary.kept = 0 if summary.dropped else len(sink.done.keys() - seen)
    return summary


def label_fingerprint(plan: Plan, judge: Backend, policy_id: str, revise_fp: str) -> str:
    """The label stage's resume fingerprint: the judge's, and what its pairs come from."""
    cfg, tpl = plan.config, plan.templates
    fp = judge_fingerprint(judge, plan.constitution, tpl, JudgeConfig.of(cfg.label, cfg.seed))
    sample = SampleConfig.of(cfg).to_dict()
    if plan.kind == "run":
        return sha256_json([fp, plan.upstream(revise_fp, sample, tpl.digest(("generate",)))])
    if "sample" in plan.sources:
        return sha256_json([fp, policy_id, sample, tpl.digest(("generate",))])
    return fp


def _finish(plan: Plan, res: RunResult, gate: InputGate, memory: bool) -> None:
    """The files a stage command makes at its end (`cai run`'s: ``finish_run``)."""
    cfg = plan.config
    if plan.kind == "revise":
        assert plan.revisions is not None and plan.folder is not None
        res.gates = write_rejects(plan.folder, cfg.gates, gate.skipped, revisions=plan.revisions.name)
        if memory:
            res.rows = list(iter_jsonl(plan.revisions))
        else:
            write_revise_report(plan.revisions)
    elif plan.kind == "label":
        assert plan.labels is not None and plan.preferences is not None and plan.folder is not None
        res.written = write_preferences(plan.labels, plan.preferences, keep_ties=cfg.label.keep_ties,
                                        drop=cfg.gates.dropping() & {"truncated"},
                                        debias_length=cfg.label.debias_length)
        res.gates = write_rejects(plan.folder, cfg.gates, revisions="", labels=plan.labels.name)
        if memory:
            res.rows = list(iter_jsonl(plan.preferences))
    elif plan.kind == "best_of_n":
        assert plan.best is not None and plan.folder is not None
        res.written = PreferenceSummary(written=best_of_n.write_pairs(plan.best, drop=cfg.gates.dropping()))
        res.gates = write_rejects(plan.folder, cfg.gates, [*gate.skipped, *best_of_n.rejects(
            plan.best, cfg.gates.dropping())], revisions="", labels="")
        res.rows = list(iter_jsonl(plan.best)) if memory else None
    else:
        res.skipped = gate.skipped


def finish_run(plan: Plan, res: RunResult, model_id: str, t0: float, history: list[dict[str, Any]],
               extra: dict[str, Any] | None = None) -> RunResult:
    """The end of every `cai run` (local or on Ray): revisions.md, preferences.jsonl, the quality
    gates' rejects.jsonl, and run.json with this run appended to its history."""
    cfg, out = plan.config, Path(plan.config.output)
    if plan.label:
        prefs = write_preferences(out / "labels.jsonl", out / "preferences.jsonl", keep_ties=cfg.label.keep_ties,
                                  drop=cfg.gates.dropping() & {"truncated"}, debias_length=cfg.label.debias_length)
        res.preferences = {"written": prefs.written, "ties": prefs.ties, "abstentions": prefs.abstentions,
                           "judgements": prefs.judgements, "position_inconsistent": prefs.inconsistent,
                           "gated": prefs.gated, "judged_by": prefs.modes}
    if plan.best_of_n:  # the pairs of `cai run` with best_of_n (the label stage's are not made)
        res.preferences = {"written": best_of_n.write_pairs(out / best_of_n.ROWS_FILE, drop=cfg.gates.dropping()),
                           "from": best_of_n.STAGE, "file": best_of_n.pairs_path(out / best_of_n.ROWS_FILE).name}
    bon = best_of_n.rejects(out / best_of_n.ROWS_FILE, cfg.gates.dropping()) if plan.best_of_n else []
    res.gates = write_rejects(out, cfg.gates, [*res.skipped, *bon])
    if "revise" in res.stages:  # after rejects.jsonl: it marks the gated rows
        write_revise_report(out / "revisions.jsonl")
    res.manifest = manifest(plan, res, model_id, time.time() - t0) | (extra or {})
    history = [*history, {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "elapsed_s": res.manifest["elapsed_s"],
        "calls": res.manifest["calls"], "constitution": constitution_record(plan),
        "templates_hash": res.manifest["templates_hash"],
        "counts": {k: {f: v[f] for f in ("written", "resumed", "failed", "dropped")}
                   for k, v in res.manifest["counts"].items() if k != "preferences"},
        **({"usage": res.usage.to_json()} if res.usage is not None else {})}]
    spent = run_json.usage_and_cost(plan, res, history)  # after "calls": the tokens of every run of the folder
    res.manifest = {k: w for key, v in res.manifest.items() for k, w in ((key, v), *(
        spent.items() if key == "calls" else ()))} | {"history": history}
    write_json_atomic(out / "run.json", res.manifest)
    return res


# --- the judge against people ------------------------------------------------------------------


@dataclass
class EvalResult:
    """Each judge's figures (``cai.metrics.summarize``) and its settings."""

    results: dict[str, dict[str, Any]]
    judge: dict[str, Any]
    naive: dict[str, Any] | None
    model: str


def run_eval_judge(file: Rows, *, backend: Backend | str | None = None, output: str | Path | None = None,
                   constitution: Constitution | str | Path | None = None,
                   templates: Templates | str | Path | None = None, config: RunConfig | None = None,
                   naive: NaiveSettings | None = None, **settings: Any) -> EvalResult:
    """Relabel human-labelled pairs with the judge (and, with ``naive.enabled``, a judge that
    parses a generated letter) and measure each against the human labels. ``output`` keeps the
    judged rows (``judge.jsonl``, ``naive.jsonl``) so that a rerun resumes."""
    plan, given = _plan("eval", file, backend, output, constitution, templates, config, settings)
    cfg = plan.config
    nv = naive or NaiveSettings.model_validate({})
    const, tpl, jcfg = plan.constitution, plan.templates, JudgeConfig.of(cfg.label, cfg.seed)
    ncfg = NaiveConfig(principles=jcfg.principles, seed=cfg.seed, tie_threshold=jcfg.tie_threshold,
                       sampling=Sampling(max_tokens=nv.max_tokens, seed=cfg.seed))
    results: dict[str, dict[str, Any]] = {}
    with _opened(plan, given) as (inner, _), counted(inner) as be:
        assert plan.folder is not None
        judges: list[tuple[str, str, str, RowFn[Pair]]] = [
            (f"{jcfg.mode} judge" + ("" if jcfg.both_orders else " (one order)"), "judge.jsonl",
             judge_fingerprint(be, const, tpl, jcfg), JudgeStage(const, tpl, jcfg, be.model_id))]
        if nv.enabled:
            judges.append(("naive judge", "naive.jsonl", naive_fingerprint(be, const, tpl, ncfg),
                           NaiveStage(const, tpl, ncfg, be.model_id)))
        for name, fname, fp, stage in judges:
            t0 = time.monotonic()
            s = run_stage(plan.folder / fname, fp, read_pairs(file, split=cfg.split, limit=cfg.limit), stage,
                          backend=be, title=name, total=plan.totals.get("eval"), concurrency=cfg.concurrency,
                          progress=cfg.progress)
            results[name] = {**summarize_files(s.path, s.failures_path), "wall_s": time.monotonic() - t0,
                             "resumed": s.resumed}
    return EvalResult(results, jcfg.to_dict(), ncfg.to_dict() if nv.enabled else None, be.model_id)


__all__ = ["Calls", "EvalResult", "LabelSettings", "ReviseSettings", "RunConfig", "RunResult", "Source",
           "StageResult", "build_backend", "labels_path", "load_constitution", "load_run_config", "run_best_of_n",
           "run_eval_judge", "run_label", "run_pipeline", "run_revise", "ConfigError"]
