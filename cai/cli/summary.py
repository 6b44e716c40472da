"""The closing lines every command prints (rows, pairs, ties, calls, failures with their reasons
and file) and the exit status that follows from them: one wording for `cai revise`, `cai label`
and `cai run`."""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ..backends.openai_server import redact
from ..errors import EXIT_ROWS_FAILED
from ..files import iter_jsonl
from ..output import SinkSummary
from ..pipeline import Calls
from ..quality.gates import REJECTS_FILE
from ..stages.preferences import PreferenceSummary, judged_by
from ..usage import tokens_line
from .app import ARGV, say

Rows = dict[str, bytes]  # row id -> digest of the row's content (its provenance left out)


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 tie``, ``2 ties``, ``0 pairs``."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def print_calls(calls: Calls, cache: Path | None, indent: str = "") -> None:
    where = f" ({cache})" if cache else " (no cache)"
    say(f"{indent}calls: {calls.sent} sent, {calls.cached} served from cache{where}, {calls.errors} failed")


def print_usage(manifest: Mapping[str, Any], indent: str = "") -> None:
    """``usage: 45210 tokens in (12000 cached), 9870 out over every run of this folder; cost $0.0383 (...)``:
    run.json's ``usage`` (the tokens served to every run of the folder) and ``cost`` when priced."""
    if isinstance(usage := manifest.get("usage"), Mapping):
        say(f"{indent}usage: {tokens_line(usage, manifest.get('cost'))}")


def print_backend(backend: Mapping[str, Any] | None, folder: Path, indent: str = "") -> None:
    """What the server side did, from the backend's description, each line only when it happened:
    ``server: 37 429s met; concurrency settled at 12 of 256 (lowest 4)`` and the time ``--rpm``/``--tpm``
    held requests back; each server's share (several --base-url); the batches sent (batch mode)."""
    lim = (backend or {}).get("limits") or {}
    parts = []
    if met := ", ".join(f"{lim[k]} {k[5:]}s" for k in ("http_429", "http_503") if lim.get(k)):
        at = lim.get("settled_at")
        at = ", ".join(map(str, at)) if isinstance(at, list) else at
        parts.append(f"{met} met; concurrency settled at {at} of {lim.get('concurrency')} (lowest {lim.get('lowest')})")
        if pace := lim.get("paced_at"):
            parts.append(f"paced at {', '.join(map(str, pace)) if isinstance(pace, list) else pace} requests/min")
    if lim.get("rate_wait_s"):
        given = " ".join(f"--{k} {lim[k]}" for k in ("rpm", "tpm") if lim.get(k))
        parts.append(f"{given} held requests back {lim['rate_wait_s']:.1f} s")
    if parts:
        say(f"{indent}server: {'; '.join(parts)}")
    if servers := (backend or {}).get("servers"):
        from ..backends.multi import servers_summary  # aiohttp: only when there were servers

        say(f"{indent}servers:")
        for line in servers_summary(servers):
            say(f"{indent}  {line}")
    if batch := (backend or {}).get("batch"):  # batch mode: what went out as batches this time
        where = f"state in {folder / batch['state']}" if batch.get("state") else f"files in {batch.get('files')}"
        say(f"{indent}batches: {batch['waves']} sent this run ({batch['requests_sent']} requests); {where}")


def snapshot(path: Path) -> Rows:
    """The rows a stage file holds before a run (a finished file, then an interrupted run's
    ``.part``), by id: what ``print_rows`` compares the run's rows with."""
    return {**_digests(path), **_digests(path.with_name(path.name + ".part"))}


def _digests(path: Path) -> Rows:
    rows: Rows = {}
    try:
        with path.open("rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a crash: the run redoes that row
                    continue
                if not isinstance(row, dict) or "id" not in row:
                    continue
                row.pop("provenance", None)  # names the constitution and settings: changes with any edit
                rows[str(row["id"])] = hashlib.blake2b(
                    json.dumps(row, sort_keys=True).encode(), digest_size=8).digest()
    except OSError:  # not there, or not a file: the plan says so (one line) before any work
        pass
    return rows


def row_counts(s: SinkSummary, before: Rows) -> tuple[int, int, int]:
    """(unchanged, redone, new): of the rows the stage file holds now, those the same as before
    this run (kept, or rebuilt from cached calls with the same content; provenance aside),
    those it held before with other content (some call was sent again), and those it did not
    hold before."""
    if not s.written or not before:
        return s.resumed - s.dropped, 0, s.written
    now = _digests(s.path)
    unchanged = sum(before.get(i) == d for i, d in now.items())
    new = sum(i not in before for i in now)
    return unchanged, len(now) - unchanged - new, new


def print_rows(name: str, s: SinkSummary, before: Rows, indent: str = "", also: str = "") -> None:
    """``revise: 30 rows unchanged (cache), 2 redone, 0 new, 0 failed -> FILE``."""
    same, redone, new = row_counts(s, before)
    gone = f" ({plural(s.dropped, 'row')} no longer in the input dropped)" if s.dropped else (
        f" ({plural(s.kept, 'row')} not in this input kept; --prune removes them)" if s.kept else "")
    say(f"{indent}{name}: {plural(same, 'row')} unchanged (cache), {redone} redone, {new} new, "
        f"{s.failed} failed -> {s.path}{also}{gone}")


def print_preferences(prefs: PreferenceSummary | Mapping[str, Any], path: Path, labels: Path, keep_ties: bool,
                      tie_threshold: float, cache: Path | None, indent: str = "") -> None:
    """``preferences: 7 pairs -> FILE; 1 tie held out; 0 of 64 judgements abstained (judged by ...); ...``,
    and the ties line (``tie_hint``) when ties kept most pairs out. ``prefs``: `cai label`'s summary,
    or `cai run`'s counts in run.json."""
    p = prefs if isinstance(prefs, PreferenceSummary) else PreferenceSummary(
        written=prefs.get("written", 0), ties=prefs.get("ties", 0), abstentions=prefs.get("abstentions", 0),
        judgements=prefs.get("judgements", 0), inconsistent=prefs.get("position_inconsistent", 0),
        gated=prefs.get("gated", 0), modes=prefs.get("judged_by") or {})
    by = f" (judged by {judged_by(p.modes)})" if p.modes else ""
    say(f"{indent}preferences: {plural(p.written, 'pair')} -> {path}; {plural(p.ties, 'tie')} "
        f"{'written (--keep-ties)' if keep_ties else 'held out'}; {p.abstentions} of "
        f"{plural(p.judgements, 'judgement')} abstained{by}; {p.inconsistent} position-inconsistent")
    if hint := tie_hint(labels, tie_threshold, cache):
        say(f"{indent}[yellow]ties: {escape(hint)}[/yellow]")


def tie_hint(labels: Path, threshold: float, cache: Path | None) -> str | None:
    """One line when ties are over half of the judged pairs (all of them: no pair written): the
    spread of p and the command that relabels (from the cache) with a threshold that keeps at
    least half of them."""
    ps: list[float] = []
    ties = 0
    try:
        for row in iter_jsonl(labels):
            if isinstance(row.get("p_a"), (int, float)):
                ps.append(float(row["p_a"]))
                ties += bool(row.get("tie"))
    except (OSError, ValueError):
        return None
    if 2 * ties <= len(ps):
        return None
    q = statistics.quantiles(ps, n=4, method="inclusive") if len(ps) > 1 else [ps[0]] * 3
    spread = f"p min {min(ps):.3f}, quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}, max {max(ps):.3f}"
    head = (f"{ties} of {plural(len(ps), 'judged pair')} are ties (|p - 0.5| < {threshold:g}; {spread}): "
            "the judge barely prefers either answer")
    far = sorted((abs(p - 0.5) for p in ps), reverse=True)[math.ceil(len(ps) / 2) - 1]
    if far == 0:
        return head + "; no tie threshold keeps half of them (a larger judge model may)"
    t = _threshold(far)
    how = "relabel from the cache (no new calls)" if cache else "relabel"
    return f"{head}; {how} keeping at least half: {command_with('--label-tie-threshold', t)}"


def _threshold(far: float) -> str:
    """A short threshold at most ``far`` (a pair with |p - 0.5| = far is kept: ties are ``<``)."""
    for digits in range(2, 8):
        t = math.floor(far * 10**digits) / 10**digits
        if 0 < t <= far:
            return f"{t:.{digits}f}"
    return "0"


def command_with(flag: str, value: str, aliases: tuple[str, ...] = ("--tie-threshold",)) -> str:
    """The command line this process was given, with ``flag value`` replacing any given value."""
    names = (flag, *aliases)
    args, skip = [], False
    for a in ARGV:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not a.startswith(tuple(n + "=" for n in names)):
            args.append(redact(a))  # a key in a URL is never printed
    return shlex.join(["cai", *args, flag, value])


def print_failures(stages: dict[str, SinkSummary], indent: str = "") -> None:
    for name, s in stages.items():
        if s.failed:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.reasons.items()))
            say(f"{indent}[yellow]{name}: {s.failed} rows failed ({reasons}); listed in {s.failures_path}[/yellow]")


def exit_status(stages: Mapping[str, SinkSummary]) -> None:
    """Exit code 3 when a stage has failed rows (listed in its failures file, printed above)."""
    if any(s.failed for s in stages.values()):
        raise typer.Exit(EXIT_ROWS_FAILED)


def print_stage_end(name: str, res: Any, output: Path, cache: Path | None, backend: bool = True) -> None:
    """The closing lines of a one-stage command (`cai revise`, `cai label`, `cai best-of-n`) after its
    rows: calls, the server side (``backend``), the gates, the failures; then the exit status."""
    print_calls(res.calls, cache)
    if backend:
        print_backend(res.backend, output.parent)
    print_gates(res.gates, output.parent / REJECTS_FILE)
    print_failures({name: res.summary})
    exit_status({name: res.summary})


def print_gates(counts: dict[str, int], rejects: Path, indent: str = "") -> None:
    """One line: what the quality gates kept out of the training data, and where it is listed."""
    if not counts:
        say(f"{indent}gates: every row passed")
        return
    what = ", ".join(f"{n} {key.split('.', 1)[1].replace('_', ' ')} ({key.split('.', 1)[0]})"
                     for key, n in counts.items())
    say(f"{indent}gates: {what}; listed in {rejects} (cai export leaves them out)")
