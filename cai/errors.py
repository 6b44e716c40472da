"""One small tree of errors, and the exit codes of every command.

The CLI turns each ``CaiError`` into one line on stderr and its ``exit_code``; usage errors of
the command line itself (unknown flag, missing argument, out-of-range value) get the same
one-line treatment and exit code 2.
"""

from __future__ import annotations

# --- exit codes: the one place they are defined ---------------------------------------------

EXIT_OK = 0
"""Every row was written (or the command had no rows to write and succeeded)."""
EXIT_BUG = 1
"""An unexpected error: a bug in cai. A traceback is printed; please report it."""
EXIT_USAGE = 2
"""Bad input or usage: a bad flag, file, config, constitution or template, an unreachable
server, an output path that cannot be written, or a run that would do nothing. One line on
stderr; nothing was written when the error is found before the work starts."""
EXIT_ROWS_FAILED = 3
"""The command finished, but some rows failed; they are listed in the failures file named on
stderr (``NAME.failures.jsonl`` beside the output). Rerunning the same command retries them."""
EXIT_WAVE_WRITTEN = 4
"""`--batch-files DIR`: the next wave's requests were written to DIR (named on stderr) and the run
stopped; run them anywhere, put the output file beside them, and rerun the same command."""
EXIT_INTERRUPTED = 130
"""Interrupted (Ctrl-C). Rerunning the same command resumes where it stopped."""
EXIT_TERMINATED = 143
"""Terminated (SIGTERM: 128 + 15), as Ctrl-C otherwise: rerunning the same command resumes."""

EXIT_BROKEN_PIPE = 141
"""stdout was closed by its reader (``cai ... | head``): 128 + SIGPIPE, as a shell reports it."""

EXIT_CODES = {
    EXIT_OK: "every row written",
    EXIT_USAGE: "bad input or usage (one line on stderr)",
    EXIT_ROWS_FAILED: "some rows failed (listed in the failures file named on stderr)",
    EXIT_WAVE_WRITTEN: "--batch-files: a wave of requests written, rerun once answered",
    EXIT_INTERRUPTED: "interrupted (rerun the same command to resume; 143: by SIGTERM)",
    EXIT_BUG: "a bug in cai (traceback printed: please report it)",
}

EXIT_CODES_HELP = "**Exit status**: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."
"""The exit codes as one paragraph, for the epilog of each command's ``--help``."""


class CaiError(Exception):
    """Base of every error cai raises on purpose. ``str(err)`` is the one-line message."""

    exit_code = EXIT_USAGE


class ConfigError(CaiError):
    """A bad input file: constitution, run config, template. Names file, line and field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None,
                 hint: str | None = None) -> None:
        self.file, self.line, self.field, self.hint = file, line, field, hint
        where = (f"{file}:{line}: " if line else f"{file}: ") if file else ""
        what, tail = (f"{field}: " if field else ""), (f" ({hint})" if hint else "")
        super().__init__(f"{where}{what}{message}{tail}")


class TemplateError(ConfigError):
    """A Jinja2 template that fails to load or render."""


class InputError(CaiError):
    """A bad dataset or record: missing column, unreadable file, malformed transcript; or an
    output path that cannot be written."""


class UsageError(CaiError):
    """A command that would do nothing (an empty input, every stage disabled) or flags that
    contradict each other."""


class BackendError(CaiError):
    """A model backend that cannot be reached, is misconfigured, or lacks a needed feature."""


class ModelNotPreparedError(BackendError):
    """The embedded model folder does not exist yet: run `cai prepare-model`."""


class ExportError(CaiError):
    """The export could not be written or pushed."""


class WaveWritten(BackendError):
    """`--batch-files`: the next wave's requests are written; the run stops until they are answered."""

    exit_code = EXIT_WAVE_WRITTEN
    label = "waiting"
