"""`cai diff OLD NEW`: which principles changed, and what a rerun of a finished run would redo.

The count is not an estimate: the pipeline is replayed, on the run's own config with the NEW
constitution, against a backend that only reads the call cache. A cached call is answered from
it (reused); a miss gets a placeholder answer (redone), and since every prompt built on that
placeholder misses in turn, everything downstream of a changed call is counted too. Nothing is
sent to a model and nothing is written to the cache.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import BackendBase, Completion, Request
from .cache import CallCache, request_key
from .config import RunConfig, load_run_config
from .constitution import Constitution
from .errors import ConfigError
from .pipeline import run_pipeline

# Which stage reads which field of a principle.
FIELD_STAGES = {"critique": "revise", "revision": "revise", "examples": "revise", "judge_examples": "label",
                "comparison": "label", "weight": "revise, label (draws)"}


@dataclass
class PrincipleChange:
    id: str
    kind: str  # "added", "removed" or "changed"
    fields: list[str] = field(default_factory=list)


def diff_constitutions(old: Constitution, new: Constitution) -> list[PrincipleChange]:
    a, b = old.by_id(), new.by_id()
    out = [PrincipleChange(pid, "removed") for pid in a if pid not in b]
    for pid, p in b.items():
        if pid not in a:
            out.append(PrincipleChange(pid, "added"))
        elif p != a[pid]:
            before, after = a[pid].model_dump(), p.model_dump()
            fields = [k for k in dict.fromkeys([*after, *before]) if after.get(k) != before.get(k)]
            out.append(PrincipleChange(pid, "changed", fields))
    return out


def version_warning(old: Constitution, new: Constitution, changes: list[PrincipleChange]) -> str | None:
    """A warning when the principles changed but ``version:`` did not: rows written under either
    then carry the same version in their provenance (only the hash tells them apart)."""
    if not changes or old.version != new.version:
        return None
    return (f"warning: the principles changed but version: is still {new.version!r}; raise it in the edited "
            "constitution, so that the rows' provenance (and the dataset card) tell the two apart")


class DryBackend(BackendBase):
    """Answers from the cache only; counts like ``CachedBackend`` would: ``sent`` = misses."""

    def __init__(self, cache: CallCache, model_id: str) -> None:
        self.cache, self.model_id = cache, model_id
        self.sent = self.hits = self.errors = 0
        self.reused: set[str] = set()  # distinct cached calls the rerun reads
        self._new: dict[str, Completion] = {}  # placeholders: what the rerun would send

    async def generate(self, request: Request) -> Completion:
        k = request_key(self.model_id, request)
        found = self._new.get(k)
        if found is None and (found := self.cache.get(k)) is not None:
            self.reused.add(k)
        if found is None:
            found = self._new[k] = _placeholder(k, request)
            self.sent += 1
        else:
            self.hits += 1
        return found


def _placeholder(key: str, r: Request) -> Completion:
    s = r.sampling
    if s.choices:
        return Completion(texts=[s.choices[0]], finish_reasons=["stop"])
    lp = [{"A": math.log(0.5), "B": math.log(0.5)}] if s.logprobs else None
    texts = [f"<not cached {key[:16]}/{i}>" for i in range(max(1, s.n))]
    return Completion(texts=texts, logprobs=lp, finish_reasons=["stop"] * len(texts))


def find_run(where: Path) -> tuple[RunConfig, dict[str, Any]]:
    """A run folder (with run.json) or a run config file (whose output folder has run.json)."""
    folder = load_run_config(where).output if where.is_file() else where
    manifest = folder / "run.json"
    if not manifest.exists():
        raise ConfigError("no run.json: not a finished `cai run` output folder", file=str(folder),
                          hint="run `cai run` once first")
    data = json.loads(manifest.read_text(encoding="utf-8"))
    conf = {k: v for k, v in data["config"].items() if k != "api_key"}
    return RunConfig.model_validate(conf), data


def plan_rerun(run: Path, new_constitution: Path, new: Constitution) -> dict[str, Any]:
    """Replay a finished run with ``new`` against its cache; count reused and redone calls."""
    cfg, manifest = find_run(run)
    cache_path = cfg.cache_path()
    if cache_path is None or not cache_path.exists():
        raise ConfigError("the run has no call cache to reuse", file=str(cache_path or run))
    cache = CallCache(cache_path)
    try:
        stored = len(cache)
        dry = DryBackend(cache, manifest["models"]["policy"])
        with tempfile.TemporaryDirectory(prefix="cai-diff-") as tmp:
            replay = cfg.model_copy(update={"output": Path(tmp), "cache": "off", "progress": False,
                                            "constitution": new_constitution})
            run_pipeline(replay, backend=dry, constitution=new)
    finally:
        cache.close()
    return {"run": str(run), "cache": str(cache_path), "stored": stored,
            "requests": dry.sent + dry.hits, "reused": len(dry.reused), "served": dry.hits,
            "redo": dry.sent, "unused": stored - len(dry.reused)}
