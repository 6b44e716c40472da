"""The embedded transformers backend on the real SmolLM2 model, and against a real vLLM server."""

from __future__ import annotations

import os
from typing import Any

import pytest

from cai.backends.base import Completion, Message, Request, Sampling
from cai.backends.embedded import EmbeddedBackend
from cai.backends.openai_server import OpenAIServerBackend
from cai.errors import ModelNotPreparedError
from tests.sync import Sync

pytestmark = pytest.mark.integration


def user(text: str) -> tuple[Message, ...]:
    return ({"role": "user", "content": text},)


def judge(question: str, a: str, b: str) -> tuple[Message, ...]:
    return (
        {"role": "user", "content": f"{question}\n(A) {a}\n(B) {b}\nAnswer with A or B."},
        {"role": "assistant", "content": "The answer is: ("},
    )


JUDGES = [
    judge("Which reply is more helpful?", "Paris is the capital of France.", "I don't know."),
    judge("Which reply is more harmless?", "Here is how to pick a lock to break in.",
          "I can't help with breaking into homes."),
    judge("Which is more polite?", "Shut up.", "Thank you for asking!"),
]


def ok(c: Completion) -> Completion:
    assert c.error is None, c.error
    return c


def test_missing_model_folder_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(ModelNotPreparedError, match="cai prepare-model"):
        EmbeddedBackend(model=str(tmp_path / "nowhere"))


def test_generation(embedded: Sync) -> None:
    assert embedded.model_id == "SmolLM2-135M-Instruct@embedded"
    c = ok(embedded.complete([Request(user("What is the capital of France?"),
                                      Sampling(max_tokens=16))])[0])
    assert "Paris" in c.text
    assert c.prompt_tokens > 10 and 0 < c.completion_tokens <= 16
    assert c.finish_reasons == ["stop"] and c.logprobs is None


def test_batch_equals_one_by_one(embedded: Sync) -> None:
    reqs = [
        Request(user("Name a colour."), Sampling(max_tokens=8)),
        Request(user("Give me a long list of ten fruits, one per line, with a short note on each."),
                Sampling(max_tokens=8)),
        Request(JUDGES[0], Sampling(max_tokens=2, logprobs=3)),
    ]
    together = embedded.complete(reqs)
    alone = [embedded.complete([r])[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert ok(a).texts == ok(b).texts
        assert a.completion_tokens == b.completion_tokens
    assert together[2].logprobs is not None and alone[2].logprobs is not None
    for x, y in zip(together[2].logprobs, alone[2].logprobs, strict=True):
        assert x.keys() == y.keys()
        assert all(abs(x[k] - y[k]) < 1e-3 for k in x)


def test_continuation_with_logprobs(embedded: Sync) -> None:
    c = ok(embedded.complete([Request(JUDGES[0], Sampling(max_tokens=2, logprobs=5))])[0])
    assert c.logprobs is not None and len(c.logprobs) == c.completion_tokens == 2
    first = c.logprobs[0]
    assert 5 <= len(first) <= 6 and all(v <= 0 for v in first.values())
    assert {"A", "B"} <= {t.strip() for t in first}
    # the model continued "(": its first token is the letter, not a new assistant turn
    best = max(first, key=lambda t: first[t])
    assert c.text.startswith(best) and best.strip() in ("A", "B")


def test_n_samples_are_seeded_and_reproducible(embedded: Sync) -> None:
    prompt = user("Write one short sentence about the sea.")
    req = Request(prompt, Sampling(max_tokens=6, temperature=1.0, n=3, seed=7))
    other = Request(prompt, Sampling(max_tokens=6, temperature=1.0, n=3, seed=8))
    a, b, c = embedded.complete([req, req, other])
    again = embedded.complete([req])[0]  # a different batch: same samples
    assert len(ok(a).texts) == 3 and len(a.finish_reasons) == 3
    assert a.texts == b.texts == again.texts
    assert ok(c).texts != a.texts and len(set(a.texts)) > 1
    greedy = ok(embedded.complete([Request(prompt, Sampling(max_tokens=6, n=2))])[0])
    assert len(greedy.texts) == 2 and greedy.texts[0] == greedy.texts[1]


def test_stop_strings(embedded: Sync) -> None:
    prompt = user("List three fruits, separated by commas.")
    full = ok(embedded.complete([Request(prompt, Sampling(max_tokens=24))])[0]).text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = ok(embedded.complete([Request(prompt, Sampling(max_tokens=24, stop=(stop, "zzz")))])[0])
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reasons == ["stop"] and cut.completion_tokens < 24


def test_choices(embedded: Sync) -> None:
    reqs = [Request(j, Sampling(choices=("A", "B"), logprobs=2)) for j in JUDGES]
    reqs.append(Request(user("Is the sky blue? Answer yes or no."),
                        Sampling(choices=("yes", "no", "maybe not"))))
    reqs.append(Request(JUDGES[0], Sampling(choices=("A", "B"), temperature=1.0, n=4, seed=1)))
    scored = embedded.complete([Request(j, Sampling(max_tokens=1, logprobs=20)) for j in JUDGES])
    out = embedded.complete(reqs)
    for c, s in zip(out[:3], scored, strict=True):
        assert ok(c).texts[0] in ("A", "B")
        lp = s.logprobs[0] if s.logprobs else {}
        assert c.text == max(("A", "B"), key=lambda t: lp.get(t, -1e9))
        assert c.logprobs is not None and c.text in c.logprobs[0]
    assert ok(out[3]).text in ("yes", "no", "maybe not")
    assert len(ok(out[4]).texts) == 4 and set(out[4].texts) <= {"A", "B"}
    assert embedded.complete([reqs[-1]])[0].texts == out[4].texts


def test_a_bad_request_does_not_sink_the_batch(embedded: Sync) -> None:
    good, bad, empty = embedded.complete([
        Request(user("Hi"), Sampling(max_tokens=2)),
        Request(user("Hi"), Sampling(max_tokens=2, n=0)),
        Request(user("Hi"), Sampling(choices=())),
    ])
    assert ok(good).texts and bad.texts == [] and bad.error and empty.error


LOOPY = user("Write a poem about the sea.")  # greedy, SmolLM2 repeats its lines


def test_repetition_penalty_breaks_loops(embedded: Sync) -> None:
    plain, penal = (ok(c) for c in embedded.complete([
        Request(LOOPY, Sampling(max_tokens=40, logprobs=1)),
        Request(LOOPY, Sampling(max_tokens=40, logprobs=1, repetition_penalty=1.5)),
    ]))
    assert plain.completion_tokens == penal.completion_tokens == 40
    assert penal.text != plain.text
    words = lambda t: t.lower().split()  # noqa: E731
    assert len(set(words(penal.text))) > len(set(words(plain.text))), (plain.text, penal.text)
    # log-probs are reported before the penalty, as vLLM does: both first steps pick "In" from
    # the same distribution
    assert plain.logprobs and penal.logprobs
    assert penal.logprobs[0] == pytest.approx(plain.logprobs[0], abs=1e-4)


def test_agrees_with_vllm_on_the_judge_token(embedded: Sync, vllm_server: str) -> None:
    reqs = [Request(j, Sampling(max_tokens=1, logprobs=5)) for j in JUDGES]
    server = Sync(OpenAIServerBackend(base_url=vllm_server))
    try:
        theirs = server.complete(reqs)
    finally:
        server.close()
    ours = embedded.complete(reqs)
    for o, t in zip(ours, theirs, strict=True):
        assert ok(o).prompt_tokens == ok(t).prompt_tokens  # same chat template rendering
        assert o.logprobs and t.logprobs
        mine, vllm = o.logprobs[0], t.logprobs[0]
        top2 = sorted(mine, key=lambda k: -mine[k])[:2]
        assert set(top2) == set(sorted(vllm, key=lambda k: -vllm[k])[:2])
        assert o.text == t.text  # greedy first token: both float32
        for tok in top2:
            assert abs(mine[tok] - vllm[tok]) < 0.02, (tok, mine[tok], vllm[tok])


def test_repetition_penalty_means_what_vllm_means(embedded: Sync, vllm_server: str) -> None:
    reqs = [Request(LOOPY, Sampling(max_tokens=12, repetition_penalty=1.5))]
    server = Sync(OpenAIServerBackend(base_url=vllm_server))
    try:
        theirs = ok(server.complete(reqs)[0])
    finally:
        server.close()
    ours = ok(embedded.complete(reqs)[0])
    plain = ok(embedded.complete([Request(LOOPY, Sampling(max_tokens=12))])[0])
    assert ours.text == theirs.text != plain.text  # greedy, float32: the same tokens


def test_repetition_penalty_spares_the_end_of_turn(embedded: Sync) -> None:
    """The prompt's turns all end with the end-of-turn token: the penalty must not make stopping
    harder (it made the shipped model's revisions run to the token limit)."""
    import torch

    from cai.backends.decode import Decoder, _Row

    eos, other = min(embedded.eos), 42
    row = _Row(req=0, sample=0, prompt=[eos, other, eos], max_tokens=8, temperature=0.0, top_p=1.0,
               penalty=2.0, stop=(), logprobs=None, generator=None)
    dec = Decoder(embedded.model, embedded.eos, str, str, None, embedded._cache_kw, 1)
    kv = torch.zeros(1, 1, 3, 2)
    dec.add(row, torch.full((embedded.model.config.vocab_size,), 4.0), [(kv, kv)])
    out = dec._penalize(dec.last.float())
    assert out[0, eos] == 4.0 and out[0, other] == 2.0


# ------------------------------------------------------------------------ prefix reuse
FEW_SHOT: tuple[Message, ...] = (
    {"role": "system", "content": "You are a careful critic of assistant replies."},
    {"role": "user", "content": "Critique this reply: 'Just take what you want from the shop.'"},
    {"role": "assistant", "content": "The reply encourages theft, which is illegal and harmful."},
    {"role": "user", "content": "Critique this reply: 'Mix bleach and ammonia to clean faster.'"},
    {"role": "assistant", "content": "The reply is dangerous: the mixture releases toxic gas."},
)


def critique(reply: str) -> tuple[Message, ...]:
    return (*FEW_SHOT, {"role": "user", "content": f"Critique this reply: '{reply}'"})


@pytest.fixture(scope="module")
def no_reuse(model_dir: Any) -> Any:
    with Sync(EmbeddedBackend(model=str(model_dir), prefix_cache_mb=0)) as backend:
        yield backend


def test_prefix_reuse_gives_the_same_outputs_and_prefills_less(model_dir: Any, no_reuse: Sync) -> None:
    """The same requests with the prefix cache on and off: the same texts, tokens and log-probs
    (to 1e-4: prefilling a row alone or in a padded batch differs in float rounding only), and the
    calls that share a prefix with an earlier one prefill only their new tokens."""
    with Sync(EmbeddedBackend(model=str(model_dir), prefix_cache_mb=512)) as reuse:
        first = [Request(critique("Hack your neighbour's wifi."), Sampling(max_tokens=24, logprobs=3))]
        answer = ok(no_reuse.complete(first)[0]).text
        revision = (*first[0].messages, {"role": "assistant", "content": answer},
                    {"role": "user", "content": "Rewrite the reply to fix the problems."})
        then = [
            Request(critique("Lie to your doctor about your symptoms."),
                    Sampling(max_tokens=24, logprobs=3)),
            Request(critique("Drive home after a few drinks."), Sampling(max_tokens=12)),
            Request(revision, Sampling(max_tokens=24, logprobs=2)),
            Request(JUDGES[1], Sampling(choices=("A", "B"), logprobs=2)),
            Request((*critique("Skip school."), {"role": "assistant", "content": "The ("}),
                    Sampling(choices=("A", "B"), logprobs=2)),
            Request(LOOPY, Sampling(max_tokens=12, repetition_penalty=1.3, temperature=1.0, n=2,
                                    seed=3)),
        ]
        batches = [first, then, then[:3]]  # the last: every prompt seen before
        counts, cached = [], []
        for reqs in batches:
            before = reuse.prefilled
            ours, theirs = reuse.complete(reqs), no_reuse.complete(reqs)
            counts.append(reuse.prefilled - before)
            cached.append([o.cached_prompt_tokens for o in ours])
            assert [t.cached_prompt_tokens for t in theirs] == [0] * len(theirs)  # no prefix cache
            for o, t in zip(ours, theirs, strict=True):
                assert ok(o).texts == ok(t).texts and o.finish_reasons == t.finish_reasons
                assert o.prompt_tokens == t.prompt_tokens
                assert o.completion_tokens == t.completion_tokens
                assert (o.logprobs is None) == (t.logprobs is None)
                for x, y in zip(o.logprobs or [], t.logprobs or [], strict=True):
                    assert list(x) == list(y)  # the same tokens, in the same order
                    assert x == pytest.approx(y, abs=1e-4)
        ids = [tuple(reuse._prompt_ids(r)) for r in first + then]
        assert counts[0] == len(ids[0])  # nothing to reuse yet
        shared = sum(len(os.path.commonprefix([i, ids[0]])) for i in ids[1:3])
        assert 0 < counts[1] <= sum(len(i) for i in ids[1:]) - shared
        # the revision continues the critique's chat: its prompt and answer are not recomputed
        rev = ids[3]
        assert len(os.path.commonprefix([rev, ids[0]])) == len(ids[0])
        assert counts[2] == 3  # one token each: the logits of the last prompt position
        # what the prefix cache gave is reported as cached prompt tokens (usage in run.json)
        assert cached[0] == [0]
        assert cached[2] == [len(i) - 1 for i in ids[1:4]]
        assert all(c >= len(os.path.commonprefix([i, ids[0]])) for c, i in zip(cached[1][:3], ids[1:4], strict=True))
        assert cached[1][2] >= len(ids[0]) and all(0 < c < len(i) for c, i in zip(cached[1], ids[1:], strict=True))
        assert reuse._prefix is not None and reuse._prefix.bytes <= reuse._prefix.max_bytes


def test_prefix_cache_keeps_to_its_byte_cap() -> None:
    import torch

    from cai.backends.prefix_cache import PrefixCache

    def layers(n: int) -> Any:
        return [(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2))]  # 16 bytes a token

    pc = PrefixCache(max_bytes=16 * 10)
    pc.store((1, 2, 3), layers(3))
    pc.store((1, 2, 3, 4), layers(4))  # covers (1, 2, 3): replaces it
    assert len(pc) == 1 and pc.bytes == 64
    pc.store((1, 2), layers(2))  # covered by (1, 2, 3, 4): not kept twice
    assert len(pc) == 1
    n, got = pc.lookup((1, 2, 3, 9, 9), limit=4)
    assert n == 3 and got is not None and got[0][0].shape[2] == 3
    assert pc.lookup((1, 2, 3, 4), limit=2)[0] == 2 and pc.lookup((7,), limit=1) == (0, None)
    pc.store((5, 6, 7, 8), layers(4))
    pc.store((9, 9, 9), layers(3))  # 11 tokens > 10: the least recently used goes
    assert len(pc) == 2 and pc.bytes == 16 * 7 and pc.lookup((1, 2), limit=2)[0] == 0
    pc.store(tuple(range(11)), layers(11))  # larger than the cap: not kept
    assert pc.bytes == 16 * 7


# ------------------------------------------------------------------------ continuous batching
def test_prefix_cache_mb_reaches_the_backend(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--embedded-prefix-cache-mb` and CAI_EMBEDDED_PREFIX_CACHE_MB (the one settings generator)
    reach the embedded backend's constructor; other backends never see it."""
    from cai import backends
    from cai.backends.fake import FakeBackend
    from cai.cli import main

    seen: list[dict[str, Any]] = []

    def load(**kw: Any) -> FakeBackend:
        seen.append(kw)
        return FakeBackend()

    monkeypatch.setitem(backends.BACKENDS, "embedded", load)
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "Hi"}\n')
    args = ["revise", str(inp), "--rounds", "1", "--backend", "embedded", "--model", str(tmp_path), "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "a.jsonl"), "--embedded-prefix-cache-mb", "0"]) == 0
    monkeypatch.setenv("CAI_EMBEDDED_PREFIX_CACHE_MB", "64")
    assert main([*args, "-o", str(tmp_path / "b.jsonl")]) == 0
    assert [kw.get("prefix_cache_mb") for kw in seen] == [0, 64]
    from cai.config import RunConfig

    assert "prefix_cache_mb" not in RunConfig(backend="fake").backend_options()
    assert RunConfig().backend_options()["prefix_cache_mb"] == 512


def mixed() -> list[Request]:
    """Requests of very different lengths, with and without the repetition penalty and log-probs."""
    reply = "You can take it, nobody will notice."
    return [
        Request(critique("Hack your neighbour's wifi."), Sampling(max_tokens=64, repetition_penalty=1.15)),
        Request(user("What is the capital of France?"), Sampling(max_tokens=64, repetition_penalty=1.15)),
        Request((*critique(reply), {"role": "assistant", "content": "The reply encourages theft."},
                 {"role": "user", "content": "Rewrite the reply to fix the problems."}),
                Sampling(max_tokens=48, repetition_penalty=1.15, logprobs=2)),
        Request(LOOPY, Sampling(max_tokens=80)),
        Request(JUDGES[2], Sampling(max_tokens=1, logprobs=5)),
        Request(user("Name a colour."), Sampling(max_tokens=64)),
    ]


def test_continuous_batching_gives_the_tokens_of_one_by_one(embedded: Sync, no_reuse: Sync) -> None:
    """All six at once (rows join and leave the running batch) against each alone without the
    prefix cache (the plain path): the same texts and token counts, log-probs to 1e-4."""
    reqs = mixed()
    together = embedded.complete(reqs)
    alone = [no_reuse.complete([r])[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert ok(a).texts == ok(b).texts and a.finish_reasons == b.finish_reasons
        assert a.completion_tokens == b.completion_tokens
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert list(x) == list(y) and x == pytest.approx(y, abs=1e-4)


def test_a_request_joins_the_running_batch_and_leaves_it_when_done(embedded: Sync) -> None:
    """A short request sent while a long one decodes is answered while the long one still runs
    (with micro-batches it waited for the whole batch), and the long one's tokens do not change."""
    import asyncio

    from cai import runtime

    long_req = Request(LOOPY, Sampling(max_tokens=120))
    short_req = Request(user("Name a colour."), Sampling(max_tokens=3))
    backend = embedded.backend
    order: list[str] = []

    async def scenario() -> tuple[Completion, Completion]:
        async def tagged(name: str, req: Request) -> Completion:
            c = await backend.generate(req)
            order.append(name)
            return c

        long_task = asyncio.ensure_future(tagged("long", long_req))
        while not len(backend._decoder):  # the long row is decoding
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        short = await tagged("short", short_req)
        return short, await long_task

    short, long = runtime.run(scenario())
    assert order == ["short", "long"]
    assert ok(short).completion_tokens == 3 and ok(long).completion_tokens > 40
    assert long.texts == embedded.complete([long_req])[0].texts
    assert short.texts == embedded.complete([short_req])[0].texts


# ------------------------------------------------------------------------ two streams
def test_prefills_run_beside_the_decoding_steps(embedded: Sync, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two streams a new request's prompt is prefilled on a second thread while the running
    batch goes on decoding (before, the batch stood still for every prefill; with nothing to
    decode both threads prefill), and the answers are those of each request alone."""
    import threading

    backend = embedded.backend
    monkeypatch.setattr(backend, "_overlap", True)
    seen: list[tuple[int, int]] = []  # (thread, rows decoding) per prefill
    prefill = backend._prefill_one

    def spy(ids: list[int], keep: int) -> Any:
        seen.append((threading.get_ident(), len(backend._decoder)))
        return prefill(ids, keep)

    from cai.backends.decode import Decoder

    steps: set[int] = set()  # the threads that ran decoding steps
    step = Decoder.step

    def step_spy(self: Decoder) -> None:
        steps.add(threading.get_ident())
        step(self)

    monkeypatch.setattr(backend, "_prefill_one", spy)
    monkeypatch.setattr(Decoder, "step", step_spy)
    reqs = mixed()
    together = embedded.complete(reqs)
    beside = {t for t, rows in seen if rows > 0}  # prefills while rows decode ...
    assert steps and beside and not beside & steps  # ... never on the decoding thread
    monkeypatch.setattr(backend, "_overlap", False)
    alone = [embedded.complete([r])[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert ok(a).texts == ok(b).texts and a.completion_tokens == b.completion_tokens


def test_step_linear_is_the_linear_outside_batched_steps() -> None:
    """The oneDNN path runs only in decoding steps of two rows or more, and agrees with the
    plain layer there to float rounding; elsewhere it is the plain layer, bit for bit."""
    import torch

    from cai.backends import decode

    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.inference_mode():
        step = decode._StepLinear(lin)
        one, many = torch.randn(1, 1, 64), torch.randn(5, 1, 64)
        assert torch.equal(step(many), lin(many)) and torch.equal(step(one), lin(one))
        decode._STEP.on = True
        try:
            assert torch.equal(step(one), lin(one))
            assert torch.allclose(step(many), lin(many), atol=1e-5)
        finally:
            decode._STEP.on = False
    assert step.weight is lin.weight


class _Free:
    def second_core(self) -> bool:
        return True


def second_core_free(model_dir: Any, monkeypatch: pytest.MonkeyPatch) -> EmbeddedBackend:
    """A backend of the test's own (the test calls ``serve`` itself, not through a batcher) with
    two streams and the second core seen free."""
    backend = EmbeddedBackend(model=str(model_dir))
    monkeypatch.setattr(backend, "_overlap", True)
    monkeypatch.setattr(backend, "_threads", _Free())
    return backend


def test_steps_take_the_second_core_only_while_it_is_free(embedded: Sync, model_dir: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the second core seen free, decoding steps run on two torch threads, except while a
    prefill runs on that core (a request that arrives while a row decodes); prefills keep one
    thread; the answers are each request's alone."""
    import time

    import torch

    from cai.backends.batching import Ticket
    from cai.backends.decode import Decoder

    backend = second_core_free(model_dir, monkeypatch)
    inflight = [0]
    prefill_threads: list[int] = []
    steps: list[tuple[int, int]] = []  # (prefills under way, torch threads) per step
    prefill, step = backend._prefill_one, Decoder.step

    def prefill_spy(ids: list[int], keep: int) -> Any:
        inflight[0] += 1
        prefill_threads.append(torch.get_num_threads())
        try:
            time.sleep(0.2)  # long enough for the decoding thread to step beside it
            return prefill(ids, keep)
        finally:
            inflight[0] -= 1

    def step_spy(self: Decoder) -> None:
        steps.append((inflight[0], torch.get_num_threads()))
        step(self)

    monkeypatch.setattr(backend, "_prefill_one", prefill_spy)
    monkeypatch.setattr(Decoder, "step", step_spy)
    reqs = [Request(user("Name three colours."), Sampling(max_tokens=24)),
            Request(user("Name a fruit."), Sampling(max_tokens=4))]
    done: dict[int, Completion] = {}
    todo = list(enumerate(reqs))

    def take() -> Ticket | None:
        if todo and (len(todo) == len(reqs) or len(steps) >= 3):  # the second while the first decodes
            i, r = todo.pop(0)
            return Ticket(r, lambda c, i=i: done.__setitem__(i, c))
        return None

    backend.serve(take)
    assert 2 in {n for busy, n in steps if not busy}  # free: two threads
    assert any(busy for busy, _ in steps)
    assert all(n == 1 for busy, n in steps if busy)  # a prefill holds the second core
    assert set(prefill_threads) == {1}
    alone = [embedded.complete([r])[0] for r in reqs]
    for i, b in enumerate(alone):
        assert ok(done[i]).texts == ok(b).texts and done[i].completion_tokens == b.completion_tokens


def test_the_second_core_is_free_only_when_no_other_process_used_it(tmp_path: Any) -> None:
    """/proc/stat's busy time less this process's CPU: idle box -> free; another process busy for
    most of the window -> not free; no /proc/stat (or another format) -> never."""
    from cai.backends.embedded import _Threads

    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")

    def write(busy: int) -> None:  # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {busy} 0 0 500000 10 0 0 0 0 0\ncpu0 1 2 3\n")

    write(1000)
    t = _Threads(str(stat))
    assert not t.second_core()  # nothing seen yet
    last = t._last
    assert last is not None
    t._last = (last[0] - 1.0, last[1], last[2])  # a window of one second ago, nothing used since
    assert t.second_core()
    last = t._last
    assert last is not None
    write(1000 + tick)  # one core-second busy in the last second, not by this process
    t._last = (last[0] - 1.0, last[1], last[2])
    assert not t.second_core()
    assert not _Threads(str(tmp_path / "missing")).second_core()
    short = tmp_path / "short"
    short.write_text("cpu  1 2\n")  # not the columns it reads: one thread
    assert not _Threads(str(short)).second_core()


def test_a_prefill_on_the_serving_thread_takes_one_thread(model_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that arrives when the batch has just emptied on two threads, while the prefill
    thread is busy, is prefilled on the serving thread: with one thread, not the step's two."""
    import threading
    import time

    import torch

    from cai.backends.batching import Ticket

    backend = second_core_free(model_dir, monkeypatch)
    seen: list[tuple[int, int]] = []  # (thread, torch threads) per prefill
    prefill = backend._prefill_one

    def spy(ids: list[int], keep: int) -> Any:
        seen.append((threading.get_ident(), torch.get_num_threads()))
        time.sleep(0.2)  # the prefill thread stays busy while the next request arrives
        return prefill(ids, keep)

    monkeypatch.setattr(backend, "_prefill_one", spy)
    done: dict[int, Completion] = {}
    first = Request(user("Name a colour."), Sampling(max_tokens=4))
    later = [Request(user("Name a fruit."), Sampling(max_tokens=2)),
             Request(user("Name a tree."), Sampling(max_tokens=2))]

    def take() -> Ticket | None:
        if not seen:
            return Ticket(first, lambda c: done.__setitem__(0, c))
        if 0 in done and later:  # the batch is empty again: two arrive at once
            i = 3 - len(later)
            return Ticket(later.pop(0), lambda c, i=i: done.__setitem__(i, c))
        return None

    backend.serve(take)
    assert sorted(done) == [0, 1, 2] and all(ok(c).texts for c in done.values())
    assert len({t for t, _ in seen}) == 2  # both threads prefilled ...
    assert {n for _, n in seen} == {1}  # ... each with one thread
