"""`cai best-of-n`: n answers per prompt, ranked by the judge; the best as SFT rows, best-vs-worst
as preference pairs (West-of-N)."""

from __future__ import annotations

from .. import pipeline
from ..config import BATCH_LEAVES, RunConfig
from ..errors import EXIT_CODES_HELP
from ..stages.best_of_n import pairs_path
from .app import TOP, app, but, say, settings_options, stage_file, under
from .label import JUDGE
from .summary import plural, print_rows, print_stage_end, snapshot

BEST_OF_N = but(under(*TOP, "best_of_n", "gates", "label.policy_model", *(f"label.{n}" for n in JUDGE)),
                "best_of_n.enabled",
                "gates.keep", "gates.text", *BATCH_LEAVES)  # the input gates, and truncated (a cut best or worst)


@app.command("best-of-n", epilog=EXIT_CODES_HELP)
@settings_options(BEST_OF_N, stage="best_of_n", positional="input", helps={
    "input": "Prompts: .jsonl/.json/.parquet/.csv, a saved datasets folder, or a Hub dataset name.",
    "output": "Output JSONL of SFT rows (the best answer; every sample and judgement kept); the pairs go to "
              "NAME.pairs.jsonl beside it (default: best_of_n.jsonl in out/run)."})
def best_of_n(config: RunConfig) -> None:
    """Best-of-n: sample n answers per prompt (--n) from the policy (--label-policy-model, on the
    same backend; default: --model), rank them with the judge (--model; round robin for n <= 8, a
    knockout above, both orders, k principles), and write the best as TRL SFT rows (`messages`)
    and best-vs-worst as TRL preference rows (prompt, chosen, rejected). `cai report` and
    `cai export` read the folder. In `cai run`, the `best_of_n:` section does the same in the run
    folder.

    Rerunning the same command resumes: finished prompts are kept, the rest are done.
    """
    output = stage_file(config, "best_of_n.jsonl")
    before = snapshot(output)
    res = pipeline.run_best_of_n(config.input or "", output=output, config=config)
    print_rows("best-of-n", res.summary, before)
    assert res.preferences is not None
    say(f"pairs: {plural(res.preferences.written, 'pair')} (best vs worst, margin > 0) -> {pairs_path(output)}")
    print_stage_end("best-of-n", res, output, config.cache_path(output.parent), backend=False)
