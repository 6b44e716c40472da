"""Shared fixtures. The real-model fixtures (embedded model, vLLM server) are session-scoped."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The real vLLM server fixture (`vllm_server`) lives in its own module.
pytest_plugins = ["tests.vllm_server"] if (REPO / "tests" / "vllm_server.py").exists() else []
SHARED_DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
SAMPLE_DATA = REPO / "examples" / "hh_red_team.jsonl"  # its first 32 lines, shipped in the repo


@pytest.fixture(scope="session")
def hh_dev() -> Path:
    """Real human-labelled harmlessness pairs (red-team prompts): the 300 in ../shared/data when
    the project sits beside that folder, else the 32 of them in examples/."""
    return SHARED_DATA if SHARED_DATA.exists() else SAMPLE_DATA


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared SmolLM2 folder (converted from the PyPI package's GGUF on first use)."""
    from cai.model import prepare_model

    folder = Path(os.environ.get("CAI_MODEL_DIR") or REPO / ".models" / "SmolLM2-135M-Instruct")
    return prepare_model(folder)


@pytest.fixture(scope="session")
def embedded(model_dir: Path):
    """One embedded transformers backend for the whole session (loading costs seconds)."""
    from cai.backends.embedded import EmbeddedBackend
    from tests.sync import Sync

    with Sync(EmbeddedBackend(model=str(model_dir))) as backend:  # complete(): generate() on the run's loop
        yield backend


@pytest.fixture
def stub_server() -> Iterator[str]:
    """tests/fake_server.py's zero-latency stub (``--stub``) in its own process; yields its URL
    without /v1. It stops by itself after 300 s."""
    with subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_server.py"), "--stub", "--model", "stub",
                           "--port", "0", "--max-seconds", "300"], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("listening on"), line
            yield f"http://127.0.0.1:{int(line.split()[-1])}"
        finally:
            proc.terminate()
            proc.wait(10)
