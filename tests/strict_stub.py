"""A strict OpenAI-style chat server with no model, as OpenAI's own API behaves for cai's requests.

- a field outside OpenAI's chat-completions schema -> HTTP 400 ``Unrecognized request argument(s)
  supplied: ...`` (so vLLM's ``continue_final_message``, ``structured_outputs``, ... are refused);
- ``n`` is accepted and ignored (one choice comes back), ``logprobs`` is accepted and no log-probs
  come back (``"logprobs": null``);
- ``response_format`` ``json_schema`` is honoured (``{"answer": <one of the enum>}``) unless
  ``json_schema=False``, when it is refused with a 400 as older OpenAI models do;
- a plain answer otherwise, from ``reply(body)`` (default: a text that depends on the messages and
  the seed, so that re-asked samples differ).

In-process: ``with StrictStub() as s: ...`` runs it on 127.0.0.1 on its own loop and thread; it
records every body it was sent (``bodies``) and stops by itself after ``max_seconds``.
``python -m tests.strict_stub --port 0`` runs it alone and prints ``listening on PORT``.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.threaded_server import ThreadedServer

MODEL = "strict-model"
# OpenAI's chat-completions request fields (the ones a client may send).
OPENAI_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed",
    "stop", "logprobs", "top_logprobs", "response_format", "frequency_penalty", "presence_penalty",
    "logit_bias", "user", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
    "metadata", "store", "service_tier", "reasoning_effort", "modalities", "audio", "prediction",
    "web_search_options", "prompt_cache_key", "safety_identifier", "verbosity",
})
Reply = Callable[[dict[str, Any]], str]


def default_reply(body: dict[str, Any]) -> str:
    h = zlib.crc32(json.dumps([body.get("messages"), body.get("seed")], sort_keys=True).encode())
    return f"Strict answer {h:08x}: a short, careful reply."


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": param, "code": None}}, status=status)


class StrictStub(ThreadedServer):
    name = "strict-stub"

    def __init__(self, json_schema: bool = True, reply: Reply = default_reply, max_seconds: float = 120.0) -> None:
        self.json_schema = json_schema
        self.reply = reply
        self.bodies: list[dict[str, Any]] = []
        self.refused: list[list[str]] = []  # the unknown fields of each refused request
        super().__init__(max_seconds)

    # ------------------------------------------------------------------------------ handlers
    async def _chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        self.bodies.append(body)
        unknown = sorted(set(body) - OPENAI_FIELDS)
        if unknown:
            self.refused.append(unknown)
            s = "s" if len(unknown) > 1 else ""
            return _error(400, f"Unrecognized request argument{s} supplied: {', '.join(unknown)}")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' is a required property", "messages")
        if body["model"] != MODEL:
            return _error(404, f"The model `{body['model']}` does not exist.", "model")
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            return _error(400, "'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        rf = body.get("response_format")
        if rf is not None and rf.get("type") == "json_schema":
            if not self.json_schema:
                return _error(400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                                   "with this model.", "response_format")
            schema = rf["json_schema"]["schema"]
            if schema.get("type") != "object" or schema.get("additionalProperties") is not False:
                return _error(400, "Invalid schema for response_format: the root must be an object with "
                                   "additionalProperties false.", "response_format")
            key, prop = next(iter(schema["properties"].items()))
            enum = prop["enum"]
            h = zlib.crc32(json.dumps(body["messages"], sort_keys=True).encode())
            text = json.dumps({key: enum[h % len(enum)]})
        else:
            text = self.reply(body)
        words = len(text.split())
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 4096
        finish = "length" if words > limit else "stop"
        if finish == "length":
            text = " ".join(text.split()[:limit])
        prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        return web.json_response({
            "id": "chatcmpl-strict", "object": "chat.completion", "created": 0, "model": MODEL,
            "system_fingerprint": "fp_strict",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": min(words, limit),
                      "total_tokens": prompt + min(words, limit)},
        })

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "system"}]})

    # ---------------------------------------------------------------------------- lifecycle
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--no-json-schema", action="store_true", help="refuse response_format json_schema")
    args = ap.parse_args()
    stub = StrictStub(json_schema=not args.no_json_schema, max_seconds=args.max_seconds).start(args.port)
    print(f"listening on {stub.base_url.rsplit(':', 1)[1].split('/')[0]}", flush=True)
    try:
        stub._thread.join(args.max_seconds + 5)
    finally:
        stub.stop()
