"""What to send an OpenAI-compatible server, and how to read its answer: the server dialects.

``vllm`` takes vLLM's extensions: ``continue_final_message`` and ``add_generation_prompt`` when
the last message is the assistant's, ``structured_outputs: {"choice": [...]}`` for ``choices``,
``repetition_penalty``. ``openai`` (a plain OpenAI-style server) gets none of them: ``choices``
become ``response_format`` with a JSON-schema enum while the server honours it, else a short plain
answer parsed strictly (one of the choices, case-sensitive, after stripping whitespace and
punctuation; anything else comes back raw, so the judge abstains). ``transformers serve`` samples
only when asked to, so ``generation_config: {"do_sample": true}`` goes with temperature > 0.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from ..types import Completion, Message, Request

# Request fields that vLLM takes and an OpenAI-style server refuses (or ignores).
VLLM_FIELDS = frozenset({
    "continue_final_message", "add_generation_prompt", "structured_outputs", "guided_choice",
    "guided_json", "guided_regex", "guided_grammar", "guided_decoding_backend", "repetition_penalty",
    "top_k", "min_p", "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
    "use_beam_search", "length_penalty", "prompt_logprobs",
})
# Standard fields cai sends that some servers refuse by name: dropped from then on.
OPTIONAL_FIELDS = frozenset({"n", "seed", "logprobs", "top_logprobs", "response_format", "stop",
                             "generation_config"})
_CAPABILITY_OF = {"n": "n", "logprobs": "logprobs", "top_logprobs": "logprobs",
                  "response_format": "json_schema"}
# A 4xx message that refuses a field says so with one of these words.
_REFUSAL = re.compile(
    r"unrecogni[sz]ed|unexpected|unknown|extra|not permitted|not allowed|unsupported|not supported"
    r"|additional propert|invalid (?:field|param|argument|key)",
    re.IGNORECASE,
)
_STRIP = string.whitespace + string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb"
# What transformers serve needs to sample at temperature > 0 as OpenAI and vLLM do (no top-k);
# the rest of the model's generation config (eos, ...) is kept.
TRANSFORMERS_SAMPLING = json.dumps({"do_sample": True, "top_k": 0})


def refused_fields(message: str, sent: Collection[str]) -> set[str]:
    """The fields of ``sent`` that an error message refuses by name (unknown, unexpected, ...)."""
    if not _REFUSAL.search(message):
        return set()
    return {f for f in sent
            if re.search(rf"(?:^|[\s'\"`:,\[{{(]){re.escape(f)}(?:$|[\s'\"`:,\]}})=.])", message)}


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The one choice that ``text`` names, strictly: a JSON object with one string value that is a
    choice, or the text itself equal to exactly one choice after stripping whitespace and
    punctuation from both ends (case-sensitive). ``None`` when it names none, or more than one."""
    t = text.strip()
    if t.startswith("{"):
        try:
            obj = json.loads(t)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            vals = [v for v in obj.values() if isinstance(v, str)]
            return vals[0] if len(vals) == 1 and vals[0] in choices else None
    hits = [c for c in choices if c.strip(_STRIP) == t.strip(_STRIP)]
    return hits[0] if len(hits) == 1 else None


def choice_schema(choices: Sequence[str]) -> dict[str, Any]:
    """OpenAI's ``response_format`` for "one of these strings" (the root must be an object)."""
    return {"type": "json_schema", "json_schema": {
        "name": "choice", "strict": True,
        "schema": {"type": "object", "properties": {"answer": {"type": "string", "enum": list(choices)}},
                   "required": ["answer"], "additionalProperties": False}}}


@dataclass(frozen=True)
class Dialect:
    """What to send a server: vLLM's fields or not, and the standard fields it refused."""

    vllm_fields: bool = True
    json_schema: bool = True  # when not vLLM: ask for ``choices`` through response_format
    n: bool = True  # False: the server ignores n; ask one sample per request
    refused: frozenset[str] = frozenset()
    # transformers serve samples only when the model's generation config says do_sample: ask for it
    do_sample: bool = False


VLLM = Dialect()


def build_body(req: Request, model: str, extra_body: dict[str, Any] | None,
               dialect: Dialect = VLLM) -> tuple[dict[str, Any], str | None]:
    """The JSON body of POST /chat/completions for one request, and how ``choices`` are asked for:
    ``structured`` (vLLM), ``json_schema``, ``plain`` or ``None`` (no choices)."""
    s = req.sampling
    messages: list[Message] = list(req.messages)
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "n": s.n if dialect.n else 1,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.repetition_penalty != 1.0 and dialect.vllm_fields:  # a vLLM extension: sent only when asked for
        body["repetition_penalty"] = s.repetition_penalty
    if s.stop:
        body["stop"] = list(s.stop)
    if s.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = s.logprobs
    mode: str | None = None
    if s.choices is not None:
        longest = max((len(c) for c in s.choices), default=1)
        if dialect.vllm_fields:
            body["structured_outputs"] = {"choice": list(s.choices)}
            mode = "structured"
        elif dialect.json_schema and "response_format" not in dialect.refused:
            body["response_format"] = choice_schema(s.choices)
            body["max_tokens"] = max(s.max_tokens, 16 + longest)  # room for {"answer": "..."}
            mode = "json_schema"
        else:
            # the instruction goes into the last user message; a final assistant message stays as
            # it is (sent as is, as any continuation is on such a server)
            hint = "Reply with exactly one of: " + ", ".join(f'"{c}"' for c in s.choices) + ". Nothing else."
            last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last is None:
                messages.append({"role": "user", "content": hint})
            else:
                messages[last] = {"role": "user", "content": f"{messages[last]['content']}\n\n{hint}"}
            # a short answer: the choice and a little punctuation ("(A)"), not an essay
            body["max_tokens"] = longest + 2
            mode = "plain"
    if dialect.do_sample and s.temperature > 0:  # transformers serve: a partial GenerationConfig
        body["generation_config"] = TRANSFORMERS_SAMPLING
    if req.continues and dialect.vllm_fields:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if extra_body:
        body.update(extra_body if dialect.vllm_fields
                    else {k: v for k, v in extra_body.items() if k not in VLLM_FIELDS})
    for f in dialect.refused:
        body.pop(f, None)
    return body, mode


def parse_response(data: dict[str, Any]) -> Completion:
    """Map a chat completion JSON answer to a ``Completion``."""
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        return Completion(texts=[], error=f"no choices in the answer: {str(data)[:300]}")
    usage = data.get("usage") or {}
    top: list[dict[str, float]] | None = None
    content = (choices[0].get("logprobs") or {}).get("content")
    if content is not None:
        top = []
        for item in content:
            d = {t["token"]: t["logprob"] for t in item.get("top_logprobs") or ()}
            d.setdefault(item["token"], item["logprob"])
            top.append(d)
    return Completion(
        texts=[(c.get("message") or {}).get("content") or "" for c in choices],
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        logprobs=top,
        finish_reasons=[str(c.get("finish_reason")) for c in choices],
        cached_prompt_tokens=cached_tokens(usage),
    )


def cached_tokens(usage: dict[str, Any]) -> int:
    """The prompt tokens a server says it served from its prefix cache: OpenAI's and vLLM's
    ``usage.prompt_tokens_details.cached_tokens`` (0 when it does not say)."""
    details = usage.get("prompt_tokens_details")
    try:
        return int((details or {}).get("cached_tokens") or 0) if isinstance(details, dict) else 0
    except (TypeError, ValueError):
        return 0


class Learned:
    """What one client found out about its server, and the dialect it sends from it.

    ``kind``: ``vllm``, ``openai`` (refused vLLM's fields, or named so), ``transformers`` (an
    OpenAI-style server known to be ``transformers serve``: asked to sample when temperature > 0)
    or ``unknown`` (took vLLM's fields without a word, or was not asked for any). ``caps``: what
    the server was seen to do, True, False or None (not seen yet): ``vllm_fields`` (continuation,
    structured choice), ``logprobs``, ``n`` (n samples in one answer), ``json_schema`` (honours
    response_format). ``notes``: counts of adaptations made (continuations sent as a new turn, ...).
    """

    def __init__(self, server: str) -> None:
        self.server = server
        self.kind = server if server != "auto" else "unknown"
        self.caps: dict[str, bool | None] = {"vllm_fields": {"vllm": True, "openai": False}.get(server),
                                             "logprobs": None, "n": None, "json_schema": None}
        self.refused: set[str] = set()
        self.notes: Counter[str] = Counter()
        self._known: tuple[tuple[Any, ...], Dialect] | None = None

    def dialect(self) -> Dialect:
        """What to send, for what is known now (built again only when that changed)."""
        caps = self.caps
        key = (caps["vllm_fields"] is not False, caps["json_schema"] is not False, caps["n"] is not False,
               len(self.refused), self.kind)
        if self._known is None or self._known[0] != key:
            sample = self.kind == "transformers" and "generation_config" not in self.refused
            self._known = key, Dialect(vllm_fields=key[0], json_schema=key[1], n=key[2],
                                       refused=frozenset(self.refused), do_sample=sample)
        return self._known[1]

    def confirm_vllm(self) -> None:
        if self.server == "auto" and self.caps["vllm_fields"] is None:
            self.kind, self.caps["vllm_fields"] = "vllm", True

    def read_listing(self, models: Any, model_id: str) -> None:
        """Tell the server from its model listing: vLLM says ``owned_by: vllm``; transformers serve
        adds a ``status`` (loaded or not) that no other server sends."""
        entries = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
        entry = next((m for m in entries if m.get("id") == model_id), entries[0] if entries else {})
        if entry.get("owned_by") == "vllm":
            self.confirm_vllm()
        elif isinstance(entry.get("status"), dict) and self.server != "vllm" and self.kind != "vllm":
            self.kind, self.caps["vllm_fields"] = "transformers", False

    def learn_refusal(self, message: str, body: dict[str, Any]) -> None:
        """A 400/422 that names fields we sent as unknown: stop sending them from now on."""
        named = refused_fields(message, [k for k in body if k not in ("model", "messages")])
        if named & VLLM_FIELDS and self.server == "auto" and self.kind == "unknown":
            self.kind, self.caps["vllm_fields"] = "openai", False
        for f in named & OPTIONAL_FIELDS:
            if f not in self.refused:
                self.refused.add(f)
                self.notes[f"refused field {f}"] += 1
                if f in _CAPABILITY_OF:
                    self.caps[_CAPABILITY_OF[f]] = False

    def fit(self, req: Request, body: dict[str, Any], mode: str | None, c: Completion) -> None:
        """Read an answer for what it tells of the server; the choice out of JSON or plain text, the
        missing samples of a greedy request (copies of the first)."""
        s = req.sampling
        if s.logprobs is not None and "logprobs" in body:
            self.caps["logprobs"] = c.logprobs is not None
        if req.continues and "continue_final_message" not in body:
            self.notes["continuation sent as a new turn"] += 1
        if s.choices is not None:
            # vLLM's structured answer is a choice already; a lenient server that ignored
            # structured_outputs, a JSON answer or a plain one is read strictly; else kept raw
            picked = [t if t in s.choices else parse_choice(t, s.choices) for t in c.texts]
            if mode == "json_schema" and all(p is not None for p in picked):
                self.caps["json_schema"] = True
            if mode != "structured":
                self.notes[f"choice by {mode}"] += 1
            if any(p is None for p in picked):
                self.notes[f"choice by {mode}: unparseable answer"] += 1
            c.texts = [p if p is not None else t for p, t in zip(picked, c.texts, strict=True)]
        if s.n > 1 and body.get("n", 1) > 1:
            self.caps["n"] = len(c.texts) >= s.n
        if 0 < len(c.texts) < s.n and s.temperature == 0:  # greedy: every sample is the first, as vLLM's n gives
            self.notes["greedy samples copied (n ignored)"] += s.n - len(c.texts)
            c.texts += [c.texts[0]] * (s.n - len(c.texts))
            c.finish_reasons += c.finish_reasons[:1] * (s.n - len(c.finish_reasons))
