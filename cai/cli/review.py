"""`cai review RUN_DIR`: a local page to label the judge's least sure pairs (human_labels.jsonl)."""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_CODES_HELP, EXIT_USAGE, InputError
from .app import app, err, out, say


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


@app.command(epilog=EXIT_CODES_HELP)
def review(
    run_dir: Annotated[Path, typer.Argument(help="A labelled run folder (with labels.jsonl, from `cai run` or "
                                            "`cai label`).")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free one).")] = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on. The default keeps the page on this machine; "
                                      "anyone who can reach another address can label.")] = "127.0.0.1",
    no_open: Annotated[bool, typer.Option("--no-open", help="Do not open a browser; print the address only.")
                       ] = False,
    reviewer: Annotated[str | None, typer.Option(
        help="Name recorded with each answer (default: your user name). A page can set its own with "
             "`?reviewer=NAME` in its address.", show_default=False)] = None,
    sample: Annotated[int | None, typer.Option(
        min=1, help="Review N pairs drawn uniformly at random (by --seed) instead of the hardest first: an "
                    "unbiased agreement figure.", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --sample draw.")] = 0,
    show_principles: Annotated[bool, typer.Option(
        "--show-principles", help="Show the principles the judge weighs before you answer (default: after, "
                                  "so they do not steer you).")] = False,
    import_file: Annotated[Path | None, typer.Option(
        "--import", help="Append the human labels of a JSONL file (same fields as human_labels.jsonl) after "
                         "checking every line, then exit; nothing is appended if one is bad.",
        show_default=False)] = None,
) -> None:
    """Label the judge's least sure pairs in a local web page: ties first, then pairs whose two
    orders or whose principles disagree, then p(A) nearest 0.5. Keys A, B, T (tie), S (skip), U
    (undo). Each answer is appended at once to RUN_DIR/human_labels.jsonl; `cai export` uses
    these labels, `cai export` and `cai report` show judge-vs-human agreement."""
    from ..analysis.human import HUMAN_FILE, load_pairs
    from ..review.labels import import_labels
    from ..review.server import Review, serve

    if import_file is not None:
        try:
            res = import_labels(run_dir, import_file)
        except InputError as e:
            for line in str(e).splitlines():
                err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(EXIT_USAGE) from None
        say(f"review: imported {res.added} labels into {run_dir / HUMAN_FILE}"
            + (f" ({res.duplicates} already there)" if res.duplicates else ""))
        return
    load_pairs(run_dir)
    rev = Review(run_dir, reviewer=reviewer or _user(), sample=sample, seed=seed, show_principles=show_principles)

    def ready(url: str) -> None:
        say(f"review: {len(rev.pairs)} pairs of {run_dir} at {url} (labels -> {run_dir / HUMAN_FILE}; "
            "Ctrl-C stops)")
        out.print(url, highlight=False, soft_wrap=True)
        out.file.flush()

    try:
        asyncio.run(serve(rev, host, port, open_browser=not no_open, ready=ready))
    except KeyboardInterrupt:
        say("review: stopped; every answer is in " + str(run_dir / HUMAN_FILE))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
