"""The call cache: keys, hits and misses, one batched call for the misses, errors not stored."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from cai.backends.base import Completion, Request, Sampling
from cai.backends.fake import FakeBackend
from cai.cache import CachedBackend, CallCache, request_key
from cai.errors import ConfigError
from cai.runtime import close, generate_all, run


def req(text: str, **sampling) -> Request:
    return Request(({"role": "user", "content": text},), Sampling(**sampling))


def test_key_covers_model_messages_sampling_and_seed():
    base = req("hi")
    k = request_key("m", base)
    assert k == request_key("m", req("hi"))
    assert k != request_key("m2", base)
    assert k != request_key("m", req("hi!"))
    assert k != request_key("m", req("hi", seed=1))
    assert k != request_key("m", req("hi", temperature=0.7))
    assert k != request_key("m", req("hi", max_tokens=7))
    assert k != request_key("m", Request(({"role": "system", "content": "hi"},), base.sampling))
    assert k != request_key("m", req("hi", repetition_penalty=1.2))


def test_a_later_field_at_its_default_leaves_keys_and_fingerprints_as_they_were():
    # the key a default request had before repetition_penalty existed (cai 0.1's cache files)
    import hashlib
    import json

    old = {"max_tokens": 512, "temperature": 0.0, "top_p": 1.0, "n": 1, "seed": 0, "logprobs": None,
           "stop": [], "choices": None}
    blob = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "sampling": old},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert request_key("m", req("hi")) == hashlib.sha256(blob.encode()).hexdigest()
    assert Sampling().to_dict() == old
    assert Sampling(repetition_penalty=1.1).to_dict() == {**old, "repetition_penalty": 1.1}


def test_misses_go_in_one_batch_and_hits_are_not_sent(tmp_path: Path):
    inner = FakeBackend()
    be = CachedBackend(inner, CallCache(tmp_path / "c.sqlite"))
    first = generate_all(be, [req("a"), req("b")])
    assert (be.sent, be.hits, inner.batches) == (2, 0, [2])
    again = generate_all(be, [req("b"), req("c"), req("a"), req("c")])
    # only "c" is new, sent once although asked twice
    assert (be.sent, be.hits, inner.batches) == (3, 3, [2, 1])
    texts = [c.texts for c in again]
    assert texts == [first[1].texts, again[1].texts, first[0].texts, again[1].texts]
    assert generate_all(be, [req("a")])[0].to_dict() == first[0].to_dict()
    assert inner.batches == [2, 1]  # an all-hit batch sends nothing at all
    close(be)


def test_cache_survives_reopen_and_is_shared(tmp_path: Path):
    path = tmp_path / "c.sqlite"
    a = CachedBackend(FakeBackend(), CallCache(path))
    b_inner = FakeBackend()
    b = CachedBackend(b_inner, CallCache(path))  # a second connection, open at the same time
    generate_all(a, [req("x", logprobs=5)])
    got = generate_all(b, [req("x", logprobs=5)])
    assert b_inner.calls == [] and got[0].logprobs is not None
    close(a)
    close(b)
    c = CallCache(path)
    assert len(c) == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()


def test_errors_are_not_cached(tmp_path: Path):
    flaky = FakeBackend(fail=lambda r: r.messages[0]["content"] == "bad")
    be = CachedBackend(flaky, CallCache(tmp_path / "c.sqlite"))
    out = generate_all(be, [req("bad"), req("good")])
    assert out[0].error and not out[1].error and be.errors == 1
    generate_all(be, [req("bad"), req("good")])
    assert [c.messages[0]["content"] for c in flaky.calls] == ["bad", "good", "bad"]
    assert len(be.cache) == 1


def test_model_id_is_part_of_the_key(tmp_path: Path):
    cache = CallCache(tmp_path / "c.sqlite")
    generate_all(CachedBackend(FakeBackend(model_id="one"), cache, close_cache=False), [req("q")])
    other = FakeBackend(model_id="two")
    generate_all(CachedBackend(other, cache, close_cache=False), [req("q")])
    assert len(other.calls) == 1 and len(cache) == 2


def test_committed_when_the_batch_returns(tmp_path: Path):
    """Each answer is in the file as soon as it is returned: a crash after it loses nothing."""
    path = tmp_path / "c.sqlite"
    be = CachedBackend(FakeBackend(), CallCache(path))
    generate_all(be, [req("a"), req("b")])
    reader = CallCache(path)
    assert reader.get(request_key("fake", req("a"))) and reader.get(request_key("fake", req("b")))
    reader.close()
    close(be)


def test_misaligned_backend_is_a_bug_not_a_cache_entry(tmp_path: Path):
    class Short(FakeBackend):
        def compute(self, requests):
            return super().compute(requests)[:-1]

    be = CachedBackend(Short(), CallCache(tmp_path / "c.sqlite"))
    out = generate_all(be, [req("a"), req("b")])
    assert all(c.failure is not None and "1 completions for 2" in c.failure.message for c in out)
    assert len(be.cache) == 0 and be.errors == 2


def test_large_batches_and_round_trip(tmp_path: Path):
    be = CachedBackend(FakeBackend(), CallCache(tmp_path / "c.sqlite"))
    reqs = [req(f"q{i}") for i in range(1300)]  # more than one lookup chunk
    first = generate_all(be, reqs)
    again = generate_all(be, reqs)
    assert be.sent == 1300 and be.hits == 1300
    assert [c.to_dict() for c in first] == [c.to_dict() for c in again]
    c = replace(Completion(texts=["x"]), logprobs=[{"A": -0.1}], finish_reasons=["stop"])
    be.cache.put_many([("k", "m", c)])
    assert be.cache.get("k") == c


def test_unusable_file_is_a_config_error(tmp_path: Path):
    bad = tmp_path / "c.sqlite"
    bad.write_text("this is not a database, " * 100)
    with pytest.raises(ConfigError, match="not a usable cache database"):
        CallCache(bad)


def _stdlib_key(model_id: str, r: Request) -> str:
    """The key as cai always computed it: the stdlib's compact, key-sorted JSON."""
    import hashlib
    import json

    from cai.backends.base import key_fields

    blob = json.dumps({"model": model_id, "messages": r.messages, "sampling": key_fields(vars(r.sampling))},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def test_orjson_writes_every_code_point_as_the_stdlib_does():
    """request_key encodes string messages with orjson: its bytes must be the stdlib's."""
    import json

    import orjson

    points = [*range(0xD800), *range(0xE000, 0x110000)]  # every scalar value (no lone surrogates)
    for i in range(0, len(points), 4096):
        text = "".join(map(chr, points[i: i + 4096]))
        assert orjson.dumps(text) == json.dumps(text, ensure_ascii=False).encode()


@pytest.mark.parametrize("messages", [
    ({"role": "user", "content": "caf\u00e9 \U0001f600 \x00\x1f\x7f \u2028 \"q\" \\ </x>"},),
    ({"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "bob", "Zeta": "z"}),
    ({"role": "user", "content": "n", "weight": 1e16},),  # not all strings: the stdlib encodes it
    ({"role": "user", "content": "t", "tags": ["a", {"b": 1.5}]},),
    (),
])
def test_keys_are_the_stdlib_json_keys(messages):
    for sampling in (Sampling(), Sampling(temperature=0.7, stop=("x",), seed=None, logprobs=5),
                     Sampling(choices=("A", "B"), repetition_penalty=1.15, top_p=1e-5),
                     Sampling(temperature=1), Sampling(temperature=1.0), Sampling(temperature=-0.0, seed=-3),
                     Sampling(seed=10**20, stop=('"seed":0,',)), Sampling(choices=('{"seed":0}',), n=True)):
        r = Request(messages, sampling)
        assert request_key("m\u00e9", r) == _stdlib_key("m\u00e9", r)


@pytest.mark.parametrize("completion", [
    Completion(["caf\u00e9 \U0001f600 \x00\x1f\x7f \u2028 \"q\" \\ </x>"], 12, 3, None, ["stop"]),
    Completion(["a", "b"], 0, 0, None, [None, "length"], error=None, cached_prompt_tokens=7),
    Completion([], 0, 0, None, None, error="HTTP 400: bad \ud800"),  # a lone surrogate: the stdlib's
    Completion(["x"], 10**20, 1, None, ["stop"]),  # over 64 bits: the stdlib's
    Completion(["x"], True, 2.0, None, ["stop"]),  # not ints: the stdlib's
    Completion(["A"], 5, 1, [{"A": -1e-05, "B": -12.5}], ["stop"]),  # log-probs (floats): the stdlib's
    Completion([1.5e-7], 1, 1, None, [3]),  # not strings: the stdlib's
])
def test_a_stored_completion_is_the_stdlib_json(tmp_path: Path, completion):
    """The cache stores plain completions through orjson: the text must be the stdlib's, byte for byte."""
    import json

    from cai.cache import _stored

    stdlib = json.dumps(completion.to_dict(), ensure_ascii=False, separators=(",", ":"))
    assert _stored(completion) == stdlib
    if completion.error is None:  # (SQLite cannot store a lone surrogate, whichever encodes it)
        cache = CallCache(tmp_path / "c.sqlite")
        cache.put_many([("k", "m", completion)])
        assert cache._db.execute("SELECT completion FROM calls").fetchone()[0] == stdlib
        cache.close()


def test_a_queued_answer_is_found_before_its_commit(tmp_path: Path):
    cache = CallCache(tmp_path / "c.sqlite")
    c = Completion(texts=["x"], finish_reasons=["stop"])
    assert cache.get("k") is None

    async def queue_and_look() -> None:
        committed = cache.put_soon("k", "m", c)
        assert not committed.done() and cache.get("k") == c  # queued: found before its commit
        assert CallCache(tmp_path / "c.sqlite").get("k") is None  # not in the file yet
        await committed  # the commit runs on the loop, after the answers that arrive with it

    run(queue_and_look())
    assert cache.get("k") == c and cache.get("other") is None
    other = CallCache(tmp_path / "c.sqlite")  # committed: another connection sees it
    assert other.get("k") == c
    other.close()
    cache.close()


def test_the_run_loop_from_a_thread_and_from_inside_a_running_loop(tmp_path: Path):
    """The Python API in a notebook (a loop already runs: a helper thread drives the run loop) or
    a worker thread (it drives the run loop itself): one loop throughout, so the backend built
    on it keeps working, and answers are committed before they are returned, as on the CLI."""
    import asyncio
    import threading

    be = CachedBackend(FakeBackend(), CallCache(tmp_path / "c.sqlite"))

    async def notebook() -> list[Completion]:
        return generate_all(be, [req("a")])

    first = asyncio.run(notebook())
    got: list[list[Completion]] = []
    worker = threading.Thread(target=lambda: got.append(generate_all(be, [req("a"), req("b")])))
    worker.start()
    worker.join(30)
    assert got and got[0][0].to_dict() == first[0].to_dict() and (be.sent, be.hits) == (2, 1)
    assert CallCache(tmp_path / "c.sqlite").get(request_key("fake", req("b"))) is not None
    close(be)
