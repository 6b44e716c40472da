"""Constitutions: a YAML file of principles, validated into pydantic models.

Every bad file gives one ``ConfigError`` that names the file, the line and the field.
Principles are drawn per row with weighted rendezvous hashing, so that editing a principle's
text changes no draw and adding one changes only the draws it wins (the fewest possible).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import ConfigError
from .hashing import sha256_json
from .resources import data_path

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Ident = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Example(BaseModel):
    """A few-shot demonstration of one critique-and-revision step.

    Sent as chat turns before the live request: user ``prompt``, assistant ``response``, user
    the principle's critique request, assistant ``critique`` (and, for the revise step, user
    the revision request, assistant ``revision``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: Text = Field(description="The user's request in the demonstration.")
    response: Text = Field(description="A flawed assistant reply to it.")
    critique: Text = Field(description="The critique of that reply under this principle.")
    revision: Text = Field(description="The reply rewritten to meet the principle.")


class JudgeExample(BaseModel):
    """A few-shot demonstration for the AI judge under this principle.

    Sent as chat turns before the live question: user the judge template rendered on
    ``prompt``, ``response_a`` and ``response_b``, assistant the answer ("The answer is: (A)",
    after ``reasoning`` for the chain-of-thought judge, which uses only examples that have one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: Text = Field(description="The user's request in the demonstration.")
    response_a: Text = Field(description="Option (A).")
    response_b: Text = Field(description="Option (B).")
    answer: Literal["A", "B"] = Field(description="The better option under this principle: A or B.")
    reasoning: Text | None = Field(default=None, description="Optional step-by-step reasoning (CoT judge).")

    @field_validator("answer", mode="before")
    @classmethod
    def _letter(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().strip("()").strip().upper() in ("A", "B"):
            return v.strip().strip("()").strip().upper()
        raise ValueError(f"answer must be A or B, got {v!r}")

    @model_validator(mode="after")
    def _different(self) -> JudgeExample:
        if self.response_a == self.response_b:
            raise ValueError("response_a and response_b are the same: nothing to choose")
        return self


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Ident
    critique: Text = Field(description="Critique request: what to look for in the response.")
    revision: Text = Field(description="Revision request: how to rewrite the response.")
    comparison: Text = Field(description="Judge question: which of two responses is better.")
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    examples: tuple[Example, ...] = Field(default=(), description="Few-shot critique/revision demonstrations.")
    judge_examples: tuple[JudgeExample, ...] = Field(default=(), description="Few-shot judge demonstrations.")

    @field_validator("weight", mode="before")
    @classmethod
    def _no_bool_weight(cls, v: Any) -> Any:
        if isinstance(v, bool):  # YAML `weight: yes` would otherwise pass as 1.0
            raise ValueError("weight must be a positive number, not a boolean")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Leave ``judge_examples`` out while empty, so that a constitution written before the
        field existed dumps, and hashes (``Constitution.digest``), exactly as it did."""
        data = handler(self)
        if isinstance(data, dict) and not self.judge_examples:
            data.pop("judge_examples", None)
        return data


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Text
    version: Text = "1"
    description: str = ""
    principles: tuple[Principle, ...] = Field(min_length=1)

    @field_validator("principles")
    @classmethod
    def _unique_ids(cls, principles: tuple[Principle, ...]) -> tuple[Principle, ...]:
        seen: set[str] = set()
        for i, p in enumerate(principles):
            if p.id in seen:
                raise ValueError(f"duplicate principle id {p.id!r} (at index {i})")
            seen.add(p.id)
        return principles

    _digest: str | None = PrivateAttr(default=None)
    _by_id: dict[str, Principle] | None = PrivateAttr(default=None)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = sha256_json(self.model_dump(mode="json"))
        return self._digest

    def by_id(self) -> dict[str, Principle]:
        if self._by_id is None:
            self._by_id = {p.id: p for p in self.principles}
        return self._by_id

    def draw(self, key: str, k: int, seed: int = 0, salt: str = "") -> list[Principle]:
        """Draw ``k`` distinct principles for ``key`` (a row id, say), weighted, deterministic."""
        return _draw(self.principles, key, k, seed, salt, self._keys)

    @functools.cached_property
    def _keys(self) -> list[tuple[bytes, float]]:
        """The draw keys, made once and read on every draw (a pydantic private attribute cost as much to
        read as the draw saved; a cached property is a plain instance attribute once made)."""
        return _draw_keys(self.principles)


def draw_ids(principles: Sequence[Principle], key: str, k: int, seed: int = 0, salt: str = "") -> list[str]:
    """Weighted rendezvous hashing (Efraimidis-Spirakis keys over a per-(key, id) hash).

    Each principle gets the score ``-ln(u) / weight`` with ``u`` a uniform hash of
    (seed, salt, key, principle id); the ``k`` smallest win. A principle's text never enters
    the hash, and a new principle displaces an old one only in the rows it wins.
    If ``k`` exceeds the number of principles the ranking wraps around.
    """
    return [p.id for p in _draw(principles, key, k, seed, salt)]


def _draw_keys(principles: Sequence[Principle]) -> list[tuple[bytes, float]]:
    return [(p.id.encode(), p.weight) for p in principles]


def _draw(principles: Sequence[Principle], key: str, k: int, seed: int, salt: str,
          keys: list[tuple[bytes, float]] | None = None) -> list[Principle]:
    """The draw; ``keys``: ``_draw_keys(principles)``, made once per constitution."""
    if k <= 0:
        return []
    # hash_int(prefix + id, 8), with the prefix hashed once: a row draws against every principle
    prefix = hashlib.blake2b(f"{seed}\x1f{salt}\x1f{key}\x1f".encode(), digest_size=8)
    copy, log, from_bytes = prefix.copy, math.log, int.from_bytes
    scores = []
    for ident, weight in keys if keys is not None else _draw_keys(principles):
        h = copy()
        h.update(ident)
        scores.append(-log((from_bytes(h.digest(), "big") + 1) / (2**64 + 1)) / weight)
    ranked = [principles[i] for i in sorted(range(len(scores)), key=scores.__getitem__)]  # stable, as before
    return [ranked[i % len(ranked)] for i in range(k)]


# --- loading with line numbers -------------------------------------------------------------


def _line_map(node: yaml.Node, file: str, path: tuple[Any, ...] = (), out: dict | None = None) -> dict:
    """Map each path in the YAML document (keys and list indexes) to its 1-based line; a key
    that appears twice in one mapping is an error."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if (*path, k.value) in out:
                raise ConfigError("key appears twice in one mapping", file=file, line=k.start_mark.line + 1,
                                  field=str(k.value), hint="remove one of them")
            out[(*path, k.value)] = k.start_mark.line + 1
            _line_map(v, file, (*path, k.value), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, file, (*path, i), out)
    return out


# libyaml's safe loader where PyYAML has it: the same documents, marks and errors, parsed
# about ten times faster (the constitution is read at the start of every run)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_with_lines(path: Path) -> tuple[Any, dict]:
    """Parse a YAML file; return its data and a map from key paths to line numbers."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=file, hint="check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read file: {e}", file=file) from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if e.context_mark is not None and (mark is None or mark.index >= len(text.rstrip())):
            mark = e.context_mark  # "unexpected end of stream": point at what was left open
        line = mark.line + 1 if mark else None
        problem = (e.problem or str(e)).strip()
        raise ConfigError(f"YAML syntax error: {problem}", file=file, line=line) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML syntax error: {e}", file=file) from None
    if node is None:
        raise ConfigError("file is empty", file=file, hint="see principles.yaml for the format")
    return data, _line_map(node, file)


def validation_to_config_error(err: ValidationError, file: str, lines: dict,
                               model: type[BaseModel] | None = None) -> ConfigError:
    """Turn pydantic's first error into one ConfigError with the closest known line. An unknown field
    is matched against the missing ones (a misspelt key); alone, against its section's fields in ``model``."""
    errors = err.errors()
    # A failing item inside `principles` also makes pydantic report "too short" on the list
    # itself; that echo is not a separate problem.
    errors = [e for e in errors if not (e["type"] == "too_short" and any(
        o is not e and tuple(o["loc"])[: len(e["loc"])] == tuple(e["loc"]) for o in errors))] or errors
    # A misspelt key shows up twice: as an unknown field and as a missing one. The unknown
    # field is the real mistake, so report it first.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = tuple(first["loc"])
    line = next((lines[loc[:cut]] for cut in range(len(loc), -1, -1) if loc[:cut] in lines), None)
    field = ".".join(str(p) for p in loc) or None
    kind, msg = first["type"], first["msg"]
    hint = None
    if kind == "extra_forbidden":
        msg = "unknown field"
        missing = [str(e["loc"][-1]) for e in errors if e["type"] == "missing" and tuple(e["loc"][:-1]) == loc[:-1]]
        close = difflib.get_close_matches(str(loc[-1]), missing, n=1) if loc else []
        hint = f"did you mean {close[0]!r}?" if close else None
    elif kind == "missing":
        msg = "missing required field"
    elif kind == "string_too_short":
        msg = "must not be empty"
    else:
        msg = msg.removeprefix("Value error, ")
    more = len(errors) - 1 - (hint is not None)  # the typo's "missing" twin is not counted
    if more:
        hint = f"{hint}; " if hint else ""
        hint += f"{more} more problem(s) after this one"
    elif kind == "extra_forbidden" and hint is None and model is not None:
        hint = _closest_field(loc, model)
    return ConfigError(msg, file=file, line=line, field=field, hint=hint)


def _closest_field(loc: tuple[Any, ...], model: type[BaseModel]) -> str | None:
    """Suggest the closest field of the section a misspelt key is in."""
    for part in loc[:-1]:
        ann = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Load and validate a constitution file; ``None`` loads the default ``principles.yaml``."""
    p = Path(path) if path is not None else data_path("principles.yaml")
    data, lines = load_yaml_with_lines(p)
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping with name and principles", file=str(p), line=lines.get(()))
    seen: dict[str, int] = {}
    items = data.get("principles")
    for i, item in enumerate(items if isinstance(items, list) else []):
        pid = item.get("id") if isinstance(item, dict) else None
        if isinstance(pid, str) and (first := seen.setdefault(pid.strip(), i)) != i:
            first_line = lines.get(("principles", first, "id"))
            raise ConfigError(f"duplicate principle id {pid.strip()!r} (first at line {first_line})", file=str(p),
                              line=lines.get(("principles", i, "id")), field=f"principles.{i}.id",
                              hint="every principle needs its own id")
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        raise validation_to_config_error(e, str(p), lines) from None
