"""`cai eval-refusal`: the refusal detector against human labels (XSTest-style files)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..errors import EXIT_CODES_HELP
from ..eval.xstest import evaluate_refusals
from .app import app, out


@app.command("eval-refusal", epilog=EXIT_CODES_HELP)
def eval_refusal(
    file: Annotated[str, typer.Argument(
        help="Answers labelled by people: CSV or JSONL with `completion` and `final_label` "
             "(1_full_compliance, 2_full_refusal, 3_partial_refusal), as XSTest's completions files.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Measure cai's refusal detector (the one `cai report` uses) against human labels: a
    confusion table, and as the last line `agreement A (n=N)` (refusal = full or partial)."""
    res = evaluate_refusals(file)
    if json_out:
        out.print_json(json.dumps(res.to_dict()))
        return
    for line in res.lines():
        out.print(line, highlight=False, soft_wrap=True)
