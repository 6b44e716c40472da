"""`cai validate` (check constitution files) and `cai render` (the exact messages a stage sends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..constitution import load_constitution
from ..errors import InputError
from ..inputs import read_prompts
from ..stages.revise import ReviseConfig, principles_for
from ..templates import Templates
from .app import ConstitutionOpt, InputArg, PromptColumnOpt, TemplatesOpt, app, out


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
        msgs = tpl.generate_messages(picked.prompt)
    elif stage in ("critique", "revise", "judge", "judge_cot"):
        msgs = tpl.messages(stage, conversation=picked.prompt, response=response, critique=critique,
                            response_a=response, response_b=response_b, principle=p, round=1)
    else:
        raise InputError(f"unknown stage {stage!r} (generate, critique, revise, judge, judge_cot)")
    out.print_json(json.dumps({"row_id": picked.id, "principle_id": p.id, "messages": msgs}))
