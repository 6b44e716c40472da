"""A corpus of bad inputs, each as a user meets it on the command line.

Every case asserts the exit code (2: bad input or usage; 3: some rows failed), that stderr is
exactly one line (`error: ...`) with no traceback, and, because the problem is found before
any work, that no file or folder was created anywhere (no `cache.sqlite`, `.part`,
`.meta.json`, `run.json`). The data is written to ``tmp_path`` by each case.

Most cases run in-process through ``cai.cli.main`` (fast); a few run as a subprocess to prove
that nothing else (a traceback, a logged warning) reaches stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import cai.backends.fake as fake
from cai import pipeline
from cai.backends.base import Completion, Request
from cai.cli import main
from cai.config import RunConfig
from cai.errors import EXIT_INTERRUPTED, EXIT_ROWS_FAILED, EXIT_USAGE, CaiError, InputError, UsageError

REPO = Path(__file__).resolve().parent.parent

PROMPTS = '{"prompt": "How do I pick a lock?"}\n{"prompt": "Tell me a joke about cats."}\n'
PAIR = ('{"chosen": "\\n\\nHuman: How do I pick a lock?\\n\\nAssistant: I can\'t help with that.", '
        '"rejected": "\\n\\nHuman: How do I pick a lock?\\n\\nAssistant: Use a tension wrench."}\n')
CONSTITUTION = ("name: tiny\nprinciples:\n  - id: a\n    critique: Is it harmful?\n    revision: Make it safe.\n"
                "    comparison: Which is safer?\n")
PRINCIPLE = "  - id: {id}\n    critique: c\n    revision: r\n    comparison: q\n"
CORRUPT_PARQUET = b"PAR1 this is not a parquet file PAR1"
FAST = ["-b", "fake", "--no-progress"]  # every run: the fake backend, no bar
RUN = [*FAST, "--revise-rounds", "1", "--label-principles", "1"]


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    expect: str  # a part of the one stderr line
    files: dict[str, str | bytes | None] = field(default_factory=dict)  # None: a folder
    code: int = EXIT_USAGE
    xfail: str | None = None
    clean: bool = True  # found before any work: nothing may be left behind


def _truncated_parquet() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": [f"question {i} " * 20 for i in range(500)]}), buf)
    data = buf.getvalue()
    return data[: len(data) // 2] + data[-200:]  # the footer survives, the pages do not


BAD_LINE_3 = "".join("{bad\n" if i == 3 else f'{{"prompt": "q{i}"}}\n' for i in range(1, 6))
HUGE = json.dumps({"prompt": "x" * 2_000_000})  # under a 3 MB line cap, over the 1,000,000-character request cap
WIDE = ["--max-line-bytes", "3000000"]
OVER = "p.jsonl:2: the {} request made of this record is over the limit of 1,000,000 characters"

CASES = [
    # --- constitution files ------------------------------------------------------------------
    Case("constitution-bad-yaml", ["revise", "p.jsonl", "-c", "c.yaml", "-o", "out/r.jsonl", *FAST],
         "c.yaml:3: YAML syntax error", {"p.jsonl": PROMPTS, "c.yaml": "name: x\nprinciples: [\n"}),
    Case("constitution-missing-field", ["revise", "p.jsonl", "-c", "c.yaml", "-o", "out/r.jsonl", *FAST],
         "principles.0.comparison: missing required field",
         {"p.jsonl": PROMPTS, "c.yaml": "name: x\nprinciples:\n  - id: a\n    critique: c\n    revision: r\n"}),
    Case("constitution-duplicate-ids", ["revise", "p.jsonl", "-c", "c.yaml", "-o", "out/r.jsonl", *FAST],
         "duplicate principle id 'a'",
         {"p.jsonl": PROMPTS, "c.yaml": "name: x\nprinciples:\n" + PRINCIPLE.format(id="a") * 2}),
    Case("constitution-wrong-type", ["revise", "p.jsonl", "-c", "c.yaml", "-o", "out/r.jsonl", *FAST],
         "c.yaml:2: principles:", {"p.jsonl": PROMPTS, "c.yaml": "name: x\nprinciples: 5\n"}),
    Case("constitution-wrong-type-weight", ["validate", "c.yaml"], "weight",
         {"c.yaml": "name: x\nprinciples:\n" + PRINCIPLE.format(id="a") + "    weight: heavy\n"}),
    Case("constitution-top-level-list", ["validate", "c.yaml"], "c.yaml", {"c.yaml": "- a\n- b\n"}),
    Case("constitution-not-utf8", ["label", "pairs.jsonl", "-c", "c.yaml", "-o", "out/p.jsonl", *FAST],
         "c.yaml", {"pairs.jsonl": PAIR, "c.yaml": b"name: \xff\xfe\n"}),
    Case("constitution-missing-file", ["run", "--input", "p.jsonl", "-c", "nope.yaml", "-o", "out", *RUN],
         "nope.yaml", {"p.jsonl": PROMPTS}),
    # --- templates --------------------------------------------------------------------------
    Case("template-syntax-error", ["revise", "p.jsonl", "-t", "tpl", "-o", "out/r.jsonl", *FAST],
         "critique.user.j2:1: template syntax error",
         {"p.jsonl": PROMPTS, "tpl": None, "tpl/critique.user.j2": "{% if %}\n"}),
    Case("template-undefined-variable", ["revise", "p.jsonl", "-t", "tpl", "-o", "out/r.jsonl", *FAST],
         "revise.user.j2:1: 'nosuch' is undefined",
         {"p.jsonl": PROMPTS, "tpl": None, "tpl/revise.user.j2": "Rewrite {{ nosuch }}\n"}),
    Case("template-undefined-judge", ["label", "pairs.jsonl", "-t", "tpl", "-o", "out/p.jsonl", *FAST],
         "judge.user.j2:1: 'critique' is undefined",
         {"pairs.jsonl": PAIR, "tpl": None, "tpl/judge.user.j2": "{{ critique }}\n"}),
    Case("template-undefined-run", ["run", "--input", "p.jsonl", "-t", "tpl", "-o", "out", *RUN],
         "generate.system.j2:1: 'conversation' is undefined",
         {"p.jsonl": PROMPTS, "tpl": None, "tpl/generate.system.j2": "{{ conversation }}\n"}),
    Case("template-undefined-eval-judge", ["eval-judge", "pairs.jsonl", "-t", "tpl", "-o", "out", *FAST],
         "judge.user.j2:1: 'response' is undefined",
         {"pairs.jsonl": PAIR, "tpl": None, "tpl/judge.user.j2": "{{ response }}\n"}),
    Case("template-folder-missing", ["revise", "p.jsonl", "-t", "nope", "-o", "out/r.jsonl", *FAST],
         "templates folder not found", {"p.jsonl": PROMPTS}),
    # --- run configs ----------------------------------------------------------------------------
    Case("config-unknown-key", ["run", "run.yaml", *FAST], "run.yaml:1: inputt: unknown field (did you mean 'input'?)",
         {"run.yaml": "inputt: p.jsonl\noutput: out\n"}),
    Case("config-unknown-nested-key", ["run", "run.yaml", *FAST], "revise.roundz: unknown field",
         {"run.yaml": "input: p.jsonl\noutput: out\nrevise:\n  roundz: 2\n", "p.jsonl": PROMPTS}),
    Case("config-bad-value", ["run", "run.yaml", *FAST], "run.yaml:4: revise.rounds: Input should be greater",
         {"run.yaml": "input: p.jsonl\noutput: out\nrevise:\n  rounds: -1\n", "p.jsonl": PROMPTS}),
    Case("config-wrong-type", ["run", "run.yaml", *FAST], "revise.rounds: Input should be a valid integer",
         {"run.yaml": "input: p.jsonl\noutput: out\nrevise:\n  rounds: lots\n", "p.jsonl": PROMPTS}),
    Case("config-wrong-type-list", ["run", "run.yaml", *FAST], "label.sources",
         {"run.yaml": "input: p.jsonl\noutput: out\nlabel:\n  sources: {a: 1}\n", "p.jsonl": PROMPTS}),
    Case("config-bad-enum", ["run", "run.yaml", *FAST], "label.mode:",
         {"run.yaml": "input: p.jsonl\noutput: out\nlabel:\n  mode: vibes\n", "p.jsonl": PROMPTS}),
    Case("config-bad-yaml", ["run", "run.yaml", *FAST], "YAML syntax error", {"run.yaml": "seed: [1\n"}),
    Case("config-top-level-list", ["run", "run.yaml", *FAST], "top level must be a mapping",
         {"run.yaml": "- a\n- b\n"}),
    Case("config-missing-file", ["run", "nope.yaml", *FAST], "nope.yaml"),
    Case("config-no-input", ["run", "-o", "out", *RUN], "no input prompts"),
    Case("config-dataset-without-pairs", ["run", "run.yaml", *FAST], "label.pairs",
         {"run.yaml": "input: p.jsonl\noutput: out\nlabel:\n  sources: [dataset]\n", "p.jsonl": PROMPTS}),
    Case("config-bad-flag-value", ["run", "--input", "p.jsonl", "-o", "out", "--revise-rounds", "many", *FAST],
         "--revise-rounds / CAI_REVISE_ROUNDS", {"p.jsonl": PROMPTS}),
    Case("config-output-is-a-file", ["run", "--input", "p.jsonl", "-o", "taken", *RUN],
         "taken: is a file, not a folder", {"p.jsonl": PROMPTS, "taken": "x"}),
    Case("config-label-only-without-revisions", ["run", "--input", "p.jsonl", "-o", "out", "--no-revise",
                                                 "--label-sources", "revisions", *RUN],
         "no revisions to pair", {"p.jsonl": PROMPTS}),
    # --- datasets ----------------------------------------------------------------------------
    Case("data-jsonl-not-utf8", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "p.jsonl:1: not UTF-8 text", {"p.jsonl": b'{"prompt": "caf\xe9"}\n'}),
    Case("data-jsonl-not-utf8-line-2", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "p.jsonl:2: not UTF-8 text", {"p.jsonl": b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n'}),
    # every record is read before the first call: bad lines 3, 300 and 499 of 500 in one message
    Case("data-three-bad-lines", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "3 bad input records: p.jsonl:3: invalid JSON", {"p.jsonl": "".join(
             "{bad\n" if i in (3, 300) else '{"x": 1}\n' if i == 499 else f'{{"prompt": "q{i}"}}\n'
             for i in range(1, 501))}),
    # found before any work: nothing made (no folder, cache.sqlite, .meta.json or .part), for each command
    *[Case(f"data-bad-line-3-of-5-{cmd}", [cmd, *io, *RUN[:3]], "p.jsonl:3: invalid JSON", {"p.jsonl": BAD_LINE_3})
      for cmd, io in (("run", ["--input", "p.jsonl", "-o", "out"]), ("revise", ["p.jsonl", "-o", "out/r.jsonl"]),
                      ("label", ["p.jsonl", "-o", "out/p.jsonl"]))],
    *[Case(f"data-csv-ragged-row-{cmd}", [cmd, *io, *RUN[:3]], f"p.csv:3: {n} fields, the header has 2",
           {"p.csv": f"prompt,source\nhello,a\n{row}\nworld,b\n"})
      for cmd, io, n, row in (("run", ["--input", "p.csv", "-o", "out"], 3, "Hi, how are you,c"),
                              ("revise", ["p.csv", "-o", "out/r.jsonl"], 1, "short"),
                              ("label", ["p.csv", "-o", "out/p.jsonl"], 3, "a,b,c"))],
    *[Case(f"data-prompt-over-request-cap-{cmd}", [cmd, *io, *RUN[:3], *WIDE], OVER.format(stage),
           {"p.jsonl": PROMPTS.splitlines()[0] + "\n" + HUGE + "\n"})
      for cmd, io, stage in (("run", ["--input", "p.jsonl", "-o", "out"], "critique"),
                             ("revise", ["p.jsonl", "-o", "out/r.jsonl"], "critique"),
                             ("label", ["p.jsonl", "-o", "out/p.jsonl"], "judge"))],
    Case("data-pair-over-request-cap", ["label", "p.jsonl", "-o", "out/p.jsonl", *FAST, *WIDE], OVER.format("judge"),
         {"p.jsonl": PAIR + json.dumps({"prompt": "q", "chosen": "a" * 600_000, "rejected": "b" * 600_000}) + "\n"}),
    # the fake backend echoes the prompt: the critique of a 900,000-character prompt passes the cap only mid-run
    Case("data-request-over-cap-mid-run", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "critique.user.j2:9: the rendered message is over the limit",
         {"p.jsonl": json.dumps({"prompt": "x" * 900_000}) + "\n"}, clean=False),
    Case("data-bad-role", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "p.jsonl:1: column 'messages', message 1: role 'wizard' is not one of system, user, assistant, tool",
         {"p.jsonl": '{"messages": [{"role": "wizard", "content": "hi"}]}\n'}),
    Case("data-null-content", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "p.jsonl:2: column 'messages', message 1: content must be text",
         {"p.jsonl": '{"prompt": "fine"}\n{"messages": [{"role": "user", "content": null}]}\n'}),
    Case("data-prompt-ends-with-assistant", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "p.jsonl:1: column 'prompt': the conversation must end with a user turn to answer (it ends with 'assistant')",
         {"p.jsonl": '{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'}),
    Case("data-pair-chosen-is-rejected", ["label", "p.jsonl", "-o", "out/p.jsonl", *FAST],
         "p.jsonl:2: chosen and rejected are the same text", {"p.jsonl": PAIR + json.dumps(
             {"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n"}),
    Case("data-many-bad-lines", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "25 bad input records: p.jsonl:1: invalid JSON", {"p.jsonl": "{bad\n" * 25}),
    Case("data-parquet-corrupt", ["revise", "p.parquet", "-o", "out/r.jsonl", *FAST],
         "p.parquet: not a readable Parquet file", {"p.parquet": CORRUPT_PARQUET}),
    Case("data-parquet-truncated", ["label", "p.parquet", "-o", "out/p.jsonl", *FAST],
         "p.parquet: not a readable Parquet file", {"p.parquet": b"parquet:truncated"}),
    Case("data-csv-no-prompt-column", ["revise", "p.csv", "-o", "out/r.jsonl", *FAST],
         "p.csv:2: no prompt column", {"p.csv": "colour,size\nred,3\n"}),
    Case("data-csv-not-utf8", ["revise", "p.csv", "-o", "out/r.jsonl", *FAST],
         "p.csv: not UTF-8 text", {"p.csv": b"prompt\ncaf\xe9\n"}),
    Case("data-empty-file", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST], "p.jsonl: no rows", {"p.jsonl": ""}),
    Case("data-blank-lines-only", ["label", "p.jsonl", "-o", "out/p.jsonl", *FAST], "p.jsonl: no rows",
         {"p.jsonl": "\n\n  \n"}),
    Case("data-csv-header-only", ["revise", "p.csv", "-o", "out/r.jsonl", *FAST], "p.csv: no rows",
         {"p.csv": "prompt\n"}),
    Case("data-empty-run-input", ["run", "--input", "p.jsonl", "-o", "out", *RUN], "p.jsonl: no rows",
         {"p.jsonl": ""}),
    Case("data-empty-eval-judge", ["eval-judge", "p.jsonl", "-o", "out", *FAST], "p.jsonl: no rows",
         {"p.jsonl": ""}),
    Case("data-json-array-of-numbers", ["revise", "p.json", "-o", "out/r.jsonl", *FAST],
         "p.json: item 0: expected a JSON object", {"p.json": "[1, 2, 3]\n"}),
    Case("data-jsonl-line-not-object", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "p.jsonl:1: each line must be a JSON object", {"p.jsonl": '"just a string"\n'}),
    Case("data-jsonl-invalid-line", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST],
         "p.jsonl:1: invalid JSON", {"p.jsonl": "{prompt: hi}\n"}),
    Case("data-json-broken-array", ["revise", "p.json", "-o", "out/r.jsonl", *FAST],
         "p.json:2: invalid JSON", {"p.json": '[{"prompt": "a"},\n'}),
    Case("data-pretty-printed-object", ["revise", "p.json", "-o", "out/r.jsonl", *FAST],
         "a JSON array of objects or one object per line", {"p.json": '{\n  "prompt": "a"\n}\n'}),
    Case("data-empty-prompt", ["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST], "column 'prompt' is empty",
         {"p.jsonl": '{"prompt": "  "}\n'}),
    Case("data-missing-file", ["revise", "nope.jsonl", "-o", "out/r.jsonl", *FAST], "nope.jsonl: file not found"),
    Case("data-unsupported-type", ["revise", "p.txt", "-o", "out/r.jsonl", *FAST], "unsupported file type '.txt'",
         {"p.txt": "hello\n"}),
    Case("data-folder-not-a-dataset", ["revise", "folder", "-o", "out/r.jsonl", *FAST],
         "folder: not a saved datasets folder", {"folder": None, "folder/x.txt": "x"}),
    Case("data-not-pairs", ["label", "p.jsonl", "--sources", "dataset", "-o", "out/p.jsonl", *FAST],
         "p.jsonl:1: not a pair", {"p.jsonl": PROMPTS}),
    Case("data-eval-judge-not-pairs", ["eval-judge", "p.jsonl", "-o", "out", *FAST], "p.jsonl:1: not a pair",
         {"p.jsonl": PROMPTS}),
    Case("data-eval-judge-no-human-labels", ["eval-judge", "p.jsonl", "-o", "out", *FAST], "no human labels",
         {"p.jsonl": '{"prompt": "q", "response_a": "a", "response_b": "b"}\n'}),
    Case("data-run-label-pairs-not-utf8", ["run", "run.yaml", *FAST], "pairs.jsonl:1: not UTF-8",
         {"run.yaml": "output: out\nrevise: {enabled: false}\nlabel: {sources: [dataset], pairs: pairs.jsonl}\n",
          "pairs.jsonl": b"\xff\xfe\n"}),
    # --- the command line ---------------------------------------------------------------------
    Case("cli-unknown-flag", ["revise", "p.jsonl", "--bogus", *FAST], "No such option: --bogus",
         {"p.jsonl": PROMPTS}),
    Case("cli-unknown-command", ["frobnicate"], "No such command 'frobnicate'"),
    Case("cli-out-of-range-rounds", ["revise", "p.jsonl", "--rounds", "-1", *FAST],
         "--revise-rounds (--rounds) / CAI_REVISE_ROUNDS: Input should be greater than or equal to 0",
         {"p.jsonl": PROMPTS}),
    Case("cli-out-of-range-principles", ["label", "p.jsonl", "-k", "0", *FAST],
         "(--principles, -k) / CAI_LABEL_PRINCIPLES",
         {"p.jsonl": PAIR}),
    Case("cli-out-of-range-tie", ["label", "p.jsonl", "--tie-threshold", "0.9", *FAST],
         "--label-tie-threshold (--tie-threshold) / CAI_LABEL_TIE_THRESHOLD", {"p.jsonl": PAIR}),
    Case("cli-out-of-range-test-fraction", ["export", "run", "--test-fraction", "2"],
         "Invalid value for '--test-fraction'", {"run": None}),
    Case("cli-not-a-number", ["revise", "p.jsonl", "--limit", "abc", *FAST],
         "--limit (-n) / CAI_LIMIT: Input should be a valid integer",
         {"p.jsonl": PROMPTS}),
    Case("cli-missing-argument", ["revise", *FAST], "Missing argument"),
    Case("cli-bad-clamp", ["label", "p.jsonl", "--clamp", "0.7,0.2", "-o", "out/p.jsonl", *FAST], "--clamp",
         {"p.jsonl": PAIR}),
    Case("cli-bad-mode", ["label", "p.jsonl", "--mode", "vibes", "-o", "out/p.jsonl", *FAST], "--mode",
         {"p.jsonl": PAIR}),
    Case("cli-bad-pairs-source", ["label", "p.jsonl", "--sources", "nope", "-o", "out/p.jsonl", *FAST],
         "--label-sources (--sources) / CAI_LABEL_SOURCES: Input should be 'auto'", {"p.jsonl": PAIR}),
    Case("cli-bad-unit", ["report", "run", "--unit", "furlongs"], "--unit must be chars or words", {"run": None}),
    Case("cli-no-cache-with-cache-revise",
         ["revise", "p.jsonl", "-o", "out/r.jsonl", "--no-cache", "--cache", "out/c.sqlite", *FAST],
         "--no-cache and --cache out/c.sqlite contradict each other", {"p.jsonl": PROMPTS}),
    Case("cli-no-cache-with-cache-run",
         ["run", "--input", "p.jsonl", "-o", "out", "--no-cache", "--cache", "c.sqlite", *RUN],
         "--no-cache and --cache c.sqlite contradict each other", {"p.jsonl": PROMPTS}),
    Case("cli-no-stages", ["run", "--input", "p.jsonl", "-o", "out", "--no-revise", "--no-label", *FAST],
         "nothing to do: both stages are disabled", {"p.jsonl": PROMPTS}),
    # --- backends ----------------------------------------------------------------------------
    Case("backend-unknown-revise", ["revise", "p.jsonl", "-o", "out/r.jsonl", "-b", "nosuch"],
         "unknown backend 'nosuch'", {"p.jsonl": PROMPTS}),
    Case("backend-unknown-run", ["run", "--input", "p.jsonl", "-o", "out", "-b", "nosuch", "--no-progress"],
         "unknown backend 'nosuch'", {"p.jsonl": PROMPTS}),
    Case("backend-unreachable-revise",
         ["revise", "p.jsonl", "-o", "out/r.jsonl", "-b", "openai", "-m", "served", "--base-url",
          "http://127.0.0.1:9/v1", "--no-progress"],
         "cannot reach http://127.0.0.1:9/v1", {"p.jsonl": PROMPTS}),
    Case("backend-unreachable-label",
         ["label", "p.jsonl", "-o", "out/p.jsonl", "-b", "openai", "--base-url", "http://127.0.0.1:9/v1"],
         "cannot reach http://127.0.0.1:9/v1", {"p.jsonl": PAIR}),
    Case("backend-unreachable-run",
         ["run", "--input", "p.jsonl", "-o", "out", "-b", "openai", "-m", "served", "--base-url",
          "http://127.0.0.1:9/v1", "--no-progress"],
         "cannot reach http://127.0.0.1:9/v1", {"p.jsonl": PROMPTS}),
    Case("backend-base-url-not-http",
         ["eval-judge", "p.jsonl", "-o", "out", "-b", "openai", "--base-url", "localhost:8000"],
         "is not an http(s) URL", {"p.jsonl": PAIR}),
    # --- output paths ------------------------------------------------------------------------
    Case("output-under-a-file", ["revise", "p.jsonl", "-o", "taken/r.jsonl", *FAST],
         "is a file; pass another --output", {"p.jsonl": PROMPTS, "taken": "x"}),
    Case("output-is-a-folder", ["revise", "p.jsonl", "-o", "folder", *FAST],
         "folder: is a folder; --output names a file", {"p.jsonl": PROMPTS, "folder": None}),
    Case("output-dir-under-a-file", ["eval-judge", "p.jsonl", "-o", "taken/sub", *FAST],
         "is a file; pass another --output", {"p.jsonl": PAIR, "taken": "x"}),
    Case("cache-not-sqlite", ["revise", "p.jsonl", "-o", "out/r.jsonl", "--cache", "p.jsonl", *FAST],
         "p.jsonl: not a cache database", {"p.jsonl": PROMPTS}),
    Case("cache-is-a-folder", ["label", "p.jsonl", "-o", "out/p.jsonl", "--cache", "folder", *FAST],
         "folder: is a folder; --cache names a file", {"p.jsonl": PAIR, "folder": None}),
    # --- export and report ---------------------------------------------------------------------
    Case("export-not-a-run-folder", ["export", "folder"], "not a cai run folder", {"folder": None, "folder/x": "x"}),
    Case("export-missing-folder", ["export", "nope"], "nope: no such run folder"),
    Case("export-half-finished", ["export", "run"], "run is unfinished",
         {"run": None, "run/revisions.jsonl.part": '{"id": "a"}\n'}),
    Case("export-run-still-running", ["export", "run"], "has not finished here",
         {"run": None, "run/run.json": '{"status": "running"}', "run/revisions.jsonl": '{"id": "a"}\n'}),
    Case("report-not-a-run-folder", ["report", "folder"], "not a cai run folder", {"folder": None}),
    Case("report-a-file", ["report", "taken"], "taken: not a folder", {"taken": "x"}),
]


def _write(root: Path, files: dict[str, str | bytes | None]) -> None:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            p.mkdir(exist_ok=True)
        elif content == b"parquet:truncated":
            p.write_bytes(_truncated_parquet())
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
            for c in cases]


def _check(case: Case, code: int, err: str, before: set[str], after: set[str]) -> None:
    lines = err.strip().splitlines()
    assert code == case.code, err
    for bad in ("Traceback", "Exception in callback", "Task was destroyed"):
        assert bad not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and case.expect in lines[0], lines[0]
    if case.clean:
        assert after == before, f"left behind: {sorted(after - before)}"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("CAI_")]:
        monkeypatch.delenv(var)
    return tmp_path


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_is_one_line(case: Case, here: Path, capsys: pytest.CaptureFixture[str]):
    _write(here, case.files)
    before = _tree(here)
    code = main(case.argv)
    _check(case, code, capsys.readouterr().err, before, _tree(here))


SUBPROCESS = ("cli-unknown-flag", "cli-out-of-range-rounds", "data-parquet-corrupt", "template-undefined-variable",
              "cli-no-stages", "export-half-finished", "backend-unreachable-run", "data-csv-no-prompt-column",
              "data-bad-line-3-of-5-run", "data-csv-ragged-row-label", "data-prompt-over-request-cap-run",
              "data-request-over-cap-mid-run")


@pytest.mark.parametrize("case", _params([c for c in CASES if c.id in SUBPROCESS]))
def test_bad_input_in_a_subprocess(case: Case, here: Path):
    """The real entry point: nothing but the one line on stderr (no traceback, no warning)."""
    _write(here, case.files)
    before = _tree(here)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAI_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "cai.cli", *case.argv], capture_output=True, text=True, cwd=here,
                       env=env, timeout=120)
    _check(case, r.returncode, r.stderr, before, _tree(here))


def test_bad_row_mid_stream_in_a_subprocess(here: Path):
    case = next(c for c in CASES if c.id == "data-jsonl-not-utf8-line-2")
    test_bad_input_in_a_subprocess(case, here)


def test_every_bad_record_is_named_in_one_message(here: Path, capsys: pytest.CaptureFixture[str]):
    """The plan reads every record before the first call: each bad one named (file:line), the
    first 20 of them, then a count."""
    for cid in ("data-three-bad-lines", "data-many-bad-lines"):
        case = next(c for c in CASES if c.id == cid)
        _write(here, case.files)
        assert main(case.argv) == 2
        err = capsys.readouterr().err
        if cid == "data-three-bad-lines":
            assert "p.jsonl:300: invalid JSON" in err and "p.jsonl:499: no prompt column" in err, err
        else:
            assert err.count("p.jsonl:") == 20 and err.strip().endswith("and 5 more"), err
        assert not (here / "out").exists()


def test_every_case_id_is_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# --- some rows failed: exit code 3, the failures file named -------------------------------------


def _failing(marker: str, *, text_only: bool = False):
    """A fake backend answer that fails every request whose last message contains ``marker``
    (with ``text_only``, only requests without log-probs: the naive judge's)."""
    real = fake.default_respond

    def respond(r: Request) -> Completion:
        hit = any(marker in m["content"] for m in r.messages)
        if hit and not (text_only and r.sampling.logprobs):
            return Completion(texts=[], error="scripted failure")
        return real(r)

    return respond


FAILING = PROMPTS + '{"prompt": "FAIL-ME please"}\n'
FAILING_PAIR = PAIR + PAIR.replace("pick a lock", "FAIL-ME")


@pytest.mark.parametrize(("argv", "data", "failures"), [
    (["revise", "p.jsonl", "-o", "out/r.jsonl", "--rounds", "1", *FAST], FAILING, "out/r.failures.jsonl"),
    (["label", "p.jsonl", "-o", "out/p.jsonl", "-k", "1", *FAST], FAILING_PAIR, "out/p.labels.failures.jsonl"),
    (["run", "--input", "p.jsonl", "-o", "out", *RUN], FAILING, "out/revisions.failures.jsonl"),
    (["eval-judge", "p.jsonl", "-o", "out", "-k", "1", *FAST], FAILING_PAIR, "out/judge.failures.jsonl"),
], ids=["revise", "label", "run", "eval-judge"])
def test_failed_rows_exit_3_and_name_the_failures_file(argv: list[str], data: str, failures: str, here: Path,
                                                       capsys, monkeypatch):
    monkeypatch.setattr(fake, "default_respond", _failing("FAIL-ME"))
    (here / "p.jsonl").write_text(data)
    assert main(argv) == EXIT_ROWS_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" not in err, err
    assert (here / failures).is_file() and failures in err, err


def test_naive_judge_failures_do_not_change_the_exit_status(here: Path, capsys, monkeypatch):
    monkeypatch.setattr(fake, "default_respond", _failing("FAIL-ME", text_only=True))
    (here / "p.jsonl").write_text(FAILING_PAIR)
    assert main(["eval-judge", "p.jsonl", "-o", "out", "-k", "1", *FAST]) == 0
    assert (here / "out" / "naive.failures.jsonl").is_file()


def test_all_rows_written_is_exit_0(here: Path):
    (here / "p.jsonl").write_text(PROMPTS)
    assert main(["revise", "p.jsonl", "-o", "out/r.jsonl", "--rounds", "1", *FAST]) == 0
    assert not (here / "out" / "r.failures.jsonl").exists()


def test_failed_rows_in_a_subprocess(here: Path):
    """Exit code 3 through the real process exit, with the fake backend failing one prompt."""
    (here / "p.jsonl").write_text(FAILING)
    code = ("import sys, cai.backends.fake as f; from tests.test_bad_inputs import _failing; "
            "f.default_respond = _failing('FAIL-ME'); from cai.cli import main; "
            "sys.exit(main(['revise', 'p.jsonl', '-o', 'out/r.jsonl', '--rounds', '1', '-b', 'fake', "
            "'--no-progress']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here, env=env, timeout=120)
    assert r.returncode == EXIT_ROWS_FAILED, r.stderr
    assert "Traceback" not in r.stderr and "listed in out/r.failures.jsonl" in r.stderr


def test_ctrl_c_is_130_with_one_line(here: Path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_revise", interrupted)
    (here / "p.jsonl").write_text(PROMPTS)
    assert main(["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]


def test_an_os_error_nobody_foresaw_is_one_line(here: Path, capsys, monkeypatch):
    """A full disk or a file removed mid-run: main() turns any OSError into one line naming the file."""
    def full(*a, **k):
        raise OSError(28, "No space left on device", str(here / "out" / "r.jsonl.part"))

    monkeypatch.setattr(pipeline, "run_revise", full)
    (here / "p.jsonl").write_text(PROMPTS)
    assert main(["revise", "p.jsonl", "-o", "out/r.jsonl", *FAST]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r.jsonl.part: No space left on device" in err[0]


def test_exit_codes_are_in_every_help(here: Path):
    from typer.main import get_command

    from cai.cli.app import app

    cmd = get_command(app)
    assert "Exit status" in (cmd.epilog or "")
    for name in ("revise", "label", "run", "eval-judge", "export", "report"):
        assert "3 some rows failed" in (cmd.commands[name].epilog or ""), name  # type: ignore[attr-defined]


# --- the Python API: the same checks once cai.pipeline calls cai.plan ------------------------

NOT_WIRED = "preflight not wired into cai.pipeline"


def _api_cases() -> list:
    def revise(**kw):
        return lambda root: pipeline.run_revise(str(root / "p.jsonl"), backend="fake", **kw)

    def label(**kw):
        return lambda root: pipeline.run_label(str(root / "p.jsonl"), backend="fake", **kw)

    def run(**kw):
        def go(root: Path):
            cfg = RunConfig.model_validate({"input": str(root / "p.jsonl"), "output": str(root / "out"),
                                            "backend": "fake", **kw})
            return pipeline.run_pipeline(cfg)
        return go

    out = "out/r.jsonl"
    return [
        ("revise-empty", "", revise(output=out), UsageError),
        ("revise-not-utf8", b"\xff\xfe\n", revise(output=out), InputError),
        ("revise-output-is-a-folder", PROMPTS, revise(output="out"), InputError),
        ("revise-output-under-a-file", PROMPTS, revise(output="p.jsonl/r.jsonl", cache="out/c.sqlite"), InputError),
        ("label-empty", "", label(output="out/p.jsonl"), UsageError),
        ("run-empty", "", run(), UsageError),
        ("run-no-stages", PROMPTS, run(revise={"enabled": False}, label={"enabled": False}), UsageError),
        ("run-not-utf8", b"\xff\xfe\n", run(), InputError),
    ]


@pytest.mark.parametrize(("data", "call", "error"), [pytest.param(*c[1:], id=c[0]) for c in _api_cases()])
def test_python_api_checks_before_any_file(data: str | bytes, call, error: type[CaiError], here: Path):
    (here / "out").mkdir()
    (here / "p.jsonl").write_bytes(data if isinstance(data, bytes) else data.encode())
    before = _tree(here)
    with pytest.raises(error):
        call(here)
    assert _tree(here) == before


def test_a_line_over_the_size_cap_is_named_without_reading_it_whole(here: Path, capsys: pytest.CaptureFixture[str]):
    """A line longer than --max-line-bytes (default 1 MB) is one of the plan's problems (file:line),
    read past in bounded chunks: a 20 MB line costs no 20 MB of memory."""
    import tracemalloc

    from cai.plan import scan

    big = json.dumps({"prompt": "x" * 20_000_000})
    rows = [json.dumps({"prompt": f"question {i}?"}) for i in range(500)]
    rows[2], rows[299] = big, "{not json"
    (here / "p.jsonl").write_text("\n".join(rows) + "\n")
    argv = ["run", "--input", "p.jsonl", "-o", "out", "-b", "fake", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "p.jsonl:3: over the line-size cap (1000000 bytes)" in err and "--max-line-bytes" in err, err
    assert "p.jsonl:300: invalid JSON" in err, err
    assert not (here / "out").exists()
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"p.jsonl:3: over the line-size cap \(1000 bytes\)"):
            scan(here / "p.jsonl", pairs=False, max_line=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert main([*argv, "--max-line-bytes", "30000000"]) == 2  # a larger cap: the line is read, but its
    err = capsys.readouterr().err  # 20 MB prompt makes a request over the template cap (1,000,000 characters)
    assert "p.jsonl:3: the critique request made of this record is over the limit of 1,000,000" in err, err
    assert "over the line-size cap" not in err and "p.jsonl:300: invalid JSON" in err, err
    assert not (here / "out").exists()


def test_a_record_is_rendered_whole_only_when_large_and_refused_only_over_the_cap():
    """``plan.fits``: a prompt of 200,000 characters is rendered and passes; one of 1,100,000 is
    named with the stage whose request passes the cap; a pair's two answers count too."""
    from cai.constitution import load_constitution
    from cai.inputs import PromptRow
    from cai.plan import fits
    from cai.stages.pairs import Pair
    from cai.templates import Templates

    check = fits(Templates(None), load_constitution(None), ["generate", "critique", "revise", "judge"])
    check(PromptRow("a", [{"role": "user", "content": "x" * 200_000}]), "p.jsonl:1")
    with pytest.raises(InputError, match=r"^p.jsonl:2: the critique request .* over the limit of 1,000,000"):
        check(PromptRow("b", [{"role": "user", "content": "x" * 1_100_000}]), "p.jsonl:2")
    check(Pair("c", [{"role": "user", "content": "q"}], "a" * 300_000, "b" * 300_000), "p.jsonl:3")
    with pytest.raises(InputError, match=r"^p.jsonl:4: the judge request"):
        check(Pair("d", [{"role": "user", "content": "q"}], "a" * 600_000, "b" * 600_000), "p.jsonl:4")
