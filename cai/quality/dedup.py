"""Find exact and near-duplicate prompts, and prompts that leak from an evaluation set.

Two texts are an **exact** duplicate when they are equal after :func:`normalize` (Unicode NFKC,
case-folded, apostrophes dropped, other punctuation turned into spaces, whitespace collapsed).
They are a **near** duplicate when the Jaccard similarity of their word-bigram shingles, as
estimated by MinHash, is at least ``threshold``. Candidates come from a MinHash LSH index
(``datasketch``), filled while streaming, and each candidate is verified with the MinHash
estimate before it counts, so LSH's false positives never get through.

Everything is deterministic: the MinHash permutations come from a fixed seed and, among several
matches, the earliest kept item wins.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError
from ..inputs import iter_records

Kind = Literal["exact", "near"]

SEED = 1  # MinHash permutation seed: fixed so that results are the same on every run
SCHEME = "affine32"  # datasketch>=2.0 hashing scheme, named so that a new default cannot change results
LSH_MARGIN = 0.1  # the LSH bucket threshold is this much below the verified one
SHINGLE_WORDS = 2  # word n-gram size of the shingles; a text shorter than this is one shingle
TEXT_COLUMNS = ("prompt", "question", "instruction", "text", "input")
EVAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")

_APOSTROPHES = re.compile(r"['\u2019\u02bc`]")
_NON_WORD = re.compile(r"[^\w\s]+|_+")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The form two texts must share to be exact duplicates: case, whitespace, punctuation ignored."""
    t = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).casefold())
    return _SPACE.sub(" ", _NON_WORD.sub(" ", t)).strip()


def shingles(normalized: str, n: int = SHINGLE_WORDS) -> set[str]:
    """Word n-grams of a normalized text (the whole text when it has fewer than ``n`` words)."""
    words = normalized.split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


# datasketch's MinHashLSH(threshold, num_perm) bands (b, r) for the thresholds cai uses (0.8 and
# LSH_MARGIN below it): picking them integrates with scipy, 0.4 s of imports at the start of every
# run; any other pair asks datasketch (tests/test_dedup.py checks these against it)
LSH_BANDS = {(0.8 - LSH_MARGIN, 128): (14, 9)}  # the key as the index computes it (0.7000000000000001)
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


class MinHash:
    """datasketch's ``MinHash(num_perm, seed=seed, scheme="affine32")`` as the index uses it (the
    same permutations and hash values: tests/test_dedup.py), without importing datasketch, whose
    LSH module imports scipy. ``fill`` replaces the hash values with those of one set of bytes."""

    scheme = SCHEME

    def __init__(self, num_perm: int, seed: int = SEED) -> None:
        gen = np.random.RandomState(seed)  # drawn as datasketch draws its affine permutations
        self._a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        self._b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        self.hashvalues = np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.hashvalues)

    def fill(self, items: list[bytes]) -> None:
        """``clear()`` then ``update_batch(items)``: each item's sha1_hash32 (the first 4 bytes of
        its SHA-1, little-endian), mixed by the MurmurHash3 finalizer, then a*h + b mod 2^32, the
        minimum per permutation."""
        hv = np.frombuffer(b"".join(hashlib.sha1(x).digest()[:4] for x in items), dtype="<u4")
        hv = hv.astype(np.uint32).reshape(-1, 1)
        s1, m1, s2, m2, s3 = _FMIX32
        hv = (hv ^ (hv >> s1)) * m1
        hv = (hv ^ (hv >> s2)) * m2
        self.hashvalues = ((hv ^ (hv >> s3)) * self._a + self._b).min(axis=0)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows per band) ``datasketch.MinHashLSH(threshold, num_perm)`` picks."""
    if (threshold, num_perm) in LSH_BANDS:
        return LSH_BANDS[(threshold, num_perm)]
    from datasketch import MinHashLSH  # imported here: it takes a second (scipy)

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class _Index:
    """Exact keys plus a MinHash LSH; match() looks up, add() inserts (streaming, no rebuild)."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 16:
            raise ValueError(f"num_perm must be at least 16, got {num_perm}")
        # the type that counts agreeing positions (at most num_perm): a third of count_nonzero's cost
        self._count = np.uint8 if num_perm < 256 else np.uint16 if num_perm < 65536 else np.int64
        self.threshold = threshold
        self.num_perm = num_perm
        self._exact: dict[str, str] = {}
        self._order: dict[str, int] = {}
        self._keys: list[str] = []  # by insertion order (the row of its signature)
        # The low byte of each hash value: a candidate whose bytes agree less than the threshold
        # cannot agree more in full, so most candidates are ruled out reading a quarter of the
        # memory. Near-identical inputs (templated prompts) make LSH candidates a share of every
        # item seen, so this check is what grows with the input.
        self._fp_rows = np.zeros((0, num_perm), dtype=np.uint8)
        # LSH only proposes candidates; every one is verified against ``threshold``. Its own threshold
        # sits LSH_MARGIN lower (and at most 0.9, which keeps at least two bands) so that pairs just
        # above ``threshold`` are not lost to LSH's false negatives. datasketch picks the bands
        # (b bands of r hash values); the buckets are kept here, compactly (``_band_keys``).
        self.bands, self.rows_per_band = lsh_bands(max(0.05, min(threshold, 0.9) - LSH_MARGIN), num_perm)
        # One dict per band: bucket key -> the row in it, or the list of rows once there are several.
        # datasketch's own storage (a set per bucket, and each item's band bytes kept for removal)
        # took about 6 KB per item at 128 permutations (600 MB at 100k prompts); the index with these
        # buckets, signatures included, about 2.4 KB (measured on 20k prompts, bench/README.md).
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._mix = np.random.default_rng(SEED).integers(1, 2**63, size=self.rows_per_band, dtype=np.uint64) | 1
        # the permutations are drawn once from SEED; one MinHash is cleared and refilled for each
        # text (the index keeps copies of its hash values, never the MinHash)
        self._mh = MinHash(num_perm, SEED)
        self._last_keys: tuple[np.ndarray, list[int]] | None = None
        # one row per item, in order, of the scheme's own width (uint32: half of what uint64 took)
        self._sig_rows = np.zeros((0, num_perm), dtype=self._mh.hashvalues.dtype)

    def __len__(self) -> int:
        return len(self._order)

    def _sketch(self, text: str) -> tuple[str, MinHash | None]:
        """The normalized text and its MinHash (None for a text without words)."""
        norm = normalize(text)
        if not (sh := shingles(norm)):
            return norm, None
        self._mh.fill([s.encode("utf-8") for s in sorted(sh)])
        return norm, self._mh

    def _match(self, norm: str, mh: MinHash | None) -> tuple[str, Kind] | None:
        if (first := self._exact.get(norm)) is not None:
            return first, "exact"
        if mh is None or not (keys := self._candidates(mh)):  # keys: the candidates' rows
            return None
        # Every candidate verified at once: one comparison of their stacked signatures, first of
        # their low bytes (agreeing at least where the full values do: a superset of the hits).
        # ``take`` costs a third of fancy indexing.
        rows = np.fromiter(keys, dtype=np.int64, count=len(keys))
        low = (self._fp_rows.take(rows, axis=0) == mh.hashvalues.astype(np.uint8)).sum(axis=1, dtype=self._count)
        rows = rows[low / self.num_perm >= self.threshold]
        same = (self._sig_rows.take(rows, axis=0) == mh.hashvalues).sum(axis=1, dtype=self._count)
        hits = rows[same / self.num_perm >= self.threshold]  # the estimate MinHash.jaccard makes
        return (self._keys[int(hits.min())], "near") if hits.size else None

    def _band_keys(self, mh: MinHash) -> list[int]:
        """Each band's bucket key: its r hash values mixed into 64 bits (a multiply-add with
        fixed odd multipliers, wrapping). Equal bands get equal keys, as in ``MinHashLSH``; a
        collision of unequal ones only adds a candidate, which the check then rules out."""
        values = mh.hashvalues
        if self._last_keys is not None and self._last_keys[0] is values:  # a match, then its add
            return self._last_keys[1]
        bands = values[: self.bands * self.rows_per_band].reshape(self.bands, self.rows_per_band)
        with np.errstate(over="ignore"):
            keys: list[int] = (bands.astype(np.uint64) * self._mix).sum(axis=1, dtype=np.uint64).tolist()
        self._last_keys = (values, keys)  # MinHash.fill makes a new array: the same one has the same values
        return keys

    def _candidates(self, mh: MinHash) -> set[int]:
        """``MinHashLSH.query``: the rows sharing at least one band with ``mh`` (tests/test_dedup.py
        checks both give the same)."""
        out: set[int] = set()
        for key, table in zip(self._band_keys(mh), self._buckets, strict=True):
            if (hit := table.get(key)) is not None:
                out.update((hit,) if isinstance(hit, int) else hit)
        return out

    def _add(self, key: str, norm: str, mh: MinHash | None) -> None:
        if key in self._order:
            raise ValueError(f"id {key!r} given twice; ids must be unique")
        row = self._order[key] = len(self._order)
        self._keys.append(key)
        self._exact.setdefault(norm, key)
        if row >= len(self._sig_rows):  # grow by doubling (at least 64 rows, new ones zero): appends stay O(1)
            more = ((0, max(64, 2 * row) - row), (0, 0))
            self._sig_rows, self._fp_rows = np.pad(self._sig_rows, more), np.pad(self._fp_rows, more)
        if mh is not None:
            self._sig_rows[row] = mh.hashvalues
            self._fp_rows[row] = mh.hashvalues.astype(np.uint8)
            for band, table in zip(self._band_keys(mh), self._buckets, strict=True):
                hit = table.setdefault(band, row)
                if hit != row:
                    if isinstance(hit, int):
                        table[band] = [hit, row]
                    else:
                        hit.append(row)

    def match(self, text: str) -> tuple[str, Kind] | None:
        return self._match(*self._sketch(text))

    def match_or_add(self, key: str, text: str) -> tuple[str, Kind] | None:
        """The earliest kept item ``text`` duplicates; when there is none, keep it under ``key``."""
        norm, mh = self._sketch(text)
        found = self._match(norm, mh)
        if found is None:
            self._add(key, norm, mh)
        return found


def find_duplicates(
    items: Iterable[tuple[str, str]], threshold: float = 0.8, num_perm: int = 128
) -> dict[str, tuple[str, Kind]]:
    """Map each duplicate id to ``(first_id, "exact" | "near")``; ids not in the result are kept.

    ``items`` are ``(id, text)`` pairs in input order (ids unique); the first occurrence of each
    group is kept and ``first_id`` is always a kept id. Exact: equal after :func:`normalize`.
    Near: estimated Jaccard of word-bigram shingles ``>= threshold``. A copy of a near duplicate
    is reported against the kept item (as "near"), never against the dropped one.
    """
    index = _Index(threshold, num_perm)
    dups: dict[str, tuple[str, Kind]] = {}
    for key, text in items:
        if key in dups:
            raise ValueError(f"id {key!r} given twice; ids must be unique")
        found = index.match_or_add(key, text)
        if found is not None:
            dups[key] = found
    return dups


def _cell_text(value: Any) -> str | None:
    """The text of a prompt cell: a string, or the user turns of a list of chat messages."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        user = [str(m["content"]) for m in value if m.get("role", "user") == "user"]
        return "\n".join(user)
    if isinstance(value, (int, float)):
        return str(value)
    raise TypeError(type(value).__name__)


class Decontaminator:
    """Flags prompts that are exact or near copies of an evaluation set's items (same test as dedup)."""

    def __init__(self, texts: Iterable[str], *, threshold: float = 0.8, num_perm: int = 128,
                 source: str = "evaluation set") -> None:
        self._index = _Index(threshold, num_perm)
        self._texts: list[str] = []
        for text in filter(str.strip, texts):  # blank items are skipped
            self._index.match_or_add(str(len(self._texts)), text)  # an item that repeats another needs no entry
            self._texts.append(text)
        if not self._texts:
            raise InputError(f"{source}: no evaluation prompts found; give a file with at least one non-empty prompt")

    def __len__(self) -> int:
        """The number of non-empty evaluation items read."""
        return len(self._texts)

    def check(self, text: str) -> tuple[str, Kind] | None:
        """The evaluation item ``text`` matches and the kind of match (exact or near), or None."""
        found = self._index.match(text)
        return (self._texts[int(found[0])], found[1]) if found else None

    def hit(self, text: str) -> str | None:
        """The evaluation item ``text`` matches (exactly or nearly), or None."""
        return found[0] if (found := self.check(text)) else None

    @classmethod
    def from_file(cls, path: str | Path, column: str | None = None, *, threshold: float = 0.8,
                  num_perm: int = 128) -> Decontaminator:
        """Read an evaluation set: JSONL/JSON/CSV/TSV/Parquet (text column ``column`` or the first of
        prompt/question/instruction/text/input; a list of chat messages counts by its user turns) or
        a .txt with one prompt per line (``column`` is not used). Matching uses ``threshold`` as in
        :func:`find_duplicates`. A missing or unreadable file, no usable column or no prompt at all
        raises a one-line ``InputError``."""
        p = Path(path)
        if not p.is_file():
            what = "is a folder, not a file" if p.is_dir() else "file not found"
            raise InputError(f"{p}: {what}; give an evaluation file (.jsonl, .json, .csv, .parquet or .txt)")
        suffix = p.suffix.lower()
        if suffix not in EVAL_SUFFIXES:
            raise InputError(f"{p}: unsupported file type {suffix or '(none)'!r}; "
                             "use .jsonl, .json, .csv, .tsv, .parquet or .txt (one prompt per line)")
        try:
            # .txt: one prompt a line (universal newlines; blank lines are skipped like empty cells)
            texts = p.read_text(encoding="utf-8").split("\n") if suffix == ".txt" else list(_read_column(p, column))
        except InputError as e:
            raise InputError(" ".join(str(e).split())) from None  # one line, whatever the reader said
        except UnicodeDecodeError as e:
            raise InputError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); re-save it as UTF-8") from None
        except Exception as e:  # noqa: BLE001 - json, csv, pyarrow and the OS raise many kinds
            msg = " ".join(str(e).split()) or type(e).__name__
            raise InputError(f"{p}: cannot read the evaluation file ({msg if len(msg) <= 200 else msg[:197] + '...'}); "
                             "check that it is a valid .jsonl, .json, .csv, .parquet or .txt file") from None
        return cls(texts, threshold=threshold, num_perm=num_perm, source=str(p))


def _read_column(path: Path, column: str | None) -> Iterator[str]:
    col = column
    for rec, where in iter_records(path):
        col = next((c for c in TEXT_COLUMNS if c in rec), None) if col is None else col
        if col is None or col not in rec:
            have = ", ".join(map(str, rec)) or "none"
            why = (f"no text column (looked for {', '.join(TEXT_COLUMNS)}; row has {have}); name the column to use"
                   if col is None else f"no column {col!r} (row has {have}); name a column every row has")
            raise InputError(f"{where}: {why}")
        try:
            text = _cell_text(rec[col])
        except TypeError as e:
            raise InputError(f"{where}: column {col!r} holds a {e}, not text; name a text column") from None
        if text is not None:
            yield text
