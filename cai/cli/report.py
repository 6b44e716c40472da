"""`cai report RUN_DIR`: what the data rewards (Goodhart diagnostics), as report.json and a page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_CODES_HELP, InputError
from ..plan import check_output_dir
from ..report.html import MAX_ROWS, write_report
from .app import app, out, say


@app.command(epilog=EXIT_CODES_HELP)
def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (from `cai run`, or `cai revise`/`cai label` "
                                            "outputs in one folder, or `cai best-of-n`'s).")],
    output_dir: Annotated[Path | None, typer.Option(
        "--output", "-o", "--output-dir", help="Where to write report.json and report.html (default: RUN_DIR).",
        show_default=False)] = None,
    unit: Annotated[str, typer.Option(help="Length unit of the length-bias figures: chars or words.")] = "chars",
    max_rows: Annotated[int, typer.Option(min=0, help="Rows embedded in the page's table.")] = MAX_ROWS,
) -> None:
    """Measure what the labels reward: how often the judge preferred the revision, per principle;
    length bias (chosen longer, correlation, a length-controlled preference rate); refusal,
    hedging, boilerplate, sycophancy and over-confidence rates in initial vs revised and chosen
    vs rejected answers; calibration against human labels when the pairs have them. Writes
    report.json and a self-contained report.html (no network needed to open it)."""
    if unit not in ("chars", "words"):
        raise InputError(f"--unit must be chars or words, got {unit!r}")
    if output_dir is not None:
        check_output_dir(output_dir, flag="--output")
    figures_path, page = write_report(run_dir, output_dir, unit=unit, max_rows=max_rows)
    say(f"report: {figures_path} (figures), {page} (open in a browser)")
    out.print(str(page), highlight=False, soft_wrap=True)
