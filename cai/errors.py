"""One small tree of errors. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


class CaiError(Exception):
    """Base of every error cai raises on purpose. ``str(err)`` is the one-line message."""

    exit_code = 2


class ConfigError(CaiError):
    """A bad input file: constitution, run config, template. Names file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file, self.line, self.field, self.hint = file, line, field, hint
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        what = f"{field}: " if field else ""
        tail = f" ({hint})" if hint else ""
        super().__init__(f"{where}{what}{message}{tail}")


class TemplateError(ConfigError):
    """A Jinja2 template that fails to load or render."""


class InputError(CaiError):
    """A bad dataset or record: missing column, unreadable file, malformed transcript."""


class BackendError(CaiError):
    """A model backend that cannot be reached, is misconfigured, or lacks a needed feature."""


class ModelNotPreparedError(BackendError):
    """The embedded model folder does not exist yet: run `cai prepare-model`."""


class ExportError(CaiError):
    """The export could not be written or pushed."""
