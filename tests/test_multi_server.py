"""Several servers behind one `openai` backend: routing, row affinity, servers going down, and
`cai run` finishing every row with one server down from the start or killed mid-run.

In-process fake servers (`tests/fake_server.py`'s FakeServer) for routing and health; two simulated engines
(`tests/fake_server.py --slots`) in their own processes (answers that take time) for the server
killed mid-run. 127.0.0.1 only; every server is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cai import runtime
from cai.backends import base_url_value, build_backend, make_backend, split_urls
from cai.backends.base import Completion, Request, Sampling
from cai.backends.multi import MultiServerBackend, server_fault, servers_summary
from cai.backends.openai_server import OpenAIServerBackend
from cai.cli.app import backend_options
from cai.config import RunConfig, load_run_config
from cai.errors import BackendError
from tests.fake_server import FakeConfig, FakeServer
from tests.sync import Sync

REPO = Path(__file__).resolve().parent.parent
MODEL = "stub-model"


# --- in-process servers (tests/fake_server.py) ---------------------------------------------------


def is_ping(body: dict[str, Any]) -> bool:
    """The router's health probe (a 1-token "ping"), not a call."""
    return body["messages"] == [{"role": "user", "content": "ping"}] and body.get("max_tokens") == 1


def bodies(s: FakeServer) -> list[dict[str, Any]]:
    """Every chat request ``s`` received, in arrival order (answered or not)."""
    return [json.loads(entry[4]) for entry in list(s.log)]


def seen(s: FakeServer) -> list[list[dict[str, Any]]]:
    """The messages of each chat request (not the pings), in arrival order."""
    return [b["messages"] for b in bodies(s) if not is_ping(b)]


def calls(s: FakeServer) -> int:
    return len(seen(s))


def pings(s: FakeServer) -> int:
    return sum(map(is_ping, bodies(s)))


class Servers:
    """Fake servers (each on its own loop thread), all stopped at the end: ``delay`` seconds per
    answer; ``failing``: every chat request answered with an HTTP 500 until ``recover(s)``. A
    stopped server cuts the connections of its requests in flight after 0.1 s."""

    def __init__(self) -> None:
        self.all: list[FakeServer] = []

    def start(self, delay: float = 0.0, failing: bool = False) -> FakeServer:
        # 7 words: the answer fits ask()'s max_tokens=8 ("stop", not cut)
        s = FakeServer(FakeConfig(model=MODEL, latency_s=delay, words=7, shutdown_s=0.1,
                                  faults={"http_500": 1.0} if failing else {})).start()
        self.all.append(s)
        return s

    @staticmethod
    def recover(s: FakeServer) -> None:
        s.config.faults = {}  # read by each request as it arrives

    @staticmethod
    def stop(s: FakeServer) -> None:
        s.stop()

    def close(self) -> None:
        for s in self.all:
            s.stop()


@pytest.fixture
def fakes() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_url() -> str:
    """A URL nothing listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/v1"


FAST = {"backoff": 0.01, "max_retries": 1, "down_min": 0.1, "down_max": 1.0, "probe_timeout": 2.0}


def multi(urls: list[str], **kw: Any) -> Sync:
    return Sync(MultiServerBackend(model=kw.pop("model", None), base_url=urls, **{**FAST, **kw}))


def wait(seconds: float) -> None:
    """Let the run's loop go on (the health monitor, the requests in flight) for ``seconds``."""
    runtime.run(asyncio.sleep(seconds))


def ask(text: str, row: str | None = None) -> Request:
    return Request(({"role": "user", "content": text},), Sampling(max_tokens=8), affinity=row)


def rows_chains(be: Sync, rows: int, calls: int) -> list[list[str]]:
    """``rows`` rows at once, each ``calls`` dependent calls (the next asks about the last answer)."""
    async def row(i: int) -> list[str]:
        texts, last = [], ""
        for k in range(calls):
            c = await be.generate(ask(f"row {i} call {k} {last}", row=f"r{i}"))
            assert c.error is None, c.error
            texts.append(last := c.text)
        return texts

    async def go() -> list[list[str]]:
        return list(await asyncio.gather(*(row(i) for i in range(rows))))

    return runtime.run(asyncio.wait_for(go(), 60))


def rows_by_server(servers: list[FakeServer]) -> dict[str, set[int]]:
    """row -> the servers (their index) that saw one of its calls."""
    where: dict[str, set[int]] = defaultdict(set)
    for i, s in enumerate(servers):
        for msgs in seen(s):
            # the live request, or (a revision) the critique request it continues
            m = next((m for msg in reversed(msgs) if (m := re.search(r"row (\d+) ", msg["content"]))), None)
            assert m, msgs
            where[m.group(1)].add(i)
    return where


# --- configuration --------------------------------------------------------------------------------


def test_urls_parse_from_every_form():
    assert split_urls("http://a/v1") == ["http://a/v1"]
    assert split_urls("http://a/v1/, http://b/v1,,") == ["http://a/v1", "http://b/v1"]
    assert split_urls(["http://a/v1", "http://b/v1,http://c/v1", "http://a/v1"]) == [
        "http://a/v1", "http://b/v1", "http://c/v1"]
    assert base_url_value("http://a/v1/") == "http://a/v1/"  # one URL: kept as written
    assert base_url_value(["http://a/v1"]) == "http://a/v1"
    assert base_url_value("http://a/v1,http://b/v1") == ["http://a/v1", "http://b/v1"]
    with pytest.raises(ValueError):
        base_url_value(" , ")


def test_run_config_takes_a_list_a_comma_string_or_one_string(tmp_path: Path, monkeypatch):
    f = tmp_path / "run.yaml"
    f.write_text("backend: openai\nbase_url:\n  - http://127.0.0.1:1/v1\n  - http://127.0.0.1:2/v1\n")
    assert load_run_config(f).base_url == ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
    f.write_text("backend: openai\nbase_url: http://127.0.0.1:1/v1\n")  # users' configs as they are
    cfg = load_run_config(f)
    assert cfg.base_url == "http://127.0.0.1:1/v1" and cfg.backend_options()["base_url"] == cfg.base_url
    assert cfg.public()["base_url"] == "http://127.0.0.1:1/v1"
    # a flag or CAI_BASE_URL arrives as one string: "A,B" is two servers, and wins over the file
    cfg = load_run_config(f, {("base_url",): "http://127.0.0.1:3/v1,http://127.0.0.1:4/v1"})
    assert cfg.base_url == ["http://127.0.0.1:3/v1", "http://127.0.0.1:4/v1"]
    assert RunConfig.model_validate({}).base_url == "http://localhost:8000/v1"


def backend_flags_command() -> tuple[Callable[..., Any], list[RunConfig]]:
    """A command with the backend options (as cai revise and cai label have them): a runner for
    it (args, env=...) and the list of the settings each invocation received."""
    import typer
    from typer.testing import CliRunner

    got: list[RunConfig] = []
    app = typer.Typer()

    @app.command()
    @backend_options
    def cmd(config: RunConfig) -> None:
        got.append(config)

    return functools.partial(CliRunner().invoke, app), got


def test_backend_flags_repeat_or_comma_separate(monkeypatch):
    """--base-url on the commands that take the backend options (cai revise, cai label)."""
    run, got = backend_flags_command()
    for k in ("CAI_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    assert run([]).exit_code == 0 and got[-1].base_url == "http://localhost:8000/v1"
    assert run(["--base-url", "http://h:1/v1"]).exit_code == 0 and got[-1].base_url == "http://h:1/v1"
    assert run(["--base-url", "http://h:1/v1", "--base-url", "http://h:2/v1"]).exit_code == 0
    assert got[-1].base_url == ["http://h:1/v1", "http://h:2/v1"]
    assert run([], env={"CAI_BASE_URL": "http://h:1/v1,http://h:2/v1"}).exit_code == 0
    assert got[-1].base_url == ["http://h:1/v1", "http://h:2/v1"]


def test_engine_flags_reach_the_in_process_engine(monkeypatch: pytest.MonkeyPatch):
    """--vllm-block-size / --vllm-max-num-seqs (and CAI_VLLM_*) become AsyncEngineArgs keywords;
    unset, they are left to vLLM."""
    run, got = backend_flags_command()
    assert run(["--backend", "vllm"]).exit_code == 0
    assert "block_size" not in got[-1].vllm.engine_args() and "max_num_seqs" not in got[-1].vllm.engine_args()
    r = run(["--backend", "vllm", "--vllm-block-size", "16"], env={"CAI_VLLM_MAX_NUM_SEQS": "64"})
    assert r.exit_code == 0, r.output
    assert got[-1].vllm.engine_args().items() >= {"block_size": 16, "max_num_seqs": 64}.items()
    cfg = RunConfig.model_validate({"backend": "vllm", "vllm": {"block_size": 32}})
    assert cfg.backend_options()["block_size"] == 32
    assert run(["--backend", "vllm", "--vllm-block-size", "0"]).exit_code != 0


def test_preflight_wants_one_server_up_and_every_url_well_formed(fakes: Servers):
    from cai.plan import check_backend

    live = fakes.start()
    check_backend("openai", [dead_url(), live.base_url])  # one down: it starts out of rotation
    with pytest.raises(BackendError, match="none of the 2 servers can be reached"):
        check_backend("openai", [dead_url(), dead_url()])
    with pytest.raises(BackendError, match="not an http"):  # every URL is checked when the backend is built
        multi([live.base_url, "localhost:8000"])


# --- routing ---------------------------------------------------------------------------------------


def test_one_url_is_the_plain_client_several_are_spread(fakes: Servers):
    a, b = fakes.start(), fakes.start()
    with Sync(build_backend("openai", None, base_url=[a.base_url])) as one:
        assert isinstance(one.backend, OpenAIServerBackend)
    with Sync(build_backend("openai", None, base_url=f"{a.base_url},{b.base_url}", concurrency=8)) as be:
        assert isinstance(be.backend, MultiServerBackend) and be.model_id == MODEL
        done = be.complete([ask(f"q{i}") for i in range(40)])
        assert all(c.error is None for c in done)
        servers = be.describe()["servers"]
    # zero-latency servers: the split between the two varies with timing; both must be used
    assert calls(a) + calls(b) == 40 and min(calls(a), calls(b)) >= 4, (calls(a), calls(b))
    assert [s["answered"] for s in servers] == [calls(a), calls(b)]
    assert [s["url"] for s in servers] == [a.base_url, b.base_url]
    assert all(s["in_rotation"] and s["failures"] == 0 and s["outages"] == 0 for s in servers)


def test_a_rows_calls_stay_on_one_server(fakes: Servers):
    three = [fakes.start(delay=0.005) for _ in "abc"]
    with multi([s.base_url for s in three]) as be:
        rows_chains(be, rows=24, calls=4)
        routing = be.routing
    where = rows_by_server(three)
    assert len(where) == 24 and all(len(v) == 1 for v in where.values()), where
    assert all(calls(s) >= 12 for s in three), [calls(s) for s in three]  # rows spread over all three
    assert routing["affinity_kept"] == 24 * 3 and routing["affinity_moved"] == 0


def test_without_affinity_rows_wander(fakes: Servers):
    """Least-loaded alone: rows on the slower server move to the faster one between calls."""
    two = [fakes.start(delay=0.001), fakes.start(delay=0.03)]
    with multi([s.base_url for s in two], affinity=False) as be:
        rows_chains(be, rows=16, calls=4)
    assert any(len(v) > 1 for v in rows_by_server(two).values())


def test_affinity_map_is_bounded(fakes: Servers):
    a, b = fakes.start(), fakes.start()
    with multi([a.base_url, b.base_url], affinity_limit=10) as be:
        be.complete([ask(f"row {i} x", row=f"r{i}") for i in range(50)])
        assert len(be._rows) == 10


# --- health -----------------------------------------------------------------------------------------


def test_a_server_down_from_the_start_is_left_out(fakes: Servers):
    a = fakes.start()
    dead = dead_url()
    with multi([dead, a.base_url]) as be:
        assert be.model_id == MODEL  # from the server that answered
        done = be.complete([ask(f"q{i}") for i in range(20)])
        assert all(c.error is None for c in done)
        gone, up = be.servers
    assert calls(a) == 20
    assert gone["url"] == dead and not gone["in_rotation"] and gone["answered"] == 0
    assert gone["outages"] == 1 and gone["out_of_rotation_s"] > 0 and "connect" in gone["last_failure"]
    assert up["answered"] == 20 and up["in_rotation"]
    first, second = servers_summary([gone, up])
    assert first.startswith(f"{dead}: 0 calls answered; out of rotation once, ") and "cannot connect" in first
    assert first.endswith("out of rotation at the end") and second == f"{a.base_url}: 20 calls answered"


def test_every_server_down_at_start_is_an_error():
    with pytest.raises(BackendError, match="none of the 2 servers answers"):
        multi([dead_url(), dead_url()])


def test_a_failing_server_is_taken_out_probed_and_put_back(fakes: Servers):
    a, b = fakes.start(failing=True), fakes.start()
    with multi([a.base_url, b.base_url], model=MODEL) as be:
        done = be.complete([ask(f"q{i}") for i in range(20)])
        assert all(c.error is None for c in done), [c.error for c in done]
        bad = be.servers[0]
        assert not bad["in_rotation"] and bad["failures"] >= 1 and bad["answered"] == 0
        assert "HTTP 500" in bad["last_failure"]
        assert be.servers[1]["answered"] == 20
        fakes.recover(a)  # it recovers: the probe puts it back
        deadline = time.monotonic() + 10
        while not be.servers[0]["in_rotation"] and time.monotonic() < deadline:
            wait(0.05)
        assert be.servers[0]["in_rotation"] and pings(a) >= 1
        before = calls(a)
        be.complete([ask(f"again {i}") for i in range(10)])
        assert calls(a) > before  # back in rotation
        assert be.servers[0]["out_of_rotation_s"] > 0 and be.servers[0]["outages"] == 1


def test_the_clients_gave_up_failure_is_what_marks_a_server_fault(fakes: Servers):
    """The router reads the failure's kind, typed by the client where it failed: this pins that."""
    a = fakes.start(failing=True)
    with Sync(OpenAIServerBackend(model=MODEL, base_url=a.base_url, max_retries=1, backoff=0.01)) as be:
        [c] = be.complete([ask("x")])
    assert c.failure is not None and c.failure.kind == "server" and server_fault(c), c.error
    assert c.failure.message.endswith("(gave up after 2 attempts)")  # the first try and one retry
    assert not server_fault(Completion(texts=[], error="HTTP 400: (gave up after 1 attempts)"))  # text decides nothing
    fakes.recover(a)


def test_every_server_gone_fails_requests_fast_with_a_clear_error(fakes: Servers):
    a, b = fakes.start(), fakes.start()
    with multi([a.base_url, b.base_url], all_down_wait=1.0, down_min=5.0) as be:
        assert all(c.error is None for c in be.complete([ask("warm a"), ask("warm b")]))
        fakes.stop(a)
        fakes.stop(b)
        t0 = time.monotonic()
        done = be.complete([ask(f"q{i}") for i in range(8)])
        took = time.monotonic() - t0
        later = be.complete([ask("later")])  # the wait is once per outage, not per request
        took_later = time.monotonic() - t0 - took
        stats = be.describe()
    assert all(c.error and "all 2 servers are out of rotation" in c.error for c in done + later), done
    assert a.base_url in (done[0].error or "") and b.base_url in (done[0].error or "")
    assert 0.9 < took < 5 and took_later < 0.8, (took, took_later)  # one wait of 1 s for the outage
    assert stats["routing"]["all_down"] == 9
    assert all(s["outages"] == 1 and not s["in_rotation"] for s in stats["servers"])


def test_a_hanging_server_is_taken_out_and_its_requests_in_flight_move(fakes: Servers):
    """Chat requests that never answer (its model listing still does): the first request whose
    retries run out takes the server out, and the others in flight there move at once."""
    slow, fast = fakes.start(delay=30.0), fakes.start(delay=0.1)
    with multi([slow.base_url, fast.base_url], model=MODEL, timeout=0.3, max_retries=2, backoff=0.05,
               down_min=30.0) as be:
        async def go() -> list[Completion]:
            first = asyncio.ensure_future(be.generate(ask("first")))  # to the slow one (a tie: the first server)
            await asyncio.sleep(0.2)
            rest = [be.generate(ask(f"q{i}")) for i in range(6)]  # spread: some to the slow one too
            return list(await asyncio.wait_for(asyncio.gather(first, *rest), 20))

        done = runtime.run(go())
        stats = be.servers
    assert all(c.error is None for c in done), [c.error for c in done]
    bad = stats[0]
    # the first request's retries ran out (2 x 0.3 s): the server went, with the later ones in flight there
    assert bad["outages"] == 1 and bad["failures"] == 1 and bad["answered"] == 0
    assert bad["rerouted"] >= 1 and bad["rerouted"] == bad["sent"] - 1, bad
    assert "timed out" in bad["last_failure"]
    assert stats[1]["answered"] == 7


def test_a_server_that_stops_answering_is_caught_by_the_liveness_check(fakes: Servers):
    """The client retries a dropped server with a long backoff; the monitor sees the retries, finds
    the server gone (GET /models fails) and moves the requests in flight well before that."""
    a, b = fakes.start(delay=0.5), fakes.start(delay=0.05)
    with multi([a.base_url, b.base_url], model=MODEL, backoff=10.0, max_retries=5, down_min=30.0) as be:
        async def go() -> tuple[list[Completion], float]:
            fut = [asyncio.ensure_future(be.generate(ask(f"q{i}"))) for i in range(6)]
            await asyncio.sleep(0.2)  # in flight on both
            t0 = time.monotonic()
            await asyncio.to_thread(fakes.stop, a)  # connections dropped, nothing listens
            done = list(await asyncio.wait_for(asyncio.gather(*fut), 10))
            return done, time.monotonic() - t0

        done, took = runtime.run(go())
        stats = be.servers
    assert all(c.error is None for c in done), [c.error for c in done]
    assert stats[0]["outages"] == 1 and stats[0]["rerouted"] == 3 and "not answering" in stats[0]["last_failure"]
    assert took < 4, took  # not the client's 5-10 s backoff


# --- cai run end to end --------------------------------------------------------------------------


def write_prompts(path: Path, n: int) -> Path:
    topics = ["a leaking tap", "a flat tyre", "a slow laptop", "a noisy fridge", "a stuck window"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"row {i} : how do I deal with {topics[i % 5]} "
                                f"number {i * 7919 % 1000}?"}) + "\n")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_cai_run_over_two_servers_keeps_rows_together(fakes: Servers, tmp_path: Path):
    from cai.pipeline import run_pipeline

    two = [fakes.start() for _ in "ab"]
    cfg = RunConfig.model_validate({
        "input": str(write_prompts(tmp_path / "p.jsonl", 30)), "output": str(tmp_path / "out"),
        "backend": "openai", "base_url": [s.base_url for s in two], "concurrency": 16, "progress": False,
        "revise": {"rounds": 2}, "label": {"enabled": False}})
    with runtime.closing(build_backend("openai", None, **cfg.backend_options())) as be:
        res = run_pipeline(cfg, backend=be)
        servers = be.describe()["servers"]
    assert res.stages["revise"].written == 30 and res.stages["revise"].failed == 0
    assert len(read_rows(tmp_path / "out" / "revisions.jsonl")) == 30
    where = rows_by_server(two)
    assert len(where) == 30 and all(len(v) == 1 for v in where.values())
    assert min(calls(s) for s in two) >= 30, [calls(s) for s in two]
    assert sum(s["answered"] for s in servers) == 30 * 5  # an answer, then 2 x (critique, revision)


def test_cli_run_with_one_server_down_finishes_every_row(fakes: Servers, tmp_path: Path, capsys):
    """`cai run --backend openai --base-url DEAD --base-url LIVE`: every row, no failures."""
    from cai.cli import main

    live = fakes.start()
    out, dead = tmp_path / "out", dead_url()
    argv = ["run", "--input", str(write_prompts(tmp_path / "p.jsonl", 12)), "-o", str(out), "-b", "openai",
            "--base-url", dead, "--base-url", live.base_url, "--revise-rounds", "1",
            "--label-principles", "1", "--concurrency", "8", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "servers:" in capsys.readouterr().err  # the summary says what each server did
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["base_url"] == [dead, live.base_url]
    per_server = {s["url"]: s for s in manifest["backend"]["servers"]}
    assert per_server[live.base_url]["answered"] >= 12 * 3 and per_server[dead]["answered"] == 0
    assert len(read_rows(out / "revisions.jsonl")) == 12 and len(read_rows(out / "labels.jsonl")) == 12
    assert not read_rows(out / "revisions.failures.jsonl") and not read_rows(out / "labels.failures.jsonl")
    assert calls(live) >= 12 * 3


def test_comma_separated_variable_reaches_cai_run(fakes: Servers, tmp_path: Path, monkeypatch):
    from cai.cli import main

    a, b = fakes.start(), fakes.start()
    monkeypatch.setenv("CAI_BASE_URL", f"{a.base_url},{b.base_url}")
    out = tmp_path / "out"
    assert main(["run", "--input", str(write_prompts(tmp_path / "p.jsonl", 10)), "-o", str(out), "-b", "openai",
                 "--revise-rounds", "1", "--no-label", "--no-progress"]) == 0
    assert len(read_rows(out / "revisions.jsonl")) == 10 and calls(a) > 0 and calls(b) > 0
    assert json.loads((out / "run.json").read_text())["config"]["base_url"] == [a.base_url, b.base_url]


# --- a server killed mid-run (its own process) -----------------------------------------------------


def _sim(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_server.py"), "--port", str(port),
                             "--model", "sim", "--slots", "8", "--ms-per-token", "0.5", "--max-seconds", "120"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
        return dict(json.loads(r.read()))


@pytest.fixture
def sims() -> Iterator[Callable[[], dict[int, subprocess.Popen[bytes]]]]:
    """Start two sim servers: port -> process (each in its own process group)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> dict[int, subprocess.Popen[bytes]]:
        ports = [free_port(), free_port()]
        started = {p: _sim(p) for p in ports}
        procs.extend(started.values())
        deadline = time.monotonic() + 30
        for p in ports:
            while True:
                try:
                    _stats(p)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        return started

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_cai_run_with_a_server_killed_mid_run_finishes_every_row(sims, tmp_path: Path):
    from cai.pipeline import run_pipeline

    started = sims()
    pa, pb = started
    urls = [f"http://127.0.0.1:{pa}/v1", f"http://127.0.0.1:{pb}/v1"]
    rows = 40
    cfg = RunConfig.model_validate({
        "input": str(write_prompts(tmp_path / "p.jsonl", rows)), "output": str(tmp_path / "out"),
        "backend": "openai", "model": "sim", "base_url": urls, "concurrency": 16, "progress": False,
        "revise": {"rounds": 2, "max_tokens": 64}, "label": {"enabled": False}, "cache": "off"})
    killed: dict[str, Any] = {}
    finished = threading.Event()

    def killer() -> None:  # kill A (SIGKILL: connections reset) once it has answered 30 calls
        deadline = time.monotonic() + 60
        while not finished.is_set() and time.monotonic() < deadline:
            try:
                if _stats(pa)["requests"] >= 30:
                    os.killpg(started[pa].pid, signal.SIGKILL)
                    killed["at"], killed["running"] = time.monotonic(), not finished.is_set()
                    return
            except OSError:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t0 = time.monotonic()
    with runtime.closing(build_backend("openai", "sim", **cfg.backend_options())) as be:
        t.start()
        try:
            res = run_pipeline(cfg, backend=be)
        finally:
            finished.set()
            t.join(5)
        servers = be.describe()["servers"]
    took = time.monotonic() - t0
    assert killed.get("running"), "the server was not killed while the run was going"
    assert res.stages["revise"].written == rows and res.stages["revise"].failed == 0
    out = read_rows(tmp_path / "out" / "revisions.jsonl")
    assert sorted(r["id"] for r in out) == sorted(f"p{i}" for i in range(rows))
    a, b = servers
    assert a["outages"] >= 1 and not a["in_rotation"] and a["answered"] >= 30
    assert a["rerouted"] >= 1  # its calls in flight when it died were answered by the other
    assert b["answered"] > a["answered"] and b["in_rotation"] and b["outages"] == 0
    assert a["answered"] + b["answered"] == rows * 5
    assert took < 60, took


def test_make_backend_takes_a_list_too(fakes: Servers):
    a, b = fakes.start(), fakes.start()
    with Sync(make_backend("openai", base_url=[a.base_url, b.base_url], model=None)) as be:
        assert isinstance(be.backend, MultiServerBackend) and be.urls == [a.base_url, b.base_url]
