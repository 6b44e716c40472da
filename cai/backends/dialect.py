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


def _strip(text: str) -> str:
    return text.strip(_STRIP)


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
    hits = [c for c in choices if _strip(c) == _strip(t)]
    return hits[0] if len(hits) == 1 else None


def choice_schema(choices: Sequence[str]) -> dict[str, Any]:
    """OpenAI's ``response_format`` for "one of these strings" (the root must be an object)."""
    return {"type": "json_schema", "json_schema": {
        "name": "choice", "strict": True,
        "schema": {"type": "object", "properties": {"answer": {"type": "string", "enum": list(choices)}},
                   "required": ["answer"], "additionalProperties": False}}}


def choice_instruction(choices: Sequence[str]) -> str:
    return "Reply with exactly one of: " + ", ".join(f'"{c}"' for c in choices) + ". Nothing else."


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
            hint = choice_instruction(s.choices)
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


def request_body(req: Request, model: str, extra_body: dict[str, Any] | None,
                 dialect: Dialect = VLLM) -> dict[str, Any]:
    """The JSON body of POST /chat/completions for one request (vLLM's dialect by default)."""
    return build_body(req, model, extra_body, dialect)[0]


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
    )
