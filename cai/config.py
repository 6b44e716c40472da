"""The settings tree (``RunConfig``): the only shape of cai's settings. Every command's flags,
every ``CAI_*`` variable and every keyword of the Python API are made from its leaves.

One rule names them: a leaf's path joined by ``_`` (``revise.rounds`` -> ``--revise-rounds``,
``CAI_REVISE_ROUNDS``, keyword ``revise_rounds``; a section's ``enabled`` is the section itself:
``--no-revise``). A command about one stage (`cai revise`, `cai label`, `cai eval-judge`) also
takes that stage's leaves without the section (``--rounds``, keyword ``rounds``): an alias of the
same option, read from the same variable. Precedence, highest first: flag, variable, config file,
default. Paths in a file are relative to the file's folder; from flags, to the current folder.
A bad value is one ``ConfigError`` naming the file and line, or the flag and variable.
"""

from __future__ import annotations

import functools
import json
import operator
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .backends import DEFAULT_BASE_URL, DEFAULT_CONCURRENCY, base_url_value
from .backends.prefix_cache import EmbeddedSettings
from .backends.vllm_local import EngineSettings
from .cache import OFF, cache_path
from .constitution import load_yaml_with_lines, validation_to_config_error
from .errors import ConfigError, UsageError

Source = Literal["auto", "revisions", "dataset", "sample"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReviseSettings(_Section):
    enabled: bool = Field(True, description="Run the critique-revise stage.")
    rounds: int = Field(4, ge=0, description="Critique-revision rounds (CAI paper: up to 4).")
    max_tokens: int = Field(512, ge=1, description="Max new tokens per answer and revision (an output cut "
                            "at this limit is gated out as truncated: leave room).")
    critique_max_tokens: int | None = Field(
        None, ge=1, description="Max new tokens per critique (default: 3/4 of max_tokens).")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy).")
    repetition_penalty: float = Field(
        1.15, gt=0, description="Above 1 discourages repeating tokens of the prompt and answer "
        "(vLLM's definition). 1.15 stops the shipped 135M model's loops; a capable model served by "
        "vLLM rarely needs it: 1 turns it off.")


class LabelSettings(_Section):
    enabled: bool = Field(True, description="Run the AI-judge labelling stage.")
    sources: list[Source] = Field(
        ["auto"], min_length=1,
        description="Where pairs come from: revisions (initial vs revised answer), dataset "
        "(existing pairs from label.pairs), sample (label.samples answers per input prompt "
        "from the policy), auto (revisions when the revise stage runs; else the input's first record "
        "decides: pairs are judged as they are, prompts are sampled). Comma-separated on the command line.")
    pairs: str | None = Field(
        None, description="Dataset of pairs for the `dataset` source (chosen/rejected, "
        "response_a/response_b, ...).")
    samples: int = Field(2, ge=2, description="`sample` source: answers per prompt (every two "
                         "make a pair).")
    sample_temperature: float = Field(1.0, ge=0, description="`sample` source: temperature.")
    sample_max_tokens: int | None = Field(None, ge=1, description="`sample` source: max tokens per answer "
                                          "(default: revise.max_tokens).")
    policy_model: str | None = Field(None, description="`sample` source: the model that answers (default: "
                                     "`model`, the judge's), on the same backend.")
    mode: Literal["logprobs", "cot", "choice"] = Field(
        "logprobs", description="logprobs (next-token option probabilities), cot (reason "
        "first, then read the probabilities; clamped) or choice (structured output, 0/1).")
    principles: int = Field(4, ge=1, description="Principles per pair (the ensemble: the label "
                            "is the mean over them).")
    both_orders: bool = Field(True, description="Judge (A, B) and (B, A) and average "
                              "(position-bias control).")
    top_logprobs: int = Field(20, ge=1, description="Top log-probs to ask for.")
    min_mass: float = Field(0.0, ge=0, le=1, description="Abstain when P(A)+P(B) is below this.")
    clamp: list[float] | None = Field(
        default_factory=lambda: [0.4, 0.6], min_length=2, max_length=2,
        description="CoT mode: clamp each judgement's probability to [lo, hi] (empty: off).")
    tie_threshold: float = Field(0.05, ge=0, le=0.5, description="|p - 0.5| below this is a tie.")
    fallback: bool = Field(True, description="Ask again as a structured choice when the "
                           "server returns no log-probs.")
    cot_max_tokens: int = Field(256, ge=1, description="Max tokens of CoT reasoning.")
    keep_ties: bool = Field(False, description="Keep ties in preferences.jsonl.")
    debias_length: bool = Field(False, description="Also write p_chosen_length_debiased: the soft label with "
                                "the length effect regressed out (cai export --score length-debiased uses it).")

    @field_validator("clamp", mode="before")
    @classmethod
    def _no_clamp(cls, v: Any) -> Any:
        """``[]``, ``none``/``off`` turn the clamp off; ``"0.4,0.6"`` (a flag) is a pair."""
        if isinstance(v, str):
            v = [] if v.strip().lower() in OFF else [x.strip() for x in v.split(",")]
        return None if v in ([], None) else v

    @field_validator("clamp")
    @classmethod
    def _clamp_range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not 0.0 <= v[0] < 0.5 < v[1] <= 1.0:
            raise ValueError(f"needs 0 <= lo < 0.5 < hi <= 1, got {v}")
        return v


class BestOfNSettings(_Section):
    enabled: bool = Field(False, description="Best-of-n (`cai best-of-n`; in `cai run` it replaces the label stage as "
                          "the source of pairs): sample n answers per prompt from label.policy_model (default: "
                          "model), rank them with the judge (label.*), keep the best (SFT rows, best_of_n.jsonl) and "
                          "best-vs-worst (pairs, best_of_n.pairs.jsonl).")
    n: int = Field(4, ge=2, description="Answers sampled per prompt (round robin up to 8, a knockout above).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the n answers.")
    max_tokens: int | None = Field(None, ge=1, description="Max new tokens per answer (default: revise.max_tokens).")


class GateSettings(_Section):
    """The quality gates: what keeps a row out of the training data (it goes to rejects.jsonl
    with its reasons; `cai export --include-rejects` puts it back)."""

    truncated: bool = Field(True, description="Drop rows and pairs with an output cut at max_tokens "
                            "(finish_reason length) at any step.")
    text: bool = Field(True, description="Drop revisions that are empty, stuck in a loop or meta-text "
                       "(\"Here is the revised response:\" with no answer); a leading label line is cleaned.")
    keep: Literal["improved", "all"] = Field("improved", description="improved: a revision the judge "
                                             "prefers less than the first answer is no SFT target; all: keep it.")
    dedup: bool = Field(True, description="Skip exact and near-duplicate prompts in the input (MinHash).")
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="Near-duplicate: word-bigram Jaccard at least this.")
    decontaminate: str | None = Field(None, description="An evaluation set (JSONL/CSV/Parquet/TXT): skip "
                                      "input prompts that match one of its prompts (same test).")

    def dropping(self) -> frozenset[str]:
        """The row flags that drop a row under these settings."""
        return frozenset(({"truncated"} if self.truncated else set())
                         | ({"empty", "loop", "meta", "copies_example"} if self.text else set()))


class RaySettings(_Section):
    """`cai run` on a Ray cluster (`pip install 'cai[ray]'`): same outputs as a local run."""

    address: str | None = Field(None, description="Run the rows on a Ray cluster: `auto` joins the cluster of "
                                "`ray start --head` on this machine, `ray://HOST:10001` a remote one, `local` "
                                "starts a Ray instance here.")
    actors: int | None = Field(None, ge=1, description="Actors in the pool (default: one per "
                               "tensor_parallel_size GPUs for `vllm`, else 2); each builds its own backend.")
    block_size: int = Field(256, ge=1, description="Work items per Ray block (an actor runs a block's rows at once).")


class NaiveSettings(_Section):
    """`cai eval-judge`'s baseline: a judge that writes a letter and has it parsed."""

    enabled: bool = Field(True, description="Also run the naive judge (one order, generated text, letter parsed).")
    max_tokens: int = Field(12, ge=1, description="Naive judge: tokens to write.")


BATCH_LEAVES = ("batch", "batch_max_requests", "batch_poll_seconds", "batch_files")


class RunConfig(_Section):
    input: str | None = Field(None, description="Prompts: .jsonl/.json/.parquet/.csv, a saved "
                              "datasets folder or a Hub dataset name.")
    output: Path = Field(Path("out/run"), description="Output folder.")
    constitution: Path | None = Field(None, description="Constitution YAML (default: the "
                                      "shipped principles.yaml).")
    templates: Path | None = Field(None, description="Folder of templates overriding the "
                                   "shipped ones.")
    backend: str = Field("embedded", description="embedded, openai, vllm or fake.")
    model: str | None = Field(None, description="Model: served name (openai), folder or HF id.")
    base_url: str | list[str] = Field(
        DEFAULT_BASE_URL, description="OpenAI-compatible server URL. Several (a YAML list, a comma-separated "
        "string, or the flag repeated) spread the calls over the servers; one that fails is taken out of rotation.")
    api_key: str | None = Field(None, description="API key (never written to outputs).")
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, description="Requests in flight to the server (at most: "
                             "fewer while it refuses with 429/503, growing back as it answers).")
    rpm: int | None = Field(None, ge=1, description="Requests per minute to send each server at most (its rate "
                            "limit): requests wait their turn instead of being refused.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute (prompt + max_tokens, corrected by the "
                            "answers' usage) to send each server at most.")
    server: Literal["auto", "vllm", "openai"] = Field(
        "auto", description="What the server takes: auto (find out: vLLM's extra fields are dropped when a server "
        "refuses them), vllm, or openai (plain OpenAI API fields only).")
    timeout: float = Field(120.0, gt=0, description="Seconds one request may take before it is retried.")
    extra_body: dict[str, Any] | None = Field(
        None, description="Fields added to every request to the server (JSON on the command line).")
    batch: bool = Field(False, description="Send the calls as jobs of the server's OpenAI Batch API (POST /files, "
                        "/batches; cheaper, slower): each step of every row's chain is a wave of batches. Batch ids "
                        "are kept in OUTPUT/batches.sqlite: a rerun polls the same batches.")
    batch_max_requests: int = Field(50_000, ge=1, description="Most requests in one batch (the provider's per-batch "
                                    "limit: OpenAI's is 50,000); in batch mode also the rows in flight.")
    batch_poll_seconds: float = Field(30.0, gt=0, description="Seconds between two status checks of a batch.")
    batch_files: str | None = Field(None, description="Offline batches: write each wave's requests to "
                                    "DIR/wave-NNN.requests.jsonl (OpenAI Batch API lines) and stop (exit 4); rerun "
                                    "with DIR/wave-NNN.output.jsonl there to go on. No server is contacted.")
    cache: str | None = Field(None, description="Call cache file (default: OUTPUT/cache.sqlite; "
                              "`off` disables it). Several runs may share one.")
    seed: int = Field(0, description="Seed for principle draws and sampling.")
    prompt_column: str | None = Field(None, description="Column holding the prompt.")
    split: str = Field("train", description="Split, for dataset folders and Hub names.")
    limit: int | None = Field(None, ge=1, description="Only the first N input rows.")
    progress: bool | None = Field(None, description="Show progress bars (default: on a terminal).")
    prune: bool = Field(False, description="Remove the rows of an earlier run in this folder that this input no "
                        "longer lists (default: keep them).")
    max_line_bytes: int = Field(1_000_000, ge=1, description="Longest input line (bytes) read; a longer one "
                                "is an input error.")
    license: str | None = Field(None, description="Licence of the prompts and so of the data (a Hub license id: mit, "
                                "apache-2.0, cc-by-4.0...), recorded in run.json; `cai export` puts it on the card.")
    price_input: float | None = Field(None, ge=0, description="USD per million prompt tokens, as your provider "
                                      "bills them: run.json, the summary and the card get a cost (no built-in prices).")
    price_output: float | None = Field(None, ge=0, description="USD per million completion tokens (see --price-input).")
    vllm: EngineSettings = Field(default_factory=lambda: EngineSettings.model_validate({}))
    embedded: EmbeddedSettings = Field(default_factory=lambda: EmbeddedSettings.model_validate({}))
    revise: ReviseSettings = Field(default_factory=lambda: ReviseSettings.model_validate({}))
    gates: GateSettings = Field(default_factory=lambda: GateSettings.model_validate({}))
    label: LabelSettings = Field(default_factory=lambda: LabelSettings.model_validate({}))
    best_of_n: BestOfNSettings = Field(default_factory=lambda: BestOfNSettings.model_validate({}))
    ray: RaySettings = Field(default_factory=lambda: RaySettings.model_validate({}))

    @field_validator("base_url", mode="before")
    @classmethod
    def _base_urls(cls, v: Any) -> Any:
        """One URL stays a string (as it always was); several, a list; "A,B" is two."""
        return base_url_value(v) if isinstance(v, (str, list, tuple)) else v

    def cache_path(self, folder: Path | None = None) -> Path | None:
        """The call cache file: ``cache``, else ``cache.sqlite`` in ``folder`` (default: ``output``)."""
        return cache_path(self.cache, False, self.output if folder is None else folder)

    def backend_options(self) -> dict[str, Any]:
        """What ``build_backend`` takes besides the name and model: the server's settings, or
        the in-process engine's."""
        opts: dict[str, Any] = {"base_url": self.base_url, "api_key": self.api_key, "concurrency": self.concurrency}
        if self.backend == "openai":
            opts |= {"server": self.server, "timeout": self.timeout, "extra_body": self.extra_body,
                     "rpm": self.rpm, "tpm": self.tpm}
        if self.backend == "embedded":
            opts |= self.embedded.model_dump()
        return opts | (self.vllm.engine_args() if self.backend == "vllm" else {})

    @property
    def batching(self) -> bool:
        """Batch mode: the Batch API (``batch``) or offline wave files (``batch_files``)."""
        return self.batch or self.batch_files is not None

    def batch_options(self) -> dict[str, Any]:
        """What ``build_batch_backend`` takes besides the model and the key."""
        return {"files": self.batch_files, "base_url": self.base_url, "api_key": self.api_key, "server": self.server,
                "extra_body": self.extra_body, "max_requests": self.batch_max_requests,
                "poll": self.batch_poll_seconds, "timeout": self.timeout}

    @field_validator("extra_body", mode="before")
    @classmethod
    def _json_body(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return json.loads(v) if v.strip() else None
            except ValueError as e:
                raise ValueError(f"must be a JSON object ({e})") from None
        return v

    @property
    def sources(self) -> list[Source]:
        """The label stage's pair sources, each once, in the order given (``auto`` is the revisions
        when the revise stage runs; without it the plan decides by the input)."""
        auto: list[Source] = ["revisions"] if self.revise.enabled else ["auto"]
        return list(dict.fromkeys(x for s in self.label.sources for x in (auto if s == "auto" else [s])))

    def check(self, has_input: bool = False) -> RunConfig:
        """The checks that span fields (each names the field to fix); returns the config."""
        if not self.revise.enabled and not self.label.enabled and not self.best_of_n.enabled:
            raise UsageError("nothing to do: both stages are disabled (--no-revise and --no-label, or "
                             "`enabled: false` in the config); enable one")
        if self.best_of_n.enabled and self.label.enabled and (self.label.pairs or self.label.sources != ["auto"]):
            raise ConfigError("best_of_n replaces the label stage as the source of pairs: drop label.sources and "
                              "label.pairs, or best_of_n", field="best_of_n.enabled")
        if self.label.enabled and "dataset" in self.sources and not self.label.pairs:
            raise ConfigError("the `dataset` pair source needs label.pairs (--label-pairs)",
                              field="label.sources")
        needs_input = self.revise.enabled or self.best_of_n.enabled or (
            self.label.enabled and bool({"sample", "auto"} & set(self.sources)))
        if needs_input and not (self.input or has_input):
            raise ConfigError("no input prompts: set `input` (--input / CAI_INPUT)", field="input")
        return self

    def check_batch(self, kind: str) -> None:
        """Batch mode (``batch``, ``batch_files``) and what it cannot go with, for a command of
        ``kind`` (run, revise, label, eval): a ``UsageError``, one line."""
        flag = "--batch" if self.batch else "--batch-files"
        if self.batch and self.batch_files is not None:
            raise UsageError("--batch and --batch-files contradict each other; pass one")
        if self.backend != "openai":
            raise UsageError(f"{flag} sends the calls as OpenAI Batch API requests: pass --backend openai, not "
                             f"--backend {self.backend}" + ("" if self.batch else " (no server is contacted)"))
        if kind in ("eval", "best_of_n") or self.best_of_n.enabled and kind == "run":
            what = "`cai eval-judge`" if kind == "eval" else "best-of-n"
            raise UsageError(f"{flag}: {what} does not run in batch mode yet; leave it out")
        if self.ray.address is not None:
            raise UsageError(f"{flag} and --ray-address contradict each other (the batches run on the provider's side)")
        if self.label.enabled and self.label.policy_model and kind in ("run", "label"):
            raise UsageError(f"{flag} with --label-policy-model is not supported: leave the policy model out")
        if self.batch and isinstance(self.base_url, list) and len(self.base_url) > 1:
            raise UsageError("--batch sends its batches to one server: pass one --base-url")
        if self.batch_files is not None and not self.model:
            raise UsageError("--batch-files needs --model (the model the requests name)")

    def public(self) -> dict[str, Any]:
        """The config as written to run.json: paths as strings, the API key left out; batch mode's settings only
        where it is on, the embedded backend's only where it is used (run.json as it was before them)."""
        drop = (set() if self.batching else {*BATCH_LEAVES}) | (set() if self.backend == "embedded" else {"embedded"})
        d = self.model_dump(mode="json", exclude=drop)
        d["api_key"] = None if self.api_key is None else "<redacted>"
        return d


# --- the flat view: one flag, one variable and one keyword per leaf ---------------------------

SHORT = {"output": "-o", "constitution": "-c", "templates": "-t", "backend": "-b", "model": "-m", "limit": "-n",
         "label_principles": "-k"}
_ENV_ALIASES = {"api_key": ("OPENAI_API_KEY",), "base_url": ("OPENAI_BASE_URL",)}


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # ("revise", "rounds")
    annotation: Any
    help: str
    default: Any = None

    @property
    def name(self) -> str:
        """``revise_rounds``; a section's ``enabled`` is the section itself (``--no-revise``)."""
        return "_".join(self.path[:-1] if self.path[-1] == "enabled" else self.path)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "CAI_" + self.name.upper()

    def short(self, stage: str | None) -> str | None:
        """The alias in a command about ``stage``: the leaf without its section (``rounds``)."""
        if stage is None or len(self.path) != 2 or self.path[0] != stage or self.path[1] == "enabled":
            return None
        return self.path[1]

    def flags(self, stage: str | None) -> list[str]:
        """Every spelling of this option in a command about ``stage``, the full name first."""
        short = self.short(stage)
        names = [self.flag, *(["--" + short.replace("_", "-")] if short else []),
                 *([SHORT[self.name]] if self.name in SHORT else [])]
        if self.is_bool:
            return [f"{n}/--no-{n[2:]}" for n in names if n.startswith("--")]
        return names

    @property
    def envs(self) -> list[str]:
        return [self.env, *_ENV_ALIASES.get(self.name, ())]

    @property
    def is_bool(self) -> bool:
        return base_type(self.annotation) is bool

    @property
    def is_list(self) -> bool:
        return typing.get_origin(base_type(self.annotation)) is list


def base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def leaves(model: type[BaseModel] = RunConfig, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    out: list[Leaf] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaves(ann, (*prefix, name))
        else:
            out.append(Leaf((*prefix, name), ann, f.description or "", f.get_default(call_default_factory=True)))
    return out


def find_leaf(name: str, stage: str | None = None) -> Leaf | None:
    """The leaf a flag or keyword name stands for: its full name, or its short name in ``stage``."""
    return next((x for x in leaves() if name in (x.name, x.short(stage))), None)


def _set(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[path[-1]] = value


_FILE_PATHS = ("output", "constitution", "templates", "cache", "input", "batch_files", "label.pairs",
               "gates.decontaminate")
_DATASETS = ("input", "label.pairs", "gates.decontaminate")  # resolved only where there: else maybe a Hub name


def _resolve_file_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to the file's folder (an empty one stays empty
    at the top level)."""
    for key in _FILE_PATHS:
        *section, name = key.split(".")
        d: Any = data.get(section[0]) if section else data
        v = d.get(name) if isinstance(d, dict) else None
        if not isinstance(v, str) or not (v or section) or Path(v).is_absolute():
            continue
        if key == "cache" and v.strip().lower() in OFF or key in _DATASETS and not (base / v).exists():
            continue
        d[name] = str(base / v)


def load_run_config(path: str | Path | None, overrides: dict[tuple[str, ...], Any] | None = None, *,
                    base: BaseModel | None = None, model: type[BaseModel] = RunConfig, stage: str | None = None
                    ) -> Any:
    """Read the file (if any; else start from ``base``), apply flag/env ``overrides`` (already
    merged: flag > env). A value from the command line that does not fit names its flag and variable."""
    data: dict[str, Any] = base.model_dump() if base is not None else {}
    lines: dict = {}
    file = str(path) if path is not None else "<command line>"
    if path is not None:
        data, lines = load_yaml_with_lines(Path(path))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("top level must be a mapping of settings", file=file,
                              line=lines.get(()))
        _resolve_file_paths(data, Path(path).parent)
    known = {x.path: x for x in leaves(model)}
    for p, v in (overrides or {}).items():
        if v is None:
            continue
        if known[p].is_list and isinstance(v, str):
            v = [] if v.strip().lower() in OFF else [s.strip() for s in v.split(",") if s.strip()]
        _set(data, p, v)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(str(x) for x in first["loc"])
        given = {p for p, v in (overrides or {}).items() if v is not None}
        hit = next((p for p in given if loc[: len(p)] == p), None)
        if hit is not None:
            leaf = known[hit]
            msg = first["msg"].removeprefix("Value error, ")
            alias = [n.split("/")[0] for n in leaf.flags(stage)][1:]
            names = leaf.flag + (f" ({', '.join(alias)})" if alias else "")
            got = functools.reduce(operator.getitem, hit, data)
            raise ConfigError(f"{msg} (got {got!r})", field=f"{names} / {leaf.env}") from None
        raise validation_to_config_error(e, file, lines, model) from None


def configure(config: RunConfig | None = None, stage: str | None = None, **settings: Any) -> RunConfig:
    """``config`` (default: every default) with ``settings`` set by leaf name (``revise_rounds=2``,
    or ``rounds=2`` for ``stage`` "revise"): the keywords of the Python API."""
    overrides: dict[tuple[str, ...], Any] = {}
    for name, value in settings.items():
        leaf = find_leaf(name, stage)
        if leaf is None:
            raise TypeError(f"unknown setting {name!r} (a field of RunConfig, as `revise_rounds` or `limit`)")
        overrides[leaf.path] = str(value) if isinstance(value, Path) else value
    return typing.cast(RunConfig, load_run_config(None, overrides, base=config, stage=stage))

