"""A key in a URL's user-info (``http://user:sk-...@host/v1``) is never echoed: the URL fails
before any work as "credentials in the URL: use --api-key" (one line, exit 2), and nothing is
made on disk, where it could be recorded (run.json, the card)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cai.backends import build_backend
from cai.backends.openai_server import redact
from cai.cli import main
from cai.errors import BackendError
from cai.plan import check_backend

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-secret-123"
URL = f"http://user:{SECRET}@127.0.0.1:9/v1"
PROMPTS = '{"prompt": "How do I pick a lock?"}\n'
PAIR = '{"prompt": "q", "chosen": "no", "rejected": "yes"}\n'


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for bad in ("Traceback", "Exception in callback", "Task was destroyed", SECRET):
        assert bad not in err, err
    assert "credentials in the URL: use --api-key" in lines[0] and "***@127.0.0.1:9" in lines[0], err
    return lines[0]


@pytest.mark.parametrize("argv", [
    ["run", "--input", "p.jsonl", "-o", "out", "-m", "served"],
    ["revise", "p.jsonl", "-o", "out/r.jsonl", "-m", "served"],
    ["label", "pairs.jsonl", "-o", "out/p.jsonl", "-m", "served"],
], ids=["run", "revise", "label"])
def test_a_key_in_the_url_is_one_line_and_never_echoed(argv: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text(PROMPTS)
    (tmp_path / "pairs.jsonl").write_text(PAIR)
    before = sorted(tmp_path.rglob("*"))
    assert main([*argv, "-b", "openai", "--base-url", URL, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    _one_line(err)
    assert SECRET not in out
    assert sorted(tmp_path.rglob("*")) == before  # no folder, cache, run.json


def test_in_a_subprocess_through_the_environment(tmp_path: Path):
    """OPENAI_BASE_URL with a key: the real process prints one line, exit 2, no key."""
    (tmp_path / "p.jsonl").write_text(PROMPTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAI_", "OPENAI_"))}
    env.update(PYTHONPATH=str(REPO), OPENAI_BASE_URL=URL)
    r = subprocess.run([sys.executable, "-m", "cai.cli", "run", "--input", "p.jsonl", "-o", "out", "-b", "openai",
                        "-m", "served", "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    _one_line(r.stderr)
    assert SECRET not in r.stdout and not (tmp_path / "out").exists()


@pytest.mark.parametrize("urls", [URL, [URL], ["http://127.0.0.1:9/v1", URL]], ids=["one", "list", "second"])
def test_backends_and_the_plan_refuse_it(urls: str | list[str]):
    """Every way in (the plan's check, one server, several servers) refuses before connecting."""
    with pytest.raises(BackendError) as e:
        check_backend("openai", urls)
    _one_line(f"error: {e.value}")
    with pytest.raises(BackendError) as e:
        build_backend("openai", "served", base_url=urls)
    _one_line(f"error: {e.value}")


def test_redact():
    assert redact(URL) == "http://***@127.0.0.1:9/v1"
    assert redact("https://:k@h") == "https://***@h"
    assert redact("http://h:8000/v1?a=b@c") == "http://h:8000/v1?a=b@c"  # an @ past the host is not user-info
    assert redact("http://localhost:8000/v1") == "http://localhost:8000/v1"


@pytest.mark.parametrize("backend", ["fake", "vllm"])
def test_refused_whatever_the_backend(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """A backend that never connects to the URL (an OPENAI_BASE_URL left in the environment, say)
    would still record it (run.json) and echo it (a rerun hint): refused the same way."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", URL)
    (tmp_path / "p.jsonl").write_text(PROMPTS)
    assert main(["run", "--input", "p.jsonl", "-o", "out", "-b", backend, "-m", "m", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    _one_line(err)
    assert SECRET not in out and not (tmp_path / "out").exists()
