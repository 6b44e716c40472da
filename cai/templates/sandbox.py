"""Jinja2's immutable sandbox, with caps on what a template builds.

Every value a template builds (a literal; an operator's, filter's or call's result; a macro's or
``{% set %}`` block's text) is measured in characters (a list, dict or object: its items', plus one
each) and refused, as a ``TemplateError`` naming file and line, past ``MAX_CHARS``: before it is
built where its size is known beforehand (``'a' * 10**10``, ``[s] * 999999``, ``s.ljust(10**9)``,
``'%10000000s' % x``, a growing ``join`` or ``replace``), item by item otherwise (an iterator a
filter returns, a block's text). Integers are capped at ``MAX_INT_BITS`` bits, ``range`` at
``MAX_RANGE`` numbers, a render at ``MAX_WORK`` steps (loop iterations and calls), the rendered
message at ``MAX_CHARS`` characters as it streams. A template is configuration the user trusts: the
caps turn its mistakes into one line in bounded memory; they do not stop one written to burn CPU.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.environment import TemplateModule
from jinja2.filters import do_batch, do_center, do_format, do_indent, do_replace, sync_do_join
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, missing

from ..errors import CaiError, TemplateError

MAX_CHARS = 1_000_000  # the most characters in a rendered message, or in any string or list built on the way
MAX_RANGE = 100_000  # the most numbers in a template's range()
MAX_INT_BITS = 16_384  # the biggest integer a template may compute (about 4,900 digits)
MAX_WORK = 1_000_000  # the most loop iterations and calls in one render

_SIZED = (str, bytes, list, tuple)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")


def _too_big(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise SecurityError(f"the template would make {what} of {n:,} characters, over the limit of {MAX_CHARS:,}")


def _kind(x: Any) -> str:
    return "a string" if isinstance(x, (str, bytes)) else "a list"


def size(x: Any, limit: int = MAX_CHARS, depth: int = 0) -> int:
    """About how many characters ``x`` prints as: a string its length, a list, dict or object its
    items' plus one each (every reference counted), counted only until past ``limit``."""
    if isinstance(x, (str, bytes)):
        return len(x)
    if isinstance(x, int):
        return x.bit_length() // 3 + 1
    if isinstance(x, Mapping):
        items: Iterable[Any] = x.items()
    elif isinstance(x, Collection) and not isinstance(x, jinja2.Undefined):
        items = x
    elif isinstance(x, Namespace):  # it hides its __dict__
        items = object.__getattribute__(x, "_Namespace__attrs").values()
    elif isinstance(getattr(x, "__dict__", None), dict) and not callable(x):  # a principle, a cycler
        items = vars(x).values()
    else:
        return 1
    total = 2
    for item in items:
        total += 1 + (size(item, limit - total, depth + 1) if depth < 100 else 1)
        if total > limit:
            break
    return total


def checked(x: Any) -> Any:
    """``x`` if it is under the cap; an iterator is counted as it is read."""
    if isinstance(x, str):
        _too_big(len(x), "a string")
    elif isinstance(x, Iterator):
        return _counted(x)
    elif not (x is None or isinstance(x, (int, float))):
        _too_big(size(x), _kind(x))
    return x


def _counted(items: Iterator[Any]) -> Iterator[Any]:
    total = 0
    for x in items:
        total += 1 + size(x, MAX_CHARS - total)
        _too_big(total, "a list")
        yield x


def _results_checked(f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose result is checked (``functools.wraps`` keeps its ``pass_context`` mark)."""
    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checked(f(*args, **kwargs))
    return run


def _int_cap(bits: float) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError(f"the template would compute a number of about {int(bits):,} bits, over the "
                            f"limit of {MAX_INT_BITS:,}")


def _check_printf(fmt: str, args: Any) -> None:
    """Refuse ``'%10000000s' % x`` and ``'%*s' % (10**9, x)``."""
    sizes = [x for spec in _PRINTF.findall(fmt) for x in spec if x]
    stars = [abs(n) for n in (args if isinstance(args, tuple) else (args,)) if isinstance(n, int)]
    for n in [int(x) for x in sizes if x != "*"] + (stars if "*" in sizes else []):
        _too_big(n, "a padded field")


def _check_format(fmt: str, args: Iterable[Any]) -> None:
    """Refuse ``'{:>10000000}'.format(x)`` (and a nested width given as an argument)."""
    nested = False
    for _lit, _field, spec, _conv in string.Formatter().parse(fmt):
        for num in re.findall(r"\d+", spec or ""):
            _too_big(int(num), "a padded field")
        nested = nested or "{" in (spec or "")
    for n in args if nested else ():
        _too_big(abs(n) if isinstance(n, int) else 0, "a padded field")


def _check_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Bound methods of strings that can grow them: check the size they would make. Returns the
    arguments to call with (an iterator given to ``join`` is read into a list first)."""
    method = getattr(obj, "__wrapped__", obj)  # str.format comes wrapped by the sandbox
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(owner, (str, bytes)):
        return args
    if name in ("format", "format_map") and isinstance(owner, str):
        mapped = args[0].values() if args and isinstance(args[0], dict) else ()
        _check_format(owner, [*args, *kwargs.values(), *mapped])
    elif name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        _too_big(args[0], "a string")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _too_big(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * tab, "a string")  # type: ignore[arg-type]
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)) and isinstance(args[1], type(owner)):
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else None)
    elif name == "join" and args:
        items = list(args[0])
        _check_join(items, owner)
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, _SIZED)), default=1)
        _too_big(len(owner) * max(1, longest), "a string")
    return args


def _check_replace(text: Any, old: Any, new: Any, count: Any) -> None:
    times = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    _too_big(len(text) + times * max(0, len(new) - len(old)), "a string")


def _check_join(items: list[Any], sep: Any) -> None:
    _too_big(sum(size(x) for x in items) + len(sep) * max(0, len(items) - 1), "a string")


class _TextBuffer(list[str]):
    """The text of a macro, a ``{% set %}`` block or a filter block, refused as it passes the cap."""

    chars = 0

    def append(self, piece: str) -> None:
        self.chars += len(piece)
        _too_big(self.chars, "a string")
        super().append(piece)

    def extend(self, pieces: Iterable[str]) -> None:
        for piece in pieces:
            self.append(piece)


class _CappedTemplate(jinja2.Template):
    def make_module(self, vars: dict[str, Any] | None = None, shared: bool = False,  # noqa: A002
                    locals: Mapping[str, Any] | None = None) -> TemplateModule:  # noqa: A002
        """An ``{% import %}``ed template, its text capped like a block's as it renders."""
        ctx, text = self.new_context(vars, shared, locals), _TextBuffer()
        text.extend(self.root_render_func(ctx))
        return TemplateModule(self, ctx, text)


class _CappedCodeGenerator(CodeGenerator):
    """Compiles ``~``, literals, loops and block buffers so that the sandbox checks them."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.call_concat(context, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _sized(self, node: nodes.List | nodes.Tuple | nodes.Dict, frame: Frame) -> None:
        """A list, tuple or dict literal (not an assignment target), checked as it is built."""
        visit = getattr(super(), f"visit_{type(node).__name__}")
        if getattr(node, "ctx", "load") != "load":
            return visit(node, frame)
        self.write("environment.sized(")
        visit(node, frame)
        self.write(")")

    visit_List = visit_Tuple = visit_Dict = _sized

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.text_buffer()")


_LOOKED_UP: ContextVar[tuple[jinja2.Undefined, str] | None] = ContextVar("cai_undefined", default=None)


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined that remembers the last failed lookup, for ``undefined_message``."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        message = super()._undefined_message
        _LOOKED_UP.set((self, message))
        return message


class CappedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with caps on what a template may build (see the module doc)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CappedCodeGenerator
    template_class = _CappedTemplate
    text_buffer = _TextBuffer
    sized = staticmethod(checked)  # a list, tuple or dict literal (compiled by ``_CappedCodeGenerator``)
    work = 0  # steps of the current render

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, undefined=_Undefined, **kwargs)
        self.globals["range"] = capped_range
        del self.globals["lipsum"]  # random text has no place in a prompt
        self.filters.update({"center": _capped_center, "indent": _capped_indent, "format": _capped_format,
                             "replace": _capped_replace, "join": _capped_join, "batch": _capped_batch})
        self.filters = {name: _results_checked(f) for name, f in self.filters.items()}
        self.filters["budgeted"] = self.budgeted
        self._safe_attrs: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """The immutable sandbox's answer, which depends on the object's type and the name only,
        remembered per (type, name): a template reads ``principle.critique`` on every render."""
        cls = type(obj)
        if obj.__class__ is not cls:  # an object that says it is of another class: asked each time
            return super().is_safe_attribute(obj, attr, value)
        key = (cls, attr)
        safe = self._safe_attrs.get(key)
        if safe is None:
            safe = super().is_safe_attribute(obj, attr, value)
            if len(self._safe_attrs) < 4096:  # names computed from data stay bounded
                self._safe_attrs[key] = safe
        return safe

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # each item a loop reads is a step of the render
            loop.iter = nodes.Filter(loop.iter, "budgeted", [], [], None, None, lineno=loop.iter.lineno)
        return tree

    def step(self) -> None:
        self.work += 1
        if self.work > MAX_WORK:
            raise SecurityError(f"the template took over {MAX_WORK:,} steps (loop iterations and calls), the "
                                "limit of one render (loops nested too deep?)")

    def budgeted(self, items: Iterable[Any]) -> Iterator[Any]:
        for x in items:
            self.step()
            yield x

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            if isinstance(left, _SIZED) and isinstance(right, int):
                _too_big(size(left) * right, _kind(left))
            elif isinstance(right, _SIZED) and isinstance(left, int):
                _too_big(size(right) * left, _kind(right))
            elif isinstance(left, int) and isinstance(right, int):
                _int_cap(left.bit_length() + right.bit_length())
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _int_cap(right * math.log2(abs(left)))
        elif operator == "+":
            if isinstance(left, _SIZED) and isinstance(right, _SIZED):
                _too_big(size(left) + size(right), _kind(left))
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return checked(super().call_binop(context, operator, left, right))

    def call_concat(self, context: jinja2.runtime.Context, items: tuple[Any, ...]) -> Any:
        """``a ~ b ~ c`` (compiled by ``_CappedCodeGenerator``)."""
        parts = [x if isinstance(x, str) else str(x) for x in items]
        _too_big(sum(len(p) for p in parts), "a string")
        return markup_join(items) if context.eval_ctx.autoescape else str_join(parts)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"{__obj!r} is not safely callable")
        __self.step()
        return checked(__context.call(__obj, *_check_method(__obj, args, kwargs), **kwargs))


def capped_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise SecurityError(f"range() of {len(rng):,} numbers, over the limit of {MAX_RANGE:,}")
    return rng


def _capped_center(value: Any, width: int = 80) -> str:
    if isinstance(width, int):
        _too_big(width, "a string")
    return do_center(value, width)


def _capped_indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    pad = width if isinstance(width, int) else len(str(width))
    _too_big(pad * (str(s).count("\n") + 1) + len(str(s)), "a string")
    return do_indent(s, width, first, blank)


def _capped_format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_printf(str(value), kwargs or tuple(args))
    return do_format(value, *args, **kwargs)


@jinja2.pass_eval_context
def _capped_replace(eval_ctx: Any, s: str, old: str, new: str, count: int | None = None) -> str:
    _check_replace(str(s), str(old), str(new), count)
    return do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _capped_join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    items = list(value)
    if attribute is None:
        _check_join(items, str(d))
    return sync_do_join(eval_ctx, items, d, attribute)


def _capped_batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    if isinstance(linecount, int):
        _too_big(linecount, "a list")
    return do_batch(value, linecount, fill_with)


# --- rendering, and where an error happened ------------------------------------------------------


def _globals(tpl: jinja2.Template) -> dict[str, Any]:
    """The template's globals as one dict, made once per template: ``Template.generate`` reads
    them from a ChainMap (template over environment) twice per render, which cost more than
    rendering a short template."""
    flat: dict[str, Any] | None = getattr(tpl, "_cai_globals", None)
    if flat is None:
        flat = dict(tpl.globals)
        tpl._cai_globals = flat  # type: ignore[attr-defined]
    return flat


def render_capped(tpl: jinja2.Template, ctx: dict[str, Any], file: str) -> str:
    """Render, streaming, and stop with a one-line error once the text passes ``MAX_CHARS``.

    What ``tpl.render(**ctx)`` does (the context: the globals, then ``ctx``; an error's traceback
    rewritten to template lines), with the globals taken from ``_globals``."""
    env, flat = tpl.environment, _globals(tpl)
    env.work = 0  # type: ignore[attr-defined]
    gen: Any = tpl.root_render_func(env.context_class(env, {**flat, **ctx}, tpl.name, tpl.blocks, globals=flat))
    parts: list[str] = []
    total = 0
    try:
        for piece in gen:
            total += len(piece)
            if total > MAX_CHARS:
                break
            parts.append(piece)
        else:
            return "".join(parts)
    except Exception:
        env.handle_exception()
    line = _generator_line(gen)
    gen.close()
    raise TemplateError(f"the rendered message is over the limit of {MAX_CHARS:,} characters "
                        "(a loop or a repeat that is too big, or an input that long?)", file=file, line=line)


def render_error(err: Exception, ctx: dict[str, Any], file: str) -> CaiError:
    """The one-line ``TemplateError`` for an exception raised while rendering ``file``."""
    if isinstance(err, CaiError):
        return err
    if isinstance(err, jinja2.UndefinedError):
        message = undefined_message(err, ctx)
    elif isinstance(err, jinja2.TemplateError):
        message = _one_line(str(err))
    elif isinstance(err, RecursionError):
        message = "recursion too deep (a macro or include that calls itself?)"
    else:  # a template's own mistake: 1/0, int('x'), an overflow, ...
        message = f"{type(err).__name__}: {_one_line(str(err))}"
    where, line = _error_where(err, file)
    return TemplateError(message, file=where, line=line)


def undefined_message(err: jinja2.UndefinedError, ctx: dict[str, Any]) -> str:
    """What was missing, named as the template wrote it, and what was there instead (never
    "'cai.constitution.Principle object' has no attribute ...")."""
    u, said = _LOOKED_UP.get() or (None, None)
    _LOOKED_UP.set(None)
    obj = u._undefined_obj if u is not None and said == err.message and not u._undefined_hint else missing
    if obj is missing:
        return f"{err.message}; variables available: {', '.join(sorted(ctx))}"
    kind, name = type(obj).__name__, u._undefined_name  # type: ignore[union-attr]
    what = f"{'an' if kind[0] in 'AEIOUaeiou' else 'a'} {kind}"
    var = next((k for k, v in ctx.items() if v is obj), None)
    fields = getattr(type(obj), "model_fields", None) or (obj if isinstance(obj, Mapping) else None)
    return (f"{f'{var} ({what})' if var else what} has no {'attribute' if isinstance(name, str) else 'element'} "
            f"{name!r}" + (f"; it has: {', '.join(map(str, fields))}" if fields else ""))


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


def _error_where(exc: BaseException, file: str) -> tuple[str, int | None]:
    """The template file and line of a render error, from the traceback Jinja rewrites to
    template lines: the innermost template frame (an included file's, when the error is there)."""
    tb = exc.__traceback__
    where: tuple[str, int | None] = (file, None)
    while tb is not None:
        g = tb.tb_frame.f_globals
        if "__jinja_exception__" in g and isinstance(g.get("__file__"), str):
            where = (g["__file__"], tb.tb_lineno)  # a template frame, at its template line
        tb = tb.tb_next
    return where
