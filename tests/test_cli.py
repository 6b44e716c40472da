"""The CLI as a user meets it: one-line errors with exit code 2, help that teaches, real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cai.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_validate_shipped_constitutions():
    files = ["principles.yaml", *sorted(str(p) for p in (REPO / "constitution").glob("*.yaml"))]
    r = run_cli("validate", *files)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok: ") == len(files) >= 3


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("name: x\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n    comparison: q\n    colour: red\n",
         ":7: principles.0.colour: unknown field"),
        ("name: x\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n",
         ":3: principles.0.comparison: missing required field"),
        ("name: x\nprinciples: [\n", "YAML syntax error"),
    ],
)
def test_bad_constitution_is_one_line_exit_2(tmp_path: Path, text: str, expect: str):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = run_cli("validate", str(f))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {f}") and expect in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_input_file_is_one_line(tmp_path: Path, capsys):
    code = main(["revise", str(tmp_path / "nope.jsonl"), "--backend", "fake", "-o", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err


def test_unknown_backend_is_one_line(tmp_path: Path, hh_dev: Path, capsys):
    code = main(["revise", str(hh_dev), "--backend", "nosuch", "-o", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert "unknown backend 'nosuch'" in capsys.readouterr().err


def test_help_teaches():
    r = run_cli("revise", "--help")
    assert r.returncode == 0
    for opt in ("--constitution", "--backend", "--rounds", "--base-url", "--limit", "CAI_BACKEND"):
        assert opt in r.stdout


def test_render_prints_the_exact_messages(hh_dev: Path):
    r = run_cli("render", "judge", str(hh_dev), "--row", "2", "--response", "R-A", "--response-b", "R-B")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}
    user = out["messages"][-2]["content"]
    assert "(A) <response_a>\nR-A\n</response_a>" in user
    assert "Is it still a dog pile" in user


def test_revise_fake_end_to_end_and_rerun_is_free(tmp_path: Path, hh_dev: Path):
    out = tmp_path / "rev.jsonl"
    args = ["revise", str(hh_dev), "-b", "fake", "-n", "6", "--rounds", "2", "-o", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and all(len(x["rounds"]) == 2 for x in rows)
    assert (tmp_path / "rev.md").read_text().count("**Round 2: principle") == 6
    r2 = run_cli(*args)
    assert "revise: 6 rows unchanged (cache), 0 redone, 0 new, 0 failed" in r2.stderr


def test_revise_gate_flags_and_variables(tmp_path: Path):
    """Each input gate of `cai revise` is a flag and a CAI_GATES_* variable, as in `cai run`."""
    prompts = tmp_path / "p.jsonl"
    texts = ["how do I bake bread at home", "How do I bake bread at home?", "what is a good name for a cat"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    def revise(*flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], int]:
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}" / "rev.jsonl"
        r = subprocess.run([sys.executable, "-m", "cai.cli", "revise", str(prompts), "-b", "fake", "--rounds", "1",
                            "--no-cache", "-o", str(out), *flags], capture_output=True, text=True,
                           env={**__import__("os").environ, **(env or {})})
        return r, len(out.read_text().splitlines()) if out.exists() else -1

    r, n = revise()
    assert r.returncode == 0 and n == 2 and "1 duplicate exact (input)" in r.stderr, r.stderr
    r, n = revise("--no-gates-dedup")
    assert r.returncode == 0 and n == 3 and "every row passed" in r.stderr, r.stderr
    r, n = revise(env={"CAI_GATES_DEDUP": "false"})
    assert r.returncode == 0 and n == 3, r.stderr
    evals = tmp_path / "eval.txt"
    evals.write_text("What is a good name for a cat?\n")
    r, n = revise("--gates-decontaminate", str(evals))
    assert r.returncode == 0 and n == 1 and "1 contaminated (input)" in r.stderr, r.stderr
    r, n = revise("--gates-decontaminate", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and n == -1 and "missing.txt: file not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r, n = revise("--gates-dedup-threshold", "2")
    assert r.returncode == 2 and "--gates-dedup-threshold" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- every option of every command: its variable is read, and reaches the settings ---------------


class _Captured(Exception):
    pass


def _sample(leaf) -> tuple[str, object]:
    """A value for ``leaf`` other than its default, as a variable holds it, and as parsed."""
    import typing

    from cai.config import base_type

    t = base_type(leaf.annotation)
    if t is bool:
        return ("false", False) if leaf.default else ("true", True)
    if typing.get_origin(t) is typing.Literal:
        choice = [c for c in typing.get_args(t) if c != leaf.default][-1]
        return choice, choice
    if t is int:
        return "7", 7
    if t is float:
        return "0.3", 0.3
    if t is Path:
        return "x/y", Path("x/y")
    if leaf.name == "label_clamp":
        return "0.3,0.7", [0.3, 0.7]
    if leaf.name == "label_sources":
        return "sample,dataset", ["sample", "dataset"]
    if leaf.name == "base_url":
        return "http://h:1/v1", "http://h:1/v1"
    if leaf.name == "extra_body":
        return '{"a": 1}', {"a": 1}
    return "xyz", "xyz"


def test_every_option_of_every_command_reads_its_variable(monkeypatch: pytest.MonkeyPatch):
    """Walk every command and every option: set its variable (each name it has), parse, and check
    the value that arrives (for settings: in the RunConfig the command runs with)."""
    import os

    from typer.main import get_command

    import cai.cli.run as run_cli
    from cai import pipeline
    from cai.cli.app import app
    from cai.config import NaiveSettings, find_leaf, leaves

    for var in [v for v in os.environ if v.startswith(("CAI_", "OPENAI_"))]:
        monkeypatch.delenv(var)

    def capture(*args, **kw):
        raise _Captured(kw.get("config", args[0] if args else None), kw.get("naive"))

    for name in ("run_revise", "run_label", "run_eval_judge", "run_best_of_n"):
        monkeypatch.setattr(pipeline, name, capture)
    monkeypatch.setattr(run_cli, "run_pipeline", capture)
    monkeypatch.setattr(run_cli, "run_pipeline_ray", capture)
    naive = {x.name: x for x in leaves(NaiveSettings, ("naive",))}
    group = get_command(app)
    checked = 0
    for cname, cmd in group.commands.items():  # type: ignore[attr-defined]
        settings = cname in ("run", "revise", "label", "eval-judge", "best-of-n")
        stage = {"revise": "revise", "label": "label", "eval-judge": "label", "best-of-n": "best_of_n"}.get(cname)
        for p in cmd.params:
            envs = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar or [])
            leaf = naive.get(p.name) or (find_leaf(p.name, stage) if settings else None)
            if settings and p.name not in ("base", "json_out", "help", "cache_ctx"):
                assert envs, f"cai {cname} {p.opts}: no variable"
            for env in envs:
                value, want = _sample(leaf) if leaf is not None else ("true" if p.name == "no_cache" else "7", None)
                monkeypatch.setenv(env, value)
                if p.name == "cache" or p.name == "no_cache":
                    monkeypatch.delenv("CAI_NO_CACHE" if p.name == "cache" else "CAI_CACHE", raising=False)
                args = ["x" for a in cmd.params if a.param_type_name == "argument" and a.required and a is not p]
                with cmd.make_context(cname, list(args)) as ctx:
                    if leaf is None and p.name != "no_cache":
                        source = ctx.get_parameter_source(p.name)
                        assert source is not None and source.name == "ENVIRONMENT", (cname, env)
                        assert str(ctx.params[p.name]) == value, (cname, env)
                    elif p.name == "no_cache":
                        with pytest.raises(_Captured) as got:
                            cmd.invoke(ctx)
                        assert got.value.args[0].cache == "off"
                    else:
                        with pytest.raises(_Captured) as got:
                            cmd.invoke(ctx)
                        cfg = got.value.args[1] if leaf.name in naive else got.value.args[0]
                        path = leaf.path[1:] if leaf.name in naive else leaf.path
                        for part in path:
                            cfg = getattr(cfg, part)
                        assert cfg == want, (cname, env, cfg, want)
                monkeypatch.delenv(env)
                checked += 1
    assert checked > 150


def test_limit_variable_limits_every_stage_command(tmp_path: Path):
    """CAI_LIMIT=2 (like every CAI_* variable) limits `cai revise`, `cai label` and `cai run`."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")} | {"CAI_LIMIT": "2"}
    src = str(REPO / "examples" / "hh_red_team.jsonl")
    for argv, out in (
        (["revise", src, "-o", str(tmp_path / "r" / "revisions.jsonl")], tmp_path / "r" / "revisions.jsonl"),
        (["label", src, "-o", str(tmp_path / "l" / "preferences.jsonl")], tmp_path / "l" / "labels.jsonl"),
        (["run", "--input", src, "-o", str(tmp_path / "run")], tmp_path / "run" / "revisions.jsonl"),
    ):
        r = subprocess.run([sys.executable, "-m", "cai.cli", *argv, "--backend", "fake", "--no-progress"],
                           capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert len(out.read_text().splitlines()) == 2, (argv[0], r.stderr)


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_exits_130_sigterm_143_and_the_rerun_resumes(tmp_path: Path, sig: str, code: int):
    import os
    import signal
    import time

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i} about {i * 7}"}) + "\n" for i in range(300)))
    argv = [sys.executable, "-m", "cai.cli", "run", "--input", str(prompts), "-o", str(tmp_path / "o"), "-b", "fake",
            "--no-progress", "--concurrency", "4", "--revise-rounds", "1", "--label-principles", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")} | {"CAI_FAKE_DELAY": "0.01"}
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    part = tmp_path / "o" / "revisions.jsonl.part"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "interrupted: rerun the same command to resume" in err
    r = subprocess.run(argv, capture_output=True, text=True, env={**env, "CAI_FAKE_DELAY": "0"}, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "o" / "revisions.jsonl").read_text().splitlines()) == 300


def _caught(pid: int) -> int:
    """The signals process ``pid`` catches (its SigCgt mask); 0 before it has started."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
@pytest.mark.parametrize(("script", "sig", "code", "after"), [
    ("-m", "SIGINT", 130, 0.1), ("-m", "SIGINT", 130, 0.35), ("-m", "SIGINT", 130, 0.6),
    ("-m", "SIGTERM", 143, 0.2), ("cai", "SIGINT", 130, 0.25),
])
def test_interrupt_during_imports_is_one_line(tmp_path: Path, script: str, sig: str, code: int, after: float):
    """Ctrl-C (or SIGTERM) while Python is still importing cai, before the command runs (about a
    second): one line, exit 130 (143), no traceback, as Ctrl-C mid-run."""
    import os
    import shutil
    import signal
    import time

    cai = shutil.which("cai", path=str(Path(sys.executable).parent))
    if script == "cai" and cai is None:
        pytest.skip("no `cai` console script beside this Python")
    argv = [sys.executable, "-m", "cai.cli"] if script == "-m" else [str(cai)]
    argv += ["run", "--input", str(REPO / "examples" / "hh_red_team.jsonl"), "-o", str(tmp_path / "o"), "-b", "fake",
             "--no-progress"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")} | {"CAI_FAKE_DELAY": "1"}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as p:
        deadline = time.monotonic() + 30
        while not _caught(p.pid) & (1 << (signal.SIGINT - 1)) and time.monotonic() < deadline:
            time.sleep(0.002)  # the interpreter is up (it catches SIGINT): cai's imports start now
        time.sleep(after)
        assert p.poll() is None
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    assert err.startswith("interrupted"), err
