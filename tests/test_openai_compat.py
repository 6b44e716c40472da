"""The openai backend against servers that are not vLLM, and against faults.

- the fake server in its strict mode (tests/fake_server.py, ``strict=True``), as OpenAI's API:
  unknown fields refused with 400, ``n`` ignored, no log-probs, ``response_format`` json_schema
  honoured (or refused);
- the fake server as a fault proxy (``upstream=``, ``faults=``) in front of its zero-latency stub:
  500s, 429s, stalls past the timeout, connections dropped mid-body, truncated JSON;
- a real ``transformers serve`` (tests/transformers_server.py), skipped when not installed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cai import runtime
from cai.backends.base import Message, Request, Sampling
from cai.backends.dialect import parse_choice, refused_fields
from cai.backends.openai_server import OpenAIServerBackend, fault_kind
from tests.fake_server import DEFAULT_FAULTS, MODEL, FakeConfig, FakeServer, RouteServer
from tests.sync import Sync
from tests.transformers_server import transformers_server  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parent.parent
JUDGE: tuple[Message, ...] = (
    {"role": "user", "content": "Which reply is more helpful?\n(A) Paris is the capital of France.\n"
                                "(B) I don't know.\nAnswer with the letter of the better option."},
    {"role": "assistant", "content": "The answer is: ("},
)
VLLM_ONLY = {"continue_final_message", "add_generation_prompt", "structured_outputs", "repetition_penalty"}


def user(text: str) -> tuple[Message, ...]:
    return ({"role": "user", "content": text},)


@pytest.fixture
def strict() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(strict=True, max_seconds=60)) as s:
        yield s


def backend(url: str, **kw: Any) -> Sync:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 10.0)
    return Sync(OpenAIServerBackend(base_url=url, **kw))


# ------------------------------------------------------------------------------- pure helpers
def test_refused_fields_reads_openai_fastapi_and_pydantic_messages() -> None:
    sent = ["max_tokens", "n", "seed", "continue_final_message", "add_generation_prompt", "logprobs"]
    assert refused_fields("Unrecognized request arguments supplied: add_generation_prompt, "
                          "continue_final_message", sent) == {"add_generation_prompt", "continue_final_message"}
    assert refused_fields("Unexpected fields in the request: {'continue_final_message'}", sent) == {
        "continue_final_message"}
    assert refused_fields("[{'type': 'extra_forbidden', 'loc': ('body', 'n'), 'msg': 'Extra inputs are not "
                          "permitted'}]", sent) == {"n"}
    assert refused_fields("Unrecognized request argument supplied: seed", sent) == {"seed"}
    # a message that names a field without refusing it teaches nothing
    assert refused_fields("max_tokens must be at least 1", sent) == set()
    assert refused_fields("Unknown model", sent) == set()


def test_parse_choice_is_strict() -> None:
    ch = ("A", "B")
    for text, want in [("A", "A"), (" (B).", "B"), ('"A"', "A"), ("**B**", "B"), ('{"answer": "B"}', "B"),
                       ("a", None), ("A or B", None), ("The answer is A", None), ("", None),
                       ('{"answer": "C"}', None), ('{"answer": "A"', None)]:
        assert parse_choice(text, ch) == want, text
    assert parse_choice("yes.", ("yes", "no")) == "yes"


def test_fault_kinds() -> None:
    import aiohttp

    assert fault_kind(TimeoutError()) == "timeout"
    assert fault_kind(aiohttp.ServerDisconnectedError()) == "disconnected"
    assert fault_kind(aiohttp.ClientPayloadError("cut")) == "payload"
    assert fault_kind(ConnectionResetError()) == "connection_reset"


# ------------------------------------------------------------------------------- strict stub
def test_strict_revise_style_calls_drop_vllm_fields_once(strict: FakeServer) -> None:
    system: Message = {"role": "system", "content": "You are a helpful assistant."}
    reqs = [Request((system, *user(f"question {i}")), Sampling(max_tokens=64, seed=100 + i, stop=("\n\n",),
                                                               repetition_penalty=1.2))
            for i in range(6)]
    with backend(strict.base_url, concurrency=1) as be:
        assert be.model_id == MODEL
        assert be.server_kind == "unknown"
        out = be.complete(reqs)
        assert be.server_kind == "openai" and be.capabilities["vllm_fields"] is False
    assert all(c.error is None and c.text.startswith("Fake answer") for c in out)
    assert len({c.text for c in out}) == 6
    # one refusal (the first request), then never again: detection is once per backend
    assert strict.refused == [["repetition_penalty"]]
    assert len(strict.bodies) == 7
    for b in strict.bodies[1:]:
        assert not VLLM_ONLY & set(b)
        assert b["stop"] == ["\n\n"] and b["max_tokens"] == 64 and b["messages"][0] == system
    assert [b["seed"] for b in strict.bodies[1:]] == list(range(100, 106))


def test_strict_judge_logprobs_call_continues_as_is_and_reports_no_logprobs(strict: FakeServer) -> None:
    with backend(strict.base_url) as be:
        [c] = be.complete([Request(JUDGE, Sampling(max_tokens=1, logprobs=20))])
        caps, notes = be.capabilities, be.notes
    assert c.error is None and c.text and c.logprobs is None  # the judge then falls back to a choice
    assert caps["logprobs"] is False and caps["vllm_fields"] is False
    assert notes["continuation sent as a new turn"] == 1
    first, last = strict.bodies
    assert first["continue_final_message"] is True  # auto tried vLLM's way first
    assert strict.refused == [["add_generation_prompt", "continue_final_message"]]
    assert last["messages"] == list(JUDGE) and not VLLM_ONLY & set(last)
    assert last["logprobs"] is True and last["top_logprobs"] == 20


def test_strict_choice_by_json_schema(strict: FakeServer) -> None:
    reqs = [Request(JUDGE, Sampling(max_tokens=1, choices=("A", "B"))),
            Request(user("Pick one."), Sampling(max_tokens=1, choices=("yes", "no")))]
    with backend(strict.base_url, server="openai") as be:
        out = be.complete(reqs)
        assert be.server_kind == "openai" and be.capabilities["json_schema"] is True
    assert out[0].text in ("A", "B") and out[1].text in ("yes", "no")
    assert strict.refused == []  # server="openai": vLLM's fields are never sent
    for b, ch in zip(strict.bodies, (["A", "B"], ["yes", "no"]), strict=True):
        assert b["response_format"]["json_schema"]["schema"]["properties"]["answer"]["enum"] == ch
        assert b["max_tokens"] >= 17 and "structured_outputs" not in b


def test_strict_choice_by_plain_answer_when_json_schema_is_refused() -> None:
    answers = iter([" (B).", "I think A is better", "A"])
    with FakeServer(FakeConfig(strict=True, json_schema=False, reply=lambda body: next(answers),
                               max_seconds=60)) as s, \
            backend(s.base_url, concurrency=1) as be:
        out = be.complete([Request(JUDGE, Sampling(max_tokens=1, choices=("A", "B")))] * 2
                          + [Request(user("Pick A or B."), Sampling(max_tokens=1, choices=("A", "B")))])
        caps, notes = be.capabilities, be.notes
    assert [c.text for c in out] == ["B", "I think A", "A"]  # 3 tokens; unparseable: raw, the judge abstains
    assert caps["json_schema"] is False and caps["vllm_fields"] is False
    assert notes["choice by plain: unparseable answer"] == 1
    # structured_outputs refused, then response_format refused, then plain for good
    assert s.refused == [["add_generation_prompt", "continue_final_message", "structured_outputs"]]
    plain = s.bodies[2:]
    assert len(plain) == 3 and all("response_format" not in b for b in plain)
    hint = 'Reply with exactly one of: "A", "B". Nothing else.'
    # the instruction joins the last user message; the assistant prefix is sent as is
    assert plain[0]["messages"] == [{"role": "user", "content": f"{JUDGE[0]['content']}\n\n{hint}"}, JUDGE[1]]
    assert plain[2]["messages"] == [{"role": "user", "content": f"Pick A or B.\n\n{hint}"}]
    assert all(b["max_tokens"] == 3 for b in plain)  # a short answer: "(A)" at most


def test_strict_n_ignored_asks_again_with_distinct_seeds(strict: FakeServer) -> None:
    with backend(strict.base_url, server="openai", concurrency=1) as be:
        [a] = be.complete([Request(user("sea"), Sampling(n=3, seed=5, temperature=1.0))])
        assert be.capabilities["n"] is False
        [b] = be.complete([Request(user("sea"), Sampling(n=3, seed=5, temperature=1.0))])
        [none] = be.complete([Request(user("sky"), Sampling(n=2, seed=None, temperature=1.0))])
        [greedy] = be.complete([Request(user("sun"), Sampling(n=3, seed=1, temperature=0.0))])
        assert be.notes["greedy samples copied (n ignored)"] == 2
    assert len(greedy.texts) == 3 and len(set(greedy.texts)) == 1 and len(strict.bodies) == 9  # one request
    assert a.error is None and len(a.texts) == 3 and len(set(a.texts)) == 3
    assert a.texts == b.texts  # reproducible: the same seeds again
    assert len(a.finish_reasons) == 3 and a.prompt_tokens > 0
    seeds = [(x["n"], x.get("seed")) for x in strict.bodies]
    # first call: n=3 sent and ignored, the 2 missing asked with seeds 6, 7; then n=1 from the start
    assert seeds[:3] == [(3, 5), (1, 6), (1, 7)] and seeds[3:6] == [(1, 5), (1, 6), (1, 7)]
    assert len(none.texts) == 2 and all("seed" not in x for x in strict.bodies[6:8])


def test_explicit_vllm_server_does_not_drop_fields(strict: FakeServer) -> None:
    with backend(strict.base_url, server="vllm") as be:
        [c] = be.complete([Request(JUDGE, Sampling(max_tokens=1))])
        assert be.server_kind == "vllm"
    assert c.texts == [] and c.error is not None and c.error.startswith("HTTP 400: Unrecognized request")
    assert len(strict.bodies) == 1


def test_runs_on_one_loop_share_what_was_learnt(strict: FakeServer) -> None:
    req = Request(JUDGE, Sampling(max_tokens=1, logprobs=5))
    with backend(strict.base_url) as be:
        [a] = be.complete([req])  # learns that vLLM's fields are refused
        b = runtime.run(be.generate(req))  # a later run on the same loop: the same session, what was learnt kept
        [c] = be.complete([req])
        assert be.server_kind == "openai"
    assert a.text == b.text == c.text and a.error is None and a.logprobs is None
    assert len(strict.bodies) == 4 and strict.refused == [["add_generation_prompt", "continue_final_message"]]


@pytest.fixture
def tiny() -> Iterator[Any]:
    """``tiny(listing, chat=None)``: an aiohttp app on 127.0.0.1 serving ``listing`` as GET /v1/models
    (and ``chat`` as POST /v1/chat/completions); returns its base URL."""
    servers: list[RouteServer] = []

    def start(listing: list[dict[str, Any]], chat: Any = None) -> str:
        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": listing})

        def routes(app: web.Application) -> None:
            app.router.add_get("/v1/models", models)
            if chat is not None:
                app.router.add_post("/v1/chat/completions", chat)

        servers.append(server := RouteServer(routes, handler_cancellation=True).start())
        return server.base_url

    yield start
    for server in servers:
        server.stop()


def test_vllm_detected_from_models_listing(tiny: Any) -> None:
    url = tiny([{"id": "other", "owned_by": "someone"}, {"id": "m", "owned_by": "vllm"}])
    with backend(url) as be:  # the model is discovered: the listing is read at once
        assert be.server_kind == "unknown"  # the first entry, "other", is not vLLM's
    with backend(url, model="m") as be:  # the model is named: the listing is read on the first call
        assert be.server_kind == "unknown"
        be.complete([])
        assert be.server_kind == "unknown"
        [c] = be.complete([Request(user("x"))])  # no chat route: an error, but the probe ran
        assert c.error is not None and be.server_kind == "vllm" and be.capabilities["vllm_fields"] is True


def test_transformers_serve_detected_and_asked_to_sample(tiny: Any) -> None:
    bodies: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]})

    url = tiny([{"id": "/models/x", "owned_by": "local", "object": "model", "status": {"value": "loaded"}}], chat)
    with backend(url, model="/models/x") as be:
        out = be.complete([Request(user("a"), Sampling(temperature=1.0, seed=3)), Request(JUDGE, Sampling())])
        assert be.server_kind == "transformers" and be.capabilities["vllm_fields"] is False
    assert all(c.text == "hi" for c in out)
    hot, cold = sorted(bodies, key=lambda b: b["temperature"], reverse=True)
    assert hot["generation_config"] == '{"do_sample": true, "top_k": 0}' and "generation_config" not in cold
    assert not VLLM_ONLY & set(cold)  # no 422 needed: the listing told


# ------------------------------------------------------------------------------------ faults
def test_fault_proxy_every_request_ends_answered_or_with_a_reason(stub_server: str) -> None:
    t0 = time.perf_counter()
    reqs = [Request(user(f"question {i}"), Sampling(max_tokens=8, logprobs=2 if i % 3 == 0 else None,
                                                    n=2 if i % 5 == 0 else 1))
            for i in range(300)]
    with FakeServer(FakeConfig(upstream=stub_server, faults=DEFAULT_FAULTS, stall_s=3.0, fault_retry_after="0.1",
                               seed=13, max_seconds=150)) as proxy, \
            backend(proxy.base_url, timeout=1.0, backoff=0.05, concurrency=16) as be:
        out = be.complete(reqs)
        retries, faults = be.retries, dict(proxy.faults_drawn)
    took = time.perf_counter() - t0
    errors = [c.error for c in out if c.error]
    for c in out:
        assert c.error is not None or c.texts, c
    for e in errors:  # retries ran out: the reason and the attempts are named
        assert "gave up after 6 attempts" in e and any(
            w in e for w in ("HTTP 500", "HTTP 429", "timed out", "mid-body", "malformed JSON")), e
    answered = [c for c in out if c.error is None]
    assert len(answered) >= 295
    assert all(len(c.texts) == (2 if i % 5 == 0 else 1) for i, c in enumerate(out) if c.error is None)
    assert all(c.logprobs is not None for i, c in enumerate(out) if i % 3 == 0 and c.error is None)
    # every injected fault was seen and retried (a fault on a last attempt is not retried)
    expect = {"http_500": "http_500", "http_429": "http_429", "stall": "timeout", "drop": "payload",
              "truncate": "bad_json"}
    for fate, kind in expect.items():
        assert faults.get(fate, 0) > 0, faults
        assert faults[fate] - len(errors) <= retries.get(kind, 0) <= faults[fate], (fate, faults, retries)
    assert sum(retries.values()) >= sum(v for k, v in faults.items() if k != "ok") - len(errors)
    print(f"\nfault proxy: {len(answered)}/300 answered, {len(errors)} errors, faults {faults}, "
          f"retries {retries}, {took:.1f} s")
    assert took < 150  # a Retry-After holds the whole server's new requests (as providers ask)


def test_timeout_is_retried_and_retry_after_honoured() -> None:
    calls: list[float] = []

    async def chat(request: web.Request) -> web.Response:
        calls.append(time.perf_counter())
        if len(calls) == 1:
            await asyncio.sleep(2.0)  # past the 0.5 s timeout
        if len(calls) == 2:
            return web.json_response({"error": {"message": "busy"}}, status=429, headers={"Retry-After": "0.4"})
        if len(calls) == 3:
            return web.Response(body=b'{"choices": [{"index": 0, "mess', content_type="application/json")
        return web.json_response({"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]})

    with RouteServer(lambda app: app.router.add_post("/v1/chat/completions", chat), handler_cancellation=True) as s:
        with backend(s.base_url, model="m", timeout=0.5, backoff=0.01) as be:
            [c] = be.complete([Request(user("x"))])
            assert be.retries == {"timeout": 1, "http_429": 1, "bad_json": 1}
            assert len(calls) == 4 and calls[2] - calls[1] >= 0.4  # Retry-After: 0.4, not the 0.01 s backoff
        with backend(s.base_url, model="m", timeout=0.5, max_retries=0) as be:
            calls.clear()
            [bad] = be.complete([Request(user("x"))])
    assert c.error is None and c.text == "ok" and len(calls) == 1  # the second backend: one try
    assert bad.error == "timed out after 0.5 s (gave up after 1 attempts)"


# ---------------------------------------------------------------------- real transformers serve
@pytest.fixture
def tserve(transformers_server: str) -> Iterator[Sync]:  # noqa: F811
    with Sync(OpenAIServerBackend(base_url=transformers_server, concurrency=2, timeout=120.0, backoff=0.2)) as be:
        yield be


@pytest.mark.integration
def test_transformers_plain_generation(tserve: Sync) -> None:
    assert tserve.model_id.endswith("SmolLM2-135M-Instruct")
    [c] = tserve.complete([Request(user("What is the capital of France?"), Sampling(max_tokens=12))])
    assert c.error is None, c.error
    assert "Paris" in c.text
    assert c.prompt_tokens > 10 and 0 < c.completion_tokens <= 12 and c.finish_reasons[0] in ("stop", "length")


@pytest.mark.integration
def test_transformers_continued_assistant_message(tserve: Sync) -> None:
    [c] = tserve.complete([Request(JUDGE, Sampling(max_tokens=4))])
    assert c.error is None, c.error
    assert c.text.strip()
    assert tserve.server_kind == "transformers" and tserve.capabilities["vllm_fields"] is False
    assert tserve.notes["continuation sent as a new turn"] == 1


@pytest.mark.integration
def test_transformers_choice_logprobs_and_n(tserve: Sync) -> None:
    choice, lp, n2 = tserve.complete([
        Request(JUDGE, Sampling(max_tokens=1, choices=("A", "B"))),
        Request(JUDGE, Sampling(max_tokens=1, logprobs=5)),
        Request(user("Write one short sentence about the sea."), Sampling(max_tokens=4, n=2, temperature=1.0,
                                                                          seed=7)),
    ])
    caps = tserve.capabilities
    # choice: it ignores response_format, so the answer is a plain one, parsed strictly
    assert choice.error is None, choice.error
    assert caps["json_schema"] is False
    assert choice.text in ("A", "B") or tserve.notes.get("choice by plain: unparseable answer") == 1
    # logprobs: none come back -> None (the judge then asks for a choice)
    assert lp.error is None and lp.logprobs is None and caps["logprobs"] is False
    # n: ignored, so the second sample is asked for again with seed 8; sampled, not greedy
    assert n2.error is None and len(n2.texts) == 2 and caps["n"] is False
    assert n2.texts[0] != n2.texts[1]
    print(f"\ntransformers serve: choice {choice.text!r}, n=2 {n2.texts}, {tserve.describe()}")


# ------------------------------------------------------------------------------ real vLLM server
@pytest.mark.integration
def test_vllm_server_detected_and_fully_capable(vllm_server: str) -> None:
    with Sync(OpenAIServerBackend(base_url=vllm_server, model="smollm2", concurrency=2)) as be:
        assert be.server_kind == "unknown"  # the model was named: the listing is read on the first call
        lp, n2 = be.complete([Request(JUDGE, Sampling(max_tokens=1, logprobs=5)),
                              Request(user("Say hi."), Sampling(max_tokens=2, n=2, temperature=1.0, seed=1))])
        assert be.server_kind == "vllm"
        assert be.capabilities == {"vllm_fields": True, "logprobs": True, "n": True, "json_schema": None}
        assert be.notes == {} and be.retries == {}
    assert lp.error is None and lp.logprobs is not None and n2.error is None and len(n2.texts) == 2
