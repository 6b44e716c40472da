"""run.json, the manifest of a `cai run` folder: what the run was given, what it resolved to and
what it did, with every earlier run of the folder in ``history``. While a run works, run.json is
the last complete manifest plus a ``running`` marker (written atomically), so a killed rerun
leaves the last complete one readable."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .files import iter_jsonl, write_json_atomic
from .output import SinkSummary
from .stages.judge import JudgeConfig
from .stages.preferences import PreferenceSummary
from .stages.revise import ReviseConfig
from .usage import Usage, add_up, cost

if TYPE_CHECKING:
    from .plan import Plan
    from .types import Backend


@dataclass
class Calls:
    """Model calls of one function call: sent to the model, served from the cache, failed."""

    sent: int = 0
    cached: int = 0
    errors: int = 0


@dataclass
class RunResult:
    """What a run did: each stage's summary, the preferences written, the calls, run.json."""

    output: Path
    stages: dict[str, SinkSummary] = field(default_factory=dict)
    preferences: dict[str, Any] = field(default_factory=dict)
    gates: dict[str, int] = field(default_factory=dict)  # "stage.reason" -> rows kept out (rejects.jsonl)
    backend: dict[str, Any] | None = None  # what the backend says of itself: servers, capabilities, retries
    sent: int = 0
    cached: int = 0
    errors: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)
    written: PreferenceSummary | None = None  # the preferences file's summary (`cai label`)
    rows: list[dict[str, Any]] | None = None  # the output rows, when they came back in memory
    skipped: list[dict[str, Any]] = field(default_factory=list)  # input rows the input gate kept out
    usage: Usage | None = None  # the tokens served to this run (its killed attempts' included)

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stages.values())

    @property
    def calls(self) -> Calls:
        return Calls(self.sent, self.cached, self.errors)


def _read(manifest: Path) -> dict[str, Any]:
    """run.json as a mapping (empty when missing, unreadable or not an object)."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mark_running(manifest: Path) -> list[dict[str, Any]]:
    """Mark run.json as running (atomically): the last complete manifest stays readable, with a
    ``running`` marker beside it (a killed rerun leaves it so: `cai export` still reads it); a
    folder without one says ``status: running``. Returns the runs recorded so far."""
    previous = _read(manifest)
    history = previous.get("history")
    history = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    # The run id keys this run's tokens in the cache's ledger: a rerun of a killed run goes on
    # with its id (and so counts what the killed one was served).
    run_id = running_id(manifest)
    running = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "run_id": run_id or uuid.uuid4().hex}
    base = previous if previous.get("status") == "complete" else {
        "cai_version": __version__, "status": "running", "history": history}
    write_json_atomic(manifest, {**base, "running": running})
    return history


def running_id(manifest: Path) -> str | None:
    """The run id ``mark_running`` wrote in run.json's ``running`` marker."""
    running = _read(manifest).get("running")
    run_id = running.get("run_id") if isinstance(running, dict) else None
    return run_id if isinstance(run_id, str) else None


def describe(backend: Backend) -> dict[str, Any] | None:
    """What a backend says of itself (a server client: the server kind, its capabilities, retries,
    and per server the calls answered and the time out of rotation), for run.json."""
    d = getattr(backend, "describe", None)
    return d() if callable(d) else None


def manifest(plan: Plan, res: RunResult, model_id: str, elapsed: float) -> dict[str, Any]:
    """run.json: the config as given (pair sources resolved), what it resolved to, and what the run did."""
    cfg, const, tpl = plan.config, plan.constitution, plan.templates
    cache = plan.cache
    config = cfg.public()
    if cfg.label.enabled:
        config["label"]["sources"] = plan.sources
    return {
        "cai_version": __version__,
        "status": "complete",
        "config": config,
        "constitution": const.model_dump(mode="json"),
        "constitution_hash": const.digest(),
        "templates_hash": tpl.digest(),
        "models": {"policy": model_id, "judge": model_id},
        "revise": ReviseConfig.of(cfg.revise, cfg.seed).to_dict(),
        "judge": JudgeConfig.of(cfg.label, cfg.seed).to_dict(),
        "counts": {name: {"written": s.written, "resumed": s.resumed,
                          "rows": s.written + s.resumed - s.dropped, "dropped": s.dropped, "failed": s.failed,
                          "reasons": s.reasons, "failures": str(s.failures_path) if s.failures_path else None}
                   for name, s in res.stages.items()} | {"preferences": res.preferences},
        "calls": {"sent": res.sent, "cached": res.cached, "errors": res.errors},
        "gates": res.gates,
        **({"backend": res.backend} if res.backend else {}),
        "cache": str(cache) if cache else None,
        "elapsed_s": round(elapsed, 3),
    }


def constitution_record(plan: Plan) -> dict[str, Any]:
    """Which constitution a run used (for run.json's history): its file as given (relative to the run
    folder where it lies inside it; the shipped one by name), name, version and hash."""
    const, given = plan.constitution, plan.config.constitution
    path = "principles.yaml (shipped)"
    if given is not None:
        p = Path(given)
        out = Path(plan.config.output).resolve()
        path = str(p.resolve().relative_to(out)) if p.resolve().is_relative_to(out) else str(given)
    return {"path": path, "name": const.name, "version": const.version, "hash": const.digest()}


def usage_and_cost(plan: Plan, res: RunResult, history: list[dict[str, Any]]) -> dict[str, Any]:
    """run.json's ``usage`` (the tokens served to every run of the folder: ``history``'s, with
    this run's last; ``rejected``: those of the rows the gates kept out) and, with prices, ``cost``."""
    folder, cfg = Path(plan.config.output), plan.config
    usage = add_up(h.get("usage") for h in history)
    if uncounted := sum(not isinstance(h.get("usage"), dict) for h in history):
        usage["uncounted_runs"] = uncounted  # runs before cai counted tokens
    rows, rejected = _revise_rows(folder)
    usage["rejected"] = rejected
    out: dict[str, Any] = {"usage": usage}
    pairs = int(res.preferences.get("written") or 0) if res.preferences else 0
    if (c := cost(usage, cfg.price_input, cfg.price_output, rows - rejected["rows"], pairs)) is not None:
        out["cost"] = c
    return out


def _revise_rows(folder: Path) -> tuple[int, dict[str, int]]:
    """The revision rows of a run folder, and the tokens its rows kept out by the gates cost (what
    each row records of its calls, in ``calls``). Label rows record no tokens: a gated pair's
    judge calls are not in it."""
    gated = {r.get("id") for r in iter_jsonl(folder / "rejects.jsonl") if r.get("stage") == "revise"}
    rows = 0
    rejected = {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for row in iter_jsonl(folder / "revisions.jsonl"):
        rows += 1
        if row.get("id") in gated:
            rejected["rows"] += 1
            for call in row.get("calls") or ():
                rejected["prompt_tokens"] += int(call.get("prompt_tokens") or 0)
                rejected["completion_tokens"] += int(call.get("completion_tokens") or 0)
    return rows, rejected
