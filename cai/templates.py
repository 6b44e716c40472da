"""Jinja2 prompt templates, rendered in a capped sandbox with StrictUndefined.

A stage's prompt is made of up to three files in a templates folder:
``{stage}.system.j2`` (optional), ``{stage}.user.j2`` and ``{stage}.assistant.j2`` (optional:
a prefix the model continues, such as "The answer is: ("). A user folder given with
``--templates DIR`` is searched first, then the templates shipped with cai, so a user can
override one file and keep the rest.

Few-shot examples. A principle's examples are sent as real chat turns between the system
message and the live request that the stage's templates render (the CAI paper's and Hugging
Face's open CAI recipe's format, prompt included):

- critique: user ``example.prompt``, assistant ``example.response``, user the critique request
  (``principle.critique``), assistant ``example.critique`` (and the revise stage's two more
  turns when the revision continues the critique's chat, below);
- revise: the same four turns, then user the revision request (``principle.revision``),
  assistant ``example.revision``;
- judge, judge_cot, judge_cot_answer: for each of ``principle.judge_examples``, user the stage's
  own user template rendered on the example (its prompt, response_a, response_b), assistant
  the answer prefix (``judge.assistant.j2``, or ``judge_cot_answer.assistant.j2`` with the
  example's reasoning for the CoT stages) followed by the answer letter. The CoT stages use
  only the examples that have a ``reasoning``.

How a revision is asked. When the revise templates read none of ``conversation``, ``response``
and ``critique`` (the shipped ``revise.user.j2`` shows only the revision request), the revision
continues the critique's chat, as in the CAI paper: the critique request exactly as sent, the
critique as the assistant's turn, then the revision request. The critique's example turns then
carry each example's revision too, so that a revision request begins with every token of its
critique request and an engine's prefix cache reuses the whole critique (prompt and answer).
A revise template that shows the context itself (cai 0.1's did) is sent on its own, after the
revise example turns, as before.

A stage whose templates use ``principle.examples`` or ``principle.judge_examples`` themselves
(as the templates of cai 0.x did) renders the examples its own way and gets no example turns,
so that an older template folder keeps sending exactly what it sent.

Caps. The sandbox refuses, with a ``TemplateError`` naming the file and line, a template that
would build a string or list over ``MAX_CHARS`` items (``'a' * 10**10``, ``x ~ x`` doubling in
a loop, ``s.ljust(10**9)``, ``|center(10**9)``, ``|join`` of a huge list...), an integer over
``MAX_INT_BITS`` bits, or a ``range`` of more than ``MAX_RANGE`` numbers; and every rendered
message is capped at ``MAX_CHARS`` characters. These guard against mistakes in a template, not
against a template that means to burn CPU time: a template is configuration the user trusts.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import string
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import do_batch, do_center, do_format, do_indent, do_replace, sync_do_join, sync_do_slice
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import generate_lorem_ipsum

from .backends.base import Message
from .errors import CaiError, TemplateError
from .resources import data_path

ROLES = ("system", "user", "assistant")
STAGES = ("generate", "critique", "revise", "judge", "judge_cot", "judge_cot_answer")
JUDGE_STAGES = ("judge", "judge_cot", "judge_cot_answer")

MAX_CHARS = 1_000_000  # the most characters in a rendered message, or in any string or list built on the way
MAX_RANGE = 100_000  # the most numbers in a template's range()
MAX_INT_BITS = 16_384  # the biggest integer a template may compute (about 4,900 digits)

# Tags whose opening or closing form is neutralised inside any fenced text (besides the fence's own).
FENCE_NAMES = ("conversation", "response", "critique", "revision", "reasoning", "example")
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# The context a judge example replaces with its own (with the principle, all that its turns see
# in the judge and judge_cot stages' contexts).
_JUDGE_EXAMPLE_CTX = frozenset({"principle", "conversation", "response_a", "response_b"})


def format_conversation(messages: Sequence[Message], user: str = "User", assistant: str = "Assistant") -> str:
    """Render chat messages as a plain transcript (``User: ...`` / ``Assistant: ...``)."""
    names = {"user": user, "assistant": assistant, "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def neutralise_tags(text: str, *names: str) -> str:
    """``text`` with every ``<name`` and ``</name`` (any case, spaces allowed) turned into
    ``&lt;name`` / ``&lt;/name``, so that it cannot open or close a fence of one of ``names``."""
    return _tag_opener(names).sub("&lt;", text)


@functools.lru_cache(maxsize=256)
def _tag_opener(names: tuple[str, ...]) -> re.Pattern[str]:
    """The ``<`` that opens one of ``names``, compiled once per set of names: building the
    pattern cost more than applying it, on every fenced text of every prompt."""
    alts = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"<(?=\s*/?\s*(?:{alts}))", re.IGNORECASE)


def fenced(text: Any, tag: str) -> str:
    """``<tag>`` + text + ``</tag>`` on their own lines; the text cannot close the fence.

    Inside the text, any opening or closing form of ``tag`` (and of the other fence names cai
    uses: conversation, response, response_a, critique, ...) is neutralised (``<`` becomes
    ``&lt;``), so a response that writes ``</response_a>`` and then its own instructions stays
    inside its fence.
    """
    if not isinstance(tag, str) or not _TAG_NAME.match(tag):
        raise SecurityError(f"fenced(): bad tag name {tag!r} (letters, digits, _ . -)")
    body = neutralise_tags(str(text), tag, *FENCE_NAMES)
    return f"<{tag}>\n{body}\n</{tag}>"


def with_system(system: str | None, prompt: Sequence[Message]) -> list[Message]:
    """``prompt`` with a system message first, when ``system`` is not empty."""
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    return head + list(prompt)


# --- the capped sandbox -----------------------------------------------------------------------

_SIZED = (str, bytes, list, tuple)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")


def _too_big(n: int, what: str) -> None:
    if n > MAX_CHARS:
        unit = "items" if what.endswith(("list", "batch", "slices")) else "characters"
        raise SecurityError(f"the template would make {what} of {n:,} {unit}, over the limit of {MAX_CHARS:,}")


def _kind(x: Any) -> str:
    return "a string" if isinstance(x, (str, bytes)) else "a list"


def _int_cap(bits: float) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError(f"the template would compute a number of about {int(bits):,} bits, over the "
                            f"limit of {MAX_INT_BITS:,}")


def _ints(args: Iterable[Any]) -> list[int]:
    return [a for a in args if isinstance(a, int)]


def _check_printf(fmt: str, args: Any) -> None:
    """Refuse ``'%10000000s' % x`` and ``'%*s' % (10**9, x)``."""
    star = False
    for width, prec in _PRINTF.findall(fmt):
        for x in (width, prec):
            if x == "*":
                star = True
            elif x:
                _too_big(int(x), "a padded field")
    if star:
        vals = args if isinstance(args, tuple) else (args,)
        for n in _ints(vals):
            _too_big(abs(n), "a padded field")


def _check_format(fmt: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Refuse ``'{:>10000000}'.format(x)`` (and a nested width given as an argument)."""
    nested = False
    for _lit, _field, spec, _conv in string.Formatter().parse(fmt):
        if spec:
            for num in re.findall(r"\d+", spec):
                _too_big(int(num), "a padded field")
            nested = nested or "{" in spec
    if nested:
        for n in _ints([*args, *kwargs.values()]):
            _too_big(abs(n), "a padded field")


def _check_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Bound methods of strings that can grow them: check the size they would make. Returns the
    arguments to call with (an iterator given to ``join`` is read into a list first)."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, (str, bytes)):
        return args
    name = getattr(obj, "__name__", "")
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        _too_big(args[0], "a string")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            _too_big(len(owner) + tabs * size, "a string")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)) and isinstance(args[1], type(owner)):
        count = owner.count(args[0]) if args[0] else len(owner) + 1  # type: ignore[arg-type]
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        _too_big(len(owner) + count * max(0, len(args[1]) - len(args[0])), "a string")
    elif name == "join" and args:
        items = list(args[0])
        _too_big(sum(len(x) for x in items if isinstance(x, _SIZED)) + len(owner) * max(0, len(items) - 1),
                 "a string")
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, _SIZED)), default=1)
        _too_big(len(owner) * max(1, longest), "a string")
    return args


class _CappedCodeGenerator(CodeGenerator):
    """Compiles ``~`` to ``environment.call_concat`` so that its size is checked."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.call_concat(context, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class CappedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with caps on what a template may build (see the module doc)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CappedCodeGenerator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals["range"] = capped_range
        self.globals["lipsum"] = capped_lipsum
        self.filters.update({
            "center": _capped_center, "indent": _capped_indent, "format": _capped_format,
            "replace": _capped_replace, "join": _capped_join, "slice": _capped_slice, "batch": _capped_batch,
        })

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            if isinstance(left, _SIZED) and isinstance(right, int):
                _too_big(len(left) * right, _kind(left))
            elif isinstance(right, _SIZED) and isinstance(left, int):
                _too_big(len(right) * left, _kind(right))
            elif isinstance(left, int) and isinstance(right, int):
                _int_cap(left.bit_length() + right.bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _int_cap(right * math.log2(abs(left)))
        elif operator == "+":
            if isinstance(left, _SIZED) and isinstance(right, _SIZED):
                _too_big(len(left) + len(right), _kind(left))
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return super().call_binop(context, operator, left, right)

    def call_concat(self, context: jinja2.runtime.Context, items: tuple[Any, ...]) -> Any:
        """``a ~ b ~ c`` (compiled by ``_CappedCodeGenerator``)."""
        parts = [x if isinstance(x, str) else str(x) for x in items]
        _too_big(sum(len(p) for p in parts), "a string")
        return markup_join(items) if context.eval_ctx.autoescape else str_join(parts)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"{__obj!r} is not safely callable")
        args = _check_method(__obj, args, kwargs)
        return __context.call(__obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            if is_map and len(args) == 1 and isinstance(args[0], dict):
                _check_format(fmt, (), args[0])
            else:
                _check_format(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        return functools.update_wrapper(checked, value)




def capped_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of {len(rng):,} numbers, over the limit of {MAX_RANGE:,}")
    return rng


def capped_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if n * max > MAX_CHARS // 8:
        raise SecurityError(f"lipsum(n={n}, max={max}) is too long")
    return generate_lorem_ipsum(n, html, min, max)


def _capped_center(value: Any, width: int = 80) -> str:
    if isinstance(width, int):
        _too_big(width, "a string")
    return do_center(value, width)


def _capped_indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    if isinstance(width, int):
        _too_big(width * (str(s).count("\n") + 1) + len(str(s)), "a string")
    elif isinstance(width, str):
        _too_big(len(width) * (str(s).count("\n") + 1) + len(str(s)), "a string")
    return do_indent(s, width, first, blank)


def _capped_format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_printf(str(value), kwargs or tuple(args))
    return do_format(value, *args, **kwargs)


@jinja2.pass_eval_context
def _capped_replace(eval_ctx: Any, s: str, old: str, new: str, count: int | None = None) -> str:
    text, o, n = str(s), str(old), str(new)
    times = text.count(o) if o else len(text) + 1
    if count is not None and count >= 0:
        times = min(times, count)
    _too_big(len(text) + times * max(0, len(n) - len(o)), "a string")
    return do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _capped_join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    items = list(value)
    if attribute is None:
        _too_big(sum(len(x) if isinstance(x, str) else len(str(x)) for x in items)
                 + len(str(d)) * max(0, len(items) - 1), "a string")
        return sync_do_join(eval_ctx, items, d)
    out = sync_do_join(eval_ctx, items, d, attribute)
    _too_big(len(out), "a string")
    return out


def _capped_slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    if isinstance(slices, int):
        _too_big(slices, "a list")
    return sync_do_slice(value, slices, fill_with)


def _capped_batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    if isinstance(linecount, int):
        _too_big(linecount, "a batch")
    return do_batch(value, linecount, fill_with)


# --- templates ------------------------------------------------------------------------------


# The context a revise template that continues the critique's chat does without (module doc).
_REVISE_CONTEXT = frozenset({"conversation", "response", "critique"})


def _mentions_context(node: nodes.Node) -> bool:
    """Whether a template reads any of the variables that show the conversation under revision."""
    return any(n.name in _REVISE_CONTEXT and n.ctx == "load" for n in node.find_all(nodes.Name))


def _mentions_examples(node: nodes.Node) -> bool:
    """Whether a template reads ``x.examples`` / ``x.judge_examples`` (or ``x['examples']``)."""
    for n in node.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(n, nodes.Getattr) and n.attr in ("examples", "judge_examples"):
            return True
        if isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value in (
                "examples", "judge_examples"):
            return True
    return False


class Templates:
    def __init__(self, folder: str | Path | None = None) -> None:
        self.user_folder = Path(folder) if folder is not None else None
        if self.user_folder is not None and not self.user_folder.is_dir():
            raise TemplateError("templates folder not found", file=str(self.user_folder))
        dirs = [str(data_path("prompts"))]
        if self.user_folder is not None:
            dirs.insert(0, str(self.user_folder))
        self.env = CappedSandbox(
            loader=jinja2.FileSystemLoader(dirs),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )
        self.env.filters["conversation"] = format_conversation
        self.env.filters["fenced"] = fenced
        self._cache: dict[str, jinja2.Template | None] = {}
        self._own_examples: dict[str, bool] = {}
        self._continues: bool | None = None
        self._text: dict[str, str | None] = {}  # template -> its text, when it is plain text
        self._turns: dict[tuple[str, int], tuple[Any, list[tuple[str, str]]]] = {}

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
        """The file a template name resolves to (looked up once: every render names it on error)."""
        paths = self.__dict__.setdefault("_paths", {})
        if name not in paths:
            _src, filename, _ = self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
            paths[name] = filename or name
        return str(paths[name])

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
        file = self.source_path(name)
        try:
            return _render_capped(tpl, ctx, file).strip()
        except CaiError:
            raise
        except jinja2.UndefinedError as e:
            message = f"{e.message}; variables available: {', '.join(sorted(ctx))}"
            err: BaseException = e
        except jinja2.TemplateError as e:
            message, err = _one_line(str(e)), e
        except RecursionError as e:
            message, err = "recursion too deep (a macro or include that calls itself?)", e
        except Exception as e:  # a template's own mistake: 1/0, int('x'), an overflow, ...
            message, err = f"{type(e).__name__}: {_one_line(str(e))}", e
        where, line = _error_where(err, name, file)
        raise TemplateError(message, file=where, line=line) from None

    def _plain_text(self, name: str, tpl: jinja2.Template) -> str | None:
        """What a template of plain text renders to (an answer prefix such as "The answer is: (",
        a system prompt: no variable, tag or expression), rendered once; None for any other."""
        src, _, _ = self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
        tree = self.env.parse(src, name)
        if not all(isinstance(n, (nodes.Output, nodes.TemplateData)) for n in tree.find_all(nodes.Node)):
            return None
        return _render_capped(tpl, {}, self.source_path(name)).strip()

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
        out: list[Message] = []
        if texts["system"]:
            out.append({"role": "system", "content": texts["system"]})
        out += self.example_turns(stage, **ctx)
        for role in ("user", "assistant"):
            if texts[role]:
                out.append({"role": role, "content": texts[role]})  # type: ignore[typeddict-item]
        return out

    def _continued_revision(self, ctx: dict[str, Any]) -> list[Message]:
        """The critique's request as sent, the critique as the assistant's turn (after the
        critique's answer prefix, if any), then the revision request (module doc)."""
        if "critique" not in ctx:  # never sent without it: the chat would end at the critique request
            raise TemplateError("a revision continues its critique: no critique given",
                                file=self.source_path("revise.user.j2"))
        out = self.messages("critique", **ctx)
        critique = str(ctx["critique"])
        if out and out[-1]["role"] == "assistant":
            out[-1] = {"role": "assistant", "content": out[-1]["content"] + critique}
        else:
            out.append({"role": "assistant", "content": critique})
        for role in ("user", "assistant"):
            text = self.render_text("revise", role, **ctx)
            if text:
                out.append({"role": role, "content": text})
        return out

    def revision_continues(self) -> bool:
        """Whether a revision continues the critique's chat: the revise templates read none of
        ``conversation``, ``response`` and ``critique`` (module doc)."""
        if self._continues is None:
            self._continues = not any(self._stage_reads("revise", _mentions_context))
        return self._continues

    def handles_examples(self, stage: str) -> bool:
        """Whether the stage's own templates render the principle's examples (then no turns)."""
        if stage not in self._own_examples:
            self._own_examples[stage] = any(self._stage_reads(stage, _mentions_examples))
        return self._own_examples[stage]

    def _stage_reads(self, stage: str, test: Callable[[nodes.Node], bool]) -> Iterable[bool]:
        for role in ROLES:
            name = f"{stage}.{role}.j2"
            yield self._get(name) is not None and self._reads(name, test, set())

    def _reads(self, name: str, test: Callable[[nodes.Node], bool], seen: set[str]) -> bool:
        """Whether a template, or one it includes, extends or imports, passes ``test``."""
        if name in seen:
            return False
        seen.add(name)
        try:
            src, _, _ = self.env.loader.get_source(self.env, name)  # type: ignore[union-attr]
        except jinja2.TemplateNotFound:
            return False
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
        """The principle's few-shot examples for ``stage``, as chat turns (see the module doc)."""
        p = ctx.get("principle")
        if p is None or self.handles_examples(stage):
            return []
        # The turns depend on the stage and the principle only (a judge example replaces the live
        # context, unless the context holds more: CoT answers carry the live reasoning), so they
        # are made once per principle, not on every call. The principle is kept with its turns,
        # so that its id cannot be reused by another object while they are cached.
        key = (stage, id(p))
        cacheable = stage not in JUDGE_STAGES or ctx.keys() <= _JUDGE_EXAMPLE_CTX
        hit = self._turns.get(key) if cacheable else None
        if hit is None or hit[0] is not p:
            hit = (p, self._example_turns(stage, p, ctx))
            if cacheable:
                self._turns[key] = hit
        return [{"role": r, "content": c} for r, c in hit[1]]  # type: ignore[typeddict-item]

    def _example_turns(self, stage: str, p: Any, ctx: dict[str, Any]) -> list[tuple[str, str]]:
        turns: list[tuple[str, str]] = []
        if stage in ("critique", "revise"):
            for ex in getattr(p, "examples", ()):
                turns += [("user", ex.prompt), ("assistant", ex.response),
                          ("user", p.critique), ("assistant", ex.critique)]
                if stage == "revise" or self.revision_continues():
                    turns += [("user", p.revision), ("assistant", ex.revision)]
        elif stage in JUDGE_STAGES:
            cot = stage != "judge"
            for ex in getattr(p, "judge_examples", ()):
                if cot and not ex.reasoning:
                    continue
                demo = {**ctx, "conversation": [{"role": "user", "content": ex.prompt}],
                        "response_a": ex.response_a, "response_b": ex.response_b}
                user = self.render_text(stage, "user", **demo) or ""
                if cot:
                    demo["reasoning"] = ex.reasoning
                    prefix = self.render_text("judge_cot_answer", "assistant", **demo) or ""
                else:
                    prefix = self.render_text("judge", "assistant", **demo) or ""
                turns += [("user", user), ("assistant", answer_text(prefix, ex.answer))]
        return turns

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


def answer_text(prefix: str, answer: str) -> str:
    """A judge example's answer turn: the prefix the model continues, then the letter
    (closing the parenthesis when the prefix opens one: "The answer is: (A)")."""
    if prefix.endswith("("):
        return f"{prefix}{answer})"
    return f"{prefix} {answer}".strip()


def _render_capped(tpl: jinja2.Template, ctx: dict[str, Any], file: str) -> str:
    """Render, streaming, and stop with a one-line error once the text passes ``MAX_CHARS``."""
    gen: Any = tpl.generate(**ctx)
    parts: list[str] = []
    total = 0
    for piece in gen:
        total += len(piece)
        if total > MAX_CHARS:
            line = _generator_line(gen)
            gen.close()
            raise TemplateError(f"the rendered message is over the limit of {MAX_CHARS:,} characters "
                                "(a loop or a repeat that is too big, or an input that long?)", file=file, line=line)
        parts.append(piece)
    return "".join(parts)


def _generator_line(gen: Any) -> int | None:
    """The template line a paused render generator is at (following includes)."""
    line = None
    g = gen
    while g is not None:
        frame = getattr(g, "gi_frame", None)
        t = frame.f_globals.get("__jinja_template__") if frame is not None else None
        if t is not None and frame is not None:
            line = t.get_corresponding_lineno(frame.f_lineno)
        g = getattr(g, "gi_yieldfrom", None)
    return line


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error_where(exc: BaseException, name: str, file: str) -> tuple[str, int | None]:
    """The template file and line of a render error, from the traceback Jinja rewrites to
    template lines: the innermost template frame (an included file's, when the error is there)."""
    tb = exc.__traceback__
    where: tuple[str, int | None] = (file, None)
    while tb is not None:
        g = tb.tb_frame.f_globals
        fname = tb.tb_frame.f_code.co_filename
        if "__jinja_exception__" in g and isinstance(g.get("__file__"), str):
            where = (g["__file__"], tb.tb_lineno)  # a template frame, at its template line
        elif fname.endswith(name) and where[1] is None:
            where = (file, tb.tb_lineno)
        tb = tb.tb_next
    return where
