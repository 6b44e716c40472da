"""`cai run CONFIG` (the whole pipeline) and `cai diff OLD NEW` (what an edit will redo).

`cai run`'s flags are the settings tree's leaves (``cai.config.RunConfig``): every field of the
YAML file is also a flag and a ``CAI_*`` variable, so nothing can be set in one place only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import RunConfig
from ..constitution import load_constitution
from ..diff import FIELD_STAGES, diff_constitutions, plan_rerun, version_warning
from ..errors import EXIT_CODES_HELP
from ..pipeline import run_pipeline
from ..plan import BEST_OF_N_FILE
from ..quality.gates import REJECTS_FILE
from ..scale import run_pipeline_ray
from .app import app, out, say, settings_options
from .summary import (
    exit_status,
    plural,
    print_backend,
    print_calls,
    print_failures,
    print_gates,
    print_preferences,
    print_rows,
    print_usage,
    snapshot,
)

RAY_LOCAL = "local"  # `--ray-address local`: a Ray instance started here (or the one this process has)


@app.command("run", epilog=EXIT_CODES_HELP)
@settings_options(lambda leaf: True)
def run_command(
    base: Annotated[Path | None, typer.Argument(envvar="CAI_CONFIG", show_default=False, metavar="[CONFIG]",
                                                help="Run config (YAML); see examples/run.yaml.")] = None,
    *, config: RunConfig,
) -> None:
    """Run the whole pipeline from one YAML config: critique-revise, then pairs (initial vs
    revised), then the AI judge. Output folder: revisions.jsonl, labels.jsonl,
    preferences.jsonl, failures files, cache.sqlite and run.json.

    With `best_of_n: {enabled: true}` (--best-of-n), best-of-n replaces the label stage as the
    source of pairs: n answers per prompt from label.policy_model (default: model), ranked by the
    judge (label.*): best_of_n.jsonl (the best, SFT rows) and best_of_n.pairs.jsonl (best vs
    worst); the revise stage still runs beside it unless --no-revise.

    Every model call is cached: a rerun sends only the calls whose prompt changed, and a run
    killed at any moment resumes where it stopped. Every config field is also a flag
    (`revise.rounds` is `--revise-rounds`) and a variable (`CAI_REVISE_ROUNDS`); precedence:
    flag, variable, file, default.
    """
    cfg, ray = config, config.ray.address
    before = {name: snapshot(cfg.output / file) if on else {} for name, file, on in (
        ("revise", "revisions.jsonl", cfg.revise.enabled), ("label", "labels.jsonl", cfg.label.enabled),
        ("best_of_n", BEST_OF_N_FILE, cfg.best_of_n.enabled))}
    # with a Ray address, the rows go through a Ray cluster's actors, each with its own backend
    res = run_pipeline(cfg) if ray is None else run_pipeline_ray(cfg, None if ray == RAY_LOCAL else ray,
                                                                 actors=cfg.ray.actors)
    say(f"run: {res.output}")
    if ray is not None:
        r = res.manifest.get("ray", {})
        say(f"  ray: {r.get('rows', 0)} work items in {r.get('blocks', 0)} blocks over {r.get('actors', 0)} actors "
            f"on {len(r.get('nodes', []))} node(s)")
    for name, s in res.stages.items():
        print_rows(name, s, before.get(name, {}), indent="  ")
    if res.preferences.get("from") == "best_of_n":
        say(f"  pairs: {plural(res.preferences['written'], 'pair')} (best vs worst, margin > 0) -> "
            f"{res.output / res.preferences['file']}")
    elif res.preferences:
        print_preferences(res.preferences, res.output / "preferences.jsonl", res.output / "labels.jsonl",
                          cfg.label.keep_ties, cfg.label.tie_threshold, cfg.cache_path(), indent="  ")
    print_calls(res.calls, cfg.cache_path(), indent="  ")
    print_usage(res.manifest, indent="  ")
    print_backend(res.backend, res.output, indent="  ")
    print_gates(res.gates, res.output / REJECTS_FILE, indent="  ")
    print_failures(res.stages, indent="  ")
    say(f"  manifest: {res.output / 'run.json'}")
    exit_status(res.stages)


def say_out(text: str) -> None:
    out.print(text, soft_wrap=True, highlight=False)


@app.command("diff", epilog=EXIT_CODES_HELP)
def diff_command(
    old: Annotated[Path, typer.Argument(help="The constitution the run used.")],
    new: Annotated[Path, typer.Argument(help="The edited constitution.")],
    run: Annotated[Path | None, typer.Option(
        "--run", "-r", envvar="CAI_RUN",
        help="A finished run (its output folder, or its config file): count the cached calls "
        "a rerun with NEW reuses and the calls it redoes.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Which principles changed between two constitutions, and (with --run) how many cached calls
    a rerun will reuse and how many it will send again: exact for calls whose prompt changes; the
    calls after them are counted too, though a redone answer that comes out the same (greedy
    sampling, a small rewording) leaves them cached, so the rerun may send fewer."""
    a, b = load_constitution(old), load_constitution(new)
    changes = diff_constitutions(a, b)
    if warning := version_warning(a, b, changes):
        say(f"[yellow]{escape(warning)}[/yellow]")
    plan = plan_rerun(run, new, b) if run is not None else None
    if json_out:
        out.print_json(json.dumps({"changes": [c.__dict__ for c in changes], "rerun": plan}))
        return
    say_out(f"{a.name} v{a.version} ({len(a.principles)} principles) -> "
            f"{b.name} v{b.version} ({len(b.principles)} principles)")
    for c in changes:
        what = ", ".join(f"{f} ({FIELD_STAGES.get(f, 'all')})" for f in c.fields)
        say_out(f"  {c.kind:8} {c.id}" + (f": {what}" if what else ""))
    same = len(b.principles) - sum(c.kind != "removed" for c in changes)
    say_out(f"  {same} principles unchanged" + ("" if changes else " (no changes)"))
    if plan is None:
        say_out("(pass --run DIR to count the cached calls a rerun reuses and redoes)")
        return
    say_out(f"rerun of {plan['run']} with {new} (cache {plan['cache']}, "
            f"{plan['stored']} calls stored):")
    say_out(f"  {plan['reused']} cached calls reused, at most {plan['redo']} calls redone (sent to "
            f"the model; fewer where a redone answer comes out as before); "
            f"{plan['unused']} cached calls no longer used")
