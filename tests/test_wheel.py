"""The built wheel works outside the checkout: its shipped constitutions and templates come from
inside the wheel, and the `cai` command runs a small job on the fake backend.

The wheel is built from this checkout (hatchling, no build isolation: nothing is downloaded) and
installed with ``--no-deps`` into a fresh virtualenv in a temporary folder; that virtualenv
borrows the project's installed dependencies through a ``.pth`` file, but not the editable
install, so ``import cai`` can only find the wheel's copy (asserted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("hatchling", reason="hatchling builds the wheel (the dev extra installs it)")
    tmp = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
                 REPO, cwd=tmp)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("*.whl")
    venv = tmp / "venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    assert made.returncode == 0, made.stderr
    site = Path(_run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp).stdout.strip())
    # the project's dependencies, not its editable install (a .pth line adds a folder, not its .pth files)
    (site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
                     "--no-deps", wheel, cwd=tmp)
    assert installed.returncode == 0, installed.stderr
    return wheel, venv


def test_the_wheel_is_named_apart_and_ships_the_data(wheel_env: tuple[Path, Path]) -> None:
    wheel, _ = wheel_env
    assert wheel.name.startswith("cai_constitution-"), wheel.name  # `cai` on the index is another project
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cai/_data/principles.yaml" in names
    assert any(n.startswith("cai/_data/prompts/") and n.endswith(".j2") for n in names)
    assert any(n.startswith("cai/_data/constitution/") and n.endswith(".yaml") for n in names)


def test_the_installed_wheel_validates_and_runs_outside_the_checkout(wheel_env: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    _, venv = wheel_env
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("CAI_")}
    where = _run(venv / "bin" / "python", "-c",
                 "import cai, cai.resources as r; print(cai.__file__); print(r.data_path('principles.yaml'))",
                 cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    module, principles = where.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(principles).is_relative_to(venv), where.stdout
    shipped = [Path(principles), *sorted((Path(principles).parent / "constitution").glob("*.yaml"))]
    assert len(shipped) > 1
    ok = _run(venv / "bin" / "cai", "validate", *shipped, cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("ok: ") == len(shipped), ok.stdout

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("How do I pick a lock?", "Say hi.",
                                                                           "Is the sea salty?")))
    ran = _run(venv / "bin" / "cai", "revise", prompts, "--backend", "fake", "--limit", "2",
               "-o", tmp_path / "out" / "revisions.jsonl", cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "revisions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
