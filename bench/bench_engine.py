"""How full `cai run` keeps a continuous-batching engine, beside a plain per-row asyncio client.

    .venv/bin/python bench/bench_engine.py            # S = 256 and 64, 4,000 rows each
    .venv/bin/python bench/bench_engine.py --quick    # about a minute

The server is tests/fake_server.py's simulated engine (``--slots S``): S slots (vLLM's
max_num_seqs), each request holds a slot for completion_tokens x 2 ms, lengths lognormal
(median 0.35 x max_tokens, capped at 256).
Both clients run the same critique-revise work: per row an answer (256 tokens max), then per
round a critique (192) and a revision (256), 2 rounds: 5 dependent calls a row.

- **plain**: the ideal client, a few lines of asyncio: each row its own chain of calls, S rows
  in flight, one aiohttp session. Its own process.
- **cai run**: `python -m cai.cli run --backend openai --no-label`, default settings but the
  concurrency (= S), no cache; its own process.

Utilisation = the server's busy slot-seconds / (S x span from first request to last answer).
The figure to read is the ratio cai/plain at S = 256 (target >= 0.9), printed last as
`utilisation cai/ideal R (S=256)`. Figures, not assertions: nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
ROUNDS = 2


def get(url: str, data: bytes | None = None) -> dict:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


async def plain(url: str, rows: int, in_flight: int) -> None:
    """The ideal client: every row a chain of 5 calls, ``in_flight`` rows at a time."""
    import aiohttp

    todo = iter(range(rows))

    async def ask(session: aiohttp.ClientSession, content: str, max_tokens: int) -> str:
        body = {"model": "sim", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        async with session.post(f"{url}/chat/completions", json=body) as resp:
            data = await resp.json()
            return str(data["choices"][0]["message"]["content"])

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in todo:
            answer = await ask(session, f"prompt {i}", 256)
            for r in range(ROUNDS):
                critique = await ask(session, f"critique {i}.{r}: {answer[:200]}", 192)
                answer = await ask(session, f"revise {i}.{r}: {critique[:200]}", 256)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))


def measure(url: str, base: str, argv: list[str]) -> dict:
    get(f"{base}/reset", b"")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed: {proc.stderr[-2000:]}")
    return {**get(f"{base}/stats"), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows (about a minute)")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--slots", type=int, nargs="+", default=[256, 64])
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--plain-client", nargs=3, metavar=("URL", "ROWS", "IN_FLIGHT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.plain_client:
        asyncio.run(plain(a.plain_client[0], int(a.plain_client[1]), int(a.plain_client[2])))
        return
    results = []
    for slots in a.slots:
        rows = a.rows or ((slots * 3) if a.quick else 4000)
        server = subprocess.Popen([PY, str(REPO / "tests" / "fake_server.py"), "--port", str(a.port), "--model", "sim",
                                   "--slots", str(slots)], start_new_session=True, stdout=subprocess.DEVNULL)
        base, url = f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{a.port}/v1"
        try:
            for _ in range(100):
                try:
                    get(f"{base}/stats")
                    break
                except OSError:
                    time.sleep(0.1)
            with tempfile.TemporaryDirectory(prefix="cai-bench-engine-") as tmp:
                prompts = Path(tmp) / "prompts.jsonl"
                prompts.write_text("".join(json.dumps({"prompt": f"Prompt {i}: how do I do thing {i}?"}) + "\n"
                                           for i in range(rows)))
                p = measure(url, base, [PY, __file__, "--plain-client", url, str(rows), str(slots)])
                c = measure(url, base, [PY, "-m", "cai.cli", "run", "--input", str(prompts), "-o", f"{tmp}/out",
                                        "--backend", "openai", "--base-url", url, "--model", "sim", "--no-label",
                                        "--revise-rounds", str(ROUNDS), "--concurrency", str(slots), "--no-cache",
                                        "--no-progress"])
            results.append({"slots": slots, "rows": rows, "plain": p, "cai": c,
                            "ratio": c["utilisation"] / p["utilisation"]})
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    print(f"{'S':>5} {'rows':>6} {'calls':>6} {'plain util':>10} {'cai util':>9} {'cai/plain':>9} "
          f"{'plain s':>8} {'cai s':>7}")
    for r in results:
        p, c = r["plain"], r["cai"]
        print(f"{r['slots']:>5} {r['rows']:>6} {c['requests']:>6} {p['utilisation']:>10.3f} "
              f"{c['utilisation']:>9.3f} {r['ratio']:>9.3f} {p['span_s']:>8.1f} {c['span_s']:>7.1f}")
    out = REPO / ".tmp" / "bench" / "engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    head = next((r for r in results if r["slots"] == 256), results[0])
    print(f"utilisation cai/ideal {head['ratio']:.3f} (S={head['slots']})")


if __name__ == "__main__":
    main()
