"""Jinja2 prompt templates, rendered in a sandbox with StrictUndefined.

A stage's prompt is made of up to three files in a templates folder:
``{stage}.system.j2`` (optional), ``{stage}.user.j2`` and ``{stage}.assistant.j2`` (optional:
a prefix the model continues, such as "The answer is: ("). A user folder given with
``--templates DIR`` is searched first, then the templates shipped with cai, so a user can
override one file and keep the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .backends.base import Message
from .errors import TemplateError
from .resources import data_path

ROLES = ("system", "user", "assistant")
STAGES = ("generate", "critique", "revise", "judge", "judge_cot", "judge_cot_answer")


def format_conversation(messages: Sequence[Message], user: str = "User", assistant: str = "Assistant") -> str:
    """Render chat messages as a plain transcript (``User: ...`` / ``Assistant: ...``)."""
    names = {"user": user, "assistant": assistant, "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def with_system(system: str | None, prompt: Sequence[Message]) -> list[Message]:
    """``prompt`` with a system message first, when ``system`` is not empty."""
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    return head + list(prompt)


class Templates:
    def __init__(self, folder: str | Path | None = None) -> None:
        self.user_folder = Path(folder) if folder is not None else None
        if self.user_folder is not None and not self.user_folder.is_dir():
            raise TemplateError("templates folder not found", file=str(self.user_folder))
        dirs = [str(data_path("prompts"))]
        if self.user_folder is not None:
            dirs.insert(0, str(self.user_folder))
        self.env = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(dirs),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )
        self.env.filters["conversation"] = format_conversation
        self._cache: dict[str, jinja2.Template | None] = {}

    def _get(self, name: str) -> jinja2.Template | None:
        if name not in self._cache:
            try:
                self._cache[name] = self.env.get_template(name)
            except jinja2.TemplateNotFound:
                self._cache[name] = None
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(
                    f"template syntax error: {e.message}", file=e.filename or name, line=e.lineno
                ) from None
        return self._cache[name]

    def source_path(self, name: str) -> str:
        _src, filename, _ = self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
        return filename or name

    def has(self, stage: str, role: str = "user") -> bool:
        return self._get(f"{stage}.{role}.j2") is not None

    def render_text(self, stage: str, role: str, **ctx: Any) -> str | None:
        """Render one file; ``None`` when that (optional) file does not exist."""
        name = f"{stage}.{role}.j2"
        tpl = self._get(name)
        if tpl is None:
            return None
        try:
            return tpl.render(**ctx).strip()
        except jinja2.UndefinedError as e:
            raise TemplateError(
                f"{e.message}; variables available: {', '.join(sorted(ctx))}",
                file=self.source_path(name), line=_error_line(e, name),
            ) from None
        except jinja2.TemplateError as e:
            raise TemplateError(str(e), file=self.source_path(name), line=_error_line(e, name)) from None

    def generate_messages(self, prompt: Sequence[Message]) -> list[Message]:
        """The first-answer request: the ``generate`` system prompt (when there is one), then the prompt."""
        return with_system(self.render_text("generate", "system"), prompt)

    def messages(self, stage: str, **ctx: Any) -> list[Message]:
        """Render a stage's system/user/assistant files into chat messages."""
        if not self.has(stage, "user"):
            raise TemplateError(f"no template {stage}.user.j2", file=str(self.user_folder or "prompts"))
        out: list[Message] = []
        for role in ROLES:
            text = self.render_text(stage, role, **ctx)
            if text:
                out.append({"role": role, "content": text})  # type: ignore[typeddict-item]
        return out

    def digest(self, stages: Sequence[str] = STAGES) -> str:
        """Hash of the template sources that the given stages resolve to (for provenance)."""
        h = hashlib.sha256()
        for stage in stages:
            for role in ROLES:
                name = f"{stage}.{role}.j2"
                try:
                    src, _, _ = self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
                except jinja2.TemplateNotFound:
                    continue
                h.update(f"{name}\0{src}\0".encode())
        return h.hexdigest()


def _error_line(exc: BaseException, name: str) -> int | None:
    """Find the template line of a render error from the traceback."""
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name) or tb.tb_frame.f_globals.get("__jinja_template__"):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
