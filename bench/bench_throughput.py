"""Throughput of `cai run` against a zero-latency stub server, beside a bare aiohttp loop.

    .venv/bin/python bench/bench_throughput.py                      # 10k and 100k rows
    .venv/bin/python bench/bench_throughput.py --rows 2000 20000    # quicker

One stub server (tests/fake_server.py --stub, its own process, 127.0.0.1) serves everything, in this
order: the bare loop, `cai run` on the small input, the bare loop again, `cai run` on the large
input, and a no-change rerun of the small one. The bare loop is a plain asyncio program in its
own process: one aiohttp session, ``--concurrency`` workers posting chat-completion bodies of
the size cai sends and parsing the JSON answers; nothing else. Each `cai run` is a process of
its own too, so its peak RSS (``ru_maxrss`` from wait4) is its own. The targets: cai at least
0.5x the bare loop's requests/s, large/small time ratio at most 11 for 10x the rows, peak RSS
under 1 GiB. Results are printed and written to OUT/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable


def bare_body(i: int) -> bytes:
    """A body like cai's critique requests: a conversation, a reply, a principle."""
    words = " ".join(f"word{(i * 7 + j) % 997}" for j in range(120))
    msgs = [{"role": "user", "content": f"Here is a conversation {i}. {words}\n\nCritique request:"
             " Identify specific ways in which the reply is harmful."}]
    return json.dumps({"model": "stub", "messages": msgs, "max_tokens": 192, "temperature": 0.0,
                       "top_p": 1.0, "n": 1, "seed": i}).encode()


async def bare_loop(url: str, n: int, concurrency: int) -> dict:
    import aiohttp

    bodies = [bare_body(i) for i in range(n)]  # built before the clock starts
    todo = iter(bodies)
    ok = 0
    post = f"{url}/chat/completions"

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        for body in todo:
            async with session.post(post, data=body) as resp:
                data = json.loads(await resp.read())
                ok += resp.status == 200 and bool(data["choices"])

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, headers={
            "Content-Type": "application/json", "Authorization": "Bearer EMPTY"}) as session:
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"requests": n, "ok": ok, "seconds": dt, "rps": n / dt, "cpu_us_per_request": round(cpu / n * 1e6, 1)}


def backend_only(url: str, n: int, concurrency: int, batch: int) -> dict:
    """cai's openai backend alone: generate() on prebuilt requests, ``batch`` in flight at a time."""
    sys.path.insert(0, str(REPO))  # a checkout without `pip install -e .`
    from cai import runtime
    from cai.backends.openai_server import OpenAIServerBackend
    from cai.types import Request, Sampling

    reqs = [Request(tuple(json.loads(bare_body(i))["messages"]), Sampling(max_tokens=192, seed=i))
            for i in range(n)]
    be = OpenAIServerBackend(model="stub", base_url=url, concurrency=concurrency)
    t0, c0 = time.perf_counter(), time.process_time()
    ok = sum(not c.error for i in range(0, n, batch) for c in runtime.generate_all(be, reqs[i: i + batch]))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    runtime.close(be)
    return {"requests": n, "ok": ok, "batch": batch, "seconds": dt, "rps": n / dt,
            "cpu_us_per_request": round(cpu / n * 1e6, 1)}


def client_only(url: str, n: int, concurrency: int, client: str) -> dict:
    """One chat-completion client alone, ``concurrency`` requests in flight: cai's (aiohttp, with
    its retries and dialect handling) or the ``openai`` SDK's ``AsyncOpenAI`` (httpx); CPU per request."""
    sys.path.insert(0, str(REPO))
    bodies = [json.loads(bare_body(i)) for i in range(n)]
    from openai import AsyncOpenAI  # imported before the clock starts, as cai's client is

    from cai.backends.openai_server import OpenAIServerBackend
    from cai.types import Request, Sampling

    async def go() -> int:
        sem = asyncio.Semaphore(concurrency)
        if client == "aiohttp":
            be = OpenAIServerBackend(model="stub", base_url=url, concurrency=concurrency)
            reqs = [Request(tuple(b["messages"]), Sampling(max_tokens=192, seed=b["seed"])) for b in bodies]

            async def one(i: int) -> bool:
                async with sem:
                    return (await be.generate(reqs[i])).failure is None
        else:
            sdk = AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=5)

            async def one(i: int) -> bool:
                async with sem:
                    r = await sdk.chat.completions.create(**bodies[i])
                    return bool(r.choices)
        try:
            return sum(await asyncio.gather(*(one(i) for i in range(n))))
        finally:
            await (be.aclose() if client == "aiohttp" else sdk.close())

    t0, c0 = time.perf_counter(), time.process_time()
    ok = asyncio.run(go())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"client": client, "requests": n, "ok": ok, "seconds": round(dt, 2), "rps": round(n / dt, 1),
            "cpu_us_per_request": round(cpu / n * 1e6, 1)}


def run_measured(cmd: list[str]) -> dict:
    """Run a child with wait4 so that its own peak RSS is known."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "stderr": err}


def prompt_text(i: int, kind: str) -> str:
    """Prompt ``i``. ``templated``: one sentence with the number changed, so that every pair is
    about 0.5 similar and the near-duplicate gate's LSH proposes a share of all rows kept so
    far for each new one (its cost grows with the rows); ``varied``: 14 words drawn from 5,000
    (seeded), as unalike as real prompt sets are."""
    if kind == "templated":
        return f"Question {i}: how should I handle situation number {i} with my neighbour's dog?"
    rng = random.Random(i)
    return f"Question {i}: " + " ".join(f"w{rng.randrange(5000)}" for _ in range(14)) + "?"


def write_prompts(path: Path, n: int, kind: str) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "prompt": prompt_text(i, kind)}) + "\n")


def cai_run(url: str, prompts: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [PY, "-m", "cai.cli", "run", "--input", str(prompts), "--output", str(out),
           "--backend", "openai", "--base-url", url, "--model", "stub",
           "--concurrency", str(args.concurrency),
           "--revise-rounds", str(args.rounds), "--label-principles", str(args.principles),
           "--no-progress"]
    r = run_measured(cmd)
    m = json.loads((out / "run.json").read_text())
    sent = m["calls"]["sent"]
    rows = m["counts"]["revise"]["rows"]
    return {"rows": rows, "calls_sent": sent, "calls_cached": m["calls"]["cached"],
            "wall_s": round(r["wall_s"], 2), "pipeline_s": m["elapsed_s"],
            "rps_wall": round(sent / r["wall_s"], 1),
            "rps_pipeline": round(sent / m["elapsed_s"], 1) if sent else 0.0,
            # the process's own CPU (all threads, start-up included): with other jobs on the
            # same cores, a steadier measure than the rates
            "cpu_s": round(r["cpu_s"], 2), "cpu_us_per_call": round(r["cpu_s"] / sent * 1e6, 1) if sent else None,
            "peak_rss_mib": round(r["peak_rss_mib"], 1), "command": " ".join(cmd)}


def child(*args: object) -> dict:
    r = subprocess.run([PY, str(HERE / "bench_throughput.py"), *map(str, args)], cwd=REPO,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout)


def bare(url: str, n: int, c: int) -> dict:
    return child("--bare", url, n, c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs=2, default=[10_000, 100_000],
                    metavar=("SMALL", "LARGE"))
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="revise.rounds (cai's default: 4)")
    ap.add_argument("--principles", type=int, default=1,
                    help="label.principles, judged in both orders (cai's default: 4)")
    ap.add_argument("--prompts", choices=("varied", "templated"), default="varied",
                    help="varied: unalike prompts (default); templated: one sentence, the number changed "
                    "(the near-duplicate gate's worst case: its cost per row grows with the rows)")
    ap.add_argument("--out", type=Path, default=REPO / ".tmp" / "bench")
    ap.add_argument("--bare", nargs=3, metavar=("URL", "N", "CONCURRENCY"), help=argparse.SUPPRESS)
    ap.add_argument("--backend-only", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--client-only", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        url, n, c = args.bare
        print(json.dumps(asyncio.run(bare_loop(url, int(n), int(c)))))
        return
    if args.backend_only:
        url, n, c, b = args.backend_only
        print(json.dumps(backend_only(url, int(n), int(c), int(b))))
        return
    if args.client_only:
        url, n, c, which = args.client_only
        print(json.dumps(client_only(url, int(n), int(c), which)))
        return
    small, large = args.rows
    args.out.mkdir(parents=True, exist_ok=True)
    # cai as installed: a wheel's modules are compiled at install time, and an editable install
    # writes them on first import, unless PYTHONDONTWRITEBYTECODE is set (some sandboxes set
    # it), when every `cai run` compiled cai's own modules again (0.1 s of CPU per process)
    subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "cai")], stdout=subprocess.DEVNULL)  # read-only: as before
    for name in ("small", "large"):
        subprocess.run(["rm", "-rf", str(args.out / name)], check=True)
    server = subprocess.Popen([PY, str(REPO / "tests" / "fake_server.py"), "--stub", "--model", "stub",
                               "--max-seconds", "7200"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[-1])
        url = f"http://127.0.0.1:{port}/v1"
        write_prompts(args.out / "small.jsonl", small, args.prompts)
        write_prompts(args.out / "large.jsonl", large, args.prompts)
        # the answer, a critique and a revision per round, k principles x both orders
        calls_per_row = 1 + 2 * args.rounds + 2 * args.principles
        n_bare = small * calls_per_row
        res: dict = {"cpus": os.cpu_count(), "concurrency": args.concurrency,
                     "chunk_size": args.chunk_size, "rounds": args.rounds,
                     "principles": args.principles, "prompts": args.prompts}
        print(f"stub server on {url}; {os.cpu_count()} CPUs", flush=True)
        res["bare_1"] = bare(url, n_bare, args.concurrency)
        print("bare loop:", res["bare_1"], flush=True)
        res["backend_only"] = child("--backend-only", url, n_bare, args.concurrency,
                                    args.chunk_size)
        print("cai openai backend alone:", res["backend_only"], flush=True)
        for which in ("aiohttp", "openai-sdk"):  # the same requests through each client, side by side
            res[f"client_{which}"] = child("--client-only", url, n_bare, args.concurrency, which)
            print(f"client {which}:", res[f"client_{which}"], flush=True)
        res["cai_small"] = cai_run(url, args.out / "small.jsonl", args.out / "small", args)
        print("cai small:", res["cai_small"], flush=True)
        res["bare_2"] = bare(url, n_bare, args.concurrency)
        print("bare loop:", res["bare_2"], flush=True)
        res["cai_large"] = cai_run(url, args.out / "large.jsonl", args.out / "large", args)
        print("cai large:", res["cai_large"], flush=True)
        res["cai_small_rerun"] = cai_run(url, args.out / "small.jsonl", args.out / "small", args)
        print("cai small, no-change rerun:", res["cai_small_rerun"], flush=True)
    finally:
        server.terminate()
        server.wait(10)
    bare_rps = (res["bare_1"]["rps"] + res["bare_2"]["rps"]) / 2
    s, big = res["cai_small"], res["cai_large"]
    res["summary"] = {
        "bare_rps": round(bare_rps, 1),
        "backend_only_rps": round(res["backend_only"]["rps"], 1),
        "cai_rps_wall": s["rps_wall"], "cai_rps_pipeline": s["rps_pipeline"],
        "ratio_wall": round(s["rps_wall"] / bare_rps, 3),
        "ratio_pipeline": round(s["rps_pipeline"] / bare_rps, 3),
        # the same two for the large input, where start-up weighs 10x less
        "ratio_wall_large": round(big["rps_wall"] / bare_rps, 3),
        "ratio_pipeline_large": round(big["rps_pipeline"] / bare_rps, 3),
        "large_over_small_time": round(big["wall_s"] / s["wall_s"], 2),
        "large_over_small_pipeline": round(big["pipeline_s"] / s["pipeline_s"], 2),
        "peak_rss_mib": max(s["peak_rss_mib"], big["peak_rss_mib"]),
        "bare_cpu_us_per_request": res["bare_1"]["cpu_us_per_request"],
        "cai_cpu_us_per_call": [s["cpu_us_per_call"], big["cpu_us_per_call"]],
        "client_cpu_us_per_request": {w: res[f"client_{w}"]["cpu_us_per_request"] for w in ("aiohttp", "openai-sdk")},
        "rerun_calls_sent": res["cai_small_rerun"]["calls_sent"],
    }
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["summary"], indent=2))


if __name__ == "__main__":
    main()
