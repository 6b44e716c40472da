"""`--batch-files DIR`: batch mode with files instead of a server, for a run in steps.

Each wave's requests are written to ``DIR/wave-NNN.requests.jsonl`` (OpenAI Batch-API lines, as
``vllm run-batch -i`` reads them; at most ``max_requests`` a file) and the run stops with
``WaveWritten`` (exit 4), naming the file and where its answers go: ``DIR/wave-NNN.output.jsonl``,
in the Batch API's output format (``vllm run-batch -o`` writes it; error lines may be in the same
file or in ``wave-NNN.errors.jsonl``). Rerun the same command with the output there: every output
file of DIR is read, its answers go through the call cache like any call, and the run goes on to
the next wave, until it completes. A request with no line in any output (a job cut short) goes
into the next wave; a line with an error fails its row (exit 3): take it out of the output file to
have it asked again.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from ..errors import BackendError, WaveWritten
from ..types import Completion, Request
from .waves import WaveBackend, read_answer

_WAVE = re.compile(r"^wave-(\d{3,})\.(requests|output|errors)\.jsonl$")
_FORMAT = "the Batch API output format is one JSON object a line: {custom_id, response: {status_code, body}, error}"


class BatchFilesBackend(WaveBackend):
    """Waves written to ``folder`` for the user to run; their answers read back from it."""

    def __init__(self, model: str, key: Callable[[str, Request], str], *, folder: str | Path, server: str = "auto",
                 extra_body: dict[str, Any] | None = None, max_requests: int = 50_000, quiet: float = 1.0) -> None:
        super().__init__(model, key, server=server, extra_body=extra_body, max_requests=max_requests, quiet=quiet)
        self.folder = Path(folder)
        self.where = {"files": str(self.folder)}
        self._answers: dict[str, dict[str, Any]] | None = None
        self.written: list[Path] = []
        self.stopped: WaveWritten | None = None  # set once a wave is written: the run stops

    async def generate(self, request: Request) -> Completion:
        if self.stopped is not None:
            raise self.stopped
        return await super().generate(request)

    def files(self) -> dict[int, dict[str, Path]]:
        """The wave files of the folder by number: ``{3: {"requests": ..., "output": ...}}``."""
        found: dict[int, dict[str, Path]] = {}
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                if m := _WAVE.match(p.name):
                    found.setdefault(int(m[1]), {})[m[2]] = p
        return found

    def answers(self) -> dict[str, dict[str, Any]]:
        """Every line of every output (and errors) file, by custom_id (read once)."""
        if self._answers is None:
            self._answers = {}
            for _, kinds in sorted(self.files().items()):
                for kind in ("errors", "output"):  # an answer wins over an error line for the same id
                    if kind in kinds:
                        self._answers.update(_read(kinds[kind]))
        return self._answers

    async def _known(self, key: str, req: Request) -> Completion | None:
        line = self.answers().get(key)
        return read_answer(line, req, self.learned, self.model_id, self.extra_body) if line else None

    async def _flush(self) -> None:
        """Once the requests stop coming: every waiting request into wave files, and stop."""
        while self._pending:
            wait = self.due() - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self.stopped = self._write(dict(self._pending))
            self._pending.clear()
            self.settle(list(self._waiting), self.stopped)

    def _write(self, pending: dict[str, Request]) -> WaveWritten:
        files = self.files()
        for kinds in files.values():  # unanswered waves of an earlier stop: written again, as they are now
            if "output" not in kinds and "requests" in kinds:
                kinds["requests"].unlink()
        n = max((k for k, kinds in files.items() if "output" in kinds), default=0) + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        keys, written = list(pending), []
        for i in range(0, len(keys), self.max_requests):
            path = self.folder / f"wave-{n:03d}.requests.jsonl"
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("wb") as f:
                for k in keys[i:i + self.max_requests]:
                    f.write(orjson.dumps(self.line(k, pending[k])) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            written.append(path)
            n += 1
        self.written, self.waves, self.sent = written, self.waves + len(written), self.sent + len(keys)
        first = written[0]
        out = first.with_name(first.name.replace(".requests.", ".output."))
        more = f" (and {len(written) - 1} more wave files after it)" if len(written) > 1 else ""
        return WaveWritten(
            f"{len(keys):,} requests written to {first}{more}, OpenAI Batch API lines; run them (e.g. `vllm run-batch "
            f"-i {first} -o {out} --model {self.model_id}`, or a provider's batch tool), put the output (Batch API "
            f"output lines) at {out}, then rerun this command to go on")


def _read(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except ValueError as e:
                raise BackendError(f"{path}:{i}: not a JSON line ({e}); {_FORMAT}") from None
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                raise BackendError(f"{path}:{i}: no custom_id; {_FORMAT}")
            out[line["custom_id"]] = line
    return out
