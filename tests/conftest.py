"""Shared fixtures. The real-model fixtures (embedded model, vLLM server) are session-scoped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The real vLLM server fixture (`vllm_server`) lives in its own module.
pytest_plugins = ["tests.vllm_server"] if (REPO / "tests" / "vllm_server.py").exists() else []
SHARED_DATA = REPO.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


@pytest.fixture(scope="session")
def hh_dev() -> Path:
    """The 300 human-labelled harmlessness pairs beside the project (real red-team prompts)."""
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the project expects ../shared/data beside it")
    return SHARED_DATA


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

    backend = EmbeddedBackend(model=str(model_dir))
    yield backend
    backend.close()
