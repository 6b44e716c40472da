"""`cai run CONFIG --ray-address ADDRESS`: the whole pipeline on a Ray cluster, as a local run writes it.

    from cai.scale import run_pipeline_ray

    res = run_pipeline_ray("run.yaml", address="auto")   # None: a local Ray instance

How it runs: the **driver** (this process) builds the run's ``Plan`` (every check before the
first call; the work items in order), opens the outputs (``JsonlSink``: resume by id) and
hands the items not yet written to Ray as a Dataset (``ray.data.from_items``, blocks of
``ray.block_size``). ``map_batches`` over an **actor pool** runs each item's whole chain (revise,
then judge the initial-vs-revised pair, as `cai run` fuses them; dataset and sampled pairs
after the input's rows), each actor with its own backend built from the config (vLLM on
``tensor_parallel_size`` GPUs, an OpenAI-compatible client over every ``base_url``, or ``fake``).
The **driver is the only writer**: results come back in input order and are appended as a local
run appends them, then preferences.jsonl, revisions.md and run.json (with a ``ray`` section); an
id already written is never written again, so Ray's retries and reruns cannot duplicate a row.
**The call cache**: actors on the driver's node share the run's SQLite file; actors elsewhere
keep one per node (``node_cache``; never one SQLite file on a network file system).

Why not ``ray.data.llm``: it maps one prompt to one completion per row. cai's calls are chained
per row (answer, critique, revision for up to four rounds, then the judge), and each row's
principles and seeds come from its id: as processors that is 2 + 2 x rounds + 1 barriers over
the dataset. Here one actor runs a row's whole chain while its other rows keep the engine full,
and a row's turns stay in one engine's prefix cache.
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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import lock, runtime
from ..backends import BackendBase, build_backend, split_urls
from ..backends.vllm_local import model_name
from ..cache import CachedBackend, CallCache, CountingBackend
from ..config import RunConfig, load_run_config
from ..constitution import Constitution
from ..errors import CaiError, ConfigError
from ..files import dumps
from ..manifest import mark_running
from ..model import default_model_dir
from ..output import JsonlSink
from ..pipeline import LabelStage, RunResult, finish_run, kept, label_fingerprint
from ..plan import Plan, check_backend, unique_pair
from ..quality.gates import InputGate
from ..stages.judge import JudgeConfig, JudgeStage
from ..stages.pairs import Pair, SampleConfig, record_to_pair, sample_pair_ids
from ..stages.revise import ReviseConfig, ReviseStage
from ..stages.revise import fingerprint as revise_fingerprint
from ..stages.runner import DURABLE_EVERY_S, Call, Outcome, Pool, prune, run
from ..templates import Templates
from ..usage import Usage

RAY_HINT = "--ray-address needs Ray Data: pip install 'cai[ray]' (or pip install 'ray[data]')"
# The revisions.jsonl line a fused pair comes from is known only when the driver writes the
# revision: an actor puts this in the label row's `source`, and the driver fills it in.
_LINE = "\x00cai:revision-line\x00"
BLOCKS_PER_ACTOR = 2  # while one block waits on the server, the next is prepared
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


def predict_model_id(cfg: RunConfig, options: dict[str, Any]) -> str:
    """The model id the actors' backends will have, without loading a model here: asked of the
    server (``openai``), built (``fake``), or named as the engines name it (``vllm``,
    ``embedded``). Each actor checks its own against it before it runs a row."""
    if cfg.backend in ("openai", "fake"):
        urls = split_urls(cfg.base_url)[:1]  # the first server is asked
        be = build_backend(cfg.backend, cfg.model, **{**cfg.backend_options(), **options, "base_url": urls})
        runtime.close(be)
        return be.model_id
    model = cfg.model
    if cfg.backend == "embedded":
        return f"{(Path(model) if model else default_model_dir()).name}@embedded"
    return model_name(model)


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
        inner = build_backend(cfg.backend, cfg.model, **{**cfg.backend_options(), **spec.backend_options})
        if inner.model_id != spec.model_id:
            runtime.close(inner)
            raise RayRunError(f"this actor's backend serves {inner.model_id!r}, the driver expected "
                              f"{spec.model_id!r}: give every node the same model")
        cache = node_cache_file(spec, self.node)
        self.backend: CachedBackend | CountingBackend = (
            CachedBackend(inner, CallCache(cache)) if cache is not None else CountingBackend(inner))
        self.revise = ReviseStage(const, tpl, ReviseConfig.of(cfg.revise, cfg.seed), inner.model_id)
        self.label = LabelStage(JudgeStage(const, tpl, JudgeConfig.of(cfg.label, cfg.seed), inner.model_id),
                                SampleConfig.of(cfg), tpl.render_text("generate", "system"))
        self.fused = cfg.revise.enabled and cfg.label.enabled and "revisions" in cfg.sources
        self.concurrency = cfg.concurrency
        self.instance = uuid.uuid4().hex  # a restarted actor is a new instance: its counts start again

    async def _one(self, kind: str, obj: Any, call: Call) -> dict[str, list[Outcome]]:
        out: dict[str, list[Outcome]] = {"revise": [], "label": []}
        label = Call(call.pool, call.bar, call.priority, call.affinity, "label")  # the stage in run.json's usage
        if kind == "row":
            call.stage = "revise"
            out["revise"] = outs = await self.revise(obj, call)
            if self.fused and outs and outs[0].row is not None:
                # as a local run does: the pair is made from the row as written (JSON)
                out["label"] = await self.label(record_to_pair(json.loads(dumps(outs[0].row)), _LINE), label)
        else:  # "pair": judge it; "sample": a prompt whose sampled answers are judged in pairs
            out["label"] = await self.label(obj, label)
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
                       "cached": be.hits, "errors": be.errors,
                       "usage": [[*key, *cell] for key, cell in be.usage.cells.items()]})
        return {"seq": seqs, "result": [pickle.dumps(r, protocol=5) for r in results], "stats": [stats] * len(seqs)}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            runtime.close(self.backend)
        self._tmp.cleanup()


# --- the driver ------------------------------------------------------------------------------


@dataclass
class _Work:
    """The work items left to do (in the order a local run writes their rows: seq), and every id
    the inputs hold (the rest are pruned at the end, as a local run does)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    revise_ids: set[str] = field(default_factory=set)
    label_ids: set[str] = field(default_factory=set)
    seq: int = 0

    def add(self, kind: str, item_id: str | None, obj: Any) -> None:
        if item_id is not None:
            self.items.append({"seq": self.seq, "item": pickle.dumps((kind, item_id, obj), protocol=5)})
        self.seq += 1


def _work(plan: Plan, gate: InputGate, rsink: JsonlSink | None, lsink: JsonlSink | None) -> _Work:
    """The plan's work items not yet written: an input row not yet revised (then judged), a pair
    not yet judged, a prompt not yet sampled."""
    work, seen = _Work(), dict[str, int]()

    def add_pair(p: Pair) -> None:
        work.label_ids.add(p.id)
        work.add("pair", None if lsink is None or lsink.is_done(p.id) else p.id, p)

    if plan.revise:
        assert rsink is not None
        for r in gate(plan.prompts()):
            work.revise_ids.add(r.id)
            if not rsink.is_done(r.id):
                if plan.fused:  # its pair, once revised, has the row's id
                    work.label_ids.add(unique_pair(Pair(r.id, [], "", ""), seen).id)
                work.add("row", r.id, r)
            elif plan.fused:  # revised before: its pair, made from the row as written
                add_pair(unique_pair(record_to_pair(rsink.read(r.id), f"{plan.revisions}:{rsink.line_of(r.id)}"),
                                     seen))
            else:
                work.add("row", None, r)
    for item in plan.label_items(seen) if plan.label else ():
        if isinstance(item, Pair):
            add_pair(item)
        else:
            assert lsink is not None
            ids = sample_pair_ids(item.id, plan.config.label.samples)
            work.label_ids.update(ids)
            work.add("sample", None if all(lsink.is_done(i) for i in ids) else ids[0], item)
    return work


def _write(result: dict[str, list[Outcome]], rsink: JsonlSink | None, lsink: JsonlSink | None,
           revisions: Path) -> None:
    """One work item's rows, as a local run writes them (an id written before is left as it is)."""
    lines = rsink.put(result["revise"]) if rsink is not None else []
    for o in result["label"]:
        for d in (o.row, o.info):
            if d is not None and d.get("source") == _LINE:
                d["source"] = f"{revisions}:{lines[0] if lines else None}"
    if lsink is not None:
        lsink.put(result["label"])


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
    cfg = load_run_config(cfg) if not isinstance(cfg, RunConfig) else cfg
    if cfg.best_of_n.enabled:
        raise ConfigError("best_of_n does not run on Ray yet: run it without ray.address", field="best_of_n.enabled")
    plan = Plan.build(cfg, constitution=constitution, backend_given=True)
    const, tpl = plan.constitution, plan.templates
    urls: list[str | None] = [*split_urls(cfg.base_url)] if cfg.backend == "openai" else [None]
    for u in urls:
        check_backend(cfg.backend, u)  # each server accepts connections
    options = dict(backend_options or {})
    model_id = predict_model_id(cfg, options)
    named = _Named(model_id)
    out = cfg.output
    rfp = revise_fingerprint(named, const, tpl, ReviseConfig.of(cfg.revise, cfg.seed))
    res = RunResult(output=out)
    revisions = out / "revisions.jsonl"
    counts: dict[str, dict[str, Any]] = {}  # per actor instance: its latest call counts and tokens
    ray_info: dict[str, Any] = {"address": address, "actors": 0, "nodes": [], "blocks": 0, "rows": 0}
    with lock.writer(out):  # one writer per folder, as a local run; then the rows written in input order
        history = mark_running(out / "run.json")
        with contextlib.ExitStack() as files:
            rsink = files.enter_context(JsonlSink(revisions, rfp)) if plan.revise else None
            lsink = None
            if plan.label:
                lfp = label_fingerprint(plan, named, model_id, rfp)
                lsink = files.enter_context(JsonlSink(out / "labels.jsonl", lfp))
            gate = InputGate(cfg.gates)
            work = _work(plan, gate, rsink, lsink)
            if work.items:
                cache = cfg.cache_path()
                spec = WorkerSpec(
                    config=cfg.model_dump(mode="json"), constitution=const.model_dump(mode="json"),
                    constitution_hash=const.digest(), templates=template_sources(tpl), templates_hash=tpl.digest(),
                    model_id=model_id, cache=str(cache.resolve()) if cache else None,
                    node_cache=str(node_cache) if node_cache else None, driver_node="", backend_options=options)
                _run_on_ray(cfg, spec, work, rsink, lsink, revisions, address=address, actors=actors,
                            actor_cpus=actor_cpus, max_restarts=max_restarts, max_task_retries=max_task_retries,
                            ray_remote_args=ray_remote_args, init_args=init_args, counts=counts, info=ray_info)
            for name, sink, ids in (("revise", rsink, work.revise_ids), ("label", lsink, work.label_ids)):
                if sink is None:
                    continue
                summary = sink.finish()
                if cfg.prune and len(sink.done) > len(ids & sink.done.keys()):
                    summary.dropped = prune(sink.path, ids)
                res.stages[name] = kept(summary, sink, ids)
        res.sent, res.cached, res.errors = (sum(c[k] for c in counts.values()) for k in ("sent", "cached", "errors"))
        res.usage = Usage()  # the tokens each actor reported with its last rows (a killed actor's since then: lost)
        for c in counts.values():
            for stage, step, *cell in c["usage"]:
                res.usage.add(stage, step, *cell)
        res.skipped = gate.skipped
        return finish_run(plan, res, model_id, t0, history, {"ray": ray_info})


def _run_on_ray(cfg: RunConfig, spec: WorkerSpec, plan: _Work, rsink: JsonlSink | None, lsink: JsonlSink | None,
                revisions: Path, *, address: str | None, actors: int | None, actor_cpus: float,
                max_restarts: int | None, max_task_retries: int | None, ray_remote_args: dict[str, Any] | None,
                init_args: dict[str, Any] | None, counts: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    """The work items through the actor pool; their rows written here, in input order."""
    started = _connect(address, init_args)
    try:
        import ray
        import ray.data

        spec = replace(spec, driver_node=ray.get_runtime_context().get_node_id())
        blocks = math.ceil(len(plan.items) / cfg.ray.block_size)
        size, gpus = _pool_size(cfg, actors, blocks)
        if cfg.backend == "openai":  # --rpm/--tpm are the run's: each actor sends its share
            spec.backend_options.update({k: max(1, v // size) for k, v in (("rpm", cfg.rpm), ("tpm", cfg.tpm)) if v})
        seqs, rows = [int(w["seq"]) for w in plan.items], len(plan.items)
        ds = ray.data.from_items(plan.items, override_num_blocks=blocks)
        plan.items = []  # in the object store now
        ds.context.execution_options.preserve_order = True  # the driver reorders too; this keeps its buffer small
        if cfg.progress is False:
            ds.context.enable_progress_bars = False
        compute = ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=BLOCKS_PER_ACTOR,
                                             enable_true_multi_threading=True)
        remote = {k: v for k, v in (("max_restarts", max_restarts), ("max_task_retries", max_task_retries))
                  if v is not None} | (ray_remote_args or {})
        mapped = ds.map_batches(RowWorker, fn_constructor_kwargs={"spec": spec}, batch_size=cfg.ray.block_size,
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
                    counts[stat["instance"]] = {k: stat[k] for k in ("sent", "cached", "errors", "usage")}
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
