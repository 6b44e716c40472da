"""The typer app and the options every command shares (backend, constitution, templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .backends import BACKENDS, Backend, make_backend

app = typer.Typer(
    name="cai",
    help=(
        "Turn a written constitution into alignment training data.\n\n"
        "Stages: `cai revise` (critique and revise: SFT data), `cai label` (AI judge: preference "
        "pairs). Start with `cai prepare-model` (once), then e.g.\n\n"
        "  cai revise prompts.jsonl -o out/revisions.jsonl --limit 10\n\n"
        "Every option can also be set with an environment variable `CAI_<OPTION>`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
err = Console(stderr=True)
out = Console()

# --- shared options -------------------------------------------------------------------------

BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend", "-b", envvar="CAI_BACKEND",
        help=f"Model backend: {', '.join(BACKENDS)}. `embedded` runs SmolLM2-135M on the CPU "
        "(plumbing, not quality); `openai` talks to `vllm serve` or any OpenAI-compatible server.",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", envvar="CAI_MODEL",
                 help="Model: a served model name (openai), a folder or HF id (vllm, embedded)."),
]
BaseUrlOpt = Annotated[
    str,
    typer.Option("--base-url", envvar=["CAI_BASE_URL", "OPENAI_BASE_URL"],
                 help="OpenAI-compatible server URL, e.g. http://localhost:8000/v1 for `vllm serve`."),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar=["CAI_API_KEY", "OPENAI_API_KEY"], show_default=False,
                 help="API key for the server (never written to outputs)."),
]
ConcurrencyOpt = Annotated[
    int,
    typer.Option("--concurrency", envvar="CAI_CONCURRENCY", min=1,
                 help="Requests in flight to the server. vLLM batches hundreds: keep it full."),
]
ConstitutionOpt = Annotated[
    Path | None,
    typer.Option("--constitution", "-c", envvar="CAI_CONSTITUTION",
                 help="Constitution YAML file. Default: the shipped principles.yaml (harmlessness)."),
]
TemplatesOpt = Annotated[
    Path | None,
    typer.Option("--templates", "-t", envvar="CAI_TEMPLATES",
                 help="Folder of Jinja2 templates overriding the shipped ones file by file."),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Show a progress bar (default: when stderr is a terminal)."),
]


def build_backend(
    backend: str, model: str | None, base_url: str, api_key: str | None, concurrency: int
) -> Backend:
    opts: dict[str, Any] = {"model": model}
    if backend == "openai":
        opts.update(base_url=base_url, api_key=api_key, concurrency=concurrency)
    return make_backend(backend, **opts)
