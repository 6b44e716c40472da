"""A content-addressed cache of model calls in SQLite (WAL): a rerun redoes only what changed.

The key of a call is the SHA-256 of the backend's model id, the rendered messages and the
sampling parameters (the per-call seed included). ``CachedBackend`` wraps any backend: it
answers the requests whose key is stored (or in flight: one request asked twice at once is
sent once), sends only the misses to the inner backend, and commits each successful answer on
the run's loop before returning it (answers that arrive together share one transaction).
Failed completions are not stored, so a rerun tries them again.

Editing one principle's text changes the rendered prompts of the calls that use it, so exactly
those calls (and the ones downstream, whose prompts contain their answers) miss the cache.
Several processes may share one cache file: WAL lets readers and a writer work side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from .backends.base import Backend
from .errors import ConfigError
from .types import Completion, Message, Request, Sampling, key_fields
from .usage import Usage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    completion TEXT NOT NULL,
    created REAL NOT NULL
)
"""  # a rowid table: inserts at random keys move only the small index, not the rows
# The tokens served to each run (run.json's ``usage``), committed with the answers they came
# with: a killed run's tokens are there for its rerun, which goes on under the same run id.
_LEDGER = """
CREATE TABLE IF NOT EXISTS usage (
    run TEXT NOT NULL, stage TEXT NOT NULL, step TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_prompt_tokens INTEGER NOT NULL,
    PRIMARY KEY (run, stage, step)
)
"""
_ADD_USAGE = """
INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run, stage, step) DO UPDATE SET
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_prompt_tokens = cached_prompt_tokens + excluded.cached_prompt_tokens
"""
OFF = ("off", "false", "no", "0", "none")  # values of --cache / CAI_CACHE that disable it


# json.dumps with these settings, without building an encoder per call
_COMPACT = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _compact(obj: Any) -> bytes:
    return _COMPACT.encode(obj).encode()


_ROW = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # a stored completion, as always


def _stored(c: Completion) -> str:
    """``_ROW.encode(c.to_dict())``. A completion of strings and integers only (no log-probs: floats,
    which orjson writes in another notation) is encoded by orjson, byte for byte the same (see
    ``request_key``) at a fifth of the cost; anything else, or what orjson refuses (a lone
    surrogate, an integer over 64 bits), by the stdlib."""
    d = c.to_dict()
    if c.logprobs is None and _plain(d):
        with contextlib.suppress(TypeError):  # orjson.JSONEncodeError is a TypeError
            return orjson.dumps(d).decode()
    return _ROW.encode(d)


def _plain(d: dict[str, Any]) -> bool:
    """Whether a completion's dict holds only strings, None and integers (in lists or not)."""
    for v in d.values():
        if type(v) is list:
            for x in v:
                if type(x) is not str and x is not None:
                    return False
        elif type(v) is not str and type(v) is not int and v is not None:
            return False
    return True
_model_json = functools.lru_cache(maxsize=64)(_compact)  # a run has one or two model ids


def _strings(messages: tuple[Message, ...]) -> bool:
    """Whether every message is a dict of strings (a plain loop: twice as fast as all())."""
    for m in messages:
        if type(m) is not dict:
            return False
        for v in m.values():
            if type(v) is not str:
                return False
    return True


def request_key(model_id: str, req: Request) -> str:
    """The cache key of one call: model id, messages and sampling (seed included).

    The SHA-256 of ``{"messages":..,"model":..,"sampling":..}`` as compact, key-sorted JSON
    (non-ASCII as UTF-8). The sampling fields go in as ``Sampling.to_dict()`` has them (JSON writes
    tuples as lists); ``vars()`` instead of ``dataclasses.asdict`` because asdict's deep copies
    cost more than the rest of the key. Messages of plain strings (every prompt cai renders) are
    encoded by orjson, whose output for strings is byte for byte the stdlib's (every code point
    is checked in tests/test_cache.py) at a fraction of the cost on long prompts; anything else
    goes through the stdlib encoder, so every key is what it always was.
    """
    h = hashlib.sha256(b'{"messages":')
    messages = req.messages
    try:  # orjson refuses a key that is not a string
        h.update(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS) if _strings(messages) else _compact(messages))
    except TypeError:
        h.update(_compact(messages))
    h.update(b',"model":' + _model_json(model_id) + b',"sampling":' + _sampling_json(req.sampling) + b"}")
    return h.hexdigest()


def _sampling_json(s: Sampling) -> bytes:
    """``_compact(key_fields(vars(s)))``: the JSON around the seed (the one field that changes
    from call to call) is encoded once per sampling shape, the seed written in between."""
    seed = s.seed
    if (seed is not None and type(seed) is not int) or any(
            x == 0 and math.copysign(1.0, x) < 0 for x in (s.temperature, s.top_p, s.repetition_penalty)):
        return _compact(key_fields(vars(s)))  # -0.0 equals 0.0 in the lru_cache below, not in JSON
    head, tail = _around_seed(s.max_tokens, s.temperature, s.top_p, s.n, s.logprobs, s.stop, s.choices,
                              s.repetition_penalty)
    return head + (b"null" if seed is None else str(seed).encode()) + tail


@functools.lru_cache(maxsize=256, typed=True)  # typed: 1 and 1.0 are different JSON
def _around_seed(max_tokens: int, temperature: float, top_p: float, n: int, logprobs: int | None,
                 stop: tuple[str, ...], choices: tuple[str, ...] | None, penalty: float) -> tuple[bytes, bytes]:
    s = Sampling(max_tokens, temperature, top_p, n, 0, logprobs, stop, choices, penalty)
    full = _compact(key_fields(vars(s)))
    head, tail = full.split(b'"seed":0', 1)  # the key: a string value would have its quotes escaped
    return head + b'"seed":', tail


class CallCache:
    """A key -> Completion store in one SQLite file, shared by processes (WAL). Used from the
    run's loop only: ``put_soon`` gathers the answers that arrive while the loop is busy and
    commits them together in one transaction, from a callback on the same loop."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pending: dict[str, tuple[str, Completion]] = {}  # answered, not committed yet
        self._committed: asyncio.Future[None] | None = None  # done when _pending is committed
        self._usage: dict[str, Usage] = {}  # run id -> tokens served, not committed yet
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        """The connection, WAL mode and the table. Switching to WAL (and recovering the WAL of a
        killed process that shared the file) can answer "database is locked" at once, without
        waiting for the busy timeout: that is retried for a while (several processes, one file)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
                try:
                    if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    # In WAL mode NORMAL loses nothing when the process is killed (only on power
                    # loss) and syncs only at checkpoints; checkpointing every ~40 MB instead of
                    # every 4 MB makes a commit of a batch cost about half as much.
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.execute("PRAGMA wal_autocheckpoint=10000")
                    db.execute(_SCHEMA)
                    with contextlib.suppress(sqlite3.OperationalError):  # an old cache, read-only: no ledger
                        db.execute(_LEDGER)
                    return db
                except BaseException:
                    db.close()
                    raise
            except sqlite3.OperationalError as e:
                if "locked" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise ConfigError(f"not a usable cache database ({e})", file=str(self.path),
                                  hint="pass another --cache path, or --no-cache") from None
            except sqlite3.DatabaseError as e:
                raise ConfigError(f"not a usable cache database ({e})", file=str(self.path),
                                  hint="pass another --cache path, or --no-cache") from None

    def get(self, key: str) -> Completion | None:
        """One key's stored answer (the runner's lookup, once per call), or None."""
        p = self._pending.get(key)
        if p is not None:
            return p[1]
        row = self._db.execute("SELECT completion FROM calls WHERE key = ?", (key,)).fetchone()
        return Completion.from_dict(json.loads(row[0])) if row is not None else None

    def put_soon(self, key: str, model: str, completion: Completion) -> asyncio.Future[None]:
        """Queue one answer for the next commit (a callback on the running loop, after the
        answers that arrive with it); the future is done once it is committed."""
        self._pending[key] = (model, completion)
        if self._committed is None:
            loop = asyncio.get_running_loop()
            self._committed = loop.create_future()
            loop.call_soon(self.flush)
        return self._committed

    def note_usage(self, run: str, request: Request, completion: Completion) -> None:
        """Add one served call's tokens to ``run``'s ledger, committed with the next answers
        (or on its own, soon, for a failed call)."""
        usage = self._usage.get(run)
        if usage is None:
            usage = self._usage[run] = Usage()
        usage.served(request, completion)
        if self._committed is None:
            loop = asyncio.get_running_loop()
            self._committed = loop.create_future()
            loop.call_soon(self.flush)

    def ledger(self, run: str) -> Usage:
        """The tokens served to ``run`` (its killed attempts' included), as committed."""
        self.flush()
        u = Usage()
        with contextlib.suppress(sqlite3.OperationalError):  # no ledger (an old cache, read-only)
            for stage, step, *cell in self._db.execute(
                    "SELECT stage, step, prompt_tokens, completion_tokens, cached_prompt_tokens FROM usage "
                    "WHERE run = ?", (run,)):
                u.add(stage, step, *cell)
        return u

    def _write_usage(self) -> None:
        """Inside the commit's transaction: the tokens noted since the last commit."""
        usage, self._usage = self._usage, {}
        self._db.executemany(_ADD_USAGE, [(run, stage, step, *cell) for run, u in usage.items()
                                          for (stage, step), cell in u.cells.items()])

    def flush(self) -> None:
        """Commit every queued answer now, in one transaction."""
        pending, done = self._pending, self._committed
        self._pending, self._committed = {}, None
        try:
            self.put_many((k, m, c) for k, (m, c) in pending.items())
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the commit
            if done is not None and not done.done():
                done.set_exception(e)
            return
        if done is not None and not done.done():
            done.set_result(None)

    def put_many(self, items: Iterable[tuple[str, str, Completion]]) -> int:
        """Store (key, model id, completion) triples in one transaction; return how many."""
        now = time.time()
        rows = [(k, m, _stored(c), now) for k, m, c in items]
        if not rows and not self._usage:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?)", rows)
            if self._usage:
                self._write_usage()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return len(rows)

    def __len__(self) -> int:
        self.flush()
        return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def close(self) -> None:
        self.flush()
        self._db.close()


class CountingBackend:
    """No cache: pass every request through, and count them as ``CachedBackend`` does; ``usage``
    sums the tokens of the calls served (in memory only: a killed run's are lost)."""

    def __init__(self, backend: Backend) -> None:
        self.inner, self.model_id = backend, backend.model_id
        self.max_in_flight: int | None = getattr(backend, "max_in_flight", None)
        self.sent = self.hits = self.errors = 0
        self.usage = Usage()
        self.run_id: str | None = None  # set: the served tokens also go to the cache's ledger

    async def generate(self, request: Request) -> Completion:
        c = await self.inner.generate(request)
        self.sent += 1
        self.errors += c.failure is not None
        self.usage.served(request, c)
        return c

    def served(self) -> Usage:
        """The tokens served to this run: the ledger's (killed attempts included) where there is one."""
        return self.usage

    async def aclose(self) -> None:
        await self.inner.aclose()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


class CachedBackend(CountingBackend):
    """A Backend that answers from a ``CallCache`` and sends only the misses to ``backend``.

    ``sent`` counts requests passed to the inner backend, ``hits`` the ones answered without
    it (stored before, or the same request in flight already), ``errors`` the failed ones.
    """

    def __init__(self, backend: Backend, cache: CallCache, *, close_cache: bool = True) -> None:
        super().__init__(backend)
        self.cache, self.close_cache = cache, close_cache
        self._in_flight: dict[str, asyncio.Future[Completion]] = {}

    async def generate(self, request: Request) -> Completion:
        """One request: from the cache, or from the model and committed to the cache as soon as
        the answer arrives (a kill loses only the calls in flight)."""
        key = request_key(self.model_id, request)
        hit = self.cache.get(key)
        if hit is None and (same := self._in_flight.get(key)) is not None:
            hit = await asyncio.shield(same)
        if hit is not None:
            self.hits += 1
            return hit
        fut = self._in_flight[key] = asyncio.get_running_loop().create_future()
        try:
            c = await self.inner.generate(request)
            self.sent += 1
            self.usage.served(request, c)
            if self.run_id is not None:  # committed with the answer (a failure's: on its own)
                self.cache.note_usage(self.run_id, request, c)
            # An answer is returned only once it is committed: the row that uses it may be written
            # next, and a row on disk whose calls are not in the cache would be asked again (and may
            # come out different) by a rerun that redoes the row or reads the cache from elsewhere.
            if c.failure is None:
                await self.cache.put_soon(key, self.model_id, c)
            else:
                self.errors += 1
            fut.set_result(c)
            return c
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
                fut.exception()  # retrieved: a waiter may not be there to
            raise
        finally:
            del self._in_flight[key]

    def served(self) -> Usage:
        return self.cache.ledger(self.run_id) if self.run_id is not None else self.usage

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            if self.close_cache:
                self.cache.close()


def cache_path(value: str | None, no_cache: bool, default_dir: Path) -> Path | None:
    """The cache file a command uses: ``--cache PATH`` / ``CAI_CACHE``, else ``default_dir``'s
    ``cache.sqlite``; ``None`` with ``--no-cache`` or a value such as ``off``."""
    if no_cache or (value is not None and value.strip().lower() in OFF):
        return None
    return Path(value) if value else Path(default_dir) / "cache.sqlite"


Counted = CachedBackend | CountingBackend


def served(*backends: Counted) -> Usage:
    """The tokens served to a run through ``backends`` (each counted once): from the cache's ledger
    where the run has one (its killed attempts included), else as counted in memory."""
    usage, ledgers = Usage(), dict[Path, CachedBackend]()
    for b in {id(b): b for b in backends}.values():
        if isinstance(b, CachedBackend) and b.run_id is not None:
            b.cache.flush()
            ledgers.setdefault(b.cache.path.resolve(), b)  # several backends on one file: read once
        else:
            usage.merge(b.usage)
    for b in ledgers.values():
        usage.merge(b.served())
    return usage


@contextmanager
def counted(backend: Backend, cache: str | Path | None = None) -> Iterator[Counted]:
    """``backend`` behind the call cache at ``cache`` (or a counter), the cache closed after the
    block; the backend stays open for its owner."""
    if isinstance(backend, (CachedBackend, CountingBackend)):
        yield backend
        return
    be: Counted = CachedBackend(backend, CallCache(cache)) if cache else CountingBackend(backend)
    try:
        yield be
    finally:
        if isinstance(be, CachedBackend):
            be.cache.close()
