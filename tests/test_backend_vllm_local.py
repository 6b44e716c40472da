"""In-process vLLM (its async engine, ``AsyncLLM``). Runs only where ``import vllm`` works, i.e. in .venv-vllm:

    PYTHONPATH=. .venv-vllm/bin/python -m pytest -q tests/test_backend_vllm_local.py
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cai import runtime
from cai.backends.base import Completion, Message, Request, Sampling
from cai.backends.vllm_local import VLLMBackend  # imports vllm only when built
from tests.sync import Sync

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not importable here; run this file with .venv-vllm/bin/python",
    ),
]

REPO = Path(__file__).resolve().parent.parent
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CACHE_ROOT": str(REPO / ".cache" / "vllm"),
}
CPU_ENGINE = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True}  # the GPU defaults, for a CPU
JUDGE: tuple[Message, ...] = (
    {"role": "user", "content": "Which reply is more helpful?\n(A) Paris is the capital of "
     "France.\n(B) I don't know.\nAnswer with A or B."},
    {"role": "assistant", "content": "The answer is: ("},
)


def user(text: str) -> tuple[Message, ...]:
    return ({"role": "user", "content": text},)


def ok(c: Completion) -> Completion:
    assert c.error is None, c.error
    return c


@pytest.fixture(scope="module")
def llm() -> Iterator[Sync]:
    from cai.model import prepare_model

    saved = {k: os.environ.get(k) for k in CPU_ENV}
    for k, v in CPU_ENV.items():
        os.environ.setdefault(k, v)
    folder = prepare_model(
        Path(os.environ.get("CAI_MODEL_DIR") or REPO / ".models" / "SmolLM2-135M-Instruct")
    )
    backend = Sync(VLLMBackend(model=str(folder), **CPU_ENGINE))  # complete(): generate() on the run's loop
    yield backend
    backend.close()
    for k, old in saved.items():
        if old is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = old


def test_generation_and_continuation_in_one_batch(llm: Sync) -> None:
    assert llm.model_id == "SmolLM2-135M-Instruct"
    plain = Request(user("What is the capital of France?"), Sampling(max_tokens=16))
    cont = Request(JUDGE, Sampling(max_tokens=1, logprobs=5))
    a, b, c = llm.complete([plain, cont, plain])  # mixed groups come back in order
    assert "Paris" in ok(a).text and a.texts == ok(c).texts
    assert a.prompt_tokens > 10 and 0 < a.completion_tokens <= 16
    assert a.finish_reasons[0] in ("stop", "length") and a.logprobs is None
    lps = ok(b).logprobs
    assert lps is not None and len(lps) == 1
    top = lps[0]
    assert 5 <= len(top) <= 6 and {"A", "B"} <= {t.strip() for t in top}
    assert b.text.strip() in ("A", "B")


def test_seeded_n_samples_stops_and_choices(llm: Sync) -> None:
    sea = Request(user("Write one short sentence about the sea."),
                  Sampling(max_tokens=10, temperature=1.0, n=3, seed=7))
    fruits = user("List three fruits, separated by commas.")
    full = ok(llm.complete([Request(fruits, Sampling(max_tokens=24))])[0]).text
    stop = full.split()[2]
    s1, s2, cut, pick = llm.complete([
        sea, sea, Request(fruits, Sampling(max_tokens=24, stop=(stop,))),
        Request(user("Pick A or B."), Sampling(max_tokens=4, choices=("A", "B"))),
    ])
    assert len(ok(s1).texts) == 3 and s1.texts == ok(s2).texts and len(set(s1.texts)) > 1
    assert ok(cut).text == full[: full.index(stop)] and cut.finish_reasons == ["stop"]
    assert ok(pick).text in ("A", "B")


def test_bad_request_does_not_sink_the_batch(llm: Sync) -> None:
    good, too_long, no_n = llm.complete([
        Request(user("Hi"), Sampling(max_tokens=2)),
        Request(user("word " * 3000), Sampling(max_tokens=2)),
        Request(user("Hi"), Sampling(max_tokens=2, n=0)),
    ])
    assert ok(good).texts
    assert too_long.texts == [] and too_long.error
    assert no_n.texts == [] and no_n.error


def test_requests_fed_one_by_one_share_the_engine(llm: Sync) -> None:
    """The runner's path: many ``generate`` calls in flight at once on the run's loop, which
    drives the engine; and one at a time, on later runs of the same loop."""
    reqs = [Request(user(f"Count to {i}."), Sampling(max_tokens=8)) for i in range(6)]
    many = llm.complete(reqs)
    assert [ok(c).texts for c in many] == [ok(runtime.run(llm.generate(r))).texts for r in reqs]


def test_cai_run_on_the_in_process_engine_resumes_from_the_cache(llm: Sync, tmp_path: Path) -> None:
    """`cai run`'s streaming scheduler on AsyncLLM: every row written, and a rerun sends nothing."""
    from cai.config import RunConfig
    from cai.pipeline import run_pipeline

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Name a colour, number {i}."}}\n' for i in range(3)))
    cfg = RunConfig.model_validate({"input": str(prompts), "output": str(tmp_path / "run"), "progress": False,
                                    "revise": {"rounds": 1, "max_tokens": 16}, "label": {"principles": 1}})
    first = run_pipeline(cfg, backend=llm.backend)
    assert first.stages["revise"].written == 3 and first.sent == 3 * 3 + 3 * 2
    again = run_pipeline(cfg, backend=llm.backend)
    assert again.sent == 0 and again.stages["revise"].resumed == 3
