"""`cai run` and `cai diff`: the pipeline, its config, and rerunning only what changed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.backends.base import Completion, Request
from cai.backends.fake import FakeBackend, default_respond
from cai.config import RunConfig, leaves, load_run_config
from cai.constitution import Constitution, load_constitution
from cai.errors import ConfigError
from cai.pipeline import run_pipeline
from cai.stages.judge import JudgeConfig
from cai.stages.judge import principles_for as judge_principles
from cai.stages.revise import ReviseConfig
from cai.stages.revise import principles_for as revise_principles

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 2


def unique_respond(req: Request) -> Completion | str:
    """Like the default fake, but a generated text is the full hash of its request, so that a
    changed prompt always gives a changed answer (and so changes everything downstream)."""
    if req.sampling.logprobs or req.sampling.choices:
        return default_respond(req)
    blob = json.dumps([req.messages, req.sampling.to_dict()], sort_keys=True)
    return "reply " + hashlib.sha256(blob.encode()).hexdigest()


def sixteen() -> Constitution:
    c = load_constitution()
    return Constitution(name="sixteen", principles=c.principles[:16])


def write_constitution(c: Constitution, path: Path) -> Path:
    path.write_text(yaml.safe_dump(c.model_dump(mode="json"), sort_keys=False))
    return path


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: how do I fix thing {i}?"})
                    + "\n")
    return path


def config(tmp: Path, n: int = 40, **kw) -> RunConfig:
    base = {"input": str(write_prompts(tmp / "prompts.jsonl", n)), "output": str(tmp / "out"),
            "backend": "fake", "progress": False, "revise": {"rounds": ROUNDS}}
    return RunConfig.model_validate({**base, **kw})


def lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(x) for x in text.splitlines()]


def test_pipeline_writes_every_file_and_the_manifest(tmp_path: Path):
    cfg = config(tmp_path, n=12)
    be = FakeBackend(unique_respond)
    res = run_pipeline(cfg, backend=be)
    out = tmp_path / "out"
    revs, labels, prefs = (lines(out / f) for f in
                           ("revisions.jsonl", "labels.jsonl", "preferences.jsonl"))
    assert len(revs) == len(labels) == 12 and {r["id"] for r in revs} == {x["id"] for x in labels}
    assert len(prefs) == sum(not x["tie"] for x in labels)
    per_row = 1 + 2 * ROUNDS + 4 * 2  # answer, critique+revision per round, k=4 x both orders
    assert res.sent == len(be.calls) == 12 * per_row and res.cached == 0
    m = json.loads((out / "run.json").read_text())
    for key in ("cai_version", "config", "constitution", "templates_hash", "models", "judge",
                "counts", "calls"):
        assert key in m
    assert m["calls"] == {"sent": 12 * per_row, "cached": 0, "errors": 0}
    assert m["constitution"]["principles"][0]["critique"]
    assert m["judge"]["both_orders"] is True and m["judge"]["principles"] == 4  # JudgeConfig's one shape
    assert m["counts"]["revise"]["rows"] == 12
    assert m["counts"]["preferences"]["written"] == len(prefs)
    assert (out / "cache.sqlite").exists()


def test_no_change_rerun_sends_zero_calls(tmp_path: Path):
    cfg = config(tmp_path)
    run_pipeline(cfg, backend=FakeBackend(unique_respond))
    first = (tmp_path / "out" / "labels.jsonl").read_text()
    again = FakeBackend(unique_respond)
    res = run_pipeline(cfg, backend=again)
    assert again.calls == [] and res.sent == 0
    assert (tmp_path / "out" / "labels.jsonl").read_text() == first
    # run.json keeps every run: the first one's calls are not overwritten by the rerun's zero
    history = json.loads((tmp_path / "out" / "run.json").read_text())["history"]
    assert [h["calls"]["sent"] for h in history] == [40 * 13, 0]
    assert history[1]["counts"]["revise"] == {"written": 0, "resumed": 40, "failed": 0, "dropped": 0}
    # a fresh output folder on the same cache: every row is rebuilt, still not one call sent
    fresh = FakeBackend(unique_respond)
    res = run_pipeline(cfg.model_copy(update={"output": tmp_path / "out2",
                                              "cache": str(tmp_path / "out" / "cache.sqlite")}),
                       backend=fresh)
    assert fresh.calls == [] and res.sent == 0 and res.cached > 0

    def judged(text: str) -> list:
        return [(r["id"], r["p_a"], r["judgements"]) for r in map(json.loads, text.splitlines())]

    assert judged((tmp_path / "out2" / "labels.jsonl").read_text()) == judged(first)


def expected_redo(ids: list[str], const: Constitution, cfg: RunConfig, pid: str,
                  fields: set[str]) -> int:
    """Count, from the draws alone, the calls an edit of principle ``pid``'s ``fields`` redoes."""
    rcfg, jcfg = ReviseConfig.of(cfg.revise, cfg.seed), JudgeConfig.of(cfg.label, cfg.seed)
    orders = 2 if jcfg.both_orders else 1
    n = 0
    for rid in ids:
        changed = False  # has this row's answer changed yet
        for p in revise_principles(rid, const, rcfg):
            # a principle's examples show its revision request, in the critique's few-shot turns
            # too (the revision continues the critique's chat)
            crit = changed or (p.id == pid and bool(fields & {"critique", "examples"}
                                                    or ("revision" in fields and p.examples)))
            changed = crit or (p.id == pid and bool(fields & {"revision", "examples"}))
            n += crit + changed
        judged = [p.id for p in judge_principles(rid, const, jcfg)]
        n += orders * (len(judged) if changed else
                       judged.count(pid) * ("comparison" in fields))
    return n


@pytest.mark.parametrize("fields", [{"critique"}, {"revision"}, {"comparison"},
                                    {"critique", "revision", "comparison"}])
def test_editing_one_of_16_principles_redoes_exactly_the_affected_calls(tmp_path: Path, fields):
    old = sixteen()
    cfg = config(tmp_path, n=48)
    run_pipeline(cfg, backend=FakeBackend(unique_respond), constitution=old)
    before = {r["id"]: r for r in lines(tmp_path / "out" / "labels.jsonl")}
    ids = list(before)
    # the principle drawn most often in round 1 (so that the edit matters to many rows)
    firsts = [revise_principles(i, old, ReviseConfig.of(cfg.revise, cfg.seed))[0].id for i in ids]
    pid = max(set(firsts), key=firsts.count)
    edited = Constitution(name=old.name, principles=tuple(
        p.model_copy(update={f: getattr(p, f) + " Be brief." for f in fields}) if p.id == pid
        else p for p in old.principles))
    expect = expected_redo(ids, edited, cfg, pid, fields)
    assert expect > 0
    be = FakeBackend(unique_respond)
    res = run_pipeline(cfg, backend=be, constitution=edited)
    assert res.sent == len(be.calls) == expect
    total = 48 * (1 + 2 * ROUNDS + 8)
    assert res.cached == total - expect
    # rows the edit did not touch are the same as before, byte for byte (but the provenance)
    after = {r["id"]: r for r in lines(tmp_path / "out" / "labels.jsonl")}
    for rid in ids:
        if pid not in after[rid]["principle_ids"] and pid not in [
                p.id for p in revise_principles(rid, old, ReviseConfig.of(cfg.revise, cfg.seed))]:
            assert after[rid]["judgements"] == before[rid]["judgements"]


def test_diff_counts_what_a_rerun_will_redo(tmp_path: Path):
    old = sixteen()
    old_file = write_constitution(old, tmp_path / "old.yaml")
    cfg = config(tmp_path, n=24, constitution=str(old_file))
    run_pipeline(cfg, backend=FakeBackend(unique_respond))
    edited = Constitution(name=old.name, principles=tuple(
        p.model_copy(update={"critique": "Find every problem."}) if i == 3 else p
        for i, p in enumerate(old.principles)))
    new_file = write_constitution(edited, tmp_path / "new.yaml")
    r = subprocess.run([sys.executable, "-m", "cai.cli", "diff", str(old_file), str(new_file),
                        "--run", str(tmp_path / "out"), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["changes"] == [{"id": old.principles[3].id, "kind": "changed",
                                "fields": ["critique"]}]
    be = FakeBackend(unique_respond)
    res = run_pipeline(cfg.model_copy(update={"constitution": new_file}), backend=be)
    rerun = plan["rerun"]
    assert rerun["redo"] == res.sent == len(be.calls) > 0
    assert rerun["served"] == res.cached
    assert rerun["reused"] + rerun["unused"] == rerun["stored"]


def test_failures_are_listed_retried_and_never_cached(tmp_path: Path):
    cfg = config(tmp_path, n=10)
    bad = {"p3", "p7"}
    flaky = FakeBackend(unique_respond, fail=lambda r: any(
        f"Question {i[1:]}:" in m["content"] for i in bad for m in r.messages))
    res = run_pipeline(cfg, backend=flaky)
    s = res.stages["revise"]
    assert s.failed == 2 and s.written == 8 and res.errors == 2
    fails = lines(tmp_path / "out" / "revisions.failures.jsonl")
    assert {f["id"] for f in fails} == bad
    assert all(f["reason"].startswith("initial answer: backend error") for f in fails)
    m = json.loads((tmp_path / "out" / "run.json").read_text())
    assert m["counts"]["revise"]["failed"] == 2 and m["counts"]["label"]["rows"] == 8
    healed = FakeBackend(unique_respond)
    res = run_pipeline(cfg, backend=healed)
    assert res.stages["revise"].written == 2 and res.stages["revise"].failed == 0
    assert res.sent == 2 * (1 + 2 * ROUNDS + 8)  # only the two failed rows, all of their calls
    assert not (tmp_path / "out" / "revisions.failures.jsonl").exists()


def test_config_precedence_flag_env_file_default(tmp_path: Path, monkeypatch):
    f = tmp_path / "run.yaml"
    f.write_text("input: prompts.jsonl\nseed: 3\nrevise:\n  rounds: 2\n  max_tokens: 99\n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "x"}\n')
    cfg = load_run_config(f, {("revise", "rounds"): "5"})
    assert cfg.revise.rounds == 5 and cfg.revise.max_tokens == 99 and cfg.seed == 3
    assert cfg.input == str(tmp_path / "prompts.jsonl")  # relative to the file's folder
    assert cfg.output == Path("out/run") and cfg.cache_path() == Path("out/run/cache.sqlite")
    # through the real command line: flag > CAI_* > file
    env = {"CAI_REVISE_MAX_TOKENS": "77", "CAI_SEED": "4", "CAI_BACKEND": "fake"}
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from cai.cli import main

    assert main(["run", str(f), "--seed", "9", "--revise-rounds", "1", "--label-principles", "1",
                 "--no-progress"]) == 0
    m = json.loads((tmp_path / "out" / "run" / "run.json").read_text())["config"]
    assert (m["seed"], m["revise"]["max_tokens"], m["revise"]["rounds"]) == (9, 77, 1)
    assert m["backend"] == "fake" and m["label"]["principles"] == 1


def test_every_config_field_is_a_flag_and_a_variable():
    from typer.main import get_command

    from cai.cli.app import app

    cmd = get_command(app).commands["run"]  # type: ignore[attr-defined]
    opts = {o for p in cmd.params for o in p.opts}
    envs = {e for p in cmd.params for e in ([p.envvar] if isinstance(p.envvar, str)
                                            else p.envvar or [])}
    for leaf in leaves():
        assert leaf.flag in opts and leaf.env in envs, leaf
    assert "--revise-rounds" in opts and "CAI_LABEL_MODE" in envs and "--no-label" in {
        o for p in cmd.params for o in p.secondary_opts}


@pytest.mark.parametrize(("text", "expect"), [
    ("revise:\n  rounds: -1\n", "run.yaml:2: revise.rounds: Input should be greater than"),
    ("label:\n  mode: vibes\n", "run.yaml:2: label.mode:"),
    ("revise:\n  roundz: 2\n", "run.yaml:2: revise.roundz: unknown field (did you mean 'rounds'?)"),
    ("seed: [1\n", "YAML syntax error"),
])
def test_bad_config_is_one_line_with_file_and_line(tmp_path: Path, text: str, expect: str):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_run_config(f)
    assert expect in str(e.value)


def test_bad_flag_names_the_flag_and_variable():
    with pytest.raises(ConfigError, match="--revise-rounds / CAI_REVISE_ROUNDS"):
        load_run_config(None, {("revise", "rounds"): "many"})


def test_example_config_is_valid():
    cfg = load_run_config(REPO / "examples" / "run.yaml")
    assert cfg.sources == ["revisions"] and cfg.revise.enabled
    assert Path(cfg.input).is_file(), "the example's input ships with the repo"


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys):
    from cai.cli import main

    bad = tmp_path / "run.yaml"
    bad.write_text("input: x.jsonl\nlabel:\n  sources: [revisions, vibes]\n")
    assert main(["run", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run.yaml:3: label.sources.1:" in err and len(err.splitlines()) == 1
    assert main(["run", "--backend", "fake", "--no-progress", "--output", str(tmp_path / "o")]) == 2
    assert "no input prompts" in capsys.readouterr().err
    assert main(["diff", str(bad), str(bad)]) == 2  # not a constitution


def test_run_summary_names_failures_and_their_file(tmp_path: Path, capsys, monkeypatch):
    """Through the CLI: the closing lines count calls and name every failure reason and file."""
    import cai.backends.fake as fake

    write_prompts(tmp_path / "p.jsonl", 6)
    real = fake.default_respond

    def respond(r: Request) -> Completion:
        if "Question 2:" in r.messages[-1]["content"]:
            return Completion(texts=[""])  # an empty answer: the row fails, with its reason
        return real(r)

    monkeypatch.setattr(fake, "default_respond", respond)
    from cai.cli import main

    assert main(["run", "--input", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "o"), "-b",
                 "fake", "--revise-rounds", "1", "--label-principles", "1", "--no-progress"]) == 3  # rows failed
    err = capsys.readouterr().err
    assert "calls: 26 sent, 0 served from cache" in err, err  # 6 answers + 5 x (2 + 2)
    assert "revise: 1 rows failed (initial answer: 1); listed in" in err
    assert "revisions.failures.jsonl" in err


def test_a_smaller_input_keeps_its_rows_unless_pruned_and_a_larger_one_reuses_the_cache(tmp_path: Path):
    cfg = config(tmp_path, n=10)
    run_pipeline(cfg, backend=FakeBackend(unique_respond))
    out = tmp_path / "out"
    be = FakeBackend(unique_respond)
    res = run_pipeline(cfg.model_copy(update={"limit": 6}), backend=be)  # nothing deleted unasked
    assert be.calls == [] and {k: (s.kept, s.dropped) for k, s in res.stages.items()} == {
        "revise": (4, 0), "label": (4, 0)}
    for name in ("revisions.jsonl", "labels.jsonl"):
        assert [r["id"] for r in lines(out / name)] == [f"p{i}" for i in range(10)]
    be = FakeBackend(unique_respond)
    res = run_pipeline(cfg.model_copy(update={"limit": 6, "prune": True}), backend=be)
    assert be.calls == [] and {k: (s.kept, s.dropped) for k, s in res.stages.items()} == {
        "revise": (0, 4), "label": (0, 4)}
    for name in ("revisions.jsonl", "labels.jsonl"):
        assert [r["id"] for r in lines(out / name)] == [f"p{i}" for i in range(6)]
    assert {r["id"] for r in lines(out / "preferences.jsonl")} <= {f"p{i}" for i in range(6)}
    m = json.loads((out / "run.json").read_text())
    assert m["counts"]["revise"]["rows"] == 6 and m["counts"]["revise"]["dropped"] == 4
    be = FakeBackend(unique_respond)
    res = run_pipeline(cfg, backend=be)  # the four rows come back, from the cache
    assert be.calls == [] and res.cached > 0 and len(lines(out / "labels.jsonl")) == 10


def test_rerun_with_limit_keeps_every_row_and_prune_removes_them(tmp_path: Path, capsys):
    """`cai run` twenty rows, then `--limit 5`: still twenty rows; with `--prune`: five."""
    from cai.cli import main

    write_prompts(tmp_path / "p.jsonl", 20)
    out = tmp_path / "o"
    args = ["run", "--input", str(tmp_path / "p.jsonl"), "-o", str(out), "-b", "fake", "--revise-rounds", "1",
            "--label-principles", "1", "--no-progress"]
    ids = [f"p{i}" for i in range(20)]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--limit", "5"]) == 0
    for name in ("revisions.jsonl", "labels.jsonl"):
        assert [r["id"] for r in lines(out / name)] == ids
    assert "15 rows not in this input kept; --prune removes them" in capsys.readouterr().err
    assert main([*args, "--limit", "5", "--prune"]) == 0
    got = capsys.readouterr()
    assert "15 rows no longer in the input dropped" in got.err
    err = got.err
    assert "Traceback" not in err
    for name in ("revisions.jsonl", "labels.jsonl"):
        assert [r["id"] for r in lines(out / name)] == ids[:5]
    m = json.loads((out / "run.json").read_text())
    assert m["config"]["prune"] is True and m["counts"]["revise"]["dropped"] == 15
    assert "running" not in m and m["status"] == "complete"
