"""The typer app, its consoles, and the options several commands share.

Commands live in the modules beside this one; each parses flags, calls one function of
``cai.pipeline`` (or another library module), prints, and returns. The backend and cache
options are declared once here and added to a command by ``backend_options`` and
``cache_options``.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from ..backends import BACKENDS, DEFAULT_BASE_URL, DEFAULT_CONCURRENCY, Backend, base_url_value, build_backend
from ..backends.vllm_local import EngineSettings
from ..cache import OFF, cache_path
from ..config import GateSettings
from ..errors import EXIT_CODES_HELP, ConfigError
from ..preflight import conflicting

app = typer.Typer(
    name="cai",
    help=(
        "Turn a written constitution into alignment training data.\n\n"
        "Stages: `cai revise` (critique and revise: SFT data), `cai label` (AI judge: preference "
        "pairs), or both from one config with `cai run`. Start with `cai prepare-model` (once), then e.g.\n\n"
        "  cai revise prompts.jsonl -o out/revisions.jsonl --limit 10\n\n"
        "Every option can also be set with an environment variable `CAI_<OPTION>`."
    ),
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
err = Console(stderr=True)
out = Console()


def say(text: str) -> None:
    """A line on stderr (summaries, warnings): stdout stays for data."""
    err.print(text, soft_wrap=True, highlight=False)


# --- options shared by several commands --------------------------------------------------------

BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend", "-b", envvar="CAI_BACKEND",
        help=f"Model backend: {', '.join(BACKENDS)}. `embedded` runs SmolLM2-135M on the CPU "
        "(plumbing, not quality); `openai` talks to `vllm serve` or any OpenAI-compatible server.",
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", envvar="CAI_MODEL",
                 help="Model: a served model name (openai), a folder or HF id (vllm, embedded)."),
]
BaseUrlOpt = Annotated[
    list[str] | None,
    typer.Option("--base-url", envvar=["CAI_BASE_URL", "OPENAI_BASE_URL"], metavar="URL",
                 show_default=DEFAULT_BASE_URL,
                 help="OpenAI-compatible server URL, e.g. http://localhost:8000/v1 for `vllm serve`. Repeat it "
                 "(or comma-separate the URLs) to spread the calls over several servers serving the same model."),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar=["CAI_API_KEY", "OPENAI_API_KEY"], show_default=False,
                 help="API key for the server (never written to outputs)."),
]
ConcurrencyOpt = Annotated[
    int,
    typer.Option("--concurrency", envvar="CAI_CONCURRENCY", min=1,
                 help="Requests in flight to the server. vLLM batches hundreds: keep it full."),
]
SERVER_KINDS = ("auto", "vllm", "openai")
ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="CAI_SERVER",
                 help="What the server takes: auto (find out), vllm (its extra fields), openai (plain API only)."),
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", envvar="CAI_TIMEOUT", min=0.001,
                 help="Seconds one request may take before it is retried (a stall costs one request)."),
]
CacheOpt = Annotated[
    str | None,
    typer.Option("--cache", envvar="CAI_CACHE", show_default=False,
                 help="Call cache (SQLite; default: cache.sqlite beside the output; `off` disables it). "
                 "A call already in it is not sent again."),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not use the call cache.")]
ConstitutionOpt = Annotated[
    Path | None,
    typer.Option("--constitution", "-c", envvar="CAI_CONSTITUTION",
                 help="Constitution YAML file. Default: the shipped principles.yaml (harmlessness)."),
]
TemplatesOpt = Annotated[
    Path | None,
    typer.Option("--templates", "-t", envvar="CAI_TEMPLATES",
                 help="Folder of Jinja2 templates overriding the shipped ones file by file."),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Show a progress bar (default: when stderr is a terminal)."),
]
SeedOpt = Annotated[int, typer.Option(envvar="CAI_SEED", help="Seed for principle draws and sampling.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the first N rows.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Split, for dataset folders and Hub names.")]
InputArg = Annotated[
    str,
    typer.Argument(help="Prompts: .jsonl/.json/.parquet/.csv, a saved datasets folder, or a Hub "
                   "dataset name. Columns: prompt, messages, or hh-rlhf `chosen` transcripts."),
]
PromptColumnOpt = Annotated[
    str | None, typer.Option("--prompt-column", help="Column holding the prompt (default: detected).")
]


@dataclass(frozen=True)
class BackendSpec:
    """The backend options as given; ``build()`` makes the backend (a context manager)."""

    backend: str = "embedded"
    model: str | None = None
    base_url: str | list[str] = DEFAULT_BASE_URL  # several: a list (see ``base_url_value``)
    api_key: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    server: str = "auto"
    timeout: float = 120.0
    engine: EngineSettings = field(default_factory=lambda: EngineSettings.model_validate({}))

    def build(self, model: str | None = None) -> Backend:
        opts: dict[str, Any] = (self.engine.engine_args() if self.backend == "vllm" else
                                {"server": self.server, "timeout": self.timeout} if self.backend == "openai" else {})
        return build_backend(self.backend, model or self.model, base_url=self.base_url, api_key=self.api_key,
                             concurrency=self.concurrency, **opts)


def _engine_option(name: str, f: Any) -> tuple[Any, Any]:
    """``--vllm-NAME`` / ``CAI_VLLM_NAME`` for one field of the engine settings (as `cai run` has them)."""
    flag = "--vllm-" + name.replace("_", "-")
    decls = [f"{flag}/--no-vllm-{name.replace('_', '-')}"] if f.annotation is bool else [flag]
    opt = typer.Option(*decls, envvar=f"CAI_VLLM_{name.upper()}", help=f.description, rich_help_panel=
                       "vLLM engine (--backend vllm)")
    return Annotated[f.annotation, opt], f.default


_ENGINE_PARAMS = {f"vllm_{name}": _engine_option(name, f) for name, f in EngineSettings.model_fields.items()}
_BACKEND_PARAMS = {"backend": (BackendOpt, "embedded"), "model": (ModelOpt, None),
                   "base_url": (BaseUrlOpt, None), "api_key": (ApiKeyOpt, None),
                   "concurrency": (ConcurrencyOpt, DEFAULT_CONCURRENCY), "server": (ServerOpt, "auto"),
                   "timeout": (TimeoutOpt, 120.0), **_ENGINE_PARAMS}
_CACHE_PARAMS = {"cache": (CacheOpt, None), "no_cache": (NoCacheOpt, False),
                 "cache_ctx": (typer.Context, inspect.Parameter.empty)}

F = TypeVar("F", bound=Callable[..., Any])


def _add_options(fn: F, replaced: str, extra: dict[str, tuple[Any, Any]],
                 collect: Callable[[dict[str, Any]], Any]) -> F:
    """``fn`` with its parameter ``replaced`` swapped for the ``extra`` options; ``collect``
    turns their values into the value of ``replaced``."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params = [p.replace(annotation=hints.get(p.name, p.annotation))
              for p in inspect.signature(fn).parameters.values() if p.name != replaced]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
               for name, (ann, default) in extra.items()]

    @functools.wraps(fn)
    def command(**kw: Any) -> Any:
        given = {name: kw.pop(name) for name in extra}
        return fn(**kw, **{replaced: collect(given)})

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return typing.cast(F, command)


def backend_options(fn: F) -> F:
    """Add --backend, --model, --base-url, --api-key and --concurrency; ``fn`` gets ``backend: BackendSpec``."""
    return _add_options(fn, "backend", _BACKEND_PARAMS, _spec)


def _spec(values: dict[str, Any]) -> BackendSpec:
    engine = {k.removeprefix("vllm_"): values.pop(k) for k in list(values) if k.startswith("vllm_")}
    if values.get("server") not in SERVER_KINDS:
        raise ConfigError(f"must be one of {', '.join(SERVER_KINDS)} (got {values.get('server')!r})", field="--server")
    try:  # --base-url given several times, or "A,B": several servers; not given: the default
        values["base_url"] = base_url_value(values.get("base_url") or DEFAULT_BASE_URL)
    except ValueError as e:
        raise ConfigError(str(e), field="--base-url") from None
    return BackendSpec(**values, engine=settings(EngineSettings, **engine))


def _gate_option(name: str) -> tuple[Any, Any]:
    """``--gates-NAME`` / ``CAI_GATES_NAME`` for one gate setting: the flag and variable `cai run` has."""
    f = GateSettings.model_fields[name]
    flag = "--gates-" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if f.annotation is bool else [flag]
    ann = str | None if name == "decontaminate" else f.annotation
    return Annotated[ann, typer.Option(*decls, envvar=f"CAI_GATES_{name.upper()}", help=f.description,
                                       rich_help_panel="Quality gates")], f.default


def gate_options(*names: str) -> Callable[[F], F]:
    """Add the quality-gate flags ``names`` (fields of ``GateSettings``); ``fn`` gets ``gates: GateSettings``."""
    def deco(fn: F) -> F:
        return _add_options(fn, "gates", {f"gates_{n}": _gate_option(n) for n in names},
                            lambda v: settings(GateSettings, _prefix="gates_", **v))
    return deco


def cache_options(default_dir: Callable[[dict[str, Any]], Path]) -> Callable[[F], F]:
    """Add --cache and --no-cache; ``fn`` gets ``cache: Path | None`` (default: cache.sqlite in
    ``default_dir(values)``, resolved when the command runs)."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def resolved(**kw: Any) -> Any:
            c = kw.pop("cache")
            no_cache_conflict(c["cache_ctx"], c["cache"], c["no_cache"])
            return fn(**kw, cache=cache_path(c["cache"], c["no_cache"], default_dir(kw)))

        return _add_options(typing.cast(F, resolved), "cache", _CACHE_PARAMS, lambda v: v)
    return deco


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the parameter ``name`` was given as a flag (not from a CAI_* variable or its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def no_cache_conflict(ctx: typer.Context, cache: str | None, no_cache: bool) -> None:
    """``--no-cache`` with ``--cache PATH`` on one command line is a usage error; a CAI_CACHE
    variable is a default that ``--no-cache`` overrides."""
    if no_cache and cache is not None and cache.strip().lower() not in OFF and given_on_command_line(ctx, "cache"):
        conflicting({"--no-cache": True, f"--cache {cache}": True})


def settings(model: type[BaseModel], _prefix: str = "", **values: Any) -> Any:
    """Build a settings model from flag values (named ``_prefix`` + field); a bad value is one
    line naming the flag."""
    try:
        return model.model_validate({k.removeprefix(_prefix): v for k, v in values.items()})
    except ValidationError as e:
        first = e.errors()[0]
        flag = "--" + (_prefix + str(first["loc"][0])).replace("_", "-") if first["loc"] else "a flag"
        raise ConfigError(f"{first['msg'].removeprefix('Value error, ')} (got {first.get('input')!r})",
                          field=flag) from None
