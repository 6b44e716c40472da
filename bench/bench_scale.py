"""Rows/s of `cai run` on one server, then on two: does a second server double the rate?

    .venv/bin/python bench/bench_scale.py            # 1200 rows on 1 and on 2 servers (about 3 min)
    .venv/bin/python bench/bench_scale.py --quick    # 400 rows (about a minute)

The servers are tests/fake_server.py's simulated engines (``--slots``), each its own process,
all with the same settings (default S = 32 slots, 4 ms per token, long-tailed lengths): a
server's slots, not the client, are the bottleneck.
The run is `python -m cai.cli run --backend openai --no-label --revise-rounds 2` (5 dependent
calls a row: an answer, then a critique and a revision per round), no cache, the same
``--concurrency`` (default 128) for every server count, one ``--base-url`` per server. Its own
process; rows/s = rows / run.json's ``elapsed_s`` (the pipeline, not the interpreter's start).
Per server: calls served and utilisation (busy slot-seconds / (slots x span)).

The rate ratio cannot quite reach the server ratio: each run starts with empty slots and ends
with the last rows' chains draining (a few seconds of 5 calls in a row), a fixed cost that is a
larger share of the shorter run. More rows: closer to 2.

Figures, not assertions. The last line is ``rows/s 2 servers / 1 server R``.

``--vllm``: instead, the prefix-cache hit rate on real servers: two vLLM servers (``.venv-vllm``,
SmolLM2-135M, float32, CPU, each its own process group; ``VLLM_SERVER_DEV_MODE=1`` for
``POST /reset_prefix_cache`` before each run), a 2-round critique-revise run of ``--vllm-rows``
prompts of examples/hh_red_team.jsonl, in this process, on 1 server, on 2 with row affinity,
and on 2 without (least-loaded only). Hit rate = the growth of ``vllm:prefix_cache_hits`` /
``vllm:prefix_cache_queries`` (prompt tokens) over the run, summed over the servers used.

Measured on the 2-core development box (shared), 2026-11-29:

- default settings (1200 rows): 1 server 15.70 rows/s (utilisation 0.99), 2 servers 30.62 rows/s
  (3000/3000 calls, 0.97/0.97): ``rows/s 2 servers / 1 server 1.951`` (``--quick``: 1.896).
- ``--vllm --vllm-rows 16 --vllm-max-tokens 32``: hit rate 0.214 on 1 server, 0.161 on 2 with
  affinity, 0.161 on 2 without. cai's critique and revision prompts are single-turn requests
  after the principle's few-shot turns: what they share is the principle's examples (across
  rows), not a row's earlier turns, so two caches hit less than one; and with equal servers
  least-loaded routing already keeps a row where it was, so affinity changed nothing here.
  (Both servers share the same 2 cores: their times are not a throughput figure.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_engine import get  # noqa: E402 - a sibling script: the same small HTTP helper

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
ROUNDS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_vllm(proc: subprocess.Popen[bytes], log: Path, port: int, deadline: float) -> None:
    """Until the vLLM server on ``port`` answers /v1/models; its exit or ``deadline`` (monotonic)
    ends the benchmark, naming its log."""
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited ({proc.returncode}); see {log}")
        try:
            get(f"http://127.0.0.1:{port}/v1/models")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"vLLM not ready in time; see {log}") from None
            time.sleep(2)


def start_servers(n: int, slots: int, ms_per_token: float) -> list[tuple[int, subprocess.Popen[bytes]]]:
    servers = []
    for _ in range(n):
        port = free_port()
        proc = subprocess.Popen([PY, str(REPO / "tests" / "fake_server.py"), "--port", str(port), "--model", "sim",
                                 "--slots", str(slots), "--ms-per-token", str(ms_per_token), "--max-seconds", "3600"],
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        servers.append((port, proc))
    deadline = time.monotonic() + 60
    for port, _ in servers:
        while True:
            try:
                get(f"http://127.0.0.1:{port}/stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    return servers


def run_cai(ports: list[int], prompts: Path, out: Path, concurrency: int) -> dict:
    for p in ports:
        get(f"http://127.0.0.1:{p}/reset", b"")
    argv = [PY, "-m", "cai.cli", "run", "--input", str(prompts), "-o", str(out), "--backend", "openai",
            "--model", "sim", "--no-label", "--revise-rounds", str(ROUNDS), "--concurrency", str(concurrency),
            "--no-cache", "--no-progress"]
    for p in ports:
        argv += ["--base-url", f"http://127.0.0.1:{p}/v1"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cai run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    manifest = json.loads((out / "run.json").read_text())
    counts = manifest["counts"]["revise"]
    return {"servers": len(ports), "rows": counts["written"], "failed": counts["failed"],
            "elapsed_s": manifest["elapsed_s"], "wall_s": wall,
            "per_server": [get(f"http://127.0.0.1:{p}/stats") for p in ports]}


def start_vllm(port: int) -> tuple[subprocess.Popen[bytes], Path]:
    python = REPO / ".venv-vllm" / "bin" / "python"
    model = REPO / ".models" / "SmolLM2-135M-Instruct"
    tmp = REPO / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_SERVER_DEV_MODE": "1", "TMPDIR": str(tmp),
           "VLLM_CACHE_ROOT": str(REPO / ".cache" / "vllm")}
    log = tmp / f"bench-scale-vllm-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                 "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager",
                                 "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port), "--seed", "0"],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                start_new_session=True)
    return proc, log


def prefix_counters(port: int) -> tuple[float, float]:
    """(hits, queries): vLLM's prefix-cache counters, in prompt tokens."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    got = {"hits": 0.0, "queries": 0.0}
    for line in text.splitlines():
        for k in got:
            if line.startswith(f"vllm:prefix_cache_{k}_total"):
                got[k] += float(line.rsplit(" ", 1)[1])
    return got["hits"], got["queries"]


def vllm_mode(rows: int, max_tokens: int, concurrency: int) -> None:
    sys.path.insert(0, str(REPO))
    from cai.backends.multi import MultiServerBackend
    from cai.backends.openai_server import OpenAIServerBackend
    from cai.config import RunConfig
    from cai.pipeline import run_pipeline
    from cai.runtime import closing

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still stop the servers
    ports = [free_port(), free_port()]
    started = [start_vllm(p) for p in ports]
    results = []
    try:
        deadline = time.monotonic() + 1200
        for port, (proc, log) in zip(ports, started, strict=True):
            wait_for_vllm(proc, log, port, deadline)
        print(f"  vLLM servers ready on {ports}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="cai-bench-scale-vllm-") as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            src = (REPO / "examples" / "hh_red_team.jsonl").read_text().splitlines()[:rows]
            prompts.write_text("\n".join(src) + "\n")
            for name, used, affinity in [("1 server", ports[:1], True), ("2 servers, affinity", ports, True),
                                         ("2 servers, no affinity", ports, False)]:
                for p in used:
                    get(f"http://127.0.0.1:{p}/reset_prefix_cache", b"")
                before = [prefix_counters(p) for p in used]
                urls = [f"http://127.0.0.1:{p}/v1" for p in used]
                be = (OpenAIServerBackend(model="smollm2", base_url=urls[0], concurrency=concurrency)
                      if len(urls) == 1 else
                      MultiServerBackend(model="smollm2", base_url=urls, concurrency=concurrency, affinity=affinity))
                cfg = RunConfig.model_validate({
                    "input": str(prompts), "output": f"{tmp}/{len(results)}", "backend": "openai", "model": "smollm2",
                    "base_url": urls, "concurrency": concurrency, "cache": "off", "progress": False,
                    "revise": {"rounds": ROUNDS, "max_tokens": max_tokens}, "label": {"enabled": False}})
                t0 = time.perf_counter()
                with closing(be):
                    res = run_pipeline(cfg, backend=be)
                    split = [s["answered"] for s in be.describe().get("servers", [])] or [res.sent]
                dt = time.perf_counter() - t0
                after = [prefix_counters(p) for p in used]
                hits = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
                queries = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
                rev = res.stages["revise"]
                results.append({"run": name, "rows": rev.written, "failed": rev.failed, "seconds": dt, "calls": split,
                                "hits": hits, "queries": queries, "hit_rate": sum(hits) / max(1.0, sum(queries))})
                print(f"  {name}: {dt:.0f} s", file=sys.stderr, flush=True)
    finally:
        for proc, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(f"vLLM (CPU) x2, SmolLM2-135M; {rows} rows, revise rounds {ROUNDS}, max_tokens {max_tokens}, "
          f"concurrency {concurrency}")
    print(f"{'run':>24} {'rows':>5} {'failed':>6} {'s':>6} {'calls per server':>17} {'hit/query tokens':>22} "
          f"{'hit rate':>8}")
    for r in results:
        hq = "/".join(f"{h:.0f}" for h in r["hits"]) + " of " + "/".join(f"{q:.0f}" for q in r["queries"])
        print(f"{r['run']:>24} {r['rows']:>5} {r['failed']:>6} {r['seconds']:>6.0f} "
              f"{'/'.join(map(str, r['calls'])):>17} {hq:>22} {r['hit_rate']:>8.3f}")
    out = REPO / ".tmp" / "bench" / "scale_vllm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 rows")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--ms-per-token", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--vllm", action="store_true", help="prefix-cache hit rates on two real vLLM servers")
    ap.add_argument("--vllm-rows", type=int, default=32)
    ap.add_argument("--vllm-max-tokens", type=int, default=64)
    ap.add_argument("--vllm-concurrency", type=int, default=32)
    a = ap.parse_args()
    if a.vllm:
        vllm_mode(a.vllm_rows, a.vllm_max_tokens, a.vllm_concurrency)
        return
    rows = a.rows or (400 if a.quick else 1200)
    servers = start_servers(max(a.servers), a.slots, a.ms_per_token)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="cai-bench-scale-") as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Prompt {i}: how do I do thing "
                                                   f"{i * 7919 % 100003}?"}) + "\n" for i in range(rows)))
            for n in a.servers:
                r = run_cai([p for p, _ in servers[:n]], prompts, Path(tmp) / f"out{n}", a.concurrency)
                r["rows_per_s"] = r["rows"] / r["elapsed_s"]
                results.append(r)
                print(f"  {n} server(s): {r['rows']} rows in {r['elapsed_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        for _, proc in servers:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    print(f"sim servers: {a.slots} slots, {a.ms_per_token:g} ms/token; cai run --no-label --revise-rounds {ROUNDS} "
          f"--concurrency {a.concurrency}; {rows} rows, {5 * rows} calls")
    print(f"{'servers':>7} {'rows':>6} {'failed':>6} {'pipeline s':>10} {'wall s':>7} {'rows/s':>7} "
          f"{'calls per server':>20} {'utilisation per server':>24}")
    for r in results:
        calls = "/".join(str(s["requests"]) for s in r["per_server"])
        util = "/".join(f"{s['utilisation']:.2f}" if s["utilisation"] else "-" for s in r["per_server"])
        print(f"{r['servers']:>7} {r['rows']:>6} {r['failed']:>6} {r['elapsed_s']:>10.1f} {r['wall_s']:>7.1f} "
              f"{r['rows_per_s']:>7.2f} {calls:>20} {util:>24}")
    out = REPO / ".tmp" / "bench" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    by = {r["servers"]: r for r in results}
    if 1 in by and 2 in by:
        print(f"rows/s 2 servers / 1 server {by[2]['rows_per_s'] / by[1]['rows_per_s']:.3f}")


if __name__ == "__main__":
    main()
