"""cai on Ray (`cai run --ray`, ``cai.scale.run_pipeline_ray``): the same files as a local run,
row for row; through a killed actor; over two OpenAI-compatible stub servers; resumed by the CLI.

One local Ray instance (2 CPUs, no dashboard) serves the whole module: starting Ray costs
seconds. Skipped when Ray Data is not installed (``pip install 'cai[ray]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

# A local Ray cluster and its actor processes (about 75 s for the module): not in the quick loop.
pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cai[ray]' to run these tests)")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'cai[ray]')")

from cai.backends.base import Request  # noqa: E402
from cai.backends.fake import FakeBackend  # noqa: E402
from cai.cli import main  # noqa: E402
from cai.config import RunConfig  # noqa: E402
from cai.pipeline import run_pipeline  # noqa: E402
from cai.scale import ray_run, run_pipeline_ray  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Every file a run writes whose content a Ray run must reproduce byte for byte.
OUTPUTS = ("revisions.jsonl", "revisions.failures.jsonl", "revisions.md", "labels.jsonl", "labels.failures.jsonl",
           "preferences.jsonl", "rejects.jsonl")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray instance for the module (or the one this process already has)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The actors unpickle the failing predicate below by value: they need not import this file.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        ray.shutdown()


def flaky(req: Request) -> bool:
    """Prompt 11's first call fails (a revise failure); prompt 3's judge answers fail (a label
    failure)."""
    text = json.dumps(req.messages)
    return "thing 11?" in text or ("thing 3?" in text and req.sampling.logprobs is not None)


def write_prompts(path: Path, n: int, duplicate: bool = False) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: how do I fix thing {i}?"}) + "\n")
        if duplicate:  # the input gate skips it (rejects.jsonl says so)
            f.write(json.dumps({"id": "again", "prompt": "Question 0: how do I fix thing 0?"}) + "\n")
    return path


def config(tmp: Path, n: int, **kw: Any) -> RunConfig:
    base = {"input": str(write_prompts(tmp / "prompts.jsonl", n, duplicate=True)), "output": str(tmp / "out"),
            "backend": "fake", "ray": {"block_size": 4}, "progress": False, "revise": {"rounds": 2},
            "label": {"principles": 2}}
    return RunConfig.model_validate({**base, **kw})


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def manifest(folder: Path, fresh: bool) -> dict[str, Any]:
    """run.json less what differs between two runs of the same rows (time, Ray's own record);
    unless both runs started afresh, less the calls made (and their tokens) and the rows written vs
    resumed too."""
    m = json.loads((folder / "run.json").read_text())
    for key in ("elapsed_s", "history", "ray", *(() if fresh else ("calls", "usage", "cost"))):
        m.pop(key, None)
    m["config"].pop("ray")  # the settings of how it ran (`--ray-address local` or none)
    if not fresh:
        for c in m["counts"].values():
            if "resumed" in c:  # a stage's counts (preferences.jsonl is written whole every run)
                del c["written"], c["resumed"]
    return m


def same_outputs(local: Path, ray_out: Path, fresh: bool = True) -> None:
    """Every output file of the two runs is the same (both written to the same path in turn)."""
    for name in OUTPUTS:
        a, b = local / name, ray_out / name
        assert a.exists() == b.exists(), name
        if a.exists():
            assert a.read_bytes() == b.read_bytes(), name
    assert manifest(local, fresh) == manifest(ray_out, fresh)


def local_reference(cfg: RunConfig, tmp: Path, backend: Any = None) -> Path:
    """The local run of ``cfg``, moved aside (its folder is free for the Ray run: same paths)."""
    run_pipeline(cfg, backend=backend or FakeBackend())
    return Path(shutil.move(str(cfg.output), str(tmp / "local")))


def test_ray_run_writes_what_a_local_run_writes(cluster: None, tmp_path: Path) -> None:
    """Three pair sources (revisions, a dataset whose ids collide with the input's, sampled
    pairs), failures in both stages, a duplicate prompt: every file the same, row for row."""
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(5):
            f.write(json.dumps({"id": "p2" if i == 4 else f"d{i}", "prompt": f"Pair question {i}?",
                                "response_a": f"first answer {i}", "response_b": f"second answer {i}"}) + "\n")
    cfg = config(tmp_path, 14, label={"principles": 2, "sources": ["revisions", "dataset", "sample"],
                                      "pairs": str(pairs)})
    local = local_reference(cfg, tmp_path, FakeBackend(fail=flaky))
    res = run_pipeline_ray(cfg, backend_options={"fail": flaky})
    same_outputs(local, cfg.output)
    # work items: 14 rows (the duplicate gated out), 5 pairs, 15 prompts to sample (ungated, as locally)
    assert res.manifest["ray"]["actors"] == 2 and res.manifest["ray"]["rows"] == 14 + 5 + 15
    revised = lines(cfg.output / "revisions.jsonl")
    labels = lines(cfg.output / "labels.jsonl")
    assert [r["id"] for r in revised] == [f"p{i}" for i in range(14) if i != 11]
    assert {r["id"] for r in labels} >= {"p0", "d0", "p2-2", "p0-s01"}  # each source; the dataset's p2 renamed
    assert [r["id"] for r in lines(cfg.output / "revisions.failures.jsonl")] == ["p11"]
    assert "p3" in {r["id"] for r in lines(cfg.output / "labels.failures.jsonl")}


def test_a_killed_actor_still_gives_one_row_per_input(cluster: None, tmp_path: Path) -> None:
    """SIGKILL one actor process mid-run: Ray restarts it and runs its block again; the driver,
    the only writer, writes each row once, and the files are the local run's."""
    cfg = config(tmp_path, 16, ray={"block_size": 2}, revise={"rounds": 1})
    local = local_reference(cfg, tmp_path)
    log = tmp_path / "calls.log"  # the fake backend appends "PID BATCH DIGEST" per answered request
    done: dict[str, Any] = {}

    def go() -> None:
        try:
            done["res"] = run_pipeline_ray(cfg, backend_options={"delay": 0.25, "log": str(log)},
                                           max_restarts=3, max_task_retries=3)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            done["error"] = e

    t = threading.Thread(target=go)
    t.start()
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline and t.is_alive():
        pids = [int(x.split()[0]) for x in log.read_text().splitlines()] if log.exists() else []
        victim = next((p for p in pids if p != os.getpid()), None)
        time.sleep(0.05)
    assert victim is not None, f"no actor answered a call ({done.get('error')!r})"
    os.kill(victim, signal.SIGKILL)
    t.join(180)
    assert not t.is_alive() and "error" not in done, done.get("error")
    after = {int(x.split()[0]) for x in log.read_text().splitlines()}
    assert after - {victim}, "no other actor process answered after the kill"
    for name in ("revisions.jsonl", "labels.jsonl"):
        ids = [r["id"] for r in lines(cfg.output / name)]
        assert ids == [f"p{i}" for i in range(16)], name  # one row per input, in input order
    same_outputs(local, cfg.output, fresh=False)  # the killed block's calls were made twice


@pytest.fixture
def two_servers() -> Iterator[list[str]]:
    """Two zero-latency stubs (tests/fake_server.py --stub) in their own processes on free ports of
    127.0.0.1 (each stops by itself)."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(2):
            proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_server.py"), "--stub", "--model",
                                     "stub", "--port", "0", "--max-seconds", "120"], stdout=subprocess.PIPE, text=True)
            procs.append(proc)
        urls = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("listening on"), line
            urls.append(f"http://127.0.0.1:{int(line.split()[-1])}/v1")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.communicate(timeout=10)  # waits, and closes its stdout pipe


def served(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=5) as r:
        return int(json.loads(r.read())["served"])


def test_ray_run_over_two_stub_servers_finishes_every_row(cluster: None, tmp_path: Path,
                                                          two_servers: list[str]) -> None:
    cfg = config(tmp_path, 16, backend="openai", base_url=two_servers, concurrency=16)
    local = local_reference(cfg, tmp_path, FakeBackend())  # a fake stands in: only the row ids are compared
    before = [served(u) for u in two_servers]
    res = run_pipeline_ray(cfg)
    assert res.failed == 0 and res.manifest["models"]["policy"] == "stub"
    for name in ("revisions.jsonl", "labels.jsonl"):
        assert [r["id"] for r in lines(cfg.output / name)] == [r["id"] for r in lines(local / name)], name
    assert all(served(u) > b for u, b in zip(two_servers, before, strict=True)), "a server got no call"
    assert res.sent > 0


def test_cli_ray_resumes_a_local_run_and_a_rerun_sends_nothing(cluster: None, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`cai run CONFIG --ray local` picks up a local run cut short (resume by id), writes the rest as a
    local run would have; run again, it has nothing to send and starts no actor."""
    cfg = config(tmp_path, 12)
    local = local_reference(cfg, tmp_path)
    run_pipeline(cfg.model_copy(update={"limit": 5}), backend=FakeBackend())  # the first 5 rows only
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    args = ["run", str(tmp_path / "run.yaml"), "--ray-address", "local", "--no-progress"]
    assert main(args) == 0
    assert "ray: 7 work items" in capsys.readouterr().err
    m = json.loads((cfg.output / "run.json").read_text())
    assert {k: (m["counts"][k]["written"], m["counts"][k]["resumed"]) for k in ("revise", "label")} == {
        "revise": (7, 5), "label": (7, 5)}
    same_outputs(local, cfg.output, fresh=False)
    assert main(args) == 0
    assert "ray: 0 work items" in capsys.readouterr().err
    m = json.loads((cfg.output / "run.json").read_text())
    assert m["calls"]["sent"] == 0 and m["ray"]["actors"] == 0
    same_outputs(local, cfg.output, fresh=False)


def test_an_actor_with_another_model_stops_the_run_before_any_row(cluster: None, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's fingerprints name a model; an actor whose backend serves another one refuses
    to start, and the run stops with the actor's reason, no row written."""
    monkeypatch.setattr(ray_run, "predict_model_id", lambda cfg, options: "another-model")
    cfg = config(tmp_path, 4)
    with pytest.raises(ray_run.RayRunError, match="serves 'fake', the driver expected 'another-model'"):
        run_pipeline_ray(cfg)
    assert not (cfg.output / "revisions.jsonl").exists()
    assert (cfg.output / "revisions.jsonl.part").read_text() == ""


def test_actors_off_the_driver_node_keep_a_cache_per_node() -> None:
    spec = ray_run.WorkerSpec(config={}, constitution={}, constitution_hash="", templates={}, templates_hash="",
                              model_id="m", cache="/runs/a/cache.sqlite", node_cache=None, driver_node="head")
    assert ray_run.node_cache_file(spec, "head") == Path("/runs/a/cache.sqlite")
    other = ray_run.node_cache_file(spec, "worker-1")
    assert other is not None and other != Path("/runs/a/cache.sqlite") and other.name.startswith("cache-")
    assert ray_run.node_cache_file(spec, "worker-2") == other  # the same file name on every other node
    ssd = replace(spec, node_cache="/local/ssd")
    assert ray_run.node_cache_file(ssd, "worker-1") == Path("/local/ssd") / other.name
    assert ray_run.node_cache_file(replace(spec, cache=None), "head") is None
