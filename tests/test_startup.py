"""The command line's start-up and collector settings (issue 20's CPU per call): the program
imports only the module of the command it runs, and a command runs with the start-up's
objects frozen and a higher collector threshold, put back afterwards."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import typer

import cai.cli as cli
from cai.cli.app import app

ROOT = Path(__file__).resolve().parent.parent


def test_command_modules_name_every_command_and_its_module():
    cli.register()
    found = {}
    for info in app.registered_commands:
        name = info.name or typer.main.get_command_name(info.callback.__name__)
        found[name] = info.callback.__module__.rsplit(".", 1)[-1]
    assert found == cli.COMMAND_MODULES
    assert set(cli.COMMAND_MODULES.values()) == set(cli.COMMANDS)


# `python -m cai.cli ARGS`, as runpy does it (sys.argv[0] is "-m" while the package is imported),
# then the modules imported by the end
PROGRAM = """
import atexit, runpy, sys
atexit.register(lambda: print(" ".join(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["-m", *sys.argv[1:]]
runpy.run_module("cai.cli", run_name="__main__", alter_sys=True)
"""


def _imported(*args: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return set(r.stderr.splitlines()[-1].split())


def test_the_program_imports_only_the_module_of_its_command():
    mods = _imported("run", "--help")
    assert "cai.cli.run" in mods
    assert not {"cai.cli.report", "cai.cli.review", "cai.cli.export", "cai.report.html"} & mods
    assert "tenacity" not in mods  # imported by the client's first retry only
    assert {f"cai.cli.{m}" for m in cli.COMMANDS} <= _imported("--help")  # every command listed


def test_a_command_runs_with_the_collector_tuned_and_puts_it_back(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_main", lambda argv: seen.append((gc.get_threshold(), gc.get_freeze_count())) or 0)
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert cli.main(["--help"]) == 0
    assert seen[0][0] == cli.GC_THRESHOLD and seen[0][1] > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, frozen)


# the program's state once the command returned: what Python's exit would walk, its threads
AT_EXIT = """
import atexit, gc, os, runpy, sys
atexit.register(lambda: print(len(gc.get_objects()), gc.get_freeze_count(), len(os.listdir("/proc/self/task")),
                              os.environ.get("OPENBLAS_NUM_THREADS"), "numpy" in sys.modules, file=sys.stderr))
sys.argv = ["-m", *sys.argv[1:]]
runpy.run_module("cai.cli", run_name="__main__", alter_sys=True)
"""


def test_the_program_ends_frozen_with_one_thread():
    """Exit walks no object (everything frozen once the command returned: the collections at exit
    cost 0.06-0.08 s), and numpy's OpenBLAS started no spinning threads (0.045 s), while the
    environment the command's children get is as it was."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", AT_EXIT, "run", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    tracked, frozen, threads, blas, numpy = r.stderr.splitlines()[-1].split()
    assert numpy == "True"  # `cai run` imports it: the case that matters
    assert int(tracked) < int(frozen) // 100
    assert (threads, blas) == ("1", "None")
