"""Kill, resume, cache and diff on the backends that talk to a model, not only the fake one.

For each of: the ``openai`` backend against tests/fake_server.py's zero-latency stub, the ``openai``
backend against a real vLLM server, and in-process vLLM (``--backend vllm``, run with .venv-vllm's python), one test
runs `cai run` as a subprocess in its own process group and checks:

(a) ``kill -9`` of the group at random moments mid-run (after its first committed call), then a
    rerun that finishes: one row per input row in revisions.jsonl and in labels.jsonl (with
    labels.failures.jsonl: a pair the judge cannot label is listed there instead), every final file
    whole after every kill, and no call committed before a kill sent again (the openai backends: the
    fake server as a proxy with ``tag=True`` tags each answer with its request, so the cache file says
    which requests were committed); no process of the killed group or of its children is left running
    (the in-process engine core and its worker);
(b) a rerun with nothing changed sends 0 calls (run.json's last history entry, and the server's
    own count), and writes the same rows;
(c) after one principle's critique is reworded in a copy of the constitution, `cai diff --run`
    predicts exactly the number of calls the rerun then sends.

The real-model cases are tiny (6 rows, one revision round, one judge principle, 16 tokens). The
in-process tests start an engine per `cai run` (five for the kill test) and are also marked ``slow``;
the last one kills cai alone (not its group, as the OOM killer does): its engine core and workers
must not outlive it (cai/backends/vllm_local.py's watchdog).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from cai.constitution import load_constitution
from tests.fake_server import FakeConfig, FakeServer, committed
from tests.test_resume_kill import assert_whole

REPO = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("CAI_KILL_SEED", time.time_ns()))
TINY = ["--revise-rounds", "1", "--label-principles", "1", "--revise-max-tokens", "16"]
# the in-process engine on a CPU: tests/test_backend_vllm_local.py's CPU_ENV and CPU_ENGINE as flags
VLLM_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CACHE_ROOT": str(REPO / ".cache" / "vllm"),
}
VLLM_CPU_FLAGS = ["--vllm-dtype", "float32", "--vllm-max-model-len", "2048", "--vllm-enforce-eager"]


# ------------------------------------------------------------------------------------ helpers
def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any CAI_* setting (a developer's CAI_CACHE must not leak in)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CAI_")}, **extra}


WORDS = ("rivers", "bread", "glaciers", "violins", "bees", "comets", "copper", "tides", "moss", "owls", "salt",
         "kites", "clocks", "ferns", "lanterns", "wolves", "honey", "canyons", "pearls", "storms", "maps")


def write_prompts(path: Path, n: int) -> Path:
    """``n`` prompts far enough apart that the near-duplicate gate keeps every one."""
    with path.open("w") as f:
        for i in range(n):
            a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 7) % len(WORDS)]
            f.write(json.dumps({"id": f"q{i:02d}", "prompt": f"Question {i}: what do {a} and {b} share?"}) + "\n")
    return path


def write_constitution(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def cache_rows(cache: Path) -> int:
    if not cache.exists():
        return 0
    try:
        db = sqlite3.connect(str(cache), timeout=5)
        try:
            return int(db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:  # not created yet
        return 0


def last_run(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())["history"][-1]


def processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, state), from /proc."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        found[int(d.name)] = (int(ppid), int(pgrp), state)
    return found


def descendants(pid: int) -> set[int]:
    procs, found, todo = processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, _, _) in procs.items():
            if ppid == parent and p not in found:
                found.add(p)
                todo.append(p)
    return found


def alive(pids: set[int], group: int) -> dict[int, str]:
    """The processes among ``pids`` or in process group ``group`` still running (zombies are dead)."""
    out = {}
    for p, (_, pgrp, state) in processes().items():
        if (p in pids or pgrp == group) and state not in ("Z", "X"):
            try:
                out[p] = (Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160])
            except OSError:
                continue
    return out


def kill_then_finish(cmd: list[str], env: dict[str, str], out: Path, *, kills: int, window: float,
                     rng: random.Random, startup_timeout: float, finish_timeout: float,
                     after_kill: Callable[[], None] = lambda: None) -> list[int]:
    """Run ``cmd`` and ``kill -9`` its process group a random moment (up to ``window`` s) after its
    first committed call, ``kills`` times; then run it to the end. Returns the killed pids."""
    cache = out / "cache.sqlite"
    killed: list[int] = []
    log = out.parent / "cai-stderr.log"
    for _ in range(kills):
        base = cache_rows(cache)
        with log.open("ab") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout
            while proc.poll() is None and cache_rows(cache) == base:
                assert time.monotonic() < deadline, f"no call committed in {startup_timeout:.0f} s"
                time.sleep(0.02)
            deadline = time.monotonic() + rng.uniform(0.0, window)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if proc.poll() is not None:
                break  # it finished before the kill
            family = descendants(proc.pid)  # the engine core and its worker, for in-process vLLM
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed.append(proc.pid)
            end = time.monotonic() + 15
            while (left := alive(family, proc.pid)) and time.monotonic() < end:
                time.sleep(0.2)
            assert not left, f"left running after kill -9 of cai's process group: {left}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert_whole(out)
        after_kill()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=finish_timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return killed


def check_one_row_each(out: Path, n: int) -> None:
    """Exactly one row per input row: revisions.jsonl in input order; labels.jsonl and
    labels.failures.jsonl together, each id once; no temporary file left."""
    assert_whole(out)
    ids = [f"q{i:02d}" for i in range(n)]
    assert [r["id"] for r in rows(out / "revisions.jsonl")] == ids
    assert not rows(out / "revisions.failures.jsonl")
    labelled = [r["id"] for r in rows(out / "labels.jsonl")] + [r["id"] for r in rows(out / "labels.failures.jsonl")]
    assert sorted(labelled) == ids, "a row labelled twice, or not at all"
    prefs = [p["id"] for p in rows(out / "preferences.jsonl")]
    assert len(prefs) == len(set(prefs))
    assert not [p.name for p in out.iterdir() if p.name.endswith((".part", ".tmp"))]


def run_cai(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def no_change_and_diff(tmp: Path, cmd: list[str], env: dict[str, str], old: Path, *, edit: str, timeout: float,
                       proxy: FakeServer | None = None, lost: frozenset[int] | set[int] = frozenset()) -> None:
    """(b) and (c) on a finished run; ``proxy`` counts the calls the server saw, where it can;
    ``lost``: the calls answered before a kill but never committed (see above).

    ``edit``: the field reworded. ``critique`` redoes a chain (critique, then the revision and the
    judge calls downstream of it); `cai diff` counts the downstream calls as redone, which is exact
    only when every redone answer differs from the cached one: so it is for the stub (an answer is
    a hash of its request), not for a real model at temperature 0, whose redone revision may come
    back word for word the same (its judge calls are then served from the cache). ``comparison``
    redoes judge calls only, the last step: exact on any backend."""
    out = tmp / "out"
    runs = len(json.loads((out / "run.json").read_text())["history"])
    revs, labels = (out / "revisions.jsonl").read_text(), (out / "labels.jsonl").read_text()
    sent = (lambda: len(proxy.log)) if proxy else None
    seen = sent() if sent else 0
    # (b) nothing changed: not one call
    run_cai(cmd, env, timeout)
    m = json.loads((out / "run.json").read_text())
    assert len(m["history"]) == runs + 1
    assert m["history"][-1]["calls"]["sent"] == 0, m["history"][-1]["calls"]
    assert m["history"][-1]["counts"]["revise"]["resumed"] == len(revs.splitlines())
    assert (out / "revisions.jsonl").read_text() == revs and (out / "labels.jsonl").read_text() == labels
    if sent:
        assert sent() == seen, "the server was sent calls on a no-change rerun"
        # a fresh output folder on the same cache: every row rebuilt from the cache, not one call
        # sent but the ones a kill kept out of the cache
        fresh = tmp / "fresh"
        run_cai([*cmd, "-o", str(fresh), "--cache", str(out / "cache.sqlite")], env, timeout)
        calls = last_run(fresh)["calls"]
        assert calls["sent"] == len(lost) and calls["cached"] > 0, calls
        assert proxy is not None and set(proxy.sent()[seen:]) == set(lost) and sent() - seen == len(lost)
        if not lost:
            assert (fresh / "revisions.jsonl").read_text().replace(str(fresh), str(out)) == revs
        seen = sent()

    # (c) reword the principle the first row was critiqued (or judged) with
    const = yaml.safe_load(old.read_text())
    if edit == "critique":
        pid = rows(out / "revisions.jsonl")[0]["rounds"][0]["principle_id"]
    else:
        judged = rows(out / "labels.jsonl")
        assert judged, "no pair was judged: nothing for a comparison edit to redo"
        pid = judged[0]["principle_ids"][0]
    for p in const["principles"]:
        if p["id"] == pid:
            p[edit] = "Consider, point by point, which of the two replies is clearer, kinder and safer. " + p[edit]
    new = write_constitution(const, tmp / "new.yaml")
    d = subprocess.run([sys.executable, "-m", "cai.cli", "diff", str(old), str(new), "--run", str(out), "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert d.returncode == 0, d.stderr[-3000:]
    plan = json.loads(d.stdout)
    assert plan["changes"] == [{"id": pid, "kind": "changed", "fields": [edit]}]
    redo = plan["rerun"]["redo"]
    assert redo > 0
    seen = sent() if sent else 0
    run_cai([*cmd[: cmd.index("-c")], "-c", str(new), *cmd[cmd.index("-c") + 2:]], env, timeout)
    calls = last_run(out)["calls"]
    assert calls["sent"] == redo, f"cai diff predicted {redo} calls, the rerun sent {calls}"
    assert calls["cached"] == plan["rerun"]["served"]
    if sent:
        assert sent() - seen == redo


def check_no_committed_call_sent_again(proxy: FakeServer, marks: list[tuple[int, set[int]]],
                                       final: set[int], kills: int, concurrency: int) -> set[int]:
    """``marks``: (requests seen so far, tags committed) at each kill. A call committed before a kill
    is never sent again; the calls sent again are the ones in flight (or answered but not yet
    committed) at a kill: a handful per kill. Every call sent is committed in the end, but calls of
    killed runs never asked again: returned. Those are (1) calls answered just before a kill whose
    row reached the output while their answer still waited for the cache writer (cai writes a row
    without waiting for the commit of its calls): the rerun keeps the row and does not ask again;
    (2) on a real server, calls built on an answer that was not committed and comes back different
    when asked again (batching, prefix cache)."""
    sent = proxy.sent()
    for upto, done in marks:
        again = [t for t in sent[upto:] if t in done]
        assert not again, f"{len(again)} calls committed before a kill were sent again (seed {SEED})"
    assert final <= set(sent), "a call committed that the server never saw"
    lost = set(sent) - final
    where = [(i, e[3]) for i, e in enumerate(proxy.log) if e[0] in lost]
    assert all(i < marks[-1][0] for i, _ in where), (
        f"calls of the finishing run never committed (index in the log, status): {where}; "
        f"kills after {[u for u, _ in marks]} calls (seed {SEED})")
    assert len(lost) <= kills * concurrency, f"too many calls of killed runs never asked again: {where}"
    resent = len(sent) - len(set(sent))
    assert resent <= kills * 2 * concurrency, f"{resent} calls sent again over {kills} kills (seed {SEED})"
    print(f"seed {SEED}: {kills} kills after {[u for u, _ in marks]} calls sent; {len(sent)} sent, "
          f"{len(set(sent))} distinct, {resent} sent again, {len(lost)} answered but never committed")
    return lost


# ---------------------------------------------------------------------------- openai: stub
def recording_proxy(upstream: str, delay: float = 0.0, max_seconds: float = 600.0) -> FakeServer:
    """The fake server as a proxy in front of ``upstream``: each call held ``delay`` x [0.5, 1.5)
    seconds (seeded: answers come back out of order), logged, and tagged with ``crc32(body)``."""
    return FakeServer(FakeConfig(upstream=upstream, latency_s=delay, jitter=True, tag=True, seed=SEED,
                                 max_seconds=max_seconds))


def openai_scenario(tmp_path: Path, upstream: str, *, n: int, kills: int, window: float, delay: float,
                    concurrency: int, extra: list[str], deterministic: bool, startup_timeout: float,
                    timeout: float) -> dict[str, str]:
    """(a), (b) and (c) through a recording proxy in front of ``upstream``; returns the text of
    revisions.jsonl and labels.jsonl as (a) left them. ``deterministic``: the upstream's answer is a
    function of the request (the stub), so a critique edit's chain is exactly predictable."""
    rng = random.Random(SEED)
    old = write_constitution(load_constitution().model_dump(mode="json"), tmp_path / "old.yaml")
    out = tmp_path / "out"
    env = clean_env()
    with recording_proxy(upstream, delay=delay, max_seconds=600) as proxy:
        cmd = [sys.executable, "-m", "cai.cli", "run", "--input", str(write_prompts(tmp_path / "p.jsonl", n)),
               "-o", str(out), "-c", str(old), "--backend", "openai", "--base-url", proxy.base_url,
               "--concurrency", str(concurrency), "--no-progress", "--seed", "1", *extra]
        marks: list[tuple[int, set[int]]] = []

        def mark() -> None:
            marks.append((len(proxy.log), committed(out / "cache.sqlite")))

        killed = kill_then_finish(cmd, env, out, kills=kills, window=window, rng=rng,
                                  startup_timeout=startup_timeout, finish_timeout=timeout, after_kill=mark)
        assert len(killed) == kills, f"the run finished after {len(killed)} of {kills} kills (seed {SEED})"
        check_one_row_each(out, n)
        lost = check_no_committed_call_sent_again(proxy, marks, committed(out / "cache.sqlite"), kills,
                                                  concurrency)
        # every call a written row used was committed first (answers are returned once committed),
        # so on the stub, whose answers are a function of the request, nothing is left uncommitted
        assert not deterministic or not lost, f"calls answered, used, and never committed: {sorted(lost)}"
        final = last_run(out)["calls"]
        assert final["errors"] == 0
        # the finishing run sent only calls not committed yet: each one added a row to the cache
        assert final["sent"] == cache_rows(out / "cache.sqlite") - len(marks[-1][1])
        after_a = {name: (out / name).read_text() for name in ("revisions.jsonl", "labels.jsonl")}
        no_change_and_diff(tmp_path, cmd, env, old, edit="critique" if deterministic else "comparison",
                           timeout=timeout, proxy=proxy, lost=lost)
    return after_a


@pytest.mark.integration  # a kill loop over a stub server: about ten `cai run` processes (about 45 s)
def test_openai_stub_kill_resume_no_change_and_diff(tmp_path: Path, stub_server: str) -> None:
    """openai backend, the zero-latency stub behind a proxy that holds each call 15-45 ms: 24 rows,
    2 revision rounds, 2 judge principles in both orders, 4 kills; the resumed
    rows are the rows of one uninterrupted run."""
    n, rounds = 24, ["--revise-rounds", "2", "--label-principles", "2"]
    after_a = openai_scenario(tmp_path, stub_server, n=n, kills=4, window=0.4, delay=0.03, concurrency=4,
                              extra=rounds, deterministic=True, startup_timeout=60, timeout=120)
    clean = tmp_path / "clean"
    with recording_proxy(stub_server) as proxy:  # the same answers (and tags), no kill, no cache
        run_cai([sys.executable, "-m", "cai.cli", "run", "--input", str(tmp_path / "p.jsonl"), "-o", str(clean),
                 "-c", str(tmp_path / "old.yaml"), "--backend", "openai", "--base-url", proxy.base_url,
                 "--concurrency", "4", "--no-progress", "--seed", "1", *rounds, "--no-cache"], clean_env(), 120)
        assert len(proxy.log) == last_run(clean)["calls"]["sent"] > 0

    def strip(text: str) -> dict[str, dict]:
        return {r["id"]: {k: v for k, v in r.items() if k != "source"} for r in map(json.loads, text.splitlines())}

    for name, text in after_a.items():
        assert strip(text) == strip((clean / name).read_text()), name


# ------------------------------------------------------------------------ openai: real vLLM
@pytest.mark.integration
def test_openai_vllm_server_kill_resume_no_change_and_diff(tmp_path: Path, vllm_server: str) -> None:
    """openai backend, the real vLLM server (SmolLM2): 6 tiny rows (5 calls a row), 2 kills."""
    openai_scenario(tmp_path, vllm_server.removesuffix("/v1"), n=6, kills=2, window=3.0, delay=0.0,
                    concurrency=4, extra=TINY, deterministic=False, startup_timeout=120, timeout=300)


# ------------------------------------------------------------------------ in-process vLLM
# Every `cai run --backend vllm` starts an engine (a minute or more on a busy 2-CPU machine): the
# kill test starts five, hence `slow` (opt in with -m slow).
def in_process_cmd(tmp_path: Path, n: int, *extra: str) -> tuple[list[str], dict[str, str]]:
    from tests.vllm_server import SETUP_HINT, model_folder, vllm_python

    py = vllm_python()
    if not py.exists():
        pytest.fail(f"{py} not found: {SETUP_HINT}", pytrace=False)
    cmd = [str(py), "-m", "cai.cli", "run", "--input", str(write_prompts(tmp_path / "p.jsonl", n)),
           "-o", str(tmp_path / "out"), *extra, "--backend", "vllm", "--model", str(model_folder()),
           *VLLM_CPU_FLAGS, "--no-progress", "--seed", "1", *TINY]
    return cmd, clean_env(PYTHONPATH=str(REPO), **VLLM_CPU_ENV)


@pytest.mark.integration
@pytest.mark.slow
def test_vllm_in_process_kill_resume_no_change_and_diff(tmp_path: Path) -> None:
    """`cai run --backend vllm` under .venv-vllm's python: 6 tiny rows, 2 kills of the process group
    (cai, its engine core and worker: none may be left running), then (b) and (c)."""
    n, rng = 6, random.Random(SEED)
    old = write_constitution(load_constitution().model_dump(mode="json"), tmp_path / "old.yaml")
    out = tmp_path / "out"
    cmd, env = in_process_cmd(tmp_path, n, "-c", str(old))
    stored: list[int] = []
    killed = kill_then_finish(cmd, env, out, kills=2, window=3.0, rng=rng, startup_timeout=300,
                              finish_timeout=400, after_kill=lambda: stored.append(cache_rows(out / "cache.sqlite")))
    assert len(killed) == 2, f"the run finished after {len(killed)} of 2 kills (seed {SEED})"
    check_one_row_each(out, n)
    final = last_run(out)["calls"]
    assert final["errors"] == 0
    # the finishing run sent only calls not committed before the last kill: each one added a cache row
    assert final["sent"] == cache_rows(out / "cache.sqlite") - stored[-1]
    no_change_and_diff(tmp_path, cmd, env, old, edit="comparison", timeout=400)


@pytest.mark.integration
@pytest.mark.slow
def test_vllm_in_process_kill_9_of_cai_alone_leaves_no_engine(tmp_path: Path) -> None:
    """kill -9 of the cai process only, mid-run: its engine core (a child process) must not outlive it."""
    cmd, env = in_process_cmd(tmp_path, 6)
    with (tmp_path / "cai-stderr.log").open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and cache_rows(tmp_path / "out" / "cache.sqlite") == 0:
            assert time.monotonic() < deadline, "no call committed in 300 s"
            time.sleep(0.05)
        family = descendants(proc.pid)
        assert family, "the engine core is a child process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        end = time.monotonic() + 30
        while (left := alive(family, -1)) and time.monotonic() < end:
            time.sleep(0.5)
        assert not left, f"still running 30 s after kill -9 of cai ({proc.pid}): {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the orphans are still in cai's process group
        proc.wait()
