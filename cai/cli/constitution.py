"""`cai validate` (check constitution files) and `cai render` (the exact messages a stage sends)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

import jinja2
import typer
from rich.markup import escape

from ..config import RunConfig
from ..constitution import Constitution, Principle, load_constitution
from ..errors import EXIT_USAGE, CaiError, InputError, TemplateError
from ..inputs import read_prompts
from ..stages import judge as judge_stage
from ..stages import revise as revise_stage
from ..stages.pairs import Pair, detect_source, first_record, read_pairs, sample_pair_ids
from ..templates import Templates
from .app import app, err, out, settings_options, under

T = TypeVar("T")
RENDER_STAGES = ("generate", "critique", "revise", "judge", "judge_cot", "judge_cot_answer")


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(
        help="Constitutions (.yaml, .yml) and prompt templates (.j2) to check.")],
) -> None:
    """Check constitution and template files: one line each, `ok: ...` or `error: ...` naming file,
    line and field (a template is compiled in the sandbox that renders it); exit 2 if any failed."""
    failed = 0
    for f in files:
        try:
            out.print(f"ok: {f}: {_check(f)}", soft_wrap=True, highlight=False)
        except (CaiError, OSError, UnicodeDecodeError) as e:
            failed += 1
            what = f"{f}: {e.strerror or e}" if isinstance(e, OSError) else \
                f"{f}: not UTF-8 text" if isinstance(e, UnicodeDecodeError) else " ".join(str(e).split())
            err.print(f"[red]error:[/red] {escape(what)}", soft_wrap=True, highlight=False)
    if failed:
        raise typer.Exit(EXIT_USAGE)


def _check(f: Path) -> str:
    """What a good file is (raises on a bad one)."""
    kind = f.suffix.lower()
    if kind == ".j2":
        if not f.is_file():
            raise InputError(f"{f}: file not found")
        try:
            Templates(f.parent).env.get_template(f.name)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"template syntax error: {e.message}", file=str(f), line=e.lineno) from None
        return "template, compiles"
    if kind not in (".yaml", ".yml"):
        raise InputError(f"{f}: not a constitution (.yaml, .yml) or a template (.j2)")
    c = load_constitution(f)
    return f"{c.name} v{c.version}, {len(c.principles)} principles, hash {c.digest()[:12]}"


@app.command()
@settings_options(under("input", "constitution", "templates", "seed", "prompt_column"), positional="input")
def render(
    stage: Annotated[str, typer.Argument(help=f"{', '.join(RENDER_STAGES)}.")],
    config: RunConfig,
    row: Annotated[int, typer.Option(
        "--row", min=1, help="Which row (1-based): a prompt, or a pair for the judge.")] = 1,
    round: Annotated[int | None, typer.Option(
        "--round", min=1, help="critique/revise: the round (its principle is the one drawn for that row and round; "
        "default 1).")] = None,
    draw: Annotated[int | None, typer.Option(
        "--draw", min=1,
        help="Judge stages: which of the pair's drawn principles (1 to `cai label -k`; default 1).")] = None,
    order: Annotated[str, typer.Option(
        "--order", help="Judge stages: ab (the pair as given) or ba (swapped, the judge's second order).")] = "ab",
    principle: Annotated[str | None, typer.Option(help="Principle id: overrides the drawn one.")] = None,
    response: Annotated[str | None, typer.Option(
        help="critique/revise: the response (the latest answer). Judge: response A (default: the pair's).")] = None,
    response_b: Annotated[str | None, typer.Option(help="Judge: response B (default: the pair's).")] = None,
    critique: Annotated[str, typer.Option(help="revise: the critique.")] = "[critique]",
    reasoning: Annotated[str, typer.Option(help="judge_cot_answer: the judge's reasoning.")] = "[reasoning]",
) -> None:
    """Print, as JSON, the exact chat messages a stage sends for one row: the principle the row
    draws (for that round, or that judge draw), its few-shot examples as chat turns, and the
    live request. `cai label` draws the judge's principles per pair: give a pairs file (the
    one you label) for the judge stages."""
    if stage not in RENDER_STAGES:
        raise InputError(f"unknown stage {stage!r} ({', '.join(RENDER_STAGES)})")
    judging = stage in judge_stage.JUDGE_STAGES
    if round is not None and judging:
        raise InputError("--round is for critique and revise; the judge's principles are picked with --draw")
    if draw is not None and not judging:
        raise InputError("--draw is for the judge stages; critique and revise take --round")
    if order not in judge_stage.ORDERS:
        raise InputError(f"--order must be ab or ba, got {order!r}")
    const, tpl, seed = load_constitution(config.constitution), Templates(config.templates), config.seed
    input, prompt_column = config.input or "", config.prompt_column
    result: dict[str, Any] = {"stage": stage}
    if judging:
        pair = _pair(input, row, prompt_column)
        k = draw or 1
        p = _principle(const, principle) or judge_stage.principles_for(
            pair.id, const, judge_stage.JudgeConfig(principles=k, seed=seed))[k - 1]
        a = response if response is not None else pair.response_a
        b = response_b if response_b is not None else pair.response_b
        a, b = (b, a) if order == "ba" else (a, b)
        ctx: dict[str, Any] = {"conversation": pair.prompt, "response_a": a, "response_b": b, "principle": p}
        if stage == "judge_cot_answer":
            ctx["reasoning"] = reasoning
        result |= {"row_id": pair.id, "principle_id": p.id, "draw": k, "order": order,
                   "messages": tpl.messages(stage, **ctx)}
    else:
        picked = _prompt_row(input, row, prompt_column)
        if stage == "generate":
            result |= {"row_id": picked.id, "messages": tpl.generate_messages(picked.prompt)}
        else:
            n = round or 1
            p = _principle(const, principle) or revise_stage.principles_for(
                picked.id, const, revise_stage.ReviseConfig(rounds=n, seed=seed))[n - 1]
            ctx = {"conversation": picked.prompt, "response": "[response]" if response is None else response,
                   "principle": p, "round": n}
            if stage == "revise":
                ctx["critique"] = critique
            result |= {"row_id": picked.id, "principle_id": p.id, "round": n, "messages": tpl.messages(stage, **ctx)}
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))


def _principle(const: Constitution, pid: str | None) -> Principle | None:
    if pid is None:
        return None
    if pid not in const.by_id():
        raise InputError(f"no principle {pid!r} in {const.name} (ids: {', '.join(const.by_id())})")
    return const.by_id()[pid]


def _nth(rows: list[T], row: int, input: str) -> T:
    if len(rows) < row:
        raise InputError(f"{input}: has fewer than {row} rows")
    return rows[row - 1]


def _prompt_row(input: str, row: int, column: str | None) -> Any:
    return _nth(list(read_prompts(input, column=column, limit=row)), row, input)


def _pair(input: str, row: int, column: str | None) -> Pair:
    """The ``row``-th pair as `cai label` reads it; for a prompts file, the first pair that
    `cai label --pairs sample` would make of that prompt, with placeholder responses."""
    if detect_source(first_record(input)) == "sample":
        r = _prompt_row(input, row, column)
        return Pair(sample_pair_ids(r.id, 2)[0], r.prompt, "[response A]", "[response B]")
    picked = _nth(list(read_pairs(input, limit=row)), row, input)
    if picked.error:
        raise InputError(picked.error)
    return picked
