"""`cai label` (AI-judge preference pairs) and `cai eval-judge` (the judge against human labels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import pipeline, preflight, runtime
from ..config import GateSettings, LabelSettings
from ..constitution import load_constitution
from ..errors import EXIT_CODES_HELP, EXIT_ROWS_FAILED
from ..quality import REJECTS_FILE
from ..stages.preferences import judged_by
from ..templates import Templates
from .app import (
    BackendSpec,
    ConstitutionOpt,
    LimitOpt,
    ProgressOpt,
    SeedOpt,
    SplitOpt,
    TemplatesOpt,
    app,
    backend_options,
    cache_options,
    gate_options,
    out,
    say,
    settings,
)
from .summary import exit_status, print_calls, print_failures, print_gates

ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        envvar="CAI_JUDGE_MODE",
        help=(
            "logprobs: read P(A), P(B) from one token's log-probs; cot: reason first, then "
            "read them (clamped); choice: structured output A/B, a hard label (servers "
            "without log-probs)."
        ),
    ),
]
PrinciplesOpt = Annotated[
    int,
    typer.Option(
        "--principles",
        "-k",
        min=1,
        envvar="CAI_JUDGE_PRINCIPLES",
        help="Principles per pair (ensemble); the label is their mean.",
    ),
]
SingleOrderOpt = Annotated[
    bool,
    typer.Option(
        "--single-order",
        help=(
            "Judge only in the given order (default: both orders, averaged, against position bias)."
        ),
    ),
]
TieOpt = Annotated[
    float, typer.Option("--tie-threshold", min=0.0, max=0.5, help="|p - 0.5| below this is a tie.")
]
ClampOpt = Annotated[
    str,
    typer.Option(
        "--clamp",
        help="CoT mode: clamp each probability to LO,HI (CAI paper: 0.4,0.6); `none` to disable.",
    ),
]
ChunkOpt = Annotated[
    int,
    typer.Option(
        min=1,
        envvar="CAI_CHUNK_SIZE",
        help="Accepted for old scripts; no effect: pairs stream through the judge one by one.",
    ),
]


@app.command(epilog=EXIT_CODES_HELP)
@backend_options
@cache_options(lambda kw: kw["output"].parent)
@gate_options("truncated")
def label(
    backend: BackendSpec,
    cache: Path | None,
    gates: GateSettings,
    input: Annotated[
        str,
        typer.Argument(
            help=(
                "Pairs (chosen/rejected transcripts or messages, prompt/response_a/response_b, or "
                "`cai revise` output) or prompts to sample pairs for: .jsonl/.json/.parquet/"
                ".csv, a saved datasets folder or a Hub dataset name."
            )
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            envvar="CAI_OUTPUT",
            help=(
                "TRL preference rows; every judged pair (ties too) goes to labels.jsonl beside it."
            ),
        ),
    ] = Path("out/preferences.jsonl"),
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            help=(
                "Where pairs come from: auto (by columns), sample (n answers per prompt from the "
                "policy), dataset (existing pairs), revisions (initial vs revised answer)."
            ),
        ),
    ] = "auto",
    mode: ModeOpt = "logprobs",
    principles: PrinciplesOpt = 4,
    single_order: SingleOrderOpt = False,
    tie_threshold: TieOpt = 0.05,
    keep_ties: Annotated[
        bool, typer.Option("--keep-ties", help="Write ties to preferences too.")
    ] = False,
    debias_length: Annotated[bool, typer.Option(
        "--debias-length", help="Also write p_chosen_length_debiased: the soft label with the length effect "
        "regressed out, beside the raw one (`cai export --score length-debiased` uses it).")] = False,
    clamp: ClampOpt = "0.4,0.6",
    cot_max_tokens: Annotated[int, typer.Option(min=1, help="CoT mode: reasoning tokens.")] = 256,
    samples: Annotated[
        int, typer.Option(min=2, help="Sample mode: answers per prompt (every two make a pair).")
    ] = 2,
    sample_temperature: Annotated[
        float, typer.Option(min=0.0, help="Sample mode: temperature.")
    ] = 1.0,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Sample mode: max tokens per answer.")
    ] = 256,
    policy_model: Annotated[
        str | None,
        typer.Option(help=("Sample mode: the model that answers (default: the judge's --model).")),
    ] = None,
    constitution: ConstitutionOpt = None,
    templates: TemplatesOpt = None,
    seed: SeedOpt = 0,
    chunk_size: ChunkOpt = 64,
    prompt_column: Annotated[
        str | None, typer.Option(help="Sample mode: the prompt column.")
    ] = None,
    limit: LimitOpt = None,
    split: SplitOpt = "train",
    progress: ProgressOpt = None,
) -> None:
    """AI-judge preference pairs: each pair is judged under k principles, in both orders, from
    the option tokens' log-probs. Writes TRL preference rows (prompt, chosen, rejected,
    p_chosen, ...).

    Rerunning the same command resumes: finished pairs are kept, the rest are judged.
    """
    ls = settings(LabelSettings, mode=mode, principles=principles, both_orders=not single_order,
                  tie_threshold=tie_threshold, keep_ties=keep_ties, clamp=clamp, cot_max_tokens=cot_max_tokens,
                  debias_length=debias_length,
                  samples=samples, sample_temperature=sample_temperature)
    const, tpl = load_constitution(constitution), Templates(templates)
    # before the models load and before any file is made
    preflight.check_label(input, output=output, cache=cache, pairs=pairs, mode=ls.mode, prompt_column=prompt_column,
                          split=split, constitution=const, templates=tpl)
    preflight.check_backend(backend.backend, backend.base_url)
    with (runtime.closing(backend.build()) as be,
          runtime.closing(backend.build(policy_model) if policy_model else None) as policy):
        res = pipeline.run_label(input, backend=be, output=output, pairs=pairs, constitution=const,
                                 templates=tpl, settings=ls, seed=seed, max_tokens=max_tokens,
                                 policy=policy, cache=cache, concurrency=backend.concurrency, limit=limit,
                                 prompt_column=prompt_column, split=split, progress=progress, gates=gates)
    prefs, s = res.preferences, res.summary
    assert prefs is not None
    held = "written (--keep-ties)" if keep_ties else "held out"
    say(f"label: {prefs.written} preference pairs -> {output}; {prefs.ties} ties {held}; "
        f"{prefs.abstentions} of {prefs.judgements} judgements abstained"
        + (f" (judged by {judged_by(prefs.modes)})" if prefs.modes else "") + "; "
        f"{prefs.inconsistent} pairs position-inconsistent; {s.failed} failed; "
        f"{s.resumed} kept from before; every judged pair in {s.path}")
    print_calls(res.calls, cache)
    print_gates(res.gates, output.parent / REJECTS_FILE)
    print_failures({"label": s})
    exit_status({"label": s})


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_table(results: dict[str, dict[str, Any]]) -> Table:
    names = list(results)
    t = Table(title="Judge vs human labels")
    t.add_column("metric")
    for n in names:
        t.add_column(n, justify="right")
    s = [results[n] for n in names]
    t.add_row(
        "pairs (labelled / failed)",
        *[f"{r['pairs']} ({r['labelled']} / {r['failures']})" for r in s],
    )
    t.add_row(
        "agreement with human (decided)", *[f"{_pct(r['agreement'])} of {r['decided']}" for r in s]
    )
    t.add_row("coverage (decided / pairs)", *[_pct(r["coverage"]) for r in s])
    t.add_row("soft agreement (mean p(human's))", *[_pct(r["soft_agreement"]) for r in s])
    t.add_row("Brier score (0 best, 0.25 chance)", *[_num(r.get("brier")) for r in s])
    t.add_row("calibration error (ECE, 10 bins)", *[_num(r.get("ece")) for r in s])
    t.add_row("position consistency", *[_pct(r["position_consistency"]) for r in s])
    t.add_row(
        "abstention rate (judgements)",
        *[f"{_pct(r['abstention_rate'])} of {r['judgements']}" for r in s],
    )
    t.add_row("tie rate", *[_pct(r["tie_rate"]) for r in s])
    t.add_row("first slot picked", *[_pct(r["first_slot_rate"]) for r in s])
    t.add_row(
        "wall time (this run)",
        *[f"{r.get('wall_s', 0):.0f} s" + (f" ({r['resumed']} resumed)" if r.get("resumed") else "")
          for r in s],
    )
    return t


@app.command("eval-judge", epilog=EXIT_CODES_HELP + " eval-judge exits 3 when the judge under test "
             "failed on some pairs (its figures then cover fewer pairs than the file; with -o DIR they are listed "
             "in DIR/judge.failures.jsonl); the naive judge's failures are one of its measured figures and "
             "never change the exit status.")
@backend_options
def eval_judge(
    backend: BackendSpec,
    file: Annotated[
        str,
        typer.Argument(
            help=(
                "Human-labelled pairs: chosen/rejected (hh-rlhf transcripts, messages) or "
                "prompt/response_a/response_b/label."
            )
        ),
    ],
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            "-o",
            help=(
                "Keep the judged rows here (judge.jsonl, naive.jsonl); a rerun resumes. Default: a "
                "temporary folder."
            ),
        ),
    ] = None,
    mode: ModeOpt = "logprobs",
    principles: PrinciplesOpt = 4,
    single_order: SingleOrderOpt = False,
    tie_threshold: TieOpt = 0.05,
    clamp: ClampOpt = "0.4,0.6",
    naive: Annotated[
        bool,
        typer.Option(
            "--naive/--no-naive",
            help=("Also run the naive judge (one order, generated text, letter parsed)."),
        ),
    ] = True,
    naive_max_tokens: Annotated[
        int, typer.Option(min=1, help="Naive judge: tokens to write.")
    ] = 12,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    constitution: ConstitutionOpt = None,
    templates: TemplatesOpt = None,
    seed: SeedOpt = 0,
    chunk_size: ChunkOpt = 32,
    limit: LimitOpt = None,
    split: SplitOpt = "train",
    progress: ProgressOpt = None,
) -> None:
    """Relabel human-labelled pairs and print agreement with the human label, position
    consistency, abstention and tie rates, beside a naive text-parsing judge."""
    ls = settings(LabelSettings, mode=mode, principles=principles, both_orders=not single_order,
                  tie_threshold=tie_threshold, clamp=clamp)
    const, tpl = load_constitution(constitution), Templates(templates)
    preflight.check_eval_judge(file, output_dir=output_dir, split=split, mode=ls.mode, constitution=const,
                               templates=tpl)
    preflight.check_backend(backend.backend, backend.base_url)
    with runtime.closing(backend.build()) as be:
        res = pipeline.run_eval_judge(file, backend=be, output_dir=output_dir, constitution=const,
                                      templates=tpl, settings=ls, seed=seed, naive=naive,
                                      naive_max_tokens=naive_max_tokens, concurrency=backend.concurrency, limit=limit,
                                      split=split, progress=progress)
    if json_out:
        out.print_json(json.dumps({"file": file, "model": res.model, "results": res.results,
                                   "judge": res.judge, "naive": res.naive}))
    else:
        out.print(render_table(res.results))
        out.print(f"model {res.model}; {ls.principles} principles per pair; "
                  f"{'both orders' if ls.both_orders else 'one order'}; tie threshold {ls.tie_threshold}")
    judge_name, judged = next(iter(res.results.items()))
    if judged.get("failures"):
        where = (f"listed in {output_dir / 'judge.failures.jsonl'}" if output_dir is not None
                 else "pass -o DIR to keep them in DIR/judge.failures.jsonl")
        say(f"[yellow]{judge_name}: {judged['failures']} of {judged['pairs']} pairs failed; {where}[/yellow]")
        raise typer.Exit(EXIT_ROWS_FAILED)
