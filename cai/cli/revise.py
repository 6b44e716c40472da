"""`cai revise`: critique and revise (the supervised stage): `cai run` with the label stage off."""

from __future__ import annotations

from .. import pipeline
from ..config import RunConfig
from ..errors import EXIT_CODES_HELP
from .app import TOP, app, but, settings_options, stage_file, under
from .summary import print_rows, print_stage_end, snapshot

REVISE = but(under(*TOP, "revise", "gates"), "revise.enabled", "gates.keep")


@app.command(epilog=EXIT_CODES_HELP)
@settings_options(REVISE, stage="revise", positional="input", helps={
    "input": "Prompts: .jsonl/.json/.parquet/.csv, a saved datasets folder, or a Hub dataset name. Columns: "
             "prompt, messages, or hh-rlhf `chosen` transcripts.",
    "output": "Output JSONL (a Markdown report is written beside it; default: revisions.jsonl in out/run)."})
def revise(config: RunConfig) -> None:
    """Critique and revise: answer each prompt, then critique and rewrite the answer against a
    principle drawn per round. Writes TRL SFT rows (`messages`) with the full trace.

    Rerunning the same command resumes: finished rows are kept, the rest are done.
    """
    output = stage_file(config, "revisions.jsonl")
    before = snapshot(output)
    res = pipeline.run_revise(config.input or "", output=output, config=config)
    print_rows("revise", res.summary, before, also=f" (readable: {output.with_suffix('.md')})")
    print_stage_end("revise", res, output, config.cache_path(output.parent))
