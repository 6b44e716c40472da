"""`cai revise`: critique and revise (the supervised stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import pipeline, preflight, runtime
from ..config import GateSettings, ReviseSettings
from ..constitution import load_constitution
from ..errors import EXIT_CODES_HELP
from ..quality import REJECTS_FILE
from ..templates import Templates
from .app import (
    BackendSpec,
    ConstitutionOpt,
    InputArg,
    LimitOpt,
    ProgressOpt,
    PromptColumnOpt,
    SeedOpt,
    SplitOpt,
    TemplatesOpt,
    app,
    backend_options,
    cache_options,
    gate_options,
    say,
    settings,
)
from .summary import exit_status, print_calls, print_failures, print_gates

_DEFAULT = ReviseSettings.model_validate({})  # one set of defaults: the run config's (revise.*)
OutputOpt = Annotated[Path, typer.Option("--output", "-o", envvar="CAI_OUTPUT",
                                         help="Output JSONL (a Markdown report is written beside it).")]


@app.command(epilog=EXIT_CODES_HELP)
@backend_options
@cache_options(lambda kw: kw["output"].parent)
@gate_options("truncated", "text", "dedup", "dedup_threshold", "decontaminate")
def revise(
    input: InputArg,
    backend: BackendSpec,
    cache: Path | None,
    gates: GateSettings,
    output: OutputOpt = Path("out/revisions.jsonl"),
    constitution: ConstitutionOpt = None,
    templates: TemplatesOpt = None,
    rounds: Annotated[int, typer.Option(min=0, envvar="CAI_ROUNDS",
                                        help="Critique-revision rounds (CAI paper: up to 4).")] = _DEFAULT.rounds,
    seed: SeedOpt = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Max new tokens per answer/revision.")
                          ] = _DEFAULT.max_tokens,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0: greedy).")
                           ] = _DEFAULT.temperature,
    repetition_penalty: Annotated[float, typer.Option(
        min=0.01, help="Above 1 discourages repeating tokens of the prompt and answer (vLLM's definition). "
        "The default stops the shipped 135M model's loops; a capable model rarely needs it: 1 turns it off."
    )] = _DEFAULT.repetition_penalty,
    chunk_size: Annotated[int, typer.Option(min=1, envvar="CAI_CHUNK_SIZE",
                                            help="No effect (kept for old scripts): rows stream one by one.")
                          ] = 256,
    prompt_column: PromptColumnOpt = None,
    limit: LimitOpt = None,
    split: SplitOpt = "train",
    progress: ProgressOpt = None,
) -> None:
    """Critique and revise: answer each prompt, then critique and rewrite the answer against a
    principle drawn per round. Writes TRL SFT rows (`messages`) with the full trace.

    Rerunning the same command resumes: finished rows are kept, the rest are done.
    """
    rs = settings(ReviseSettings, rounds=rounds, max_tokens=max_tokens, temperature=temperature,
                  repetition_penalty=repetition_penalty)
    const, tpl = load_constitution(constitution), Templates(templates)
    # before the model loads and before any file is made
    preflight.check_revise(input, output=output, cache=cache, prompt_column=prompt_column, split=split,
                           constitution=const, templates=tpl, gates=gates)
    preflight.check_backend(backend.backend, backend.base_url)
    with runtime.closing(backend.build()) as be:
        res = pipeline.run_revise(input, backend=be, output=output, constitution=const, templates=tpl,
                                  settings=rs, seed=seed, cache=cache, concurrency=backend.concurrency, limit=limit,
                                  prompt_column=prompt_column, split=split, progress=progress, gates=gates)
    s = res.summary
    say(f"revise: {s.written} rows written, {s.resumed} kept from before, {s.failed} failed -> {output} "
        f"(readable: {output.with_suffix('.md')})")
    print_calls(res.calls, cache)
    print_gates(res.gates, output.parent / REJECTS_FILE)
    print_failures({"revise": s})
    exit_status({"revise": s})
