"""The OpenAI-server client: against a tiny in-process aiohttp stub, then a real vLLM server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from cai.backends import make_backend
from cai.backends.base import Message, Request, Sampling
from cai.backends.dialect import build_body, parse_response
from cai.backends.openai_server import OpenAIServerBackend
from cai.errors import BackendError
from cai.stages.runner import Call, Outcome, run_rows
from tests.fake_server import RouteServer
from tests.sync import Sync

Handler = Callable[[dict[str, Any], "Stub"], "web.Response | Any"]


def ok_body(text: str = "hello", n: int = 1, top: dict[str, float] | None = None) -> dict[str, Any]:
    lp = None
    if top is not None:
        tok = max(top, key=lambda t: top[t])
        lp = {"content": [{"token": tok, "logprob": top[tok], "bytes": None,
                           "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]}]}
    return {
        "id": "x", "object": "chat.completion", "model": "stub-model",
        "choices": [{"index": i, "message": {"role": "assistant", "content": f"{text}{i or ''}"},
                     "logprobs": lp if i == 0 else None, "finish_reason": "stop"}
                    for i in reversed(range(n))],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2 * n, "total_tokens": 7 + 2 * n},
    }


@dataclass
class Stub:
    """An aiohttp app on its own loop and thread; ``handler`` answers POST /chat/completions."""

    handler: Handler
    base_url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    state: dict[str, Any] = field(default_factory=dict)


STUB = web.AppKey("stub", Stub)


async def _chat(request: web.Request) -> web.StreamResponse:
    stub = request.app[STUB]
    body = await request.json()
    stub.bodies.append(body)
    stub.calls += 1
    stub.in_flight += 1
    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
    try:
        res = stub.handler(body, stub)
        if asyncio.iscoroutine(res):
            res = await res
        return res if isinstance(res, web.StreamResponse) else web.json_response(res)
    finally:
        stub.in_flight -= 1


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "stub-model"}, {"id": "other"}]})


@pytest.fixture
def stub() -> Iterator[Callable[[Handler], Stub]]:
    servers: list[RouteServer] = []

    def start(handler: Handler) -> Stub:
        s = Stub(handler)

        def routes(app: web.Application) -> None:
            app[STUB] = s
            app.router.add_post("/v1/chat/completions", _chat)
            app.router.add_get("/v1/models", _models)

        servers.append(server := RouteServer(routes).start())
        s.base_url = server.base_url
        return s

    yield start
    for server in servers:
        server.stop()


def user(text: str) -> tuple[Message, ...]:
    return ({"role": "user", "content": text},)


def client(s: Stub, **kw: Any) -> Sync:
    kw.setdefault("backoff", 0.01)
    return Sync(OpenAIServerBackend(base_url=s.base_url, **kw))


def test_model_discovered_and_response_mapped(stub: Callable[[Handler], Stub]) -> None:
    s = stub(lambda body, s: ok_body("hi", n=body["n"], top={"A": -0.1, " B": -2.5}))
    with client(s) as be:
        assert be.model_id == "stub-model"
        [c] = be.complete([Request(user("x"), Sampling(n=3, logprobs=2))])
    assert c.error is None
    assert c.texts == ["hi", "hi1", "hi2"]  # ordered by index
    assert (c.prompt_tokens, c.completion_tokens) == (7, 6)
    assert c.logprobs == [{"A": -0.1, " B": -2.5}]
    assert c.finish_reasons == ["stop"] * 3
    assert s.bodies[0]["model"] == "stub-model"
    assert s.bodies[0]["logprobs"] is True and s.bodies[0]["top_logprobs"] == 2


def test_429_then_success_is_retried(stub: Callable[[Handler], Stub]) -> None:
    def handler(body: dict[str, Any], s: Stub) -> Any:
        if s.calls == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429,
                                     headers={"Retry-After": "0"})
        return ok_body()

    s = stub(handler)
    with client(s, model="m") as be:
        [c] = be.complete([Request(user("x"))])
    assert c.error is None and c.text == "hello"
    assert s.calls == 2


def test_5xx_gives_up_after_max_retries_without_raising(stub: Callable[[Handler], Stub]) -> None:
    s = stub(lambda body, s: web.json_response({"error": {"message": "boom"}}, status=503))
    with client(s, model="m", max_retries=2) as be:
        [c] = be.complete([Request(user("x"))])
    assert c.texts == [] and c.error is not None and "503" in c.error and "boom" in c.error
    assert c.failure is not None and c.failure.kind == "server"  # retries ran out: the server's fault
    assert s.calls == 3


def test_400_is_an_error_completion_not_retried(stub: Callable[[Handler], Stub]) -> None:
    def handler(body: dict[str, Any], s: Stub) -> Any:
        if body["messages"][0]["content"] == "bad":
            return web.json_response(
                {"error": {"message": "max_tokens must be at least 1", "code": 400}}, status=400
            )
        return ok_body()

    s = stub(handler)
    with client(s, model="m") as be:
        good, bad, good2 = be.complete(
            [Request(user("ok")), Request(user("bad")), Request(user("ok"))]
        )
    assert good.text == "hello" and good2.text == "hello"
    assert bad.texts == [] and bad.error == "HTTP 400: max_tokens must be at least 1"
    assert bad.failure is not None and bad.failure.kind == "request"
    assert s.calls == 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_raises_backend_error() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(BackendError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1: is the"):
        OpenAIServerBackend(base_url=url, max_retries=1, backoff=0.01)
    with Sync(OpenAIServerBackend(model="m", base_url=url, max_retries=1, backoff=0.01)) as be:
        out = be.complete([Request(user("x"))] * 5)  # typed where it happened: unreachable
        assert {c.failure.kind for c in out if c.failure} == {"unreachable"} and not any(c.texts for c in out)
        assert all(c.error and c.error.startswith(f"cannot reach {url}: is the") for c in out)

        async def ask(item: int, call: Call) -> list[Outcome]:
            await call(Request(user(str(item))))
            return []

        with pytest.raises(BackendError, match="cannot reach"):  # and the run stops
            run_rows(range(5), ask, be.backend)


def test_model_listing_that_keeps_failing_says_how() -> None:
    """A server whose GET /models keeps answering 503 (a model still loading, say): the error names
    the answer, neither a class name nor a "cannot reach" (it answered)."""
    async def loading(_: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "model is loading"}}, status=503)

    server = RouteServer(lambda app: app.router.add_get("/v1/models", loading)).start()
    try:
        with pytest.raises(BackendError) as e:
            OpenAIServerBackend(base_url=server.base_url, max_retries=1, backoff=0.01)
        assert str(e.value) == f"GET {server.base_url}/models: HTTP 503: model is loading"
    finally:
        server.stop()


def test_concurrency_really_overlaps_and_is_capped(stub: Callable[[Handler], Stub]) -> None:
    async def slow(body: dict[str, Any], s: Stub) -> Any:
        await asyncio.sleep(0.2)
        return ok_body(body["messages"][0]["content"])

    s = stub(slow)
    with client(s, model="m", concurrency=8) as be:
        t0 = time.perf_counter()
        out = be.complete([Request(user(str(i))) for i in range(32)])
        took = time.perf_counter() - t0
    assert [c.text for c in out] == [str(i) for i in range(32)]  # order kept
    assert s.max_in_flight == 8
    assert took < 32 * 0.2 / 3  # 4 waves of 0.2 s, not 32


def test_continue_final_message_and_structured_choice_sent(
    stub: Callable[[Handler], Stub],
) -> None:
    s = stub(lambda body, s: ok_body("A"))
    judge: tuple[Message, ...] = (
        {"role": "user", "content": "Which?"},
        {"role": "assistant", "content": "The answer is: ("},
    )
    with client(s, model="m", extra_body={"top_k": 5}) as be:
        be.complete([
            Request(user("plain"), Sampling(seed=None, stop=("\n",))),
            Request(judge, Sampling(max_tokens=1, logprobs=5)),
            Request(user("pick"), Sampling(choices=("A", "B"))),
        ])
    by = {b["messages"][0]["content"]: b for b in s.bodies}
    plain, cont, pick = by["plain"], by["Which?"], by["pick"]
    assert "continue_final_message" not in plain and "add_generation_prompt" not in plain
    assert plain["stop"] == ["\n"] and "seed" not in plain and "structured_outputs" not in plain
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert cont["messages"][-1] == {"role": "assistant", "content": "The answer is: ("}
    assert cont["top_logprobs"] == 5 and cont["max_tokens"] == 1 and cont["seed"] == 0
    assert pick["structured_outputs"] == {"choice": ["A", "B"]}
    assert all(b["top_k"] == 5 for b in s.bodies)


def test_request_body_and_parse_edge_cases() -> None:
    body, _ = build_body(Request(user("x"), Sampling(choices=("y",))), "m",
                         {"structured_outputs": None, "guided_choice": ["y"]})
    assert body["structured_outputs"] is None and body["guided_choice"] == ["y"]
    assert parse_response({"choices": []}).error is not None
    c = parse_response({"choices": [{"index": 0, "message": {"content": None},
                                     "finish_reason": "length"}]})
    assert c.texts == [""] and c.logprobs is None and c.finish_reasons == ["length"]
    # repetition_penalty is a vLLM extension: sent only when set, so other servers never see it
    assert "repetition_penalty" not in build_body(Request(user("x")), "m", None)[0]
    assert build_body(Request(user("x"), Sampling(repetition_penalty=1.2)), "m", None)[0]["repetition_penalty"] == 1.2


def test_make_backend_openai(stub: Callable[[Handler], Stub]) -> None:
    s = stub(lambda body, s: ok_body())
    with Sync(make_backend("openai", base_url=s.base_url, model=None)) as be:
        assert be.model_id == "stub-model"
        assert be.complete([]) == []


# --------------------------------------------------------------------------- real vLLM server
JUDGE: tuple[Message, ...] = (
    {"role": "user", "content": "Which reply is more helpful?\n(A) Paris is the capital of "
     "France.\n(B) I don't know.\nAnswer with A or B."},
    {"role": "assistant", "content": "The answer is: ("},
)


@pytest.fixture(scope="module")
def served(vllm_server: str) -> Iterator[Sync]:
    with Sync(OpenAIServerBackend(base_url=vllm_server)) as be:
        yield be


@pytest.mark.integration
def test_real_plain_generation(served: Sync) -> None:
    assert served.model_id == "smollm2"
    [c] = served.complete([Request(user("What is the capital of France?"),
                                   Sampling(max_tokens=16))])
    assert c.error is None, c.error
    assert "Paris" in c.text
    assert c.prompt_tokens > 10 and 0 < c.completion_tokens <= 16
    assert c.finish_reasons[0] in ("stop", "length")


@pytest.mark.integration
def test_real_judge_continuation_logprobs(served: Sync) -> None:
    [c] = served.complete([Request(JUDGE, Sampling(max_tokens=1, logprobs=5))])
    assert c.error is None, c.error
    assert c.logprobs is not None and len(c.logprobs) == 1
    top = c.logprobs[0]
    assert 5 <= len(top) <= 6
    assert {"A", "B"} & {t.strip() for t in top}
    assert c.text.strip() in ("A", "B")  # continues "(", no new turn opened


@pytest.mark.integration
def test_real_n3_seeded_sampling(served: Sync) -> None:
    req = Request(user("Write one short sentence about the sea."),
                  Sampling(max_tokens=12, temperature=1.0, n=3, seed=7))
    a, b = served.complete([req, req])
    assert a.error is None and len(a.texts) == 3 and len(a.finish_reasons) == 3
    assert a.texts == b.texts  # same seed, same samples
    assert len(set(a.texts)) > 1


@pytest.mark.integration
def test_real_structured_choice(served: Sync) -> None:
    reqs = [Request(user(q), Sampling(max_tokens=4, choices=("A", "B")))
            for q in ("Pick A or B.", "Is B better than A? Say A or B.")]
    for c in served.complete(reqs):
        assert c.error is None, c.error
        assert c.texts[0] in ("A", "B")


@pytest.mark.integration
def test_real_bad_request_does_not_raise(served: Sync) -> None:
    good, bad = served.complete([Request(user("Hi"), Sampling(max_tokens=2)),
                                 Request(user("Hi"), Sampling(max_tokens=100_000))])
    assert good.error is None
    assert bad.texts == [] and bad.error is not None and bad.error.startswith("HTTP 400")
