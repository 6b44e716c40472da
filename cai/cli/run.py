"""`cai run CONFIG` (the whole pipeline) and `cai diff OLD NEW` (what an edit will redo).

`cai run`'s flags are made from the config model (``cai.config.RunConfig``): every field of the
YAML file is also a flag and a ``CAI_*`` variable, so nothing can be set in one place only.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import preflight, runtime
from ..backends import build_backend
from ..config import Leaf, base_type, env_names, leaves, load_run_config
from ..constitution import load_constitution
from ..diff import FIELD_STAGES, diff_constitutions, plan_rerun
from ..errors import EXIT_CODES_HELP
from ..pipeline import Calls, run_pipeline
from ..quality import REJECTS_FILE
from ..scale import run_pipeline_ray
from ..stages.preferences import judged_by
from ..templates import Templates
from .app import app, no_cache_conflict, out, say
from .summary import exit_status, print_calls, print_failures, print_gates

SHORT = {"output": "-o", "constitution": "-c", "templates": "-t", "backend": "-b", "model": "-m",
         "limit": "-n"}
METAVAR = {int: "INT", float: "FLOAT", Path: "PATH"}
RAY_LOCAL = "local"  # `--ray local`: a Ray instance started here (or the one this process has)


def _option(leaf: Leaf) -> inspect.Parameter:
    decls = [leaf.flag, *([SHORT[leaf.name]] if leaf.name in SHORT else [])]
    if leaf.is_bool:
        decls[0] = f"{leaf.flag}/--no-{leaf.flag[2:]}"
        ann: Any = Optional[bool]  # noqa: UP045 - typer reads this at run time
    elif leaf.name == "base_url":  # may be repeated (several servers); given once: a list of one
        ann = Optional[list[str]]  # noqa: UP045 - typer reads this at run time
    else:
        ann = Optional[str]  # noqa: UP045 - parsed by the config model, like the YAML value
    base = base_type(leaf.annotation)
    meta = "A,B,..." if leaf.is_list else METAVAR.get(base, "TEXT")
    opt = typer.Option(None, *decls, envvar=env_names(leaf), help=leaf.help, show_default=False,
                       metavar=None if leaf.is_bool else meta, rich_help_panel=_panel(leaf))
    return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                             annotation=ann)


def _panel(leaf: Leaf) -> str:
    return {"revise": "Revise stage", "label": "Label stage"}.get(leaf.path[0], "Run")


def run_command(**kw: Any) -> None:
    """Run the whole pipeline from one YAML config: critique-revise, then pairs (initial vs
    revised), then the AI judge. Output folder: revisions.jsonl, labels.jsonl,
    preferences.jsonl, failures files, cache.sqlite and run.json.

    Every model call is cached: a rerun sends only the calls whose prompt changed, and a run
    killed at any moment resumes where it stopped. Every config field is also a flag
    (`revise.rounds` is `--revise-rounds`) and a variable (`CAI_REVISE_ROUNDS`); precedence:
    flag, variable, file, default.
    """
    config = kw.pop("config")
    no_cache = kw.pop("no_cache")
    ray, ray_actors = kw.pop("ray"), kw.pop("ray_actors")
    no_cache_conflict(kw.pop("ctx"), kw["cache"], no_cache)
    overrides = {leaf.path: kw[leaf.name] for leaf in leaves()}
    if no_cache:
        overrides[("cache",)] = "off"
    cfg = load_run_config(config, overrides)
    const = load_constitution(cfg.constitution)
    # before the model loads and before the output folder, cache or run.json is made
    preflight.check_run(cfg, constitution=const, templates=Templates(cfg.templates))
    if ray is not None:  # the rows through a Ray cluster's actors, each with its own backend
        res = run_pipeline_ray(cfg, None if ray == RAY_LOCAL else ray, constitution=const, actors=ray_actors)
    else:
        preflight.check_backend(cfg.backend, cfg.base_url)
        with runtime.closing(build_backend(cfg.backend, cfg.model, **cfg.backend_options())) as be:
            res = run_pipeline(cfg, backend=be, constitution=const)
    say(f"run: {res.output}")
    if ray is not None:
        r = res.manifest.get("ray", {})
        say(f"  ray: {r.get('rows', 0)} work items in {r.get('blocks', 0)} blocks over {r.get('actors', 0)} actors "
            f"on {len(r.get('nodes', []))} node(s)")
    for name, s in res.stages.items():
        gone = s.dropped
        say(f"  {name}: {s.written} rows written, {s.resumed - gone} kept from before, "
            f"{s.failed} failed -> {s.path}"
            + (f" ({gone} rows no longer in the input dropped)" if gone else ""))
    if res.preferences:
        p = res.preferences
        by = judged_by(p.get("judged_by") or {})
        say(f"  preferences: {p['written']} pairs -> {res.output / 'preferences.jsonl'} "
            f"({p['ties']} ties {'kept' if cfg.label.keep_ties else 'held out'}, "
            f"{p['abstentions']} of {p['judgements']} judgements abstained" + (f"; judged by {by})" if by else ")"))
    print_calls(Calls(res.sent, res.cached, res.errors), cfg.cache_path(), indent="  ")
    if servers := (res.backend or {}).get("servers"):
        from ..backends.multi import servers_summary  # aiohttp: only when there were servers

        say("  servers:")
        for line in servers_summary(servers):
            say(f"    {line}")
    print_gates(res.gates, res.output / REJECTS_FILE, indent="  ")
    print_failures(res.stages, indent="  ")
    say(f"  manifest: {res.output / 'run.json'}")
    exit_status(res.stages)


def say_out(text: str) -> None:
    out.print(text, soft_wrap=True, highlight=False)


_params = [
    inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
    inspect.Parameter(
        "config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],  # noqa: UP045
        default=typer.Argument(None, envvar="CAI_CONFIG", show_default=False,
                               help="Run config (YAML); see examples/run.yaml.")),
    *(_option(leaf) for leaf in leaves()),
    inspect.Parameter(
        "no_cache", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--no-cache", envvar="CAI_NO_CACHE", rich_help_panel="Run",
                             help="Send every call; neither read nor write the cache.")),
    inspect.Parameter(
        "ray", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],  # noqa: UP045
        default=typer.Option(None, "--ray", envvar="CAI_RAY", metavar="ADDRESS", show_default=False,
                             rich_help_panel="Ray",
                             help="Run the rows on a Ray cluster (`pip install 'cai[ray]'`): `auto` joins the "
                             "cluster of `ray start --head` on this machine, `ray://HOST:10001` a remote one, "
                             "`local` starts a Ray instance here. Same outputs as a local run.")),
    inspect.Parameter(
        "ray_actors", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],  # noqa: UP045
        default=typer.Option(None, "--ray-actors", envvar="CAI_RAY_ACTORS", min=1, show_default=False,
                             rich_help_panel="Ray",
                             help="Actors in the pool (default: one per tensor_parallel_size GPUs for "
                             "`vllm`, else 2); each builds its own backend.")),
]
run_command.__signature__ = inspect.Signature(_params)  # type: ignore[attr-defined]
run_command.__annotations__ = {p.name: p.annotation for p in _params}
app.command("run", epilog=EXIT_CODES_HELP)(run_command)


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
