"""`cai run CONFIG --ray ADDRESS`: the whole pipeline over a Ray cluster, same outputs as a local run.

    from cai.scale import run_pipeline_ray

    res = run_pipeline_ray("run.yaml", address="auto")   # None: a local Ray instance

How it runs
-----------
- The **driver** (this process) reads the input with cai's own reader (``read_prompts``: the
  same ids, de-duplicated ids, ``file:line`` sources and ``--limit`` as a local run), opens the
  outputs (``JsonlSink``: resume by id) and leaves out every row already written. The rows
  left to do become a Ray Dataset (``ray.data.from_items``, one block per ``chunk_size`` rows).
- ``map_batches`` over an **actor pool** runs the per-row pipeline on each block: critique and
  revise the prompt, then judge the initial-vs-revised pair (``ReviseStage`` then the judge,
  chained per row, exactly as `cai run` fuses them); pairs from ``label.pairs`` (``dataset``) and
  sampled pairs (``sample``) go through the same actors, after the input's rows, so that
  ``labels.jsonl`` holds them in the order a local run writes them. Each actor builds its own
  backend from the config: the in-process vLLM engine on ``tensor_parallel_size`` GPUs
  (``num_gpus``), an OpenAI-compatible server (or several: ``base_url`` as a list, each actor
  spreading its calls over them, a row's calls kept on one server), or ``fake``. An actor runs
  a block's ``chunk_size`` rows at once (``overlap`` blocks at a time), with at most
  ``concurrency`` requests in flight.
- The **driver is the only writer**: results come back in input order and are appended to
  ``revisions.jsonl``, ``labels.jsonl`` and their failures files; ``preferences.jsonl``,
  ``revisions.md`` and ``run.json`` follow as in a local run (``run.json`` also says how Ray
  ran it, under ``ray``). An id already written is never written again, so neither Ray's
  retries (a dead actor is restarted, its block is run again: ``max_restarts``,
  ``max_task_retries``) nor a rerun after a crash (resume by id) can duplicate a row.
- **The call cache**: actors on the driver's node share the run's SQLite file (WAL is safe across
  processes on one host). Actors on other nodes keep a cache per node (``node_cache``, default
  ``<tmp>/cai-cache/``): never put one SQLite file on a network file system. A rerun is free
  for the rows whose calls are in the cache of the node that gets them (and the rows already
  written are not sent at all); ``cache: off`` turns every cache off.
- What the driver holds: every input row's id, and the rows left to do until they are handed
  to Ray (a few hundred bytes each: a million prompts fit in a GB or so).

Why not ``ray.data.llm``
------------------------
Ray's LLM batch API (``ray.data.llm.build_processor``) maps one prompt to one completion per row:
a stage of independent requests. cai's calls are chained and dependent per row: the critique
needs the answer, the revision needs the critique, for up to four rounds, and the judge needs
the final revision, and each row's principles and seeds come from its id. As a sequence of
processors that would be 2 + 2 x rounds + 1 passes, each a full barrier over the dataset, with
the conversation carried in columns between them. Here one actor runs the whole chain of a row
while its other rows' calls keep the engine full (cai's request pool), and a row's turns stay
in one engine's prefix cache. ``ray.data.llm`` would serve a stage of single independent calls
(answering a fixed prompt set once, say); cai has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import pickle
import re
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__, preflight, runtime
from ..backends import Backend, BackendBase, build_backend, split_urls
from ..cache import CachedBackend, CallCache, CountingBackend
from ..config import RunConfig, load_run_config
from ..constitution import Constitution, load_constitution
from ..errors import CaiError, InputError
from ..files import dumps, write_json_atomic
from ..hashing import sha256_json
from ..inputs import read_prompts
from ..model import default_model_dir
from ..output import JsonlSink
from ..pipeline import LabelStage, RunResult, finish_run, label_upstream, read_history
from ..quality import InputGate
from ..stages.judge import JudgeStage
from ..stages.judge import fingerprint as judge_fingerprint
from ..stages.pairs import Pair, read_pairs, record_to_pair, sample_pair_ids
from ..stages.revise import ReviseStage
from ..stages.revise import fingerprint as revise_fingerprint
from ..stages.runner import DURABLE_EVERY_S, Call, Outcome, Pool, prune, run
from ..templates import Templates

RAY_HINT = "the --ray option needs Ray Data: pip install 'cai[ray]' (or pip install 'ray[data]')"
# The revisions.jsonl line a fused pair comes from is known only when the driver writes the
# revision: an actor puts this in the label row's `source`, and the driver fills it in.
_LINE = "\x00cai:revision-line\x00"
DEFAULT_ACTOR_CPUS = 0.5  # a server client or the fake needs little; and a 2-core box keeps a CPU free


class RayRunError(CaiError):
    """The Ray part of a run failed (an actor could not start, a block failed for good)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every actor builds its pipeline from (small, and the same for all of them)."""

    config: dict[str, Any]  # RunConfig.model_dump(mode="json"), the API key included
    constitution: dict[str, Any]
    constitution_hash: str
    templates: dict[str, str]  # every template the driver resolves: name -> source
    templates_hash: str
    model_id: str  # what the driver's fingerprints were made with; an actor that differs stops the run
    cache: str | None  # the run's cache file (absolute): for actors on the driver's node
    node_cache: str | None  # where actors on other nodes keep theirs (None: the temp folder)
    driver_node: str
    backend_options: dict[str, Any] = field(default_factory=dict)


def build_worker_backend(cfg: RunConfig, urls: Sequence[str] | None = None, **options: Any) -> Backend:
    """The backend one actor uses: the config's (``openai`` over every server of ``base_url``, or
    over ``urls``), with ``options`` for the backend on top."""
    opts = {**cfg.backend_options(), **options}
    if urls is not None:
        opts["base_url"] = list(urls)
    return build_backend(cfg.backend, cfg.model, **opts)


def predict_model_id(cfg: RunConfig, options: dict[str, Any]) -> str:
    """The model id the actors' backends will have, without loading a model here: asked of the
    server (``openai``), built (``fake``), or named as the engines name it (``vllm``,
    ``embedded``). Each actor checks its own against it before it runs a row."""
    if cfg.backend in ("openai", "fake"):
        be = build_worker_backend(cfg, split_urls(cfg.base_url)[:1] or None, **options)
        runtime.close(be)
        return be.model_id
    model = cfg.model
    if cfg.backend == "embedded":
        return f"{(Path(model) if model else default_model_dir()).name}@embedded"
    if model is None:
        return default_model_dir().name
    return Path(model).resolve().name if Path(model).exists() else model


class _Named(BackendBase):
    """A model id for the stage fingerprints (no model behind it)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


# --- the actor -------------------------------------------------------------------------------


def template_sources(tpl: Templates) -> dict[str, str]:
    """Every template ``tpl`` resolves (a user folder over the shipped ones): name -> source."""
    env, loader = tpl.env, tpl.env.loader
    assert loader is not None
    return {name: loader.get_source(env, name)[0] for name in loader.list_templates()}


def node_cache_file(spec: WorkerSpec, node: str) -> Path | None:
    """The cache an actor on ``node`` uses: the run's on the driver's node, else one per node."""
    if spec.cache is None:
        return None
    if node == spec.driver_node:
        return Path(spec.cache)
    folder = Path(spec.node_cache) if spec.node_cache else Path(tempfile.gettempdir()) / "cai-cache"
    return folder / f"{Path(spec.cache).stem}-{hashlib.sha256(spec.cache.encode()).hexdigest()[:12]}.sqlite"


class RowWorker:
    """One actor of the pool: its own backend (behind the call cache) and the per-row pipeline.
    ``__call__`` takes a block of work items and returns one result per item, in order."""

    def __init__(self, spec: WorkerSpec) -> None:
        import ray

        cfg = RunConfig.model_validate(spec.config)
        const = Constitution.model_validate(spec.constitution)
        self._tmp = tempfile.TemporaryDirectory(prefix="cai-templates-")
        for name, src in spec.templates.items():
            path = Path(self._tmp.name) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(src, encoding="utf-8")
        tpl = Templates(self._tmp.name)
        if const.digest() != spec.constitution_hash or tpl.digest() != spec.templates_hash:
            raise RayRunError("this node's constitution or templates differ from the driver's "
                              "(install the same cai version on every node)")
        self.node = ray.get_runtime_context().get_node_id()
        inner = build_worker_backend(cfg, None, **spec.backend_options)
        if inner.model_id != spec.model_id:
            runtime.close(inner)
            raise RayRunError(f"this actor's backend serves {inner.model_id!r}, the driver expected "
                              f"{spec.model_id!r}: give every node the same model")
        cache = node_cache_file(spec, self.node)
        self.backend: CachedBackend | CountingBackend = (
            CachedBackend(inner, CallCache(cache)) if cache is not None else CountingBackend(inner))
        rcfg, jcfg = cfg.revise.resolve(cfg.seed), cfg.label.resolve(cfg.seed)
        self.revise = ReviseStage(const, tpl, rcfg, inner.model_id)
        self.label = LabelStage(JudgeStage(const, tpl, jcfg, inner.model_id),
                                cfg.label.sample_config(cfg.seed, cfg.revise.max_tokens),
                                tpl.render_text("generate", "system"))
        self.fused = cfg.revise.enabled and cfg.label.enabled and "revisions" in cfg.sources
        self.concurrency = cfg.concurrency
        self.instance = uuid.uuid4().hex  # a restarted actor is a new instance: its counts start again

    async def _one(self, kind: str, obj: Any, call: Call) -> dict[str, list[Outcome]]:
        out: dict[str, list[Outcome]] = {"revise": [], "label": []}
        if kind == "row":
            out["revise"] = outs = await self.revise(obj, call)
            if self.fused and outs and outs[0].row is not None:
                # as a local run does: the pair is made from the row as written (JSON)
                out["label"] = await self.label(record_to_pair(json.loads(dumps(outs[0].row)), _LINE), call)
        else:  # "pair": judge it; "sample": a prompt whose sampled answers are judged in pairs
            out["label"] = await self.label(obj, call)
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        seqs = [int(s) for s in batch["seq"]]
        items = [pickle.loads(x) for x in batch["item"]]

        async def go(pool: Pool) -> list[dict[str, list[Outcome]]]:
            call = Call(pool)
            return list(await asyncio.gather(*(self._one(kind, obj, call.row(s, item_id))
                                               for s, (kind, item_id, obj) in zip(seqs, items, strict=True))))

        results = run(go, self.backend, self.concurrency)
        be = self.backend
        stats = dumps({"instance": self.instance, "node": self.node, "pid": os.getpid(), "sent": be.sent,
                       "cached": be.hits, "errors": be.errors})
        return {"seq": seqs, "result": [pickle.dumps(r, protocol=5) for r in results], "stats": [stats] * len(seqs)}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            runtime.close(self.backend)


# --- the driver ------------------------------------------------------------------------------


@dataclass
class _Plan:
    """The work items left to do (in the order a local run writes their rows: seq), every id the
    inputs hold (the rest are pruned at the end, as a local run does), and the input rows the
    input gate skipped."""

    work: list[dict[str, Any]] = field(default_factory=list)
    revise_ids: set[str] = field(default_factory=set)
    label_ids: set[str] = field(default_factory=set)
    gate: InputGate | None = None
    seq: int = 0


def _plan(cfg: RunConfig, rsink: JsonlSink | None, lsink: JsonlSink | None) -> _Plan:
    """What to send to the actors: an input row not yet revised (then judged), a pair not yet
    judged (a revision written before, or a pair of ``label.pairs``), a prompt not yet sampled."""
    plan, revisions = _Plan(gate=InputGate(cfg.gates)), cfg.output / "revisions.jsonl"
    sources = cfg.sources if cfg.label.enabled else []
    fused = cfg.revise.enabled and "revisions" in sources
    seen: dict[str, int] = {}

    def unique(p: Pair) -> Pair:  # several pair sources in one stream: a repeated id gets -2, -3...
        n = seen[p.id] = seen.get(p.id, 0) + 1
        return p if n == 1 else replace(p, id=f"{p.id}-{n}")

    def add(kind: str, item_id: str | None, obj: Any) -> None:
        if item_id is not None:
            plan.work.append({"seq": plan.seq, "item": pickle.dumps((kind, item_id, obj), protocol=5)})
        plan.seq += 1

    def add_pair(p: Pair) -> None:
        p = unique(p)
        plan.label_ids.add(p.id)
        add("pair", None if lsink is None or lsink.is_done(p.id) else p.id, p)

    if cfg.revise.enabled:
        assert rsink is not None and cfg.input is not None and plan.gate is not None
        for r in plan.gate(read_prompts(cfg.input, column=cfg.prompt_column, split=cfg.split, limit=cfg.limit)):
            plan.revise_ids.add(r.id)
            if not rsink.is_done(r.id):
                if fused:  # its pair, once revised, has the row's id
                    unique(Pair(r.id, [], "", ""))
                    plan.label_ids.add(r.id)
                add("row", r.id, r)
            elif fused:  # revised before: its pair, made from the row as written
                add_pair(record_to_pair(rsink.read(r.id), f"{revisions}:{rsink.line_of(r.id)}"))
            else:
                add("row", None, r)
    elif "revisions" in sources:
        if not revisions.exists():
            raise InputError(f"{revisions}: no revisions to pair (enable the revise stage)")
        for p in read_pairs(revisions):
            add_pair(p)
    if "dataset" in sources and cfg.label.pairs:
        for p in read_pairs(cfg.label.pairs, split=cfg.split, limit=cfg.limit):
            add_pair(p)
    if "sample" in sources and cfg.input:
        assert lsink is not None
        for r in read_prompts(cfg.input, column=cfg.prompt_column, split=cfg.split, limit=cfg.limit):
            ids = sample_pair_ids(r.id, cfg.label.samples)
            plan.label_ids.update(ids)
            add("sample", None if all(lsink.is_done(i) for i in ids) else ids[0], r)
    return plan


def _write(result: dict[str, list[Outcome]], rsink: JsonlSink | None, lsink: JsonlSink | None,
           revisions: Path) -> None:
    """One work item's rows, as a local run writes them (an id written before is left as it is)."""
    line: int | None = None
    for o in result["revise"]:
        assert rsink is not None
        if rsink.is_done(o.id):
            line = rsink.line_of(o.id)
        elif o.row is not None:
            line = rsink.write(o.row)
        else:
            rsink.fail(o.id, o.reason or "unknown failure", **o.info)
    for o in result["label"]:
        assert lsink is not None
        for d in (o.row, o.info):
            if d is not None and d.get("source") == _LINE:
                d["source"] = f"{revisions}:{line}"
        if lsink.is_done(o.id):
            continue
        if o.row is not None:
            lsink.write(o.row)
        else:
            lsink.fail(o.id, o.reason or "unknown failure", **o.info)


def _connect(address: str | None, init_args: dict[str, Any] | None) -> bool:
    """Join the cluster at ``address`` ("auto", "ray://host:10001", ...) or start a local
    instance; True when this call started (and so must stop) it."""
    try:
        import ray
    except ImportError:
        raise CaiError(RAY_HINT) from None
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, **(init_args or {}))
    else:
        ray.init(**{"num_cpus": os.cpu_count() or 1, "include_dashboard": False, **(init_args or {})})
    return True


def _pool_size(cfg: RunConfig, actors: int | None, blocks: int) -> tuple[int, float]:
    """How many actors, and GPUs for each (vLLM: one actor per ``tensor_parallel_size`` GPUs)."""
    import ray

    gpus = float(cfg.vllm.tensor_parallel_size) if cfg.backend == "vllm" else 0.0
    if actors is None:
        if gpus:
            have = ray.cluster_resources().get("GPU", 0.0)
            if have < gpus:
                raise RayRunError(f"the vllm backend needs {int(gpus)} GPU(s) per actor; the cluster has {have:g}")
            actors = int(have // gpus)
        else:
            actors = 2
    return max(1, min(actors, blocks)), gpus


def run_pipeline_ray(cfg: RunConfig | str | Path, address: str | None = None, *,
                     constitution: Constitution | None = None, actors: int | None = None,
                     actor_cpus: float = DEFAULT_ACTOR_CPUS, node_cache: str | Path | None = None,
                     backend_options: dict[str, Any] | None = None, max_restarts: int | None = None,
                     max_task_retries: int | None = None, ray_remote_args: dict[str, Any] | None = None,
                     init_args: dict[str, Any] | None = None) -> RunResult:
    """Run (or resume) a run config on Ray: the same files as ``run_pipeline``, row for row.

    ``address``: a running cluster ("auto", "ray://head:10001"); None joins the Ray instance
    this process has, or starts a local one. ``actors``: the pool's size (default: one per
    ``tensor_parallel_size`` GPUs for ``vllm``, else 2), ``actor_cpus`` CPUs each.
    ``node_cache``: where actors off the driver's node keep their call cache.
    ``backend_options``: extra keywords for each actor's backend. ``max_restarts`` and
    ``max_task_retries``: Ray's, for a dead actor (None: Ray Data's, -1 and -1: restart it
    and run its block again without end). ``ray_remote_args`` go to
    ``map_batches`` as they are (``resources``, ``runtime_env``...), ``init_args`` to ``ray.init``.
    """
    t0 = time.time()
    if importlib.util.find_spec("ray") is None:  # before any file is made
        raise CaiError(RAY_HINT)
    cfg = (load_run_config(cfg) if not isinstance(cfg, RunConfig) else cfg).check()
    const = constitution or load_constitution(cfg.constitution)
    tpl = Templates(cfg.templates)
    preflight.check_run(cfg, constitution=const, templates=tpl)
    urls: list[str | None] = [*split_urls(cfg.base_url)] if cfg.backend == "openai" else [None]
    for u in urls:
        preflight.check_backend(cfg.backend, u)  # each server accepts connections
    options = dict(backend_options or {})
    model_id = predict_model_id(cfg, options)
    named = _Named(model_id)
    out, revisions = cfg.output, cfg.output / "revisions.jsonl"
    rcfg, jcfg = cfg.revise.resolve(cfg.seed), cfg.label.resolve(cfg.seed)
    rfp = revise_fingerprint(named, const, tpl, rcfg)
    scfg = cfg.label.sample_config(cfg.seed, cfg.revise.max_tokens)
    res = RunResult(output=out)
    out.mkdir(parents=True, exist_ok=True)
    history = read_history(out / "run.json")
    write_json_atomic(out / "run.json", {"cai_version": __version__, "status": "running", "history": history})
    counts: dict[str, dict[str, int]] = {}  # per actor instance: its latest call counts
    ray_info: dict[str, Any] = {"address": address, "actors": 0, "nodes": [], "blocks": 0, "rows": 0}
    with contextlib.ExitStack() as files:
        rsink = files.enter_context(JsonlSink(revisions, rfp)) if cfg.revise.enabled else None
        lsink = None
        if cfg.label.enabled:
            lfp = sha256_json([judge_fingerprint(named, const, tpl, jcfg), label_upstream(cfg, rfp, scfg, tpl)])
            lsink = files.enter_context(JsonlSink(out / "labels.jsonl", lfp))
        plan = _plan(cfg, rsink, lsink)
        if plan.work:
            cache = cfg.cache_path()
            spec = WorkerSpec(
                config=cfg.model_dump(mode="json"), constitution=const.model_dump(mode="json"),
                constitution_hash=const.digest(), templates=template_sources(tpl), templates_hash=tpl.digest(),
                model_id=model_id, cache=str(cache.resolve()) if cache else None,
                node_cache=str(node_cache) if node_cache else None, driver_node="", backend_options=options)
            _run_on_ray(cfg, spec, plan, rsink, lsink, revisions, address=address, actors=actors,
                        actor_cpus=actor_cpus, max_restarts=max_restarts, max_task_retries=max_task_retries,
                        ray_remote_args=ray_remote_args, init_args=init_args, counts=counts, info=ray_info)
        for name, sink, ids in (("revise", rsink, plan.revise_ids), ("label", lsink, plan.label_ids)):
            if sink is None:
                continue
            summary = sink.finish()
            if len(sink.done) > len(ids & sink.done.keys()):
                summary.dropped = prune(sink.path, ids)
            res.stages[name] = summary
    res.sent, res.cached, res.errors = (sum(c[k] for c in counts.values()) for k in ("sent", "cached", "errors"))
    return finish_run(cfg, const, tpl, res, model_id, t0, history, plan.gate.skipped if plan.gate else [],
                      {"ray": ray_info})


def _run_on_ray(cfg: RunConfig, spec: WorkerSpec, plan: _Plan, rsink: JsonlSink | None, lsink: JsonlSink | None,
                revisions: Path, *, address: str | None, actors: int | None, actor_cpus: float,
                max_restarts: int | None, max_task_retries: int | None, ray_remote_args: dict[str, Any] | None,
                init_args: dict[str, Any] | None, counts: dict[str, dict[str, int]], info: dict[str, Any]) -> None:
    """The work items through the actor pool; their rows written here, in input order."""
    started = _connect(address, init_args)
    try:
        import ray
        import ray.data

        spec = replace(spec, driver_node=ray.get_runtime_context().get_node_id())
        blocks = math.ceil(len(plan.work) / cfg.chunk_size)
        size, gpus = _pool_size(cfg, actors, blocks)
        seqs, rows = [int(w["seq"]) for w in plan.work], len(plan.work)
        ds = ray.data.from_items(plan.work, override_num_blocks=blocks)
        plan.work = []  # in the object store now
        ds.context.execution_options.preserve_order = True  # the driver reorders too; this keeps its buffer small
        if cfg.progress is False:
            ds.context.enable_progress_bars = False
        overlap = max(1, cfg.overlap)
        compute = ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=overlap,
                                             enable_true_multi_threading=overlap > 1)
        remote = {k: v for k, v in (("max_restarts", max_restarts), ("max_task_retries", max_task_retries))
                  if v is not None} | (ray_remote_args or {})
        mapped = ds.map_batches(RowWorker, fn_constructor_kwargs={"spec": spec}, batch_size=cfg.chunk_size,
                                compute=compute, num_cpus=actor_cpus, num_gpus=gpus or None,
                                udf_modifying_row_count=False, **remote)
        info.update(actors=size, blocks=blocks, rows=rows, num_gpus=gpus, num_cpus=actor_cpus)
        order: Iterator[int] = iter(seqs)
        head = next(order, None)
        done: dict[int, dict[str, list[Outcome]]] = {}
        nodes: set[str] = set()
        last_sync = time.monotonic()
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            for s, r, st in zip(batch["seq"], batch["result"], batch["stats"], strict=True):
                done[int(s)] = pickle.loads(r)
                stat = json.loads(st)
                nodes.add(stat["node"])
                prev = counts.get(stat["instance"])
                if prev is None or stat["sent"] + stat["cached"] >= prev["sent"] + prev["cached"]:
                    counts[stat["instance"]] = {k: stat[k] for k in ("sent", "cached", "errors")}
            while head is not None and head in done:
                _write(done.pop(head), rsink, lsink, revisions)
                head = next(order, None)
            durable = time.monotonic() - last_sync >= DURABLE_EVERY_S
            for sink in (rsink, lsink):
                if sink is not None:
                    sink.flush(durable=durable)
            if durable:
                last_sync = time.monotonic()
        info["nodes"] = sorted(nodes)
        if head is not None:
            raise RayRunError(f"the actors returned no result for work item {head} (of {rows})")
    except CaiError:
        raise
    except Exception as e:
        raise RayRunError(f"the Ray run failed: {_reason(e)}") from e
    finally:
        if started:
            ray.shutdown()


_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")


def _reason(e: BaseException) -> str:
    """The error an actor raised (the last ``SomeError: message`` line of the tracebacks Ray
    passes on), else the first line of Ray's own."""
    x: BaseException | None = e
    while x is not None:
        lines = [ln.strip() for ln in str(x).splitlines() if ln.strip()]
        for ln in reversed(lines):
            if m := _RAISED.match(ln):
                return f"{m[1]}: {m[2]}"
        x = x.__cause__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
