"""A session-scoped fixture that runs a REAL ``transformers serve`` (Hugging Face's OpenAI-compatible
server) on the prepared SmolLM2 folder: a plain OpenAI-style server for the ``openai`` backend.

``transformers serve`` refuses fields outside OpenAI's schema with HTTP 422 (``Unexpected fields in
the request``), ignores ``n``, ``logprobs`` and ``response_format`` (with a warning), and samples
greedily unless the model's generation config says otherwise. It needs
``pip install "transformers[serving]"`` in ``.venv`` (fastapi, uvicorn, openai; torch and
transformers stay as they are); without it the tests that use this fixture are skipped.

The server runs from this interpreter's environment, on 127.0.0.1, in its own process group,
logging to ``<repo>/.tmp/transformers-serve-<port>.log``; teardown stops the whole group. Use it
with ``from tests.transformers_server import transformers_server`` (or list this module in
``pytest_plugins``). To reuse a server you already run on the same folder, set
``CAI_TRANSFORMERS_BASE_URL=http://127.0.0.1:PORT/v1``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vllm_server import log_tail, stop_group

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0
SETUP_HINT = 'install it with `.venv/bin/pip install "transformers[serving]"` (scripts/setup.sh does)'


def missing() -> str | None:
    """Why ``transformers serve`` cannot run here, or None."""
    for mod in ("transformers", "fastapi", "uvicorn", "openai"):
        if importlib.util.find_spec(mod) is None:
            return f"`transformers serve` needs {mod}, which is not installed: {SETUP_HINT}"
    if importlib.util.find_spec("transformers.cli.serve") is None:
        return "this transformers has no `transformers serve` (transformers.cli.serve)"
    return None


def model_folder() -> Path:
    """``$CAI_MODEL_DIR`` or ``<repo>/.models/SmolLM2-135M-Instruct``, prepared if missing."""
    from cai.model import is_prepared, prepare_model

    folder = Path(os.environ.get("CAI_MODEL_DIR") or REPO / ".models" / "SmolLM2-135M-Instruct")
    if not is_prepared(folder):
        prepare_model(folder)
    return folder.resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(folder: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    tmp = REPO / ".tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TMPDIR=str(tmp),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
           "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--log-level", "warning", "--default-seed", "0"]
    log = tmp / f"transformers-serve-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(REPO), start_new_session=True)
    return proc, log


def wait_ready(proc: subprocess.Popen[bytes], log: Path, base_url: str) -> None:
    """Until ``/health`` answers 200 and ``/v1/models`` lists the model as loaded (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    root = base_url.removesuffix("/v1")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with code {proc.returncode}; log {log}:\n{log_tail(log)}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(f"{root}/health", timeout=5) as resp:
                healthy = resp.status == 200
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as resp:
                if healthy and b'"loaded"' in resp.read():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"transformers serve was not ready after {START_TIMEOUT_S:.0f} s; log {log}:\n{log_tail(log)}",
                pytrace=False)


@pytest.fixture(scope="session")
def transformers_server() -> Iterator[str]:
    """Start ``transformers serve`` once per session; yield its base URL (``http://127.0.0.1:P/v1``).
    The served model's name is the folder's absolute path (``GET /v1/models`` lists it)."""
    if url := os.environ.get("CAI_TRANSFORMERS_BASE_URL"):
        yield url.rstrip("/")
        return
    if why := missing():
        pytest.skip(why)
    port = free_port()
    proc, log = start(model_folder(), port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(proc, log, base_url)
        yield base_url
    finally:
        stop_group(proc)
