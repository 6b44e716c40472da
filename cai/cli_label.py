"""`cai label` (AI-judge preference pairs) and `cai eval-judge` (the judge against human labels)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .backends.base import Backend, Sampling
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
from .constitution import load_constitution, sha256_json
from .errors import InputError
from .evaljudge import NaiveConfig, naive_chunk, naive_fingerprint, summarize_files
from .inputs import PromptRow, read_prompts
from .judge import MODES, JudgeConfig, fingerprint, judge_chunk, write_preferences
from .output import JsonlSink, SinkSummary
from .pairs import (
    SampleConfig,
    detect_source,
    first_record,
    read_pairs,
    sample_pair_ids,
    sample_pairs,
)
from .progress import StageProgress
from .stage import Outcome, StageRun
from .templates import Templates

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
SeedOpt = Annotated[
    int, typer.Option(envvar="CAI_SEED", help="Seed for principle draws and sampling.")
]
ChunkOpt = Annotated[
    int,
    typer.Option(
        min=1,
        envvar="CAI_CHUNK_SIZE",
        help="Pairs per batched step (written and resumable per chunk).",
    ),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", "-n", min=1, help="Only the first N rows.")
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split, for dataset folders and Hub names.")]


def _clamp(text: str) -> tuple[float, float] | None:
    if text.strip().lower() in ("none", "off", ""):
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--clamp must be LO,HI (e.g. 0.4,0.6) or none, got {text!r}") from None
    if not 0.0 <= lo < 0.5 < hi <= 1.0:
        raise InputError(f"--clamp needs 0 <= LO < 0.5 < HI <= 1, got {text!r}")
    return lo, hi


def _judge_cfg(
    mode: str,
    k: int,
    single_order: bool,
    tie: float,
    clamp: str,
    seed: int,
    cot_max_tokens: int = 256,
) -> JudgeConfig:
    if mode not in MODES:
        raise InputError(f"unknown --mode {mode!r} (one of: {', '.join(MODES)})")
    return JudgeConfig(
        mode=mode,
        principles=k,
        both_orders=not single_order,
        tie_threshold=tie,
        clamp=_clamp(clamp),
        seed=seed,
        cot=Sampling(max_tokens=cot_max_tokens, seed=seed, stop=("Therefore",)),
    )


def _count(source: str, limit: int | None, per_row: int = 1) -> int | None:
    from .cli import count_rows  # late: cli imports this module

    n = count_rows(source, limit)
    return None if n is None else n * per_row


def _run(
    path: Path,
    fp: str,
    items: Callable[[JsonlSink, StageProgress], Iterable[Any]],
    process: Callable[[list[Any]], list[Outcome]],
    chunk_size: int,
    title: str,
    total: int | None,
    progress: bool | None,
) -> SinkSummary:
    with JsonlSink(path, fp) as sink:
        run = StageRun(sink=sink, key=lambda p: p.id, chunk_size=chunk_size, process=process)
        with StageProgress(title, total, enabled=progress) as bar:
            return run.run(items(sink, bar), bar)


def _sampled(
    rows: Iterator[PromptRow],
    policy: Backend,
    cfg: SampleConfig,
    chunk_size: int,
    system: str | None,
    sink: JsonlSink,
    bar: StageProgress,
) -> Iterator[Any]:
    """Pairs sampled per chunk of prompts; prompts whose pairs are all done are not sampled."""

    def todo() -> Iterator[PromptRow]:
        for r in rows:
            ids = sample_pair_ids(r.id, cfg.n)
            if all(sink.is_done(i) for i in ids):
                bar.advance(rows=len(ids))
            else:
                yield r

    it = todo()
    while chunk := list(islice(it, chunk_size)):
        yield from sample_pairs(chunk, policy, cfg, system)


def labels_path(output: Path) -> Path:
    if output.name == "preferences.jsonl":
        return output.with_name("labels.jsonl")
    return output.with_name(output.name.removesuffix(".jsonl") + ".labels.jsonl")


@app.command()
def label(
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
    backend: BackendOpt = "embedded",
    model: ModelOpt = None,
    base_url: BaseUrlOpt = "http://localhost:8000/v1",
    api_key: ApiKeyOpt = None,
    concurrency: ConcurrencyOpt = 256,
    seed: SeedOpt = 0,
    chunk_size: ChunkOpt = 64,
    prompt_column: Annotated[
        str | None, typer.Option(help="Sample mode: the prompt column.")
    ] = None,
    limit: LimitOpt = None,
    split: SplitOpt = "train",
    progress: ProgressOpt = None,
    cache: Annotated[str | None, typer.Option(
        "--cache", envvar="CAI_CACHE", show_default=False,
        help="Call cache (SQLite; default: cache.sqlite beside the output; `off` disables it). "
        "A call already in it is not sent again.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not use the call cache.")] = False,
) -> None:
    """AI-judge preference pairs: each pair is judged under k principles, in both orders, from
    the option tokens' log-probs. Writes TRL preference rows (prompt, chosen, rejected,
    p_chosen, ...).

    Rerunning the same command resumes: finished pairs are kept, the rest are judged.
    """
    const, tpl = load_constitution(constitution), Templates(templates)
    cfg = _judge_cfg(mode, principles, single_order, tie_threshold, clamp, seed, cot_max_tokens)
    if pairs == "auto":
        pairs = detect_source(first_record(input, split))
    if pairs not in ("sample", "dataset", "revisions"):
        raise InputError(f"unknown --pairs {pairs!r} (auto, sample, dataset, revisions)")
    cached = cache_path(cache, no_cache, output.parent)
    be = with_cache(build_backend(backend, model, base_url, api_key, concurrency), cached)
    policy = be
    labels = labels_path(output)
    try:
        fp = fingerprint(be, const, tpl, cfg)
        if pairs == "sample":
            if policy_model is not None:
                policy = with_cache(
                    build_backend(backend, policy_model, base_url, api_key, concurrency), cached)
            scfg = SampleConfig(
                n=samples,
                seed=seed,
                sampling=Sampling(max_tokens=max_tokens, temperature=sample_temperature),
            )
            fp = sha256_json([fp, policy.model_id, scfg.to_dict(), tpl.digest(("generate",))])
            system = tpl.render_text("generate", "system")
            rows = read_prompts(input, column=prompt_column, split=split, limit=limit)
            items = lambda sink, bar: _sampled(rows, policy, scfg, chunk_size, system, sink, bar)  # noqa: E731
            total = _count(input, limit, len(sample_pair_ids("x", samples)))
        else:
            items = lambda sink, bar: read_pairs(input, split=split, limit=limit)  # noqa: E731
            total = _count(input, limit)
        summary = _run(
            labels,
            fp,
            items,
            lambda ch: judge_chunk(ch, be, const, tpl, cfg),
            chunk_size,
            "label",
            total,
            progress,
        )
    finally:
        be.close()
        if policy is not be:
            policy.close()
    prefs = write_preferences(labels, output, keep_ties=keep_ties)
    held = "written (--keep-ties)" if keep_ties else "held out"
    err.print(
        f"label: {prefs.written} preference pairs -> {output}; {prefs.ties} ties {held}; "
        f"{prefs.abstentions} of {prefs.judgements} judgements abstained; "
        f"{prefs.inconsistent} pairs position-inconsistent; {summary.failed} failed; "
        f"{summary.resumed} kept from before; every judged pair in {labels}"
    )
    if isinstance(be, CachedBackend):
        sent, hits = be.sent, be.hits
        if isinstance(policy, CachedBackend) and policy is not be:
            sent, hits = sent + policy.sent, hits + policy.hits
        err.print(f"calls: {sent} sent, {hits} served from cache ({be.cache.path})")
    if summary.failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.reasons.items())
        err.print(f"[yellow]failures ({reasons}) listed in {summary.failures_path}[/yellow]")


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


@app.command("eval-judge")
def eval_judge(
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
    backend: BackendOpt = "embedded",
    model: ModelOpt = None,
    base_url: BaseUrlOpt = "http://localhost:8000/v1",
    api_key: ApiKeyOpt = None,
    concurrency: ConcurrencyOpt = 256,
    seed: SeedOpt = 0,
    chunk_size: ChunkOpt = 32,
    limit: LimitOpt = None,
    split: SplitOpt = "train",
    progress: ProgressOpt = None,
) -> None:
    """Relabel human-labelled pairs and print agreement with the human label, position
    consistency, abstention and tie rates, beside a naive text-parsing judge."""
    const, tpl = load_constitution(constitution), Templates(templates)
    cfg = _judge_cfg(mode, principles, single_order, tie_threshold, clamp, seed)
    ncfg = NaiveConfig(
        principles=principles,
        seed=seed,
        tie_threshold=tie_threshold,
        sampling=Sampling(max_tokens=naive_max_tokens, seed=seed),
    )
    if not any(p.human for p in read_pairs(file, split=split, limit=limit)):
        raise InputError(f"{file}: no human labels (need chosen/rejected, or a label column A/B)")
    total = _count(file, limit)
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cai-eval-")
        output_dir = Path(tmp.name)
    folder = output_dir
    be = build_backend(backend, model, base_url, api_key, concurrency)
    results: dict[str, dict[str, Any]] = {}
    try:
        runs: list[tuple[str, str, str, Callable[[list[Any]], list[Outcome]]]] = [
            (
                f"{cfg.mode} judge" + ("" if cfg.both_orders else " (one order)"),
                "judge.jsonl",
                fingerprint(be, const, tpl, cfg),
                lambda ch: judge_chunk(ch, be, const, tpl, cfg),
            )
        ]
        if naive:
            runs.append(
                (
                    "naive judge",
                    "naive.jsonl",
                    naive_fingerprint(be, const, tpl, ncfg),
                    lambda ch: naive_chunk(ch, be, const, tpl, ncfg),
                )
            )
        for name, fname, fp, process in runs:
            t0 = time.monotonic()
            s = _run(
                folder / fname,
                fp,
                lambda sink, bar: read_pairs(file, split=split, limit=limit),
                process,
                chunk_size,
                name,
                total,
                progress,
            )
            results[name] = {
                **summarize_files(s.path, s.failures_path),
                "wall_s": time.monotonic() - t0,
                "resumed": s.resumed,
            }
    finally:
        be.close()
        if tmp:
            tmp.cleanup()
    if json_out:
        out.print_json(
            json.dumps(
                {
                    "file": file,
                    "model": be.model_id,
                    "results": results,
                    "judge": cfg.to_dict(),
                    "naive": ncfg.to_dict(),
                }
            )
        )
    else:
        out.print(render_table(results))
        out.print(
            f"model {be.model_id}; {cfg.principles} principles per pair; "
            f"{'both orders' if cfg.both_orders else 'one order'}; tie threshold {tie_threshold}"
        )
