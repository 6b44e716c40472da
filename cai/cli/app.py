"""The typer app, its consoles, and the one generator of settings options.

Commands live in the modules beside this one; each parses flags, calls one function of
``cai.pipeline`` (or another library module), prints, and returns. ``settings_options`` makes a
command's settings flags from the leaves of the settings tree (``cai.config``): the same names,
variables and parsing in every command.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from ..cache import OFF
from ..config import BATCH_LEAVES, Leaf, RunConfig, base_type, leaves, load_run_config
from ..errors import EXIT_CODES_HELP, UsageError

app = typer.Typer(
    name="cai",
    help=(
        "Turn a written constitution into alignment training data.\n\n"
        "Stages: `cai revise` (critique and revise: SFT data), `cai label` (AI judge: preference "
        "pairs), or both from one config with `cai run`. Start with `cai prepare-model` (once), then e.g.\n\n"
        "  cai revise prompts.jsonl -o out/revisions.jsonl --limit 10\n\n"
        "Every setting is one flag and one variable in every command: `--revise-rounds` / `CAI_REVISE_ROUNDS` "
        "(a command about one stage also takes `--rounds`); `-o/--output` names where the output goes."
    ),
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
err = Console(stderr=True)
out = Console()
ARGV: list[str] = []  # the arguments this invocation was given (after `cai`), for the commands a summary suggests


def say(text: str) -> None:
    """A line on stderr (summaries, warnings): stdout stays for data."""
    err.print(text, soft_wrap=True, highlight=False)


# --- the settings options: one generator for every command ---------------------------------------

METAVAR = {int: "INT", float: "FLOAT", Path: "PATH"}
PANELS = {"revise": "Revise stage", "label": "Label stage", "gates": "Quality gates", "vllm": "vLLM engine",
          "embedded": "Embedded backend", "ray": "Ray", "naive": "Naive judge"}
F = TypeVar("F", bound=Callable[..., Any])
Include = Callable[[Leaf], bool]


def _param(leaf: Leaf, stage: str | None, positional: bool, help: str | None) -> inspect.Parameter:
    """One leaf as a typer parameter: an option named by the rule (``Leaf.flags``), its variable,
    its help; the value is parsed by the settings model, as the same value in a YAML file is."""
    if positional:
        arg = typer.Argument(envvar=leaf.env, help=help or leaf.help, show_default=False, metavar=leaf.name.upper())
        return inspect.Parameter(leaf.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=arg, annotation=str)
    # typer reads these at run time; --base-url may be repeated (several servers)
    ann: Any = (Optional[bool] if leaf.is_bool  # noqa: UP045
                else Optional[list[str]] if leaf.name == "base_url" else Optional[str])  # noqa: UP045
    t = base_type(leaf.annotation)
    choices = "|".join(typing.get_args(t)) if typing.get_origin(t) is typing.Literal else None
    meta = None if leaf.is_bool else "A,B,..." if leaf.is_list else choices or METAVAR.get(t, "TEXT")
    default = "" if leaf.default is None or leaf.is_bool or help else f" [default: {leaf.default}]"
    opt = typer.Option(None, *leaf.flags(stage), envvar=leaf.envs, help=(help or leaf.help) + default,
                       show_default=False, metavar=meta, rich_help_panel=PANELS.get(leaf.path[0], "Run"))
    return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)


def settings_options(include: Include, *, stage: str | None = None, positional: str | None = None,
                     helps: dict[str, str] | None = None, model: type[BaseModel] = RunConfig,
                     prefix: tuple[str, ...] = (), param: str = "config") -> Callable[[F], F]:
    """Give ``fn`` the options of the settings tree's leaves that ``include`` picks (``positional``:
    that leaf as the command's argument); ``fn``'s parameter ``param`` gets the settings they
    make (flag > variable > ``fn``'s ``base`` config file > default), and ``--no-cache`` where
    there is ``--cache``."""
    picked = [x for x in leaves(model, prefix) if include(x)]
    extra = [_param(x, stage, x.name == positional, (helps or {}).get(x.name)) for x in picked]
    if any(x.name == "cache" for x in picked):
        no_cache = typer.Option(False, "--no-cache", envvar="CAI_NO_CACHE", rich_help_panel="Run",
                                help="Send every call; neither read nor write the cache.")
        extra.append(inspect.Parameter("no_cache", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=no_cache))
        extra.append(inspect.Parameter("cache_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    def deco(fn: F) -> F:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != param]
        params = sorted([*own, *extra], key=lambda p: p.kind)

        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            values = {x.path[len(prefix):]: kw.pop(x.name) for x in picked}
            if "cache_ctx" in kw:
                ctx, no_cache = kw.pop("cache_ctx"), kw.pop("no_cache")
                cache = values.get(("cache",))
                given = getattr(ctx.get_parameter_source("cache"), "name", None) == "COMMANDLINE"  # not CAI_CACHE
                if no_cache and given and cache is not None and cache.strip().lower() not in OFF:
                    raise UsageError(f"--no-cache and --cache {cache} contradict each other; pass one")
                if no_cache:
                    values[("cache",)] = "off"
            base = kw.pop("base", None)
            return fn(**kw, **{param: load_run_config(base, values, model=model, stage=stage)})

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return typing.cast(F, command)
    return deco


def under(*paths: str) -> Include:
    """Leaves at or under the dotted ``paths`` (``"revise"``, ``"gates.dedup"``)."""
    parts = [tuple(p.split(".")) for p in paths]
    return lambda leaf: any(leaf.path[: len(p)] == p for p in parts)


def but(include: Include, *paths: str) -> Include:
    drop = under(*paths)
    return lambda leaf: include(leaf) and not drop(leaf)


TOP = ("input", "output", "constitution", "templates", "backend", "model", "base_url", "api_key", "concurrency",
       "server", "timeout", "extra_body", "cache", "seed", "prompt_column", "split", "limit", "max_line_bytes",
       "progress", "vllm", "rpm", "tpm", *BATCH_LEAVES, "embedded")
backend_options = settings_options(under("backend", "model", "base_url", "api_key", "concurrency", "server",
                                         "timeout", "extra_body", "vllm", "rpm", "tpm", "embedded"))


def stage_file(cfg: RunConfig, name: str) -> Path:
    """A stage command's output file: ``-o FILE``, else ``NAME`` in the default run folder."""
    return cfg.output / name if cfg.output == RunConfig.model_fields["output"].default else cfg.output
