"""``Templates``: a stage's prompt files, found, rendered in the capped sandbox and put in chat order."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes

from ..backends.base import Message
from ..errors import TemplateError
from ..resources import data_path
from .examples import (
    JUDGE_EXAMPLE_CTX,
    JUDGE_STAGES,
    ROLES,
    STAGES,
    example_turns,
    mentions_context,
    mentions_examples,
)
from .fences import fenced, format_conversation, with_system
from .sandbox import CappedSandbox, render_capped, render_error


def _names_critique(node: nodes.Node) -> bool:
    return any(n.name == "critique" for n in node.find_all(nodes.Name))


class Templates:
    def __init__(self, folder: str | Path | None = None) -> None:
        self.user_folder = Path(folder) if folder is not None else None
        if self.user_folder is not None and not self.user_folder.is_dir():
            raise TemplateError("templates folder not found", file=str(self.user_folder))
        dirs = [str(d) for d in (self.user_folder, data_path("prompts")) if d is not None]  # the user's first
        self.env = CappedSandbox(loader=jinja2.FileSystemLoader(dirs))
        self.env.filters.update(conversation=format_conversation, fenced=fenced)
        self._cache: dict[str, jinja2.Template | None] = {}
        self._text: dict[str, str | None] = {}  # template -> its text, when it is plain text
        self._continues: bool | None = None  # these three: see _stage_reads
        self._own_examples: dict[str, bool] = {}
        self._reads_critique: bool | None = None
        self._turns: dict[tuple[str, int], tuple[Any, list[tuple[str, str]]]] = {}

    def _get(self, name: str) -> jinja2.Template | None:
        if name not in self._cache:
            try:
                self._cache[name] = self.env.get_template(name)
            except jinja2.TemplateNotFound:
                self._cache[name] = None
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"template syntax error: {e.message}", file=e.filename or name,
                                    line=e.lineno) from None
        return self._cache[name]

    def _source(self, name: str) -> str | None:
        """A template's source, as the loader finds it; None when there is no such file."""
        try:
            return self.env.loader.get_source(self.env, name)[0]  # type: ignore[union-attr]
        except jinja2.TemplateNotFound:
            return None

    def has(self, stage: str, role: str = "user") -> bool:
        return self._get(f"{stage}.{role}.j2") is not None

    def render_text(self, stage: str, role: str, **ctx: Any) -> str | None:
        """Render one file; ``None`` when that (optional) file does not exist."""
        name = f"{stage}.{role}.j2"
        tpl = self._get(name)
        if tpl is None:
            return None
        if name not in self._text:
            self._text[name] = self._plain_text(name, tpl)
        text = self._text[name]
        if text is not None:
            return text
        try:
            return render_capped(tpl, ctx, tpl.filename or name).strip()
        except Exception as e:
            raise render_error(e, ctx, tpl.filename or name) from None

    def _plain_text(self, name: str, tpl: jinja2.Template) -> str | None:
        """What a template of plain text renders to (an answer prefix such as "The answer is: (",
        a system prompt: no variable, tag or expression), rendered once; None for any other."""
        tree = self.env.parse(self._source(name) or "", name)
        if not all(isinstance(n, (nodes.Output, nodes.TemplateData)) for n in tree.find_all(nodes.Node)):
            return None
        return render_capped(tpl, {}, tpl.filename or name).strip()

    def generate_messages(self, prompt: Sequence[Message]) -> list[Message]:
        """The first-answer request: the ``generate`` system prompt (when there is one), then the prompt."""
        return with_system(self.render_text("generate", "system"), prompt)

    def messages(self, stage: str, **ctx: Any) -> list[Message]:
        """Render a stage's request: the system message (if any), the principle's few-shot
        examples as chat turns, the live user message, and the assistant prefix (if any)."""
        if not self.has(stage, "user"):
            raise TemplateError(f"no template {stage}.user.j2", file=str(self.user_folder or "prompts"))
        if stage == "revise" and self.revision_continues():
            return self._continued_revision(ctx)
        texts = {role: self.render_text(stage, role, **ctx) for role in ROLES}
        out = with_system(texts["system"], self.example_turns(stage, **ctx))
        return out + [{"role": r, "content": texts[r]} for r in ("user", "assistant") if texts[r]]  # type: ignore[typeddict-item]

    def revision_messages(self, critique_request: Sequence[Message], **ctx: Any) -> list[Message]:
        """``messages("revise", **ctx)``, given ``critique_request``: what ``messages("critique")``
        rendered for this context less ``critique``. A revision that continues the critique's chat
        starts with exactly those messages (the critique templates do not read ``critique``, the
        one name the revision's context adds), so they are not rendered a second time."""
        if self.has("revise", "user") and self.revision_continues() and not self._critique_reads_critique():
            return self._continued_revision(ctx, list(critique_request))
        return self.messages("revise", **ctx)

    def _critique_reads_critique(self) -> bool:
        if self._reads_critique is None:
            self._reads_critique = self._stage_reads("critique", _names_critique)
        return self._reads_critique

    def _continued_revision(self, ctx: dict[str, Any], head: list[Message] | None = None) -> list[Message]:
        """The critique's request as sent (``head``, when the caller has it), the critique as the
        assistant's turn (after the critique's answer prefix, if any), then the revision request
        (package doc)."""
        if "critique" not in ctx:  # never sent without it: the chat would end at the critique request
            raise TemplateError("a revision continues its critique: no critique given",
                                file=self._get("revise.user.j2").filename)  # type: ignore[union-attr]
        out = self.messages("critique", **ctx) if head is None else head
        prefix = out.pop()["content"] if out and out[-1]["role"] == "assistant" else ""
        out.append({"role": "assistant", "content": prefix + str(ctx["critique"])})
        for role in ("user", "assistant"):
            if text := self.render_text("revise", role, **ctx):
                out.append({"role": role, "content": text})
        return out

    def revision_continues(self) -> bool:
        """Whether a revision continues the critique's chat: the revise templates read none of
        ``conversation``, ``response`` and ``critique`` (package doc)."""
        if self._continues is None:
            self._continues = not self._stage_reads("revise", mentions_context)
        return self._continues

    def handles_examples(self, stage: str) -> bool:
        """Whether the stage's own templates render the principle's examples (then no turns)."""
        if stage not in self._own_examples:
            self._own_examples[stage] = self._stage_reads(stage, mentions_examples)
        return self._own_examples[stage]

    def _stage_reads(self, stage: str, test: Callable[[nodes.Node], bool]) -> bool:
        """Whether one of a stage's templates passes ``test`` (each is asked once: on every call, the
        answers above are attributes)."""
        names = [f"{stage}.{role}.j2" for role in ROLES]
        return any(self._get(n) is not None and self._reads(n, test, set()) for n in names)

    def _reads(self, name: str, test: Callable[[nodes.Node], bool], seen: set[str]) -> bool:
        """Whether a template, or one it includes, extends or imports, passes ``test``."""
        if name in seen or (src := self._source(name)) is None:
            return False
        seen.add(name)
        tree = self.env.parse(src, name)
        if test(tree):
            return True
        for node in tree.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)):
            target = getattr(node, "template", None)
            if isinstance(target, nodes.Const) and isinstance(target.value, str) \
                    and self._reads(target.value, test, seen):
                return True
        return False

    def example_turns(self, stage: str, **ctx: Any) -> list[Message]:
        """The principle's few-shot examples for ``stage``, as chat turns (see the package doc)."""
        p = ctx.get("principle")
        if p is None or self.handles_examples(stage):
            return []
        # The turns depend on the stage and the principle only (a judge example replaces the live
        # context, unless the context holds more: CoT answers carry the live reasoning), so they
        # are made once per principle, not on every call. The principle is kept with its turns,
        # so that its id cannot be reused by another object while they are cached.
        key = (stage, id(p))
        cacheable = stage not in JUDGE_STAGES or ctx.keys() <= JUDGE_EXAMPLE_CTX
        hit = self._turns.get(key) if cacheable else None
        if hit is None or hit[0] is not p:
            hit = (p, example_turns(self, stage, p, ctx))
            if cacheable:
                self._turns[key] = hit
        return [{"role": r, "content": c} for r, c in hit[1]]  # type: ignore[typeddict-item]

    def digest(self, stages: Sequence[str] = STAGES) -> str:
        """Hash of the template sources that the given stages resolve to (for provenance)."""
        h = hashlib.sha256()
        for name in (f"{stage}.{role}.j2" for stage in stages for role in ROLES):
            if (src := self._source(name)) is not None:
                h.update(f"{name}\0{src}\0".encode())
        return h.hexdigest()
