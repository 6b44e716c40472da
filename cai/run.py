"""`cai run`: the whole pipeline from one config, in one output folder, rerunnable at no cost.

revise (``revisions.jsonl``) -> pairs (initial vs revised answer, a pairs dataset, or answers
sampled from the policy) -> label (``labels.jsonl``: every judged pair; ``preferences.jsonl``:
TRL rows). Rows that fail go to ``*.failures.jsonl`` with their reason. Every model call goes
through the call cache (``cache.sqlite`` by default), so a rerun sends only the calls whose
prompt changed; each stage's output resumes by row id after a crash. ``run.json`` records the
config, the full constitution, the template hash, the models, the judge settings and counts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from . import __version__
from .backends.base import Backend, Completion, Request, Sampling
from .cache import CachedBackend, CallCache
from .cli_app import build_backend
from .config import RunConfig
from .constitution import Constitution, load_constitution, sha256_json
from .errors import ConfigError, InputError
from .inputs import PromptRow, read_prompts
from .judge import JUDGE_STAGES, ORDERS, JudgeConfig, judge_chunk, write_preferences
from .judge import fingerprint as judge_fingerprint
from .output import JsonlSink, SinkSummary
from .pairs import Pair, SampleConfig, read_pairs, sample_pair_ids, sample_pairs
from .progress import StageProgress
from .report import write_revise_report
from .revise import ReviseConfig, revise_chunk
from .revise import fingerprint as revise_fingerprint
from .stage import StageRun
from .templates import Templates


class CountingBackend:
    """No cache: pass every request through, and count them."""

    def __init__(self, backend: Backend) -> None:
        self.inner, self.model_id = backend, backend.model_id
        self.sent = self.hits = self.errors = 0

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        done = self.inner.complete(requests)
        self.sent += len(requests)
        self.errors += sum(c.error is not None for c in done)
        return done

    def close(self) -> None:
        self.inner.close()


@dataclass
class RunResult:
    output: Path
    stages: dict[str, SinkSummary] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # rows no longer in the input
    preferences: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    cached: int = 0
    errors: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)


def revise_config(cfg: RunConfig) -> ReviseConfig:
    """The same settings `cai revise` builds from its flags, so both share cached calls."""
    r = cfg.revise
    return ReviseConfig.build(r.rounds, cfg.seed, r.max_tokens, r.temperature, r.repetition_penalty,
                              r.critique_max_tokens)


def judge_config(cfg: RunConfig) -> JudgeConfig:
    lab = cfg.label
    clamp = tuple(lab.clamp) if lab.clamp else None
    if clamp is not None and not 0.0 <= clamp[0] < 0.5 < clamp[1] <= 1.0:
        raise ConfigError(f"needs 0 <= lo < 0.5 < hi <= 1, got {list(clamp)}", field="label.clamp")
    return JudgeConfig(
        mode=lab.mode, principles=lab.principles, both_orders=lab.both_orders, seed=cfg.seed,
        top_logprobs=lab.top_logprobs, min_mass=lab.min_mass, clamp=clamp,  # type: ignore[arg-type]
        tie_threshold=lab.tie_threshold, fallback=lab.fallback,
        cot=Sampling(max_tokens=lab.cot_max_tokens, seed=cfg.seed, stop=("Therefore",)),
    )


def judge_settings(j: JudgeConfig) -> dict[str, Any]:
    """The judge as the dataset card describes it, plus every setting."""
    return {**j.to_dict(), "orders": list(ORDERS if j.both_orders else ORDERS[:1]),
            "ensemble_k": j.principles, "cot": j.mode == "cot",
            "clamp": list(j.clamp) if j.clamp else None, "tie_threshold": j.tie_threshold}


def count_jsonl(path: Path, limit: int | None = None) -> int | None:
    if not (path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson")):
        return limit
    with path.open("rb") as f:
        n = sum(1 for line in f if line.strip())
    return min(n, limit) if limit else n


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stage(path: Path, fp: str, items: Iterator[Any] | Callable[..., Iterator[Any]], process: Any,
           cfg: RunConfig, title: str, total: int | None, depth: int = 1,
           seen: set[str] | None = None) -> tuple[SinkSummary, int]:
    """Run (or resume) one stage; return its summary and how many stale rows were dropped."""
    seen = set() if seen is None else seen

    def tap(rows: Iterator[Any]) -> Iterator[Any]:
        for r in rows:
            seen.add(r.id)
            yield r

    with JsonlSink(path, fp) as sink:
        run = StageRun(sink=sink, process=process, key=lambda r: r.id, chunk_size=cfg.chunk_size)
        with StageProgress(title, total, enabled=cfg.progress) as bar:
            rows = tap(items(sink, bar) if callable(items) else items)
            summary = run.run(rows, bar) if depth <= 1 else _overlapped(run, rows, bar, depth)
    stale = len(sink.done - seen)
    return summary, _prune(path, seen) if stale else 0


def _prune(path: Path, keep: set[str]) -> int:
    """Drop rows whose id is no longer among the stage's inputs (the input shrank, say), so
    that the output holds one row per input row. Rewritten whole, then renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    dropped = 0
    with path.open(encoding="utf-8") as f, tmp.open("w", encoding="utf-8") as g:
        for line in f:
            if json.loads(line)["id"] in keep:
                g.write(line)
            else:
                dropped += 1
        g.flush()
        os.fsync(g.fileno())
    os.replace(tmp, path)
    return dropped


def _in_thread(fn: Any, arg: Any) -> Future:
    """``fn(arg)`` in a daemon thread (a Ctrl-C or a kill never waits for it)."""
    fut: Future = Future()

    def work() -> None:
        try:
            fut.set_result(fn(arg))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(e)

    threading.Thread(target=work, daemon=True).start()
    return fut


def _overlapped(run: StageRun, rows: Iterator[Any], bar: StageProgress, depth: int
                ) -> SinkSummary:
    """``StageRun.run`` with up to ``depth`` chunks in flight: while one chunk waits on the
    server, the next one is rendered. Chunks are written whole and in input order."""
    sink = run.sink

    def todo() -> Iterator[Any]:
        for r in rows:
            if sink.is_done(run.key(r)):
                bar.advance(rows=1)
            else:
                yield r

    def write(chunk: list[Any], fut: Future) -> None:
        outcomes = fut.result()
        if len(outcomes) != len(chunk):
            raise RuntimeError(f"stage returned {len(outcomes)} outcomes for {len(chunk)} rows")
        for o in outcomes:
            if o.row is not None:
                sink.write(o.row)
            else:
                sink.fail(o.id, o.reason or "unknown failure", **o.info)
        sink.flush()
        bar.advance(rows=len(chunk), tokens=sum(o.tokens for o in outcomes))

    pending: deque[tuple[list[Any], Future]] = deque()
    it = todo()
    while chunk := list(islice(it, run.chunk_size)):
        pending.append((chunk, _in_thread(run.process, chunk)))
        if len(pending) >= depth:
            write(*pending.popleft())
    while pending:
        write(*pending.popleft())
    return sink.finish()


def _unique(pairs: Iterator[Pair]) -> Iterator[Pair]:
    """Pairs from several sources in one file: a repeated id gets ``-2``, ``-3``..."""
    seen: dict[str, int] = {}
    for p in pairs:
        n = seen[p.id] = seen.get(p.id, 0) + 1
        yield p if n == 1 else Pair(**{**p.to_dict(), "id": f"{p.id}-{n}"})


def _sampled(rows: Iterator[PromptRow], be: Backend, scfg: SampleConfig, chunk: int,
             system: str | None, sink: JsonlSink, seen: set[str]) -> Iterator[Pair]:
    """Pairs sampled per chunk of prompts; prompts whose pairs are all done are not sampled."""

    def todo() -> Iterator[PromptRow]:
        for r in rows:
            ids = sample_pair_ids(r.id, scfg.n)
            if all(sink.is_done(i) for i in ids):
                seen.update(ids)  # still inputs of this run: keep their rows
            else:
                yield r

    it = todo()
    while batch := list(islice(it, chunk)):
        yield from sample_pairs(batch, be, scfg, system)


def run_pipeline(cfg: RunConfig, backend: Backend | None = None,
                 constitution: Constitution | None = None) -> RunResult:
    """Run (or resume) every enabled stage; ``backend`` replaces the configured one (tests)."""
    t0 = time.time()
    const = constitution or load_constitution(cfg.constitution)
    tpl = Templates(cfg.templates)
    out = cfg.output
    out.mkdir(parents=True, exist_ok=True)
    rcfg, jcfg = revise_config(cfg), judge_config(cfg)
    # Until the run ends, run.json says so: `cai export` refuses a folder between two stages.
    _write_json_atomic(out / "run.json", {"cai_version": __version__, "status": "running"})
    sources = list(dict.fromkeys(cfg.label.sources))
    if cfg.label.enabled and "dataset" in sources and not cfg.label.pairs:
        raise ConfigError("the `dataset` pair source needs label.pairs (--label-pairs)",
                          field="label.sources")
    if (cfg.revise.enabled or "sample" in sources) and not cfg.input:
        raise ConfigError("no input prompts: set `input` (--input / CAI_INPUT)", field="input")
    inner = backend or build_backend(cfg.backend, cfg.model, cfg.base_url, cfg.api_key,
                                     cfg.concurrency)
    cache_path = cfg.cache_path()
    be: CachedBackend | CountingBackend = (
        CachedBackend(inner, CallCache(cache_path)) if cache_path else CountingBackend(inner))
    res = RunResult(output=out)
    # Backends that take concurrent complete() calls; the in-process ones (embedded, vllm) do not.
    depth = cfg.overlap if type(inner).__name__ in ("OpenAIServerBackend", "FakeBackend") else 1
    revisions = out / "revisions.jsonl"
    rfp = revise_fingerprint(be, const, tpl, rcfg)
    try:
        if cfg.revise.enabled:
            rows = read_prompts(cfg.input, column=cfg.prompt_column, split=cfg.split,  # type: ignore[arg-type]
                                limit=cfg.limit)
            res.stages["revise"], res.dropped["revise"] = _stage(
                revisions, rfp, rows, lambda ch: revise_chunk(ch, be, const, tpl, rcfg), cfg,
                "revise", count_jsonl(Path(cfg.input), cfg.limit), depth)  # type: ignore[arg-type]
            write_revise_report(revisions)
        if cfg.label.enabled:
            (res.stages["label"], res.dropped["label"]), res.preferences = _label(
                cfg, be, const, tpl, jcfg, sources, rfp, depth)
    finally:
        be.close()
    res.sent, res.cached, res.errors = be.sent, be.hits, be.errors
    res.manifest = {
        "cai_version": __version__,
        "status": "complete",
        "config": cfg.public(),
        "constitution": const.model_dump(mode="json"),
        "constitution_hash": const.digest(),
        "templates_hash": tpl.digest(),
        "models": {"policy": be.model_id, "judge": be.model_id},
        "revise": rcfg.to_dict(),
        "judge": judge_settings(jcfg),
        "counts": {name: {"written": s.written, "resumed": s.resumed,
                          "rows": s.written + s.resumed - res.dropped.get(name, 0),
                          "dropped": res.dropped.get(name, 0), "failed": s.failed,
                          "reasons": s.reasons,
                          "failures": str(s.failures_path) if s.failures_path else None}
                   for name, s in res.stages.items()} | {"preferences": res.preferences},
        "calls": {"sent": be.sent, "cached": be.hits, "errors": be.errors},
        "cache": str(cache_path) if cache_path else None,
        "elapsed_s": round(time.time() - t0, 3),
    }
    _write_json_atomic(out / "run.json", res.manifest)
    return res


def _label(cfg: RunConfig, be: Backend, const: Constitution, tpl: Templates, jcfg: JudgeConfig,
           sources: Sequence[str], revise_fp: str, depth: int
           ) -> tuple[tuple[SinkSummary, int], dict[str, int]]:
    out = cfg.output
    revisions = out / "revisions.jsonl"
    scfg = SampleConfig(n=cfg.label.samples, seed=cfg.seed,
                        sampling=Sampling(max_tokens=cfg.revise.max_tokens,
                                          temperature=cfg.label.sample_temperature))
    upstream: list[Any] = []
    total: int | None = 0
    if "revisions" in sources:
        if not revisions.exists():
            raise InputError(f"{revisions}: no revisions to pair (enable the revise stage)")
        upstream.append(["revisions", revise_fp])
        total = count_jsonl(revisions)
    if "dataset" in sources:
        p = Path(cfg.label.pairs)  # type: ignore[arg-type]
        upstream.append(["dataset", str(p), p.stat().st_size if p.is_file() else None])
        total = None
    if "sample" in sources:
        upstream.append(["sample", scfg.to_dict(), tpl.digest(("generate",)), cfg.input,
                         cfg.limit, cfg.prompt_column])
        total = None
    fp = sha256_json([judge_fingerprint(be, const, tpl, jcfg), upstream])

    def pairs(sink: JsonlSink, bar: StageProgress) -> Iterator[Pair]:
        def gen() -> Iterator[Pair]:
            if "revisions" in sources:
                yield from read_pairs(revisions)
            if "dataset" in sources:
                yield from read_pairs(cfg.label.pairs, split=cfg.split)  # type: ignore[arg-type]
            if "sample" in sources:
                rows = read_prompts(cfg.input, column=cfg.prompt_column,  # type: ignore[arg-type]
                                    split=cfg.split, limit=cfg.limit)
                yield from _sampled(rows, be, scfg, cfg.chunk_size,
                                    tpl.render_text("generate", "system"), sink, seen)
        return _unique(gen())

    labels = out / "labels.jsonl"
    seen: set[str] = set()
    summary = _stage(labels, fp, pairs, lambda ch: judge_chunk(ch, be, const, tpl, jcfg), cfg,
                     "label", total, depth, seen)
    prefs = write_preferences(labels, out / "preferences.jsonl", keep_ties=cfg.label.keep_ties)
    return summary, {"written": prefs.written, "ties": prefs.ties,
                     "abstentions": prefs.abstentions, "judgements": prefs.judgements,
                     "position_inconsistent": prefs.inconsistent}


__all__ = ["JUDGE_STAGES", "RunResult", "judge_config", "revise_config", "run_pipeline"]
