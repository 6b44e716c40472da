"""The closing lines every command prints: calls made, and failures with their reasons and file."""

from __future__ import annotations

from pathlib import Path

from ..output import SinkSummary
from ..pipeline import Calls
from .app import say


def print_calls(calls: Calls, cache: Path | None, indent: str = "") -> None:
    where = f" ({cache})" if cache else " (no cache)"
    say(f"{indent}calls: {calls.sent} sent, {calls.cached} served from cache{where}, {calls.errors} failed")


def print_failures(stages: dict[str, SinkSummary], indent: str = "") -> None:
    for name, s in stages.items():
        if s.failed:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.reasons.items()))
            say(f"{indent}[yellow]{name}: {s.failed} rows failed ({reasons}); listed in {s.failures_path}[/yellow]")
