"""The embedded backend: transformers on the CPU, no server.

Requests are rendered with the model's chat template (continuing a final assistant message when
there is one), prefilled one by one and decoded together by a small decoding loop of our own
(``decode.py``), with continuous batching: a request joins the running batch between two steps
and is answered the step it finishes, so a row's next call starts while others still decode.
Every row has its own seeded ``torch.Generator`` (a sampled answer does not depend on its
batch-mates), its own stop strings and its own top-k log-probs. Log-probs are those of the raw
model distribution (before temperature and top-p), as vLLM reports them. ``choices`` is answered
by scoring each choice's log-likelihood as a continuation of the prompt and taking the best
(sampling among them by ``softmax(score / temperature)`` when the temperature is above 0).

With a prefix cache (``prefix_cache_mb`` > 0, the default; 0 turns it off) a prompt's prefill
starts from the KV cache of the longest prefix an earlier call computed (``prefix_cache.py``: the
shared system prompt and few-shot turns, a revision's earlier turns, kept when a row finishes);
``prefilled`` counts the prompt tokens that went through the model.

On two cores (torch's default of 2 threads) the backend runs two streams: the decoding steps on
the serving thread and the prompts' prefills on a second thread that lives as long as ``serve``
does, so a new request's prefill no longer stalls the running batch. While no prefill runs, a
decoding step may use both cores (torch's two threads per op): 1.5x faster a step on an idle box,
and many times slower when another process takes a core (every op's barrier waits for the
preempted partner), so they are used only while the second core is seen idle (``_Threads``).
Outputs are the same: the same kernels run the same shapes; only where they run changed.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..model import default_model_dir, require_prepared
from ..types import Completion, Request
from .batching import ContinuousBatcher, Ticket
from .prefix_cache import Layers, PrefixCache

try:  # the decoding loop imports torch
    from .decode import Decoder, _Row, pack_linears, top_logprobs, use_slot_attention
except ImportError as e:  # pragma: no cover - depends on the environment
    raise BackendError("the embedded backend needs torch and transformers "
                       f"(pip install 'cai[embedded]'): {e}") from None

__all__ = ["EmbeddedBackend", "_Row"]

_SEED_MIX = 1_000_003


_WINDOW = 0.5  # seconds between two looks at /proc/stat
_BUSY = 0.1  # of a core, used by other processes: more turns the second thread off


class _Threads:
    """Whether a decoding step may take the second core (torch's two threads per op): only while
    no prefill runs and no other process used more than ``_BUSY`` of a core in the last
    ``_WINDOW`` seconds (the box's busy time in /proc/stat less this process's own CPU time). Two
    threads made a 6-row step 1.5x faster on an idle 2-core box; with another process on a core,
    each op's barrier waits for the preempted partner (steps measured 6-30x slower), so any other
    load turns them off. Without /proc/stat, one thread always."""

    def __init__(self, stat: str = "/proc/stat") -> None:
        self._stat = stat
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample()
        self.free = False  # the second core was idle in the last window

    def _sample(self) -> tuple[float, float, float] | None:
        """(now, the box's busy CPU seconds, this process's CPU seconds), or None."""
        try:
            with open(self._stat, "rb") as f:
                cols = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        if len(cols) < 5:
            return None
        busy = sum(cols) - cols[3] - cols[4]  # all but idle and iowait (steal counts: another's)
        return time.monotonic(), busy / self._tick, time.process_time()

    def second_core(self) -> bool:
        """Whether the second core is free for this step (looked at once a window)."""
        last = self._last
        if last is None:
            return False
        now = time.monotonic()
        if now - last[0] >= _WINDOW:
            cur = self._last = self._sample()
            if cur is not None:
                others = (cur[1] - last[1]) - (cur[2] - last[2])
                self.free = others < _BUSY * (cur[0] - last[0])
        return self.free


class EmbeddedBackend:
    """SmolLM2 (or any causal LM folder) through transformers, on the CPU: up to ``batch_size``
    rows decode together, off the loop, and requests join and leave the batch between steps."""

    def __init__(
        self,
        model: str | None = None,
        batch_size: int = 8,
        max_new_tokens_cap: int | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        prefix_cache_mb: float = 512,
    ) -> None:
        folder = Path(model) if model else default_model_dir()
        if model is None or not folder.exists():
            require_prepared(folder)
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BackendError(
                "the embedded backend needs torch and transformers "
                f"(pip install 'cai[embedded]'): {e}"
            ) from None
        self._threads: _Threads | None = None  # whether a step may take the second core
        if threads:
            torch.set_num_threads(threads)
        elif torch.get_num_threads() == 2:
            torch.set_num_threads(1)  # two streams (the module's docstring)
            self._threads = _Threads()
        # prefills on a second thread while the batch decodes: when each stream has one thread
        self._overlap = torch.get_num_threads() == 1 and (os.cpu_count() or 1) >= 2
        self._lock = threading.Lock()  # the prefix cache and the tokenizer, shared by both streams
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise BackendError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        self._torch = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(folder))
        self.model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
        # transformers >= 5.2x names the KV cache argument `cache` (and warns on the old name)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.model.eval()
        use_slot_attention(self.model)
        pack_linears(self.model)
        self.model_id = f"{folder.name}@embedded"
        self.batch_size = self.max_in_flight = max(1, batch_size)  # rows decoding together
        self._batcher = ContinuousBatcher(self.serve)
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        eos: set[int] = set()
        for src in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if src is not None:
                eos.update([src] if isinstance(src, int) else src)
        self.eos = eos
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(eos, default=0)
        self._piece: dict[int, str] = {}
        self._prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.prefilled = 0  # prompt tokens run through the model (not taken from the prefix cache)
        self.reused = 0  # prompt tokens the last prefill took from the prefix cache
        self._decoder = Decoder(self.model, self.eos, self._text, self._decode,
                                self._remember if self._prefix is not None else None, self._cache_kw,
                                self.batch_size)

    # ----------------------------------------------------------------------------------- API
    def serve(self, take: Callable[[], Ticket | None]) -> None:
        """Decode until nothing is left: between steps, requests are taken from ``take`` while the
        batch has room (their prompts prefilled, reusing cached prefixes, on a second thread when
        the backend overlaps them), and every request is resolved the step its last row finishes
        (the continuous batcher's call, off the loop)."""
        if not self._overlap:
            self._serve(take, None)
            return
        set_threads = self._torch.set_num_threads  # per thread: the prefill thread keeps one
        with ThreadPoolExecutor(1, thread_name_prefix="cai-prefill", initializer=set_threads,
                                initargs=(1,)) as pool:
            try:
                self._serve(take, pool)
            finally:
                set_threads(1)

    def _serve(self, take: Callable[[], Ticket | None], pool: ThreadPoolExecutor | None) -> None:
        dec = self._decoder
        pending: deque[Future[list[tuple[_Row, Any, Layers]]]] = deque()  # prefills under way, in order
        with self._torch.inference_mode():
            while True:
                while len(dec) + len(pending) < self.batch_size and (ticket := take()) is not None:
                    # nothing to decode and the prefill thread busy: this thread prefills too
                    if pool is None or (not len(dec) and not all(f.done() for f in pending)):
                        if pool is not None and self._torch.get_num_threads() != 1:
                            self._torch.set_num_threads(1)  # the prefill thread has the other core
                        self._join(self._admit(ticket))
                    else:
                        pending.append(pool.submit(self._admit_here, ticket))
                while pending and (pending[0].done() or not len(dec)):  # nothing to decode: wait
                    self._join(pending.popleft().result())
                if not len(dec):
                    if pending:
                        continue
                    self._decoder = Decoder(self.model, self.eos, self._text, self._decode,
                                            self._remember if self._prefix is not None else None,
                                            self._cache_kw, self.batch_size)  # frees the batch's buffers
                    return
                gone = [b for b, r in enumerate(dec.rows) if not r.alive()]
                if gone:  # their callers gave up
                    dec.drop([b for b in range(len(dec)) if b not in gone])
                    if not len(dec):
                        continue
                try:
                    self._step(dec, bool(pending))
                except Exception as e:  # the batch's requests fail, later ones go on
                    for r in dec.rows:
                        if r.done is not None:
                            r.done(r, f"generation failed: {e!r}")
                    dec.drop([])

    def _step(self, dec: Decoder, prefilling: bool) -> None:
        """One decoding step: on two threads while no prefill and no other process holds the
        second core (``_Threads``)."""
        torch, picker = self._torch, self._threads
        if picker is None:
            dec.step()
            return
        n = 2 if not prefilling and picker.second_core() else 1
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        dec.step()

    def compute(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer ``requests`` at once, synchronously (``serve`` over a fixed list)."""
        results: list[Completion | None] = [None] * len(requests)
        todo = [Ticket(r, partial(results.__setitem__, i)) for i, r in enumerate(requests)]
        self.serve(lambda: todo.pop(0) if todo else None)
        return [c if c is not None else Completion(texts=[], error="no result") for c in results]

    def _join(self, rows: list[tuple[_Row, Any, Layers]]) -> None:
        """Put prefilled rows in the running batch (on the decoding thread)."""
        for r, logits, layers in rows:
            self._decoder.add(r, logits, layers)

    def _admit_here(self, ticket: Ticket) -> list[tuple[_Row, Any, Layers]]:
        """``_admit`` on the prefill thread (inference mode is per thread)."""
        with self._torch.inference_mode():
            return self._admit(ticket)

    def _admit(self, ticket: Ticket) -> list[tuple[_Row, Any, Layers]]:
        """Check a request; answer a ``choices`` one at once; prefill the prompt of the others:
        their rows, to join the running batch."""
        req = ticket.request
        try:
            ids = self._prompt_ids(req)
            s = req.sampling
            if s.n < 1 or s.max_tokens < 1:
                raise ValueError("n and max_tokens must be at least 1")
            if s.repetition_penalty <= 0:
                raise ValueError(f"repetition_penalty must be above 0, got {s.repetition_penalty}")
            if not 0 < s.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
            if len(ids) >= self.max_len:
                raise ValueError(f"prompt is {len(ids)} tokens; the model takes {self.max_len}")
        except Exception as e:  # one bad request never sinks the batch
            ticket.resolve(Completion(texts=[], error=f"bad request: {e}"))
            return []
        if s.choices is not None:
            ticket.resolve(self._choose(req, ids))
            return []
        greedy = s.temperature <= 0
        rows: list[_Row] = []
        for j in range(1 if greedy else s.n):
            gen = None
            if not greedy:
                gen = self._torch.Generator()
                if s.seed is None:
                    gen.seed()
                else:
                    gen.manual_seed((s.seed * _SEED_MIX + j) % (1 << 63))
            cap = min(s.max_tokens, self.max_len - len(ids))
            if self.max_new_tokens_cap is not None:
                cap = min(cap, self.max_new_tokens_cap)
            rows.append(_Row(0, j, ids, cap, s.temperature, s.top_p, s.repetition_penalty, s.stop,
                             s.logprobs if j == 0 else None, gen))
        left = [len(rows)]
        failed: list[str] = []

        def done(r: _Row, error: str | None = None) -> None:
            left[0] -= 1
            if error:
                failed.append(error)
            if left[0] == 0:
                ticket.resolve(Completion(texts=[], error=failed[0]) if failed else self._collect(req, rows, cached))

        try:
            logits, cache, cached = self._prefill_one(ids, 1)  # cached: reported as the answer's
        except Exception as e:
            ticket.resolve(Completion(texts=[], error=f"generation failed: {e!r}"))
            return []
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for r in rows:
            r.done = done
            r.alive = ticket.alive
        return [(r, logits[-1], layers) for r in rows]

    async def generate(self, request: Request) -> Completion:
        return await self._batcher.generate(request)

    async def aclose(self) -> None:
        await self._batcher.aclose()
        self._decoder = None  # type: ignore[assignment]
        self.model = None

    def describe(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------------------ helpers
    def _prompt_ids(self, req: Request) -> list[int]:
        cont = req.continues
        with self._lock:
            text = self.tokenizer.apply_chat_template(
                list(req.messages), tokenize=False,
                add_generation_prompt=not cont, continue_final_message=cont,
            )
            ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _text(self, tid: int) -> str:
        """One token's text as the tokenizer decodes it alone (what vLLM reports)."""
        s = self._piece.get(tid)
        if s is None:
            with self._lock:
                s = self._piece[tid] = self.tokenizer.decode([tid])
        return s

    def _prefill_one(self, ids: list[int], keep: int) -> Any:
        """Run one sequence through the model from its longest cached prefix (at least ``keep``
        tokens are computed), remember its cache; its last ``keep`` logits, its cache and the
        number of tokens taken from the prefix cache (two threads may prefill at once)."""
        torch = self._torch
        from transformers import DynamicCache

        key = tuple(ids)
        with self._lock:
            n, layers = self._prefix.lookup(key, len(ids) - keep) if self._prefix is not None else (0, None)
        self.reused = n  # the last prefill's (callers use the count returned)
        cache: Any = DynamicCache(config=self.model.config)
        for li, (k, v) in enumerate(layers or []):
            cache.update(k, v, li)
        out = self.model(input_ids=torch.tensor([ids[n:]]), use_cache=True, logits_to_keep=keep,
                         position_ids=torch.arange(n, len(ids)).unsqueeze(0),
                         **{self._cache_kw: cache})
        with self._lock:
            self.prefilled += len(ids) - n
            if self._prefix is not None:
                self._prefix.store(key, [(layer.keys, layer.values) for layer in cache.layers])
        return out.logits[0], cache, n

    def _remember(self, r: _Row, layers: Layers) -> None:
        """Keep the cache of a finished row's prompt and answer (all but its last token, which
        was never fed back) for a later prompt that continues it."""
        if self._prefix is not None:
            with self._lock:
                self._prefix.store(tuple(r.prompt + r.tokens[:-1]), layers)

    def _decode(self, tokens: list[int]) -> str:
        with self._lock:
            text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text

    def _collect(self, req: Request, group: list[_Row], cached: int) -> Completion:
        """The answer to ``req`` from its finished rows (``cached``: its prompt tokens taken from
        the prefix cache)."""
        texts = [r.text if r.text is not None else self._decode(r.tokens) for r in group]
        finish = [r.finish for r in group]
        ntok = sum(len(r.tokens) for r in group)
        n = req.sampling.n
        if len(group) < n:  # greedy: n identical answers, computed once
            texts, finish, ntok = texts * n, finish * n, ntok * n
        return Completion(
            texts=texts, prompt_tokens=len(group[0].prompt), completion_tokens=ntok,
            logprobs=group[0].top if group[0].logprobs is not None else None,
            finish_reasons=finish, cached_prompt_tokens=cached,
        )

    def _choose(self, req: Request, prompt: list[int]) -> Completion:
        """Score every choice as a continuation of ``prompt`` (rows ``prompt + choice[:-1]``,
        shared by the choices that give the same row) and pick the best."""
        torch = self._torch
        s = req.sampling
        choices = s.choices or ()
        with self._lock:
            toks = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if not toks or any(not t for t in toks):
            return Completion(texts=[], error="bad request: choices must be non-empty")
        seqs: dict[tuple[int, ...], int] = {}  # row -> tokens of the choice scored at its end
        for t in toks:
            seqs[tuple(prompt + t[:-1])] = max(len(t), seqs.get(tuple(prompt + t[:-1]), 0))
        logps: dict[tuple[int, ...], Any] = {}  # row -> [len(choice), vocab] log-probs
        reused: dict[tuple[int, ...], int] = {}  # row -> its tokens taken from the prefix cache
        try:
            for row in sorted(seqs, key=len):
                lg, _, reused[row] = self._prefill_one(list(row), seqs[row])
                logps[row] = torch.log_softmax(lg.float(), dim=-1)
        except Exception as e:
            return Completion(texts=[], error=f"scoring failed: {e!r}")
        rowlps = [logps[tuple(prompt + t[:-1])][seqs[tuple(prompt + t[:-1])] - len(t) :] for t in toks]
        scores = [float(sum(lp[p, tid] for p, tid in enumerate(t)))
                  for lp, t in zip(rowlps, toks, strict=True)]
        if s.temperature <= 0:
            picked = [max(range(len(scores)), key=scores.__getitem__)] * s.n
        else:
            gen = torch.Generator()
            if s.seed is None:
                gen.seed()
            else:
                gen.manual_seed(s.seed)
            w = torch.softmax(torch.tensor(scores) / s.temperature, dim=-1)
            picked = torch.multinomial(w, s.n, replacement=True, generator=gen).tolist()
        top = None
        if s.logprobs is not None:
            c, lp = picked[0], rowlps[picked[0]]
            top = []
            for p, tid in enumerate(toks[c]):
                tv, ti = lp[p].topk(s.logprobs) if s.logprobs else (lp[p, :0], lp[p, :0])
                top.append(top_logprobs(self._text, tv.tolist(), ti.tolist(), s.logprobs, tid,
                                        float(lp[p, tid])))
        return Completion(
            texts=[choices[c] for c in picked], prompt_tokens=len(prompt),
            completion_tokens=sum(len(toks[c]) for c in picked), logprobs=top,
            finish_reasons=["stop"] * len(picked),
            cached_prompt_tokens=min([len(prompt), *(reused.get(tuple(prompt + t[:-1]), 0) for t in toks)]),
        )
