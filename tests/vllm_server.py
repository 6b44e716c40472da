"""A session-scoped fixture that runs a REAL vLLM OpenAI server on the prepared SmolLM2 folder.

Register it with ``pytest_plugins = ["tests.vllm_server"]``. The server runs from the separate
vLLM environment (``<repo>/.venv-vllm``, or ``$CAI_VLLM_PYTHON``), in its own process group,
logging to ``<repo>/.tmp/vllm-server-<port>.log``; teardown kills the whole group.
To reuse a server you already run (same model folder, ``--served-model-name smollm2``,
``--dtype float32``), set ``CAI_VLLM_BASE_URL=http://127.0.0.1:PORT/v1``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"
START_TIMEOUT_S = 300.0
SETUP_HINT = (
    "the vLLM server tests need a vLLM environment: run `bash scripts/setup.sh --vllm` "
    "(or set CAI_VLLM_PYTHON to a python that has vllm)"
)


def vllm_python() -> Path:
    return Path(os.environ.get("CAI_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")


def model_folder() -> Path:
    """``$CAI_MODEL_DIR`` or ``<repo>/.models/SmolLM2-135M-Instruct``, prepared if missing."""
    from cai.model import is_prepared, prepare_model

    folder = Path(os.environ.get("CAI_MODEL_DIR") or REPO / ".models" / "SmolLM2-135M-Instruct")
    if not is_prepared(folder):
        prepare_model(folder)
    return folder


def free_port(start: int = 8021, end: int = 8030) -> int:
    """A free port in 8021-8029 (8011 may be someone else's server), else any free port."""
    for port in range(start, end):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server's whole process group: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def start_server(port: int) -> tuple[subprocess.Popen[bytes], Path]:
    python = vllm_python()
    if not python.exists():
        pytest.fail(f"{python} does not exist: {SETUP_HINT}", pytrace=False)
    tmp, cache = REPO / ".tmp", REPO / ".cache" / "vllm"
    tmp.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="0-1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CACHE_ROOT=str(cache),
        TMPDIR=str(tmp),
    )
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_folder()), "--served-model-name", SERVED_NAME,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
        "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
    ]
    log = tmp / f"vllm-server-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(REPO), start_new_session=True,
        )
    return proc, log


def wait_ready(proc: subprocess.Popen[bytes], log: Path, base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"the vLLM server exited with code {proc.returncode}; log {log}:\n{log_tail(log)}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    pytest.fail(
        f"the vLLM server was not ready after {START_TIMEOUT_S:.0f} s; log {log}:\n{log_tail(log)}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[str]:
    """Start the real server once per session; yield its base URL (``http://127.0.0.1:P/v1``)."""
    if url := os.environ.get("CAI_VLLM_BASE_URL"):
        yield url.rstrip("/")
        return
    port = free_port()
    proc, log = start_server(port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(proc, log, base_url)
        yield base_url
    finally:
        stop_group(proc)
