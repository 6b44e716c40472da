"""`cai label` (AI-judge preference pairs: `cai run` with the revise stage off) and `cai eval-judge`
(the judge against human labels)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import pipeline
from ..config import BATCH_LEAVES, NaiveSettings, RunConfig
from ..errors import EXIT_CODES_HELP, EXIT_ROWS_FAILED
from ..plan import labels_path
from .app import TOP, app, but, out, say, settings_options, stage_file, under
from .summary import print_preferences, print_rows, print_stage_end, snapshot

LABEL = but(under(*TOP, "label", "gates.truncated"), "label.enabled", "label.pairs")
JUDGE = ("mode", "principles", "both_orders", "top_logprobs", "min_mass", "clamp", "tie_threshold", "fallback",
         "cot_max_tokens")
EVAL = but(under(*TOP, *(f"label.{n}" for n in JUDGE)), "prompt_column", "cache", *BATCH_LEAVES)
PAIRS_HELP = ("Pairs (chosen/rejected transcripts or messages, prompt/response_a/response_b, or `cai revise` "
              "output) or prompts to sample pairs for: .jsonl/.json/.parquet/.csv, a saved datasets folder or a "
              "Hub dataset name.")


@app.command(epilog=EXIT_CODES_HELP)
@settings_options(LABEL, stage="label", positional="input", helps={
    "input": PAIRS_HELP,
    "output": "TRL preference rows; every judged pair (ties too) goes to labels.jsonl beside it (default: "
              "preferences.jsonl in out/run)."})
def label(config: RunConfig) -> None:
    """AI-judge preference pairs: each pair is judged under k principles, in both orders, from
    the option tokens' log-probs. Writes TRL preference rows (prompt, chosen, rejected,
    p_chosen, ...).

    Rerunning the same command resumes: finished pairs are kept, the rest are judged.
    """
    output = stage_file(config, "preferences.jsonl")
    before = snapshot(labels_path(output))
    res = pipeline.run_label(config.input or "", output=output, config=config)
    prefs, s = res.preferences, res.summary
    assert prefs is not None
    print_rows("label", s, before)
    print_preferences(prefs, output, s.path, config.label.keep_ties, config.label.tie_threshold,
                      config.cache_path(output.parent))
    print_stage_end("label", res, output, config.cache_path(output.parent))


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("pairs (labelled / failed)", lambda r: f"{r['pairs']} ({r['labelled']} / {r['failures']})"),
    ("agreement with human (decided)", lambda r: f"{_pct(r['agreement'])} of {r['decided']}"),
    ("coverage (decided / pairs)", lambda r: _pct(r["coverage"])),
    ("soft agreement (mean p(human's))", lambda r: _pct(r["soft_agreement"])),
    ("Brier score (0 best, 0.25 chance)", lambda r: _num(r.get("brier"))),
    ("calibration error (ECE, 10 bins)", lambda r: _num(r.get("ece"))),
    ("position consistency", lambda r: _pct(r["position_consistency"])),
    ("abstention rate (judgements)", lambda r: f"{_pct(r['abstention_rate'])} of {r['judgements']}"),
    ("tie rate", lambda r: _pct(r["tie_rate"])),
    ("first slot picked", lambda r: _pct(r["first_slot_rate"])),
    ("wall time (this run)",
     lambda r: f"{r.get('wall_s', 0):.0f} s" + (f" ({r['resumed']} resumed)" if r.get("resumed") else "")),
)


def render_table(results: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="Judge vs human labels")
    t.add_column("metric")
    for n in results:
        t.add_column(n, justify="right")
    for name, cell in ROWS:
        t.add_row(name, *[cell(r) for r in results.values()])
    return t


@app.command("eval-judge", epilog=EXIT_CODES_HELP + " eval-judge exits 3 when the judge under test "
             "failed on some pairs (its figures then cover fewer pairs than the file; with -o DIR they are listed "
             "in DIR/judge.failures.jsonl); the naive judge's failures are one of its measured figures and "
             "never change the exit status.")
@settings_options(lambda leaf: True, model=NaiveSettings, prefix=("naive",), param="naive")
@settings_options(EVAL, stage="label", positional="input", helps={
    "input": "Human-labelled pairs: chosen/rejected (hh-rlhf transcripts, messages) or "
             "prompt/response_a/response_b/label.",
    "output": "Keep the judged rows in this folder (judge.jsonl, naive.jsonl); a rerun resumes. Default: a "
              "temporary folder."})
def eval_judge(
    config: RunConfig,
    naive: NaiveSettings,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Relabel human-labelled pairs and print agreement with the human label, position
    consistency, abstention and tie rates, beside a naive text-parsing judge."""
    output_dir = None if config.output == RunConfig.model_fields["output"].default else config.output
    res = pipeline.run_eval_judge(config.input or "", output=output_dir, config=config, naive=naive)
    ls = config.label
    if json_out:
        out.print_json(json.dumps({"file": config.input, "model": res.model, "results": res.results,
                                   "judge": res.judge, "naive": res.naive}))
    else:
        out.print(render_table(res.results))
        out.print(f"model {res.model}; {ls.principles} principles per pair; "
                  f"{'both orders' if ls.both_orders else 'one order'}; tie threshold {ls.tie_threshold}")
    naive_hint(res.results.get("naive judge"), config.backend)
    judge_name, judged = next(iter(res.results.items()))
    if judged.get("failures"):
        where = (f"listed in {output_dir / 'judge.failures.jsonl'}" if output_dir is not None
                 else "pass -o DIR to keep them in DIR/judge.failures.jsonl")
        say(f"[yellow]{judge_name}: {judged['failures']} of {judged['pairs']} pairs failed; {where}[/yellow]")
        raise typer.Exit(EXIT_ROWS_FAILED)


def naive_hint(naive: dict[str, Any] | None, backend: str) -> None:
    """One line when the naive judge failed every pair: why, so that 0% reads as expected or as a fix."""
    if not naive or not naive.get("pairs") or naive.get("failures") != naive["pairs"]:
        return
    why = ("the fake backend's replies ('fake reply N to: ...') name no answer letter: expected; the naive judge "
           "needs a model that writes (A) or (B)" if backend == "fake" else
           "no reply named an answer letter: a larger or instruction-tuned model, or a larger --naive-max-tokens, "
           "may answer with one")
    say(f"naive judge: all {naive['pairs']} pairs failed ({why})")
