"""Text checks on one revision step's output: pure functions, no I/O.

:func:`clean_revision` strips whitespace and the scaffolding small models wrap their answer in
(a leading "Revised response:" label, "**Revision**" on a line of its own, quotes around the whole
answer) where that is safe. :func:`check_text` returns flags from :data:`FLAGS`; the quality gates
drop a row for the flags in :data:`DROPPING` and only count the others.

Thresholds (tuned on hand-labelled SmolLM2-135M revisions, ``tests/data/gate_examples.jsonl``):

* ``loop``: a text of at least ``LOOP_MIN_WORDS`` words where at least ``LOOP_REPEAT_FRACTION``
  of its word ``LOOP_NGRAM``-grams repeat an earlier one; or one word ``LOOP_SPAN_NGRAM``-gram
  said ``LOOP_SPAN_TIMES`` times or more; or one sentence/line of at least
  ``LOOP_MIN_SENTENCE_WORDS`` words said ``LOOP_SENTENCE_TIMES`` times or more; or a text of at
  least ``LOOP_MIN_CHARS`` characters that zlib compresses below ``LOOP_ZLIB_RATIO`` of its
  size (character-level loops: "hahaha...", "!!!!..."). Ordinary prose repeats well under 10% of
  its 4-grams; a list whose bullets share a few words stays far below the limits.
* ``restates_critique``: at least ``RESTATE_OVERLAP`` of the revision's word trigrams occur in the
  critique (revisions of at least ``RESTATE_MIN_WORDS`` words).
* ``copies_example``: at least ``RESTATE_OVERLAP`` of the revision's word trigrams occur in one
  few-shot example, or that share of the example's trigrams occurs in the revision (a copy with
  more text after it). An answer to the example's own prompt may legitimately resemble it: pass
  only the examples the model was shown for this step.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections import Counter
from collections.abc import Collection, Iterable

FLAGS: dict[str, str] = {
    "truncated": "the model hit the token limit (finish_reason 'length'): the text is cut off",
    "empty": "nothing left after cleaning: no text, or only whitespace and punctuation",
    "loop": "stuck in a loop: the same sentence or word n-grams repeated many times",
    "meta": "talks about the response or the revision instead of being the reply to the user",
    "restates_critique": "mostly repeats the critique instead of answering the user",
    "copies_example": "mostly copies a few-shot example from the constitution instead of answering this prompt",
}
"""Every flag :func:`check_text` can return, with a one-line description."""

DROPPING: frozenset[str] = frozenset({"truncated", "empty", "loop", "meta", "copies_example"})
"""Flags that drop a row; the others (``restates_critique``) are only counted."""

COUNTED: frozenset[str] = frozenset(FLAGS) - DROPPING

LOOP_NGRAM = 4
LOOP_MIN_WORDS = 16
LOOP_REPEAT_FRACTION = 0.5
LOOP_SPAN_NGRAM = 8
LOOP_SPAN_TIMES = 3
LOOP_MIN_SENTENCE_WORDS = 3
LOOP_SENTENCE_TIMES = 3
LOOP_MIN_CHARS = 120
LOOP_ZLIB_RATIO = 0.2
RESTATE_NGRAM = 3
RESTATE_MIN_WORDS = 8
RESTATE_OVERLAP = 0.5

# --- cleaning -----------------------------------------------------------------------------------

_APOS = r"(?:'|\u2019)"
_ADJ = r"(?:revised|rewritten|improved|updated|new|final|edited|corrected|better|harmless|safer|modified|reworded)"
_NOUN = r"(?:reply|response|answer|version|revision|rewrite|text|output|message)"
# A scaffolding label: "Revision", "Revised response", "Here is the revised version of the reply",
# "Sure! Here's my answer", "Assistant", "Final answer", optionally numbered ("Revision 2").
# A bare noun counts only for reply/response/answer/revision/rewrite, so "Text:" or "Note:" stay.
_LABEL_WORDS = (
    rf"(?:(?:(?:sure|okay|ok|certainly|of course|absolutely)[,.!]*\s+)?here(?:{_APOS}s|\s+is)\s+)?"
    r"(?:(?:the|my|a|an|your)\s+)?"
    rf"(?:{_ADJ}\s+{_NOUN}(?:\s+of\s+(?:the|my|your)\s+(?:(?:assistant|ai){_APOS}s\s+)?{_NOUN})?"
    r"|(?:revised|rewritten|edited|improved|corrected|updated)"
    rf"|(?:(?:assistant|ai){_APOS}s\s+)?(?:reply|response|answer|revision|rewrite)"
    r"|assistant|ai)"
    r"(?:\s*\(?#?\d+\)?)?"
)
_DECOR = r"[ \t*_#>]*"
# "Label:" followed by text on the same line or the next lines.
_LABEL_COLON = re.compile(rf"^{_DECOR}{_LABEL_WORDS}{_DECOR}:{_DECOR}(?=\S)", re.IGNORECASE)
# "**Revised Response**" / "Revision" / "## Revised reply" on a line of its own, text below.
_LABEL_LINE = re.compile(rf"^{_DECOR}{_LABEL_WORDS}{_DECOR}:?{_DECOR}\n\s*(?=\S)", re.IGNORECASE)
# A label and nothing else.
_BARE_LABEL = re.compile(rf"^{_DECOR}{_LABEL_WORDS}{_DECOR}[:.]?{_DECOR}$", re.IGNORECASE)
# The fences the prompts use, echoed by the model: "<revision>" first, "</response>" last.
_TAG_NAMES = r"(?:revision|revised[_ ]?(?:response|reply)|response|reply|answer|rewrite)"
_TAG_OPEN = re.compile(rf"^<\s*{_TAG_NAMES}\s*>\s*(?=\S)", re.IGNORECASE)
_TAG_CLOSE = re.compile(rf"(?<=\S)\s*<\s*/\s*{_TAG_NAMES}\s*>$", re.IGNORECASE)
# A closing tag cut off by the token limit: "</respon", "&lt;/response", a lone "<" or "&lt;" at the very end.
_TAG_CUT = re.compile(r"(?<=\S)\s*(?:<|&lt;)/?([a-z_]*)$", re.IGNORECASE)
_FENCES = ("revision", "revised_response", "revised_reply", "response", "reply", "answer", "rewrite", "critique",
           "conversation")
_QUOTES = {'"': '"', "\u201c": "\u201d", "'": "'", "\u2018": "\u2019"}


def _strip_cut_tag(text: str) -> str:
    m = _TAG_CUT.search(text)
    if m and any(f.startswith(m.group(1).lower()) for f in _FENCES):
        return text[: m.start()].rstrip()
    return text


def _unquote(text: str) -> str:
    """Drop quotes around the whole text when no quote of that kind appears inside."""
    close, inner = _QUOTES.get(text[:1]), text[1:-1]
    if len(text) >= 3 and close and text[-1] == close and text[0] not in inner and close not in inner:
        return inner.strip()
    return text


def clean_revision(text: str) -> str:
    """Strip whitespace, a leading scaffolding label or tag and quotes around the whole answer.

    A label goes only when it is a prefix of its own (ends in ":" or the line) and real answer text
    follows, so "Revision: I can't help." becomes "I can't help." while a bare "Revised response:"
    and "Revised plans are due Monday." are left as they are.
    """
    t = text.strip()
    for _ in range(3):
        before = t
        m = _LABEL_COLON.match(t) or _LABEL_LINE.match(t) or _TAG_OPEN.match(t)
        if m:
            t = t[m.end() :].strip()
        t = _unquote(_strip_cut_tag(_TAG_CLOSE.sub("", t)))
        if t == before:
            break
    return t


# --- checks -------------------------------------------------------------------------------------

_WORD = re.compile(r"[\w']+")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_HAS_WORD = re.compile(r"\w")

# Meta-text: the reply talks about the response, the critique or the conversation instead of being
# the reply. Checked at the start of the cleaned text...
_META_START = re.compile(
    r"^[\s*_#>\"']*(?:"
    # "The original text contained...", "The assistant's reply was...": a qualified noun, any verb
    r"(?:the|this|that|my|your|our)\s+"
    r"(?:(?:original|previous|initial|earlier|above|revised|rewritten|edited|improved|entire|whole|"
    rf"(?:assistant|ai|user){_APOS}s)\s+)+"
    r"(?:text|message|response|reply|answer|revision|rewrite|version|feedback|critique|draft|comment|edit)s?\b"
    # "This response should...", "Your feedback was...", "The critique...": nouns that name the exercise
    r"|(?:the|this|that|your)\s+(?:response|reply|revision|rewrite|feedback|critique|draft|"
    r"revision\s+request|critique\s+request)s?\b"
    r"|your\s+(?:example|suggestion|edit|comment)s?\b"
    # "That's a great answer!": grading a reply instead of giving one
    rf"|(?:that{_APOS}s|that\s+is|this\s+is|what)\s+an?\s+(?:great|good|excellent|nice|solid|perfect|wonderful|"
    r"fantastic|clear|helpful)\s+(?:answer|response|reply|revision|rewrite|edit)\b"
    # "The text contains...", "This message lacks...": everyday nouns only with a verb of judging
    r"|(?:the|this|that|your)\s+(?:text|message|answer|version|sentence|phrase|statement)\s+(?:should|would|could|"
    r"must|needs?|requires?|contains?|contained|provides?|provided|lacks?|lacked|uses?|used|avoids?|avoided|removes?|"
    r"removed|includes?|included|has\s+been|was|could\s+be|can\s+be\s+improved|is\s+(?:not\s+)?(?:clear|unclear|"
    r"concise|harmful|inappropriate|rewritten|revised|improved|polished))\b"
    # "The user requested...", "The assistant should...": narrating the conversation
    rf"|the\s+user(?:{_APOS}s)?\s+(?:asked|asks|requested|requests|wants|wanted|is|was|has|had|said|says|"
    r"suggests?|suggested|provided|mentioned|seems|appears|did|does|should|would|could|might|may|question|"
    r"request|message|prompt|feedback|final|last|initial|response|reply|intent|intention)\b"
    rf"|the\s+assistant(?:{_APOS}s)?\s+(?:should|would|could|is|was|has|had|did|does|responded|replied|"
    r"provided|gave|said|says|refused|final|last|initial|previous|response|reply|answer)\b"
    # "I have revised the response...", "I've made some changes...", "We rewrote..."
    rf"|(?:i|we)(?:\s+have|\s+had|{_APOS}ve)?\s+(?:(?:revised|rewritten|rewrote|edited|updated|modified|reworded|"
    r"rephrased|reviewed|changed|removed)\s+(?:(?:the|my|your|this|that|our|its|(?:user|assistant|ai)(?:'s|\u2019s))\s+)*"
    r"(?:(?:original|previous|initial|earlier|first)\s+)?(?:response|reply|answer|text|message|version|wording|tone|"
    r"feedback|critique|draft)"
    r"|made\s+(?:(?:some|the|a\s+few|several|a\s+number\s+of)\s+)?(?:changes|edits|revisions))\b"
    # "In this revision...", "For the rewrite..."
    r"|(?:in|for|with)\s+(?:this|the|my)\s+(?:revision|revised|rewrite|rewritten|edit)"
    # "Here is a revised version" left over after cleaning: no answer follows
    rf"|(?:(?:sure|okay|ok|certainly|of course)[,.!]*\s+)?here(?:{_APOS}s|\s+is|\s+are)\s+"
    r"(?:(?:a|an|the|my|your|another|some)\s+)?(?:possible\s+)?"
    r"(?:(?:revised|rewritten|improved|updated|edited|corrected|reworded|safer|harmless|modified)\b"
    r"|(?:version|revision|rewrite)s?\b)"
    # an unstripped label that introduces something other than the answer
    r"|(?:original|revised|rewritten|reworded|rephrased)\s+(?:response|reply|answer|version|text|message)\b"
    r"|(?:critique|revision request|critique request)\s*:"
    r")",
    re.IGNORECASE,
)
# ...and anywhere: template echo and edit scaffolding ("Original text:", "Rewritten Response:",
# "Critique:", "1. **Original**:") and announcing a rewrite in the middle of the text.
_META_ANYWHERE = re.compile(
    r"^[\s*_#>\d.)-]*(?:(?:original|revised|rewritten|improved|reworded|rephrased|edited)"
    r"(?:\s+(?:response|reply|text|version|message|sentence|question|answer))?"
    r"|critique(?:\s+request)?|revision(?:\s+request)?|assistant(?:'s|\u2019s)\s+final\s+reply)[\s*_]*:"
    rf"|here(?:{_APOS}s|\s+is)\s+(?:(?:a|an|the|my|another)\s+)?(?:possible\s+)?"
    r"(?:rewritten|revised|edited|improved|reworded)\s+(?:version|response|reply|text)"
    r"|\b(?:rewritten|revised)\s+version\s+of\s+(?:the|your|my)\b"
    # the conversation echoed as a transcript: "User: ...", "The user: ...", "Assistant: ..." lines
    r"|^[\s*_#>]*(?:the\s+)?(?:user|human|assistant|ai)\s*[*_]*\s*:"
    # the prompt's fences and headings echoed: "</conversation>", "&lt;/response>", "The user's final reply:"
    r"|(?:<|&lt;)\s*/?\s*(?:conversation|response(?:_[ab])?|critique|revision|reasoning|example)\s*(?:>|&gt;)"
    rf"|^[\s*_#>]*(?:the\s+)?(?:user|assistant|ai){_APOS}s\s+(?:final|last)\s+(?:reply|response)\s*[*_]*\s*:"
    # a sentence judging "the response" in the middle of the text: "... The response is not a critique ..."
    r"|(?:^|[.!?]\s+)(?:the|this)\s+(?:response|reply|critique|revision)\s+(?:is|was|does|did|should|would|"
    r"could|suggests?|offers?|contains?|provides?|fails?|accepts?|refuses?|uses?|gives?|includes?|lacks?|"
    r"seems?|appears?|needs?)\b"
    # narrating the conversation: "The user asked to ..."
    r"|(?:^|[.!?]\s+)the\s+user\s+(?:asked|asks|requested|requests|wants|wanted|is\s+asking|was\s+asking|"
    r"has\s+asked|said|says)\b"
    r"|\bthe\s+(?:original|previous)\s+(?:response|reply|text|message)\b"
    # announcing or describing an edit anywhere: "Here's a possible revision", "I've made changes to ...",
    # "how you could revise the response", "You've asked me to edit this message"
    rf"|here(?:{_APOS}s|\s+is)\s+(?:(?:a|an|the|my|another)\s+)?(?:possible\s+)?(?:revision|rewrite)\b"
    rf"|(?:^|[.!?]\s+)(?:(?:however|so|also|now|here),?\s+)?(?:i|we)(?:\s+have|{_APOS}ve)?\s+"
    r"(?:made\s+(?:(?:some|the|a\s+few|several)\s+)?(?:changes|edits|revisions)|(?:revised|rewritten|rewrote|"
    r"edited|rephrased|reworded)\s+(?:the|your|my|this)\s+(?:(?:original|previous|initial)\s+)?"
    r"(?:response|reply|answer|text|message|wording|tone|draft)\b)"
    r"|\b(?:rewrite|rewrote|rewritten|revise|revised|rephrase|rephrased|reword|reworded|edit|edited|written|"
    r"wrote)\s+(?:the|your|my|this|that)\s+(?:(?:original|previous|entire|whole|last|initial)\s+)?"
    r"(?:response|reply|answer)\b"
    r"|\basked\s+(?:me|us)\s+to\s+(?:edit|rewrite|revise|rephrase|reword|delete)\b"
    # template and dataset scaffolding: "the provided template", "[original]", "Chat History:"
    r"|\b(?:the|this|provided|given|requested)\s+template\b"
    r"|^[\s*_#>]*\[(?:original|revised|revision|rewritten|response|reply)\]"
    r"|^[\s*_#>]*chat\s+history\s*:",
    re.IGNORECASE | re.MULTILINE,
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeat_fraction(text: str | list[str], n: int = LOOP_NGRAM) -> float:
    """The share of word n-grams that repeat an n-gram seen earlier in the text (or list of its
    words): 0 when too short."""
    grams = _ngrams(_words(text) if isinstance(text, str) else text, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def zlib_ratio(text: str) -> float:
    """Compressed size over raw size: near 1 for short or varied text, small for a loop."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 1.0


def is_loop(text: str, words: list[str] | None = None) -> bool:
    """Whether the text (whose ``words`` the caller may have split already) is stuck in a loop (the
    module doc gives the measures and thresholds)."""
    words = _words(text) if words is None else words
    # An n-gram said t times takes at least n + t - 1 words, a sentence of w words said t times
    # w * t (the sentences' words are the text's: it splits where no word is): fewer, and the
    # counts need not be made.
    return ((len(words) >= LOOP_MIN_WORDS and repeat_fraction(words) >= LOOP_REPEAT_FRACTION)
            or (len(words) >= LOOP_SPAN_NGRAM + LOOP_SPAN_TIMES - 1
                and max(Counter(_ngrams(words, LOOP_SPAN_NGRAM)).values(), default=0) >= LOOP_SPAN_TIMES)
            or (len(words) >= LOOP_MIN_SENTENCE_WORDS * LOOP_SENTENCE_TIMES
                and max(Counter(" ".join(w) for w in map(_words, _SENTENCE_SPLIT.split(text))
                                if len(w) >= LOOP_MIN_SENTENCE_WORDS).values(), default=0) >= LOOP_SENTENCE_TIMES)
            or (len(text) >= LOOP_MIN_CHARS and zlib_ratio(text) < LOOP_ZLIB_RATIO))


def is_meta(cleaned: str) -> bool:
    """Whether cleaned text talks about the response instead of being it (a bare label counts)."""
    return bool(_BARE_LABEL.match(cleaned) or _META_START.match(cleaned) or _META_ANYWHERE.search(cleaned))


_Grams = tuple[int, list[tuple[str, ...]], frozenset[tuple[str, ...]]]


def _grams(words: list[str]) -> _Grams:
    """A text's word count and word n-grams (a list, and a set to look them up in)."""
    grams = _ngrams(words, RESTATE_NGRAM)
    return len(words), grams, frozenset(grams)


@functools.lru_cache(maxsize=1024)
def _example_grams(text: str) -> _Grams:
    """The few-shot examples are the constitution's few texts, compared with every revision: their
    n-grams are made once."""
    return _grams(_words(text))


def _overlap(grams: list[tuple[str, ...]], seen: Collection[tuple[str, ...]]) -> float:
    return sum(g in seen for g in grams) / len(grams) if grams else 0.0


def check_text(text: str, *, finish_reason: str | None, critique: str | None = None,
               examples: Iterable[str] = ()) -> list[str]:
    """The flags (from :data:`FLAGS`, in that order) that one revision's raw output earns.

    ``text`` is the raw model output, ``finish_reason`` the backend's ("length" when the token
    limit cut it), ``critique`` the critique it answers, ``examples`` the few-shot texts the
    model was shown for this step (the principle's example responses and revisions).
    """
    cleaned = clean_revision(text)
    found = {"truncated": finish_reason == "length", "empty": not _HAS_WORD.search(cleaned)}
    if not found["empty"]:
        words = _words(cleaned)
        n, grams, seen = _grams(words)
        long = n >= RESTATE_MIN_WORDS
        found |= {
            "loop": is_loop(cleaned, words), "meta": is_meta(cleaned),
            # most of the revision is the critique's wording
            "restates_critique": bool(long and critique and _overlap(
                grams, set(_ngrams(_words(critique), RESTATE_NGRAM))) >= RESTATE_OVERLAP),
            # most of the revision is an example's wording, or most of an example is in the revision
            "copies_example": long and any(
                ex_n >= RESTATE_MIN_WORDS and max(_overlap(grams, ex_seen), _overlap(ex_grams, seen)) >= RESTATE_OVERLAP
                for ex_n, ex_grams, ex_seen in map(_example_grams, examples)),
        }
    return [f for f in FLAGS if found.get(f)]
