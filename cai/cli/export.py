"""`cai export`: a finished run folder -> TRL-ready datasets with a dataset card, saved locally
and optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_CODES_HELP
from ..plan import check_output_dir
from .app import app, say


@app.command(epilog=EXIT_CODES_HELP)
def export(
    run_dir: Annotated[Path, typer.Argument(
        help="A finished run folder: revisions.jsonl and/or preferences.jsonl (from `cai run`, "
             "`cai revise -o DIR/revisions.jsonl` or `cai label -o DIR/preferences.jsonl`), or best_of_n.jsonl "
             "and best_of_n.pairs.jsonl (`cai best-of-n`, `cai run` with best_of_n: the best answers go to the "
             "SFT split, best vs worst to the preference split), with "
             "run.json, labels.jsonl and *.failures.jsonl when they exist. A folder with a "
             "*.jsonl.part file (a stage still running or crashed) is refused.")],
    out: Annotated[Path | None, typer.Option(
        "--output", "-o", "--out",
        help="Folder to write: `data/SPLIT.FORMAT` and `README.md` (the dataset card). Default: "
             "RUN_DIR/export. An earlier cai export there is replaced; another folder is refused.",
        show_default=False)] = None,
    fmt: Annotated[str, typer.Option(
        "--format", help="Data file format: parquet or jsonl.")] = "parquet",
    test_fraction: Annotated[float, typer.Option(
        "--test-fraction", min=0.0, max=0.9,
        help="Share of prompts held out in test_sft/test_prefs. The split is by prompt (a hash "
             "of its messages), the same in both, so no prompt is in train and test. 0: no test "
             "splits.")] = 0.1,
    seed: Annotated[int, typer.Option(
        "--seed", help="Salt of the prompt hash: another seed draws another test set.")] = 0,
    full: Annotated[bool, typer.Option(
        "--full", help="Also export the trace: critique/revision rounds, call stats, source-row "
             "extras, per-principle judgements and provenance, as JSON text columns (TRL ignores "
             "them). Off: the splits hold TRL's columns and light metadata only.")] = False,
    constitution: Annotated[list[Path] | None, typer.Option(
        "--constitution", "-c",
        help="Constitution YAML the run used, for the card when the folder has no run.json "
             "(its hash must match the rows' provenance). Repeat for several.",
        show_default=False)] = None,
    license: Annotated[str, typer.Option(
        "--license", help="License id for the card's metadata (e.g. mit, apache-2.0, cc-by-4.0): "
             "that of your prompts and the model's outputs.")] = "unknown",
    push_to_hub: Annotated[str | None, typer.Option(
        "--push-to-hub", metavar="REPO_ID",
        help="Also upload the written folder to this Hub dataset repo (user/name), in one commit, "
             "after it is complete and checked; nothing is pushed otherwise.",
        show_default=False)] = None,
    private: Annotated[bool, typer.Option(
        "--private/--public",
        help="Visibility when --push-to-hub creates the repo. --private refuses to push into an "
             "existing public repo.")] = True,
    score: Annotated[str, typer.Option(
        "--score", help="score_chosen/score_rejected of the preference rows: raw (the judge's soft label) or "
             "length-debiased (the label with the length effect regressed out; needs label.debias_length).")
    ] = "raw",
    include_rejects: Annotated[bool, typer.Option(
        "--include-rejects", help="Also export the SFT rows the quality gates kept out (listed in "
             "rejects.jsonl: truncated, looping, meta-text, not improved).")] = False,
    labels: Annotated[str, typer.Option(
        "--labels", help="Preference labels: human-first (a person's label from `cai review` where one exists, "
             "the judge's elsewhere; a human tie drops the pair), human (only human-labelled pairs) or ai. "
             "Each row's label_source says which.")] = "human-first",
    token: Annotated[str | None, typer.Option(
        "--token", help="Hugging Face token with write access, for --push-to-hub. Default: "
             "HF_TOKEN, or the token saved by `hf auth login`. Never written or printed.",
        show_default=False)] = None,
) -> None:
    """Export a run as TRL-ready datasets: **train_sft/test_sft** (`messages`, for SFTTrainer)
    and **train_prefs/test_prefs** (`prompt`/`chosen`/`rejected`, for DPOTrainer and
    RewardTrainer), split by prompt, with a dataset card (the constitution in full, models, judge
    settings, counts, diagnostics). On the Hub, load with `load_dataset(repo, "sft")` and
    `load_dataset(repo, "prefs")`.
    """
    from ..export import export_run  # datasets is slow to import: only when exporting

    if out is not None:
        check_output_dir(out, flag="--output")

    res = export_run(run_dir, out or run_dir / "export", fmt=fmt, test_fraction=test_fraction, seed=seed,
                     full=full, constitutions=constitution or [], license=license, push_to_hub=push_to_hub,
                     private=private, token=token, include_rejects=include_rejects, score=score,
                     labels=labels)
    sizes = ", ".join(f"{k} {v}" for k, v in res.splits.items())
    for w in res.warnings:
        say(f"warning: {w}")
    say(f"export: {sizes} -> {res.folder}")
    if res.url:
        say(f"pushed: {res.url}")
