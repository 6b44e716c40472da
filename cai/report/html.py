"""``report.html``: one self-contained page (no network) from ``page.html.j2``: headline figures,
inline SVG plots (``cai.report.svg``), a per-principle table and a filterable table of rows.

Jinja2 renders it with autoescape on: every text from the run (prompts and answers come from
models and red-team data) is escaped as it goes in, and the table's rows go in as ``|tojson``
(``<``, ``>``, ``&`` and ``'`` written as ``\\u`` escapes, so no text can close the element).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from ..analysis import MAX_ROWS, figures, load_run
from ..analysis.read import one_line
from ..errors import InputError
from ..eval.refusal import MARKER_NAMES
from .svg import LOSS, SERIES, WIN, grouped_bars_svg, histogram_svg, lines_svg, reliability_svg, stacked_bars_svg


def _pct(v: Any, digits: int = 0) -> str:
    return "n/a" if not isinstance(v, int | float) or isinstance(v, bool) else f"{100 * v:.{digits}f}%"


def _num(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "n/a"
    return f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}"


def _growth(v: Any) -> str:
    return "n/a" if isinstance(v, bool) or not isinstance(v, int | float) else f"\u00d7{v:.2f}"


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True, undefined=jinja2.ChainableUndefined)
    env.filters.update(pct=_pct, num=_num, growth=_growth)
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "allow_nan": False, "separators": (",", ":")}
    return env.from_string(files(__package__).joinpath("page.html.j2").read_text(encoding="utf-8"))


def _plots(report: dict[str, Any]) -> list[tuple[str, Markup | None, str, str]]:
    """(title, svg, caption, text when there is nothing to plot) per figure."""
    hist, mk, by_round = report["lengths"]["histogram"], report["markers"], report["revise"]["by_round"]
    per, human = report["labels"]["per_principle"], report["labels"]["overall"].get("human")
    bars = sorted(((pid, v["revision"]["win_rate"], v["revision"]["tie_rate"], v["revision"]["loss_rate"],
                    v["revision"]["pairs"]) for pid, v in per.items() if v["revision"]["pairs"]), key=lambda b: -b[1])
    xs = [r["round"] for r in by_round]
    figs = [
        ("Length of chosen vs rejected answers",
         histogram_svg(hist["edges"], [("chosen", hist["chosen"], WIN), ("rejected", hist["rejected"], LOSS)],
                       "answer length histogram", "characters"),
         f"Decided pairs; the longest 1% go in the last bin. Mean chosen {_num(report['lengths']['chosen']['mean'], 0)}"
         f", rejected {_num(report['lengths']['rejected']['mean'], 0)}.", "No decided pairs."),
        ("Revision preferred, per judge principle", stacked_bars_svg(bars, "revision win rate per principle"),
         "For each principle the judge weighed: how often its verdict (mean of both orders) "
         "preferred the revised answer.", "No revision pairs were labelled.")]
    if human:
        figs.append(("Calibration against human labels", reliability_svg(human["reliability"], "reliability diagram"),
                     f"{human['pairs']} human-labelled pairs in 10 equal-width bins of p(A); on the diagonal is "
                     f"calibrated. Brier {_num(human['brier'])}, ECE {_num(human['ece'])}.", "No human labels."))
    return figs + [
        ("Marker rates by revision round",
         lines_svg(xs, [(name, [r["markers"][name] for r in by_round], SERIES[i % len(SERIES)])
                        for i, name in enumerate(MARKER_NAMES)], "marker rates by round",
                   "round (0: initial answer)", "share of answers"),
         "Share of answers with each text marker (cai.refusal) after each round.", "No revisions."),
        ("Answer length by revision round",
         lines_svg(xs, [("mean", [r["mean"] for r in by_round], SERIES[0]),
                        ("median", [r["median"] for r in by_round], SERIES[1])],
                   "answer length by round", "round (0: initial answer)", "characters", percent=False),
         "Mean growth per round: " + ", ".join(f"round {r['round']} \u00d7{r['growth']:.2f}"
                                               for r in by_round if r.get("growth") is not None) + ".",
         "No revisions."),
        ("Markers in chosen vs rejected answers",
         grouped_bars_svg(list(MARKER_NAMES), [("chosen", [mk["chosen"][n] for n in MARKER_NAMES], WIN),
                                               ("rejected", [mk["rejected"][n] for n in MARKER_NAMES], LOSS)],
                          "markers in chosen and rejected answers") if mk["pairs"] else None,
         f"Over {mk['pairs']} decided pairs.", "No decided pairs.")]


def render(report: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The page for a report (``cai.analysis.figures``) and its table rows."""
    run = report["run"]
    cut = run.get("text_chars") or 0
    models = run.get("models") or {}
    model_text = ", ".join(f"{k}: {v}" for k, v in models.items()) if isinstance(models, dict) else str(models)
    meta = " \u00b7 ".join(str(x) for x in (
        run.get("dir"), f"constitution {run.get('constitution') or 'n/a'}", model_text,
        f"judge mode {run.get('label_mode') or 'n/a'}", f"cai {run.get('cai_version') or '?'}") if x)
    total = run.get("table_total", len(rows))
    cap = (f"The table holds the first {len(rows):,} of {total:,} rows (texts cut at {cut:,} characters) to "
           "keep this page small; revisions.jsonl and labels.jsonl hold them all." if len(rows) < total else
           f"All {total:,} rows (texts cut at {cut:,} characters).")
    gates = {**report["revise"].get("gates", {}), **report["labels"].get("gates", {})}
    judged, revised = report["labels"]["per_principle"], report["revise"]["per_principle"]
    names = [n for n in dict.fromkeys([*run.get("principles", {}), *revised, *judged]) if n in judged or n in revised]
    return _template().render(
        report=report, rows=list(rows), meta=meta, cap=cap, plots=_plots(report), principles=names,
        gate_text=("Gate flags: " + ", ".join(f"{k} ({v})" for k, v in sorted(gates.items())) + ".") if gates else "")


def _write_all(files: dict[Path, str]) -> None:
    """Write every file to a ``.tmp`` beside it first, then rename each into place: an error
    while building or writing leaves the old files (or none), never a half-written one."""
    tmps: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmps.append((tmp, path))
            with tmp.open("w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)


def write_report(run_dir: Path, out_dir: Path | None = None, *, unit: str = "chars",
                 max_rows: int = MAX_ROWS) -> tuple[Path, Path]:
    """Write ``report.json`` (the figures) and ``report.html`` (the page) into ``out_dir``
    (default: the run folder); return their paths."""
    run_dir = Path(run_dir)
    data = load_run(run_dir, unit=unit, max_rows=max_rows)
    report = figures(data)
    page = render(report, data.table)
    out = Path(out_dir) if out_dir is not None else run_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot create the report folder ({one_line(e)})") from None
    json_path, html_path = out / "report.json", out / "report.html"
    try:
        _write_all({json_path: json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                    html_path: page})
    except OSError as e:
        raise InputError(f"{out}: cannot write the report ({one_line(e)})") from None
    return json_path, html_path
