"""The embedded backend: transformers on the CPU, no server.

Requests are rendered with the model's chat template (continuing a final assistant message when
there is one), sorted by length and run in batches with left padding through a small decoding
loop of our own: it gives every row its own seeded ``torch.Generator`` (so a sampled answer does
not depend on its batch-mates), its own stop strings and its own top-k log-probs, and drops rows
from the KV cache as they finish. Log-probs are those of the raw model distribution (before
temperature and top-p), as vLLM reports them. ``choices`` is answered by scoring each choice's
log-likelihood as a continuation of the prompt and taking the best (sampling among them by
``softmax(score / temperature)`` when the temperature is above 0).

With a prefix cache (``prefix_cache_mb`` > 0, the default; 0 turns it off) every sequence is prefilled alone,
starting from the KV cache of the longest prefix an earlier call computed (``prefix_cache.py``:
the shared system prompt and few-shot turns, a revision's earlier turns), and the rows are then
decoded together as before; ``prefilled`` counts the prompt tokens that went through the model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..model import default_model_dir, require_prepared
from ..types import Completion, Request
from .batching import MicroBatcher
from .prefix_cache import Layers, PrefixCache

_SEED_MIX = 1_000_003


@dataclass
class _Row:
    """One sequence being generated: sample ``sample`` of request ``req``."""

    req: int
    sample: int
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    penalty: float
    stop: tuple[str, ...]
    logprobs: int | None
    generator: Any  # torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut the text
    finish: str = "length"
    cached: int = 0  # prompt tokens taken from the prefix cache (reported as cached_prompt_tokens)


class EmbeddedBackend:
    """SmolLM2 (or any causal LM folder) through transformers, batched, on the CPU: requests are
    gathered by one micro-batcher (``batch_size`` at a time) and computed off the loop."""

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
        if threads:
            torch.set_num_threads(threads)
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise BackendError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        self._torch = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(folder))
        self.model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
        # transformers >= 5.2x names the KV cache argument `cache` (and warns on the old name)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.model.eval()
        self.model_id = f"{folder.name}@embedded"
        self.batch_size = self.max_in_flight = max(1, batch_size)  # micro-batches of ready requests
        self._batcher = MicroBatcher(self.compute, self.batch_size)
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

    # ----------------------------------------------------------------------------------- API
    def compute(self, requests: Sequence[Request]) -> list[Completion]:
        """Answer a batch of requests at once (the micro-batcher's call, off the loop)."""
        results: list[Completion | None] = [None] * len(requests)
        rows: list[_Row] = []
        choice_reqs: list[tuple[int, list[int]]] = []
        for i, req in enumerate(requests):
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
                results[i] = Completion(texts=[], error=f"bad request: {e}")
                continue
            if s.choices is not None:
                choice_reqs.append((i, ids))
                continue
            greedy = s.temperature <= 0
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
                rows.append(_Row(i, j, ids, cap, s.temperature, s.top_p, s.repetition_penalty, s.stop,
                                 s.logprobs if j == 0 else None, gen))
        rows.sort(key=lambda r: len(r.prompt))
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b : b + self.batch_size]
            try:
                self._generate(batch)
            except Exception as e:  # keep going: only this batch's requests fail
                for r in batch:
                    results[r.req] = Completion(texts=[], error=f"generation failed: {e!r}")
        self._collect(requests, rows, results)
        if choice_reqs:
            self._choose(requests, choice_reqs, results)
        return [c if c is not None else Completion(texts=[], error="no result") for c in results]

    async def generate(self, request: Request) -> Completion:
        return await self._batcher.generate(request)

    async def aclose(self) -> None:
        await self._batcher.aclose()
        self.model = None

    def describe(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------------------ helpers
    def _prompt_ids(self, req: Request) -> list[int]:
        cont = req.continues
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
            s = self._piece[tid] = self.tokenizer.decode([tid])
        return s

    def _top(self, values: list[float], ids: list[int], k: int, chosen: int, lp: float) -> dict[
        str, float
    ]:
        top: dict[str, float] = {}
        for v, t in zip(values[:k], ids[:k], strict=True):
            s = self._text(t)
            top[s] = max(v, top.get(s, -math.inf))
        s = self._text(chosen)
        top[s] = max(lp, top.get(s, -math.inf))
        return top

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Any, Any, Any]:
        torch = self._torch
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, pos

    def _generate(self, rows: list[_Row]) -> None:
        """Decode ``rows`` together until each hits EOS, a stop string or its token limit."""
        torch = self._torch
        from transformers import DynamicCache

        live = list(range(len(rows)))  # indices into rows, aligned with the batch dimension
        k_max = max((r.logprobs or 0) for r in rows)
        want_top = any(r.logprobs is not None for r in rows)
        tvals: list[list[float]] = []
        tids: list[list[int]] = []
        with torch.inference_mode():
            if self._prefix is not None:
                last, cache, mask, pos = self._prefill_rows(rows)
            else:
                ids, mask, pos = self._left_pad([r.prompt for r in rows])
                cache = DynamicCache(config=self.model.config)
                last = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                  logits_to_keep=1, **{self._cache_kw: cache}).logits[:, -1, :]
                self.prefilled += sum(len(r.prompt) for r in rows)
            pos = pos[:, -1:]
            while live:
                logits = last.float()
                logp = torch.log_softmax(logits, dim=-1)  # reported as vLLM does: before penalties
                if any(rows[ri].penalty != 1.0 for ri in live):
                    logits = self._penalize(logits, [rows[ri] for ri in live])
                picks = logits.argmax(dim=-1).tolist()
                for b, ri in enumerate(live):
                    r = rows[ri]
                    if r.generator is not None:
                        picks[b] = self._sample(logits[b], r.temperature, r.top_p, r.generator)
                chosen_lp = logp.gather(1, torch.tensor(picks).unsqueeze(1)).squeeze(1).tolist()
                if want_top:
                    tv, ti = (logp.topk(k_max, dim=-1) if k_max else (logp[:, :0], logp[:, :0]))
                    tvals, tids = tv.tolist(), ti.tolist()
                keep: list[int] = []
                for b, ri in enumerate(live):
                    r, tok = rows[ri], picks[b]
                    r.tokens.append(tok)
                    if r.logprobs is not None:
                        r.top.append(self._top(tvals[b], tids[b], r.logprobs, tok, chosen_lp[b]))
                    if tok in self.eos or (r.stop and self._hit_stop(r)):
                        r.finish = "stop"
                    elif len(r.tokens) < r.max_tokens:
                        keep.append(b)
                        continue
                    self._remember(cache, mask, b, r)
                if not keep:
                    break
                if len(keep) < len(live):
                    sel = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(sel)
                    mask, pos = mask[sel], pos[sel]
                    picks = [picks[b] for b in keep]
                    live = [live[b] for b in keep]
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                pos = pos + 1
                last = self.model(input_ids=torch.tensor(picks).unsqueeze(1), attention_mask=mask,
                                  position_ids=pos, use_cache=True,
                                  **{self._cache_kw: cache}).logits[:, -1, :]

    def _prefill_one(self, ids: list[int], keep: int) -> Any:
        """Run one sequence through the model from its longest cached prefix (at least ``keep``
        tokens are computed), remember its cache; its last ``keep`` logits and its cache."""
        torch = self._torch
        from transformers import DynamicCache

        assert self._prefix is not None
        key = tuple(ids)
        n, layers = self._prefix.lookup(key, len(ids) - keep)
        self.reused = n  # what the caller reports as cached prompt tokens
        cache: Any = DynamicCache(config=self.model.config)
        for li, (k, v) in enumerate(layers or []):
            cache.update(k, v, li)
        out = self.model(input_ids=torch.tensor([ids[n:]]), use_cache=True, logits_to_keep=keep,
                         position_ids=torch.arange(n, len(ids)).unsqueeze(0),
                         **{self._cache_kw: cache})
        self.prefilled += len(ids) - n
        self._prefix.store(key, [(layer.keys, layer.values) for layer in cache.layers])
        return out.logits[0], cache

    def _prefill_rows(self, rows: list[_Row]) -> tuple[Any, Any, Any, Any]:
        """Prefill every row alone (reusing cached prefixes), then stack the caches left-padded
        as one batch: the first logits [rows, vocab], the cache, the attention mask, positions."""
        torch = self._torch
        from transformers import DynamicCache

        done = []
        for r in rows:
            done.append(self._prefill_one(r.prompt, 1))
            r.cached = self.reused
        _, mask, pos = self._left_pad([r.prompt for r in rows])
        width = mask.shape[1]
        cache = DynamicCache(config=self.model.config)
        pad = torch.nn.functional.pad
        for li in range(len(done[0][1].layers)):
            ls = [c.layers[li] for _, c in done]
            cache.update(torch.cat([pad(x.keys, (0, 0, width - x.keys.shape[2], 0)) for x in ls]),
                         torch.cat([pad(x.values, (0, 0, width - x.values.shape[2], 0)) for x in ls]),
                         li)
        return torch.stack([lg[-1] for lg, _ in done]), cache, mask, pos

    def _remember(self, cache: Any, mask: Any, b: int, r: _Row) -> None:
        """Keep the cache of a finished row's prompt and answer (all but its last token, which
        was never fed back) for a later prompt that continues it."""
        if self._prefix is None or len(r.tokens) < 2:
            return  # the prompt alone is remembered by its prefill
        sel = mask[b].bool()
        layers: Layers = [(x.keys[b : b + 1, :, sel], x.values[b : b + 1, :, sel])
                          for x in cache.layers]
        self._prefix.store(tuple(r.prompt + r.tokens[:-1]), layers)

    def _penalize(self, logits: Any, rows: list[_Row]) -> Any:
        """Repetition penalty on every token already in a row's prompt or answer."""
        torch = self._torch
        logits = logits.clone()
        for b, r in enumerate(rows):
            if r.penalty == 1.0:
                continue
            # End-of-turn tokens are left out: every chat turn of the prompt ends with one, so
            # penalising them keeps the model from ever stopping (measured: with the few-shot turns,
            # 9 of 12 revisions of the README's main job ran to 512 tokens; none without).
            seen = torch.tensor(sorted((set(r.prompt) | set(r.tokens)) - self.eos), dtype=torch.long)
            v = logits[b, seen]
            logits[b, seen] = torch.where(v > 0, v / r.penalty, v * r.penalty)
        return logits

    def _sample(self, logits: Any, temperature: float, top_p: float, gen: Any) -> int:
        torch = self._torch
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1:
            sp, si = probs.sort(descending=True)
            drop = (sp.cumsum(-1) - sp) >= top_p
            sp = sp.masked_fill(drop, 0.0)
            return int(si[torch.multinomial(sp, 1, generator=gen)].item())
        return int(torch.multinomial(probs, 1, generator=gen).item())

    def _hit_stop(self, r: _Row) -> bool:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in r.stop if s) if i >= 0), default=-1)
        if cut < 0:
            return False
        r.text = text[:cut]
        return True

    def _collect(self, requests: Sequence[Request], rows: list[_Row],
                 results: list[Completion | None]) -> None:
        by_req: dict[int, list[_Row]] = {}
        for r in rows:
            by_req.setdefault(r.req, []).append(r)
        for i, group in by_req.items():
            if results[i] is not None:  # its batch failed
                continue
            group.sort(key=lambda r: r.sample)
            texts = [r.text if r.text is not None else
                     self.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in group]
            finish = [r.finish for r in group]
            ntok = sum(len(r.tokens) for r in group)
            n = requests[i].sampling.n
            if len(group) < n:  # greedy: n identical answers, computed once
                texts, finish, ntok = texts * n, finish * n, ntok * n
            results[i] = Completion(
                texts=texts, prompt_tokens=len(group[0].prompt), completion_tokens=ntok,
                logprobs=group[0].top if group[0].logprobs is not None else None,
                finish_reasons=finish, cached_prompt_tokens=group[0].cached,
            )

    def _choose(self, requests: Sequence[Request], todo: list[tuple[int, list[int]]],
                results: list[Completion | None]) -> None:
        """Score every choice as a continuation; rows ``prompt + choice[:-1]`` are shared."""
        torch = self._torch
        plans: list[tuple[int, list[int], list[list[int]]]] = []
        seqs: dict[tuple[int, ...], int] = {}  # row -> tokens of the choice scored at its end
        for i, prompt in todo:
            choices = requests[i].sampling.choices or ()
            toks = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
            if not toks or any(not t for t in toks):
                results[i] = Completion(texts=[], error="bad request: choices must be non-empty")
                continue
            for t in toks:
                seqs[tuple(prompt + t[:-1])] = len(t)
            plans.append((i, prompt, toks))
        keyed = sorted(seqs, key=len)
        logps: dict[tuple[int, ...], Any] = {}  # row -> [len(choice), vocab] log-probs
        reused: dict[tuple[int, ...], int] = {}  # row -> its tokens taken from the prefix cache
        try:
            with torch.inference_mode():
                for row in keyed if self._prefix is not None else ():
                    lg, _ = self._prefill_one(list(row), seqs[row])
                    reused[row] = self.reused
                    logps[row] = torch.log_softmax(lg.float(), dim=-1)
                for b in range(0, len(keyed) if self._prefix is None else 0, self.batch_size):
                    chunk = keyed[b : b + self.batch_size]
                    k = max(seqs[row] for row in chunk)
                    ids, mask, pos = self._left_pad([list(row) for row in chunk])
                    out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                     logits_to_keep=k)
                    self.prefilled += sum(len(row) for row in chunk)
                    lp = torch.log_softmax(out.logits.float(), dim=-1)
                    for r, row in enumerate(chunk):
                        logps[row] = lp[r, k - seqs[row] :]
        except Exception as e:
            for i, _, _ in plans:
                results[i] = Completion(texts=[], error=f"scoring failed: {e!r}")
            return
        for i, prompt, toks in plans:
            s = requests[i].sampling
            choices = s.choices or ()
            rowlps = [logps[tuple(prompt + t[:-1])] for t in toks]
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
                    top.append(self._top(tv.tolist(), ti.tolist(), s.logprobs, tid,
                                         float(lp[p, tid])))
            results[i] = Completion(
                texts=[choices[c] for c in picked], prompt_tokens=len(prompt),
                completion_tokens=sum(len(toks[c]) for c in picked), logprobs=top,
                finish_reasons=["stop"] * len(picked),
                cached_prompt_tokens=min([len(prompt), *(reused.get(tuple(prompt + t[:-1]), 0) for t in toks)]),
            )
