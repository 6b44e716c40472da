"""The embedded backend's decoding loop: continuous batching over a slot KV cache.

Rows (one sampled sequence of one request) join the running batch between steps and leave it the
step they finish, so a short answer is handed back while longer ones go on, and the caller's next
request (a critique after its answer) can join at once instead of waiting for the whole batch.

The batch's keys and values live in a ``SlotCache``: one buffer per layer of
``[slots, kv_heads, capacity, head_dim]``, the live rows in slots ``0..B-1``, each row's tokens
at positions ``0..len-1`` (no padding: each row writes its new token at its own position, and a
boolean mask hides the positions past each row's end). A step writes in place instead of copying
the whole cache (``DynamicCache`` concatenates every layer every step), and attention reads the
shared key/value heads directly (``enable_gqa``) instead of repeating them per query head.

Per step the Python work is vectorised over the batch: the repetition penalty keeps a ``seen``
mask per row (updated with the token picked, not rebuilt from the prompt), greedy rows take one
``argmax``, and log-probs are computed only when a row asked for them. The arithmetic is the same
as before (the same division and multiplication per penalised logit, the same sampling per row
with its own seeded generator), so outputs are the same token for token.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .prefix_cache import Layers

_ATTENTION = "cai_slots"
_GRAIN = 64  # positions by which the slot cache's buffers grow and shrink


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
    done: Callable[..., None] | None = None  # called once, the step the row finishes
    alive: Callable[[], bool] = lambda: True  # false once the caller gave up


_STEP = threading.local()  # .on: this thread runs a decoding step (over the slot cache)
_SDPA: list[Any] = []  # transformers' own SDPA attention, for every forward that is not a step


def _slot_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                    scaling: float | None = None, dropout: float = 0.0, **kw: Any) -> tuple[Any, Any]:
    """Attention over the slot cache in a decoding step: the key/value heads are shared by their
    query heads as they are (no copy per query head); ``attention_mask`` is the boolean
    [B, 1, 1, W] mask of the step. Any other forward (a prefill, on this thread or another one)
    gets transformers' own SDPA attention, as with ``sdpa``: the model's attention setting stays
    fixed, so a prefill can run on a second thread while the batch decodes."""
    if not getattr(_STEP, "on", False):
        return _SDPA[0](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


class _StepLinear(torch.nn.Module):
    """A ``Linear`` that runs a decoding step of two rows or more through oneDNN with its weight
    prepacked (small-row matrix products: measured 1.2-1.4x faster per step than MKL at 3 and 6
    rows on one AVX2 core, and slower for one row); every other call (one row, a prefill) is the
    ``Linear`` as it was."""

    def __init__(self, lin: Any) -> None:
        super().__init__()
        self.lin = lin
        self.packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)

    @property
    def weight(self) -> Any:
        return self.lin.weight

    def forward(self, x: Any) -> Any:
        rows = x.numel() // x.shape[-1]
        if rows < 2 or not getattr(_STEP, "on", False):
            return self.lin(x)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed, self.lin.bias,
                                               "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def pack_linears(model: Any) -> bool:
    """Give ``model``'s linear layers the oneDNN path for decoding steps (``_StepLinear``) where
    torch has oneDNN; whether it did."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    with torch.inference_mode():
        for mod in list(model.modules()):
            for name, child in list(mod.named_children()):
                if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                    setattr(mod, name, _StepLinear(child))
    return True


def use_slot_attention(model: Any) -> None:
    """Set ``model`` to the slot attention (SDPA and its masks outside decoding steps), once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _SDPA[:] = [ALL_ATTENTION_FUNCTIONS["sdpa"]]  # looked up once, not per layer of every prefill
    AttentionInterface.register(_ATTENTION, _slot_attention)
    AttentionMaskInterface.register(_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = _ATTENTION


class SlotCache:
    """The KV cache of the running batch (duck-typed as a transformers ``Cache``: the model calls
    ``update`` once per layer per step). Rows are slots ``0..len(lengths)-1``; the buffers hold
    ``width`` positions, a multiple of ``_GRAIN`` just above the longest row, so that the rows'
    slice is contiguous (attention on a strided slice measured twice as slow) and a buffer is
    copied only once per ``_GRAIN`` steps, not every step."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.lengths: list[int] = []  # tokens cached per live row
        self._pos: Any = None  # the step's write positions, [B]

    def __len__(self) -> int:
        return len(self.lengths)

    def _fit(self, rows: int, tokens: int) -> None:
        """Buffers of at least ``rows`` slots and ``tokens`` positions, at most ``2 * _GRAIN``
        more than needed (copied when they change; new room is zeroed: masked positions must
        hold finite numbers, as attention multiplies them by 0)."""
        want = -(-tokens // _GRAIN) * _GRAIN
        slots, width = (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)
        if rows <= slots and want <= width <= want + 2 * _GRAIN:
            return
        slots, n = max(rows, slots, self.slots), len(self.lengths)
        keep = min(width, want)
        for buf in (self.keys, self.values):
            for li, old in enumerate(buf):
                new = old.new_zeros((slots, old.shape[1], want, old.shape[3]))
                new[:n, :, :keep] = old[:n, :, :keep]
                buf[li] = new

    def add(self, layers: Layers) -> None:
        """A new row in the next slot: ``layers`` per layer ``(keys, values)`` of [1, H, n, D]."""
        n = layers[0][0].shape[2]
        if not self.keys:
            self.keys = [k.new_zeros((self.slots, k.shape[1], 0, k.shape[3])) for k, _ in layers]
            self.values = [v.new_zeros((self.slots, v.shape[1], 0, v.shape[3])) for _, v in layers]
        self._fit(len(self.lengths) + 1, max([n + 1, *(m + 1 for m in self.lengths)]))
        b = len(self.lengths)
        for li, (k, v) in enumerate(layers):
            self.keys[li][b, :, :n] = k[0]
            self.values[li][b, :, :n] = v[0]
        self.lengths.append(n)

    def row(self, b: int) -> Layers:
        """A copy of row ``b``'s cache, [1, H, len, D] per layer."""
        n = self.lengths[b]
        return [(k[b : b + 1, :, :n].clone(), v[b : b + 1, :, :n].clone())
                for k, v in zip(self.keys, self.values, strict=True)]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (increasing), moved down to slots ``0..len(rows)-1``."""
        for dst, src in enumerate(rows):
            if dst != src:
                n = self.lengths[src]
                for buf in (self.keys, self.values):
                    for x in buf:
                        x[dst, :, :n] = x[src, :, :n]
        self.lengths = [self.lengths[b] for b in rows]

    def step_inputs(self) -> tuple[Any, Any]:
        """Positions [B, 1] of the tokens fed this step and the boolean mask [B, 1, 1, width]."""
        self._fit(len(self.lengths), max(self.lengths) + 1)
        pos = torch.tensor(self.lengths, dtype=torch.long)
        width = self.keys[0].shape[2]
        mask = torch.arange(width).unsqueeze(0) <= pos.unsqueeze(1)
        self._pos = pos
        return pos.unsqueeze(1), mask.view(len(self.lengths), 1, 1, width)

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        b = key.shape[0]
        rows = torch.arange(b)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[rows, :, self._pos] = key[:, :, 0]
        v[rows, :, self._pos] = value[:, :, 0]
        return k[:b], v[:b]

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]


class Decoder:
    """The running batch, over a model set up by ``use_slot_attention``: ``add`` a prefilled row,
    ``step`` once (pick a token for every row, hand back the rows that finished, run the rest
    through the model). ``text`` decodes one token;
    ``remember`` keeps a finished row's cache for later prompts that continue it."""

    def __init__(self, model: Any, eos: set[int], piece: Callable[[int], str], decode: Callable[[list[int]], str],
                 remember: Callable[[_Row, Layers], None] | None, cache_kw: str, slots: int) -> None:
        self.model, self.eos, self._piece, self._decode = model, eos, piece, decode
        self._remember, self._cache_kw = remember, cache_kw
        self.eos_ids = torch.tensor(sorted(eos), dtype=torch.long)
        self.rows: list[_Row] = []
        self.cache = SlotCache(slots)
        self.last: Any = None  # [B, vocab] logits of each row's next token
        self.seen: Any = None  # [B, vocab] bool: tokens the repetition penalty applies to

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: _Row, logits: Any, layers: Layers) -> None:
        """A row whose prompt is prefilled: its next-token ``logits`` [vocab] and its cache."""
        self.cache.add(layers)
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
        if row.penalty != 1.0:
            seen[torch.tensor(row.prompt, dtype=torch.long)] = True
            seen[self.eos_ids[self.eos_ids < seen.shape[0]]] = False
        first = not self.rows
        self.rows.append(row)
        self.last = logits.unsqueeze(0) if first else torch.cat([self.last, logits.unsqueeze(0)])
        self.seen = seen.unsqueeze(0) if first else torch.cat([self.seen, seen.unsqueeze(0)])

    def drop(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (indices, increasing)."""
        if len(keep) == len(self.rows):
            return
        sel = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[b] for b in keep]
        self.cache.keep(keep)
        self.last, self.seen = self.last[sel], self.seen[sel]

    def step(self) -> None:
        """Pick every row's next token; finished rows leave (their ``done`` is called); the rest
        go through the model once."""
        rows = self.rows
        logits = self.last.float()
        want = [r.logprobs for r in rows if r.logprobs is not None]
        logp = torch.log_softmax(logits, dim=-1) if want else None  # before penalties, as vLLM
        logits = self._penalize(logits)
        picks: list[int] = logits.argmax(dim=-1).tolist()
        for b, r in enumerate(rows):
            if r.generator is not None:
                picks[b] = _sample(logits[b], r.temperature, r.top_p, r.generator)
        chosen_lp: list[float] = []
        tvals: list[list[float]] = []
        tids: list[list[int]] = []
        if logp is not None:
            chosen_lp = logp.gather(1, torch.tensor(picks).unsqueeze(1)).squeeze(1).tolist()
            k_max = max(want)
            if k_max:
                tv, ti = logp.topk(k_max, dim=-1)
                tvals, tids = tv.tolist(), ti.tolist()
            else:
                tvals, tids = [[] for _ in rows], [[] for _ in rows]
        keep: list[int] = []
        ended: list[tuple[int, _Row]] = []
        for b, r in enumerate(rows):
            tok = picks[b]
            r.tokens.append(tok)
            if r.logprobs is not None:
                r.top.append(top_logprobs(self._piece, tvals[b], tids[b], r.logprobs, tok, chosen_lp[b]))
            if tok in self.eos or (r.stop and self._hit_stop(r)):
                r.finish = "stop"
            elif len(r.tokens) < r.max_tokens:
                keep.append(b)
                continue
            ended.append((b, r))
        if any(r.penalty != 1.0 for r in rows):
            self.seen[torch.arange(len(rows)), torch.tensor(picks)] = True
            self.seen[:, self.eos_ids[self.eos_ids < self.seen.shape[1]]] = False
        for b, r in ended:
            if self._remember is not None and len(r.tokens) >= 2:
                self._remember(r, self.cache.row(b))  # its prompt and answer but the last token
            if r.done is not None:
                r.done(r)
        self.drop(keep)
        if not self.rows:
            self.last = self.seen = None
            return
        self._forward([picks[b] for b in keep])

    def _forward(self, picks: list[int]) -> None:
        pos, mask = self.cache.step_inputs()
        _STEP.on = True
        try:
            out = self.model(input_ids=torch.tensor(picks).unsqueeze(1), attention_mask=mask,
                             position_ids=pos, use_cache=True, **{self._cache_kw: self.cache})
        finally:
            _STEP.on = False
        self.cache.advance()
        self.last = out.logits[:, -1, :]

    def _penalize(self, logits: Any) -> Any:
        """Repetition penalty on every token already in a row's prompt or answer but end-of-turn
        tokens: every chat turn of the prompt ends with one, so penalising them keeps the model
        from ever stopping (measured: with the few-shot turns, 9 of 12 revisions of the README's
        main job ran to 512 tokens; none without)."""
        pens = sorted({r.penalty for r in self.rows} - {1.0})
        if not pens:
            return logits
        logits = logits.clone()
        for p in pens:
            sel = torch.tensor([b for b, r in enumerate(self.rows) if r.penalty == p], dtype=torch.long)
            v = logits[sel]
            seen = self.seen[sel]
            logits[sel] = torch.where(seen, torch.where(v > 0, v / p, v * p), v)
        return logits

    def _hit_stop(self, r: _Row) -> bool:
        text = self._decode(r.tokens)
        cut = min((i for i in (text.find(s) for s in r.stop if s) if i >= 0), default=-1)
        if cut < 0:
            return False
        r.text = text[:cut]
        return True


def top_logprobs(piece: Callable[[int], str], values: list[float], ids: list[int], k: int, chosen: int,
                 lp: float) -> dict[str, float]:
    """A step's top-``k`` log-probs by token text (and the chosen token's), as vLLM reports them."""
    top: dict[str, float] = {}
    for v, t in zip(values[:k], ids[:k], strict=True):
        s = piece(t)
        top[s] = max(v, top.get(s, -math.inf))
    s = piece(chosen)
    top[s] = max(lp, top.get(s, -math.inf))
    return top


def _sample(logits: Any, temperature: float, top_p: float, gen: Any) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sp, si = probs.sort(descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        return int(si[torch.multinomial(sp, 1, generator=gen)].item())
    return int(torch.multinomial(probs, 1, generator=gen).item())
