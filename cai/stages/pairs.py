"""Preference pairs for the judge, from three sources, all as one ``Pair`` record.

- ``sample_pairs``: sample ``n`` answers per prompt from the policy model (one request with
  vLLM's ``n``, temperature 1, seeded per prompt) and pair them.
- ``read_pairs``: existing pairs from a dataset: hh-rlhf ``chosen``/``rejected`` transcripts,
  TRL preference rows (``prompt`` + ``chosen``/``rejected``), or ``prompt``/``response_a``/
  ``response_b`` columns (with an optional ``label`` column, "A" or "B").
- revision rows (``prompt``, ``initial_response``, ``revised_response``) from `cai revise`.

When a human label is known (chosen/rejected), which response is shown as A is decided by a
hash of the pair id, so that the human-preferred one is A in about half the pairs: a judge
with a position bias then cannot look good by always answering A.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from typing import Any

from ..backends.base import Backend, Message, Request, Sampling
from ..config import RunConfig
from ..errors import InputError
from ..hashing import call_seed, hash_int, short_id, unique_ids
from ..inputs import PromptRow, Source, iter_records, to_messages, transcript_prompt
from ..templates import with_system
from .provenance import StageConfig
from .runner import Call, Pool, run


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: list[Message]
    response_a: str
    response_b: str
    human: str | None = None  # "a" or "b": the response a person preferred, when known
    origin: str = ""  # "sampled", "dataset" or "revision"
    source: str = ""  # "file:line" of the input row
    error: str | None = None  # set when the pair could not be made (the judge records a failure)
    extra: dict[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # quality flags of the responses (``truncated``), carried to the label row

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TREE = RunConfig.model_validate({})


# --- (a) sampled from the policy -------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig(StageConfig):
    """The `sample` source as it runs, derived from the settings tree (``of``)."""

    n: int = _TREE.label.samples  # answers per prompt; every two distinct answers make a pair
    seed: int = 0
    sampling: Sampling = field(default_factory=lambda: SampleConfig.of(_TREE).sampling)

    @classmethod
    def of(cls, cfg: RunConfig) -> SampleConfig:
        tokens = cfg.label.sample_max_tokens or cfg.revise.max_tokens
        return cls(n=cfg.label.samples, seed=cfg.seed,
                   sampling=Sampling(max_tokens=tokens, temperature=cfg.label.sample_temperature))


def sample_pair_ids(row_id: str, n: int) -> list[str]:
    """The ids of the pairs a prompt yields (known before sampling, for resume)."""
    return [f"{row_id}-s{i}{j}" for i, j in itertools.combinations(range(n), 2)]


async def sample_prompt(r: PromptRow, call: Call, cfg: SampleConfig, system: str | None = None) -> list[Pair]:
    """Sample ``cfg.n`` answers to one prompt (one request with ``n``, seeded per prompt) and
    pair them (all combinations). A failed call gives one ``Pair`` with ``error`` set. Two
    identical answers are still returned as a pair (the judge records a failure, not a label).
    """
    if cfg.n < 2:
        raise InputError("sampling pairs needs at least 2 answers per prompt (--samples >= 2)")
    ids = sample_pair_ids(r.id, cfg.n)
    c = await call(Request(tuple(with_system(system, r.prompt)),
                           replace(cfg.sampling, n=cfg.n, seed=call_seed(cfg.seed, r.id, "sample")), step="sample"))
    base = Pair(id=ids[0], prompt=r.prompt, response_a="", response_b="", origin="sampled", source=r.source,
                extra=r.extra)
    if c.error or len(c.texts) < cfg.n:
        why = f"backend error: {c.error}" if c.error else f"got {len(c.texts)} of {cfg.n} samples"
        return [replace(base, error=f"sampling: {why}")]
    texts = [t.strip() for t in c.texts]
    cut = [r == "length" for r in c.finish_reasons] + [False] * cfg.n
    return [replace(base, id=pid, response_a=texts[i], response_b=texts[j],
                    flags=("truncated",) if cut[i] or cut[j] else ())
            for pid, (i, j) in zip(ids, itertools.combinations(range(cfg.n), 2), strict=True)]


def sample_pairs(rows: Sequence[PromptRow], backend: Backend, cfg: SampleConfig,
                 system: str | None = None) -> list[Pair]:
    """``sample_prompt`` over ``rows``, all at once: their pairs, in order."""
    async def go(pool: Pool) -> list[list[Pair]]:
        call = Call(pool)
        return list(await asyncio.gather(*(sample_prompt(r, call, cfg, system) for r in rows)))

    return [p for ps in run(go, backend, 256) for p in ps]


# --- (b) and (c) from a dataset --------------------------------------------------------------


def _reply(value: Any, column: str) -> str:
    """A response cell: a string, or a message list whose last message is the reply."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"]).strip()
    raise InputError(f"column {column!r} must be a string or a list of messages")


def _is_transcript(v: Any) -> bool:
    return isinstance(v, str) and v.lstrip(" ").startswith(("\n\nHuman:", "Human:"))


def _from_chosen_rejected(rec: dict[str, Any]) -> tuple[list[Message], str, str]:
    ch, rj = rec["chosen"], rec["rejected"]
    if "prompt" not in rec and _is_transcript(ch) and _is_transcript(rj):
        p1, c = transcript_prompt(ch)
        p2, r = transcript_prompt(rj)
        if p1 != p2:
            raise InputError("chosen and rejected transcripts differ before the last reply")
        if c is None or r is None:
            raise InputError("a transcript does not end with an Assistant reply")
        return p1, c, r
    if "prompt" not in rec and isinstance(ch, list) and isinstance(rj, list):
        p1, p2 = ch[:-1], rj[:-1]  # TRL implicit-prompt conversational rows
        if p1 != p2 or not p1:
            raise InputError("chosen and rejected message lists must share every turn but the last")
        return to_messages(p1, "chosen"), _reply(ch, "chosen"), _reply(rj, "rejected")
    if "prompt" not in rec:
        raise InputError("chosen/rejected are not transcripts; add a `prompt` column")
    return to_messages(rec["prompt"], "prompt"), _reply(ch, "chosen"), _reply(rj, "rejected")


def _differ(a: str, b: str, what: str) -> None:
    """A dataset pair of two equal answers has nothing to judge (it would fail on every rerun)."""
    if a == b:
        raise InputError(f"{what} are the same text: nothing to judge (drop the row)")


def detect_source(rec: dict[str, Any]) -> str:
    if "initial_response" in rec and "revised_response" in rec:
        return "revisions"
    if ("chosen" in rec and "rejected" in rec) or ("response_a" in rec and "response_b" in rec):
        return "dataset"
    return "sample"


def record_to_pair(rec: dict[str, Any], where: str) -> Pair:
    """One dataset row to a pair (the id is made unique by ``read_pairs``)."""
    human: str | None = None
    flags: tuple[str, ...] = ()
    swap = False
    try:
        if "initial_response" in rec and "revised_response" in rec:
            prompt = to_messages(rec["prompt"], "prompt")
            a, b = (_reply(rec[k], k) for k in ("initial_response", "revised_response"))
            origin, flags = "revision", ("truncated",) if "truncated" in (rec.get("gates") or ()) else ()
        elif "response_a" in rec and "response_b" in rec:
            prompt = to_messages(rec["prompt"], "prompt")
            a, b = (_reply(rec[k], k) for k in ("response_a", "response_b"))
            human, origin = str(rec.get("label") or "").strip().lower() or None, "dataset"
            if human not in (None, "a", "b"):
                raise InputError(f"label must be 'A' or 'B', got {rec['label']!r}")
            _differ(a, b, "response_a and response_b")
        elif "chosen" in rec and "rejected" in rec:
            prompt, a, b = _from_chosen_rejected(rec)
            _differ(a, b, "chosen and rejected")
            human, origin, swap = "a", "dataset", True
        else:
            have = ", ".join(rec) or "none"
            raise InputError(f"not a pair (need chosen/rejected, prompt/response_a/response_b, or "
                             f"prompt/initial_response/revised_response; row has {have})")
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    pid = str(rec.get("id") or short_id([prompt, a, b]))
    if swap and hash_int(f"pair-order\x1f{pid}", 1) & 1:
        a, b, human = b, a, "b"  # the chosen one is B in about half the pairs: see the module doc
    return Pair(pid, prompt, a, b, human=human, origin=origin, source=where, flags=flags)


def read_pairs(source: Source, *, split: str = "train", limit: int | None = None) -> Iterator[Pair]:
    """Stream pairs from a dataset; repeated ids (several sources in one file may repeat one) get
    ``-2``, ``-3``... to stay unique."""
    pairs = (record_to_pair(rec, where) for rec, where in islice(iter_records(source, split), limit))
    return unique_ids(pairs, lambda p: p.id, lambda p, new: replace(p, id=new))


def first_record(source: Source, split: str = "train") -> dict[str, Any]:
    for rec, _ in iter_records(source, split):
        return rec
    raise InputError(f"{source}: no rows")
