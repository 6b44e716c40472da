"""Fences: input text shown between tags that it cannot close, and the plain transcript filter."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from jinja2.sandbox import SecurityError

from ..backends.base import Message

# Tags whose opening or closing form is neutralised inside any fenced text (besides the fence's own).
FENCE_NAMES = ("conversation", "response", "critique", "revision", "reasoning", "example")
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_LESS_THAN = re.compile("[<\uff1c\ufe64]")  # "<" and what NFKC turns into it: fullwidth and small "<"


def format_conversation(messages: Sequence[Message], user: str = "User", assistant: str = "Assistant") -> str:
    """Render chat messages as a plain transcript (``User: ...`` / ``Assistant: ...``)."""
    names = {"user": user, "assistant": assistant, "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)


def fold(text: str) -> str:
    """``text`` as a reader sees it: Unicode NFKC, without zero-width and other format characters,
    so that ``＜/response_b>`` or ``</resp\u200bonse_b>`` match the tag they look like."""
    return "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")


def neutralise_tags(text: str, *names: str) -> str:
    """``text`` with every ``<name`` and ``</name`` (any case, spaces allowed, and look-alikes:
    see ``fold``) turned into ``&lt;name`` / ``&lt;/name``, so that it cannot open or close a
    fence of one of ``names``."""
    pattern = _tag_opener(names)
    if text.isascii():  # nothing to fold: the common case, one regex pass
        return pattern.sub("&lt;", text)
    longest = max(map(len, names))
    parts, start = [], 0
    for m in _LESS_THAN.finditer(text):
        if _opens(text, m.start(), pattern, longest):
            parts += [text[start:m.start()], "&lt;"]
            start = m.end()
    return "".join(parts) + text[start:]


def _opens(text: str, at: int, pattern: re.Pattern[str], longest: int) -> bool:
    """Whether the ``<`` (or look-alike) at ``at`` opens or closes a tag of ``pattern``, read folded."""
    width = 64
    while True:
        tail = fold(text[at + 1:at + 1 + width])
        if pattern.match("<" + tail):
            return True
        if at + 1 + width >= len(text) or len(tail.lstrip().removeprefix("/").lstrip()) > longest:
            return False
        width *= 4  # zero-width padding longer than the window: read further


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
