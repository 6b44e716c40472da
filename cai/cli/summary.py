"""The closing lines every command prints (calls made, failures with their reasons and file) and
the exit status that follows from them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import typer

from ..errors import EXIT_ROWS_FAILED
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


def exit_status(stages: Mapping[str, SinkSummary]) -> None:
    """Exit code 3 when a stage has failed rows (listed in its failures file, printed above)."""
    if any(s.failed for s in stages.values()):
        raise typer.Exit(EXIT_ROWS_FAILED)


def print_gates(counts: dict[str, int], rejects: Path, indent: str = "") -> None:
    """One line: what the quality gates kept out of the training data, and where it is listed."""
    if not counts:
        say(f"{indent}gates: every row passed")
        return
    what = ", ".join(f"{n} {key.split('.', 1)[1].replace('_', ' ')} ({key.split('.', 1)[0]})"
                     for key, n in counts.items())
    say(f"{indent}gates: {what}; listed in {rejects} (cai export leaves them out)")
