"""A content-addressed cache of model calls in SQLite (WAL): a rerun redoes only what changed.

The key of a call is the SHA-256 of the backend's model id, the rendered messages and the
sampling parameters (the per-call seed included). ``CachedBackend`` wraps any backend: it
answers the requests whose key is stored, sends only the misses to the inner backend in one
batched call, and commits their successful completions in one transaction as soon as that call
returns. Failed completions are not stored, so a rerun tries them again.

Editing one principle's text changes the rendered prompts of the calls that use it, so exactly
those calls (and the ones downstream, whose prompts contain their answers) miss the cache.
Several processes may share one cache file: WAL lets readers and a writer work side by side.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import orjson

from .backends.base import Backend, BackendBase, Completion, Message, Request, key_fields
from .errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    completion TEXT NOT NULL,
    created REAL NOT NULL
)
"""  # a rowid table: inserts at random keys move only the small index, not the rows
_LOOKUP_CHUNK = 500  # stay well below SQLite's limit on bound parameters
OFF = ("off", "false", "no", "0", "none")  # values of --cache / CAI_CACHE that disable it


# json.dumps with these settings, without building an encoder per call
_COMPACT = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _compact(obj: Any) -> bytes:
    return _COMPACT.encode(obj).encode()


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
    h.update(b',"model":' + _model_json(model_id) + b',"sampling":' + _compact(key_fields(vars(req.sampling))) + b"}")
    return h.hexdigest()


_Queued = tuple[str, str, Completion, "Future[None]"]  # key, model id, answer, done once committed


class CallCache:
    """A key -> Completion store in one SQLite file. Safe to share between processes and
    between the threads of one (a lock serialises its one connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self._queued: dict[str, Completion] = {}
        self._queued_lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL loses nothing when the process is killed (only on power loss)
            # and syncs only at checkpoints; checkpointing every ~40 MB instead of every 4 MB
            # makes a commit of a batch cost about half as much.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA wal_autocheckpoint=10000")
            self._db.execute(_SCHEMA)
            # Lookups on a connection of their own: in WAL mode a reader never waits for the
            # writer thread's commits (they held the one connection's lock, and every lookup
            # of the event loop with it).
            self._reader = sqlite3.connect(str(self.path), timeout=60, isolation_level=None,
                                           check_same_thread=False)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"not a usable cache database ({e})", file=str(self.path),
                              hint="pass another --cache path, or --no-cache") from None
        self._read_lock = threading.Lock()

    def get(self, key: str) -> Completion | None:
        """One key's stored answer (the runner's lookup, once per call), or None."""
        with self._queued_lock:  # an answer handed to the writer, not committed yet
            c = self._queued.get(key)
        if c is not None:
            return c
        # Looked up after the queue: the writer commits an answer before taking it off the queue.
        with self._read_lock:
            row = self._reader.execute("SELECT completion FROM calls WHERE key = ?", (key,)).fetchone()
        return Completion(**json.loads(row[0])) if row is not None else None

    def get_many(self, keys: Iterable[str]) -> dict[str, Completion]:
        keys = list(dict.fromkeys(keys))
        blobs: list[tuple[str, str]] = []
        with self._queued_lock:  # answers handed to the writer, not committed yet
            early = {k: self._queued[k] for k in keys if k in self._queued}
        keys = [k for k in keys if k not in early]
        with self._read_lock:
            for i in range(0, len(keys), _LOOKUP_CHUNK):
                part = keys[i: i + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(part))
                blobs += self._reader.execute(
                    f"SELECT key, completion FROM calls WHERE key IN ({marks})", part).fetchall()
        return early | {key: Completion(**json.loads(blob)) for key, blob in blobs}

    def put_soon(self, key: str, model: str, completion: Completion) -> Future[None]:
        """Commit one answer as soon as the writer thread can: it takes every answer queued
        while it committed the last ones, in one transaction, so a commit per answer costs no
        more than a commit per batch did, and a kill loses only the answers still queued
        (the last few milliseconds'). The future is done once the answer is committed."""
        done: Future[None] = Future()
        with self._queued_lock:
            self._queued[key] = completion
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="cai-cache-writer", daemon=True)
            self._writer.start()
        self._queue.put((key, model, completion, done))
        return done

    def _write(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                self.put_many((k, m, c) for k, m, c, _ in batch)
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the commit
                for *_, done in batch:
                    done.set_exception(e)
                continue
            with self._queued_lock:
                for k, _, c, _ in batch:
                    if self._queued.get(k) is c:
                        del self._queued[k]
            for *_, done in batch:
                done.set_result(None)

    def flush(self) -> None:
        """Wait until every queued answer is committed (the writer thread ends)."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def put_many(self, items: Iterable[tuple[str, str, Completion]]) -> int:
        """Store (key, model id, completion) triples in one transaction; return how many."""
        now = time.time()
        rows = [(k, m, json.dumps(vars(c), ensure_ascii=False, separators=(",", ":")), now)
                for k, m, c in items]  # vars(): Completion's fields are plain JSON already
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def __len__(self) -> int:
        self.flush()
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        self.flush()
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()


class CountingBackend(BackendBase):
    """No cache: pass every request through, and count them as ``CachedBackend`` does."""

    def __init__(self, backend: Backend) -> None:
        self.inner, self.model_id, self.concurrent = backend, backend.model_id, backend.concurrent
        self.loop, self.max_batch = backend.loop, backend.max_batch
        self.sent = self.hits = self.errors = 0
        self._count = threading.Lock()

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        done = self.inner.complete(requests)
        with self._count:
            self.sent += len(requests)
            self.errors += sum(c.error is not None for c in done)
        return done

    async def acomplete(self, request: Request) -> Completion:
        c = await (self.inner.acomplete(request) if self.loop is not None else
                   asyncio.wrap_future(self.inner.submit(request)))
        with self._count:
            self.sent += 1
            self.errors += c.error is not None
        return c

    def close(self) -> None:
        self.inner.close()


class CachedBackend(BackendBase):
    """A Backend that answers from a ``CallCache`` and sends only the misses to ``backend``.

    ``sent`` counts requests passed to the inner backend, ``hits`` the ones answered without
    it (stored before, or the same request twice in one batch), ``errors`` the failed ones.
    """

    def __init__(self, backend: Backend, cache: CallCache, *, close_cache: bool = True) -> None:
        self.inner = backend
        self.cache = cache
        self.model_id = backend.model_id
        self.concurrent = backend.concurrent
        self.loop, self.max_batch = backend.loop, backend.max_batch
        self.close_cache = close_cache
        self.sent = 0
        self.hits = 0
        self.errors = 0
        self._count = threading.Lock()

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        keys = [request_key(self.model_id, r) for r in requests]
        found = self.cache.get_many(keys)
        todo: dict[str, Request] = {}
        for k, r in zip(keys, requests, strict=True):
            if k not in found and k not in todo:
                todo[k] = r
        if todo:
            done = self.inner.complete(list(todo.values()))
            if len(done) != len(todo):  # a backend bug; never cache a misaligned answer
                raise RuntimeError(
                    f"backend returned {len(done)} completions for {len(todo)} requests")
            fresh = dict(zip(todo, done, strict=True))
            self.cache.put_many((k, self.model_id, c) for k, c in fresh.items() if c.error is None)
            found.update(fresh)
        with self._count:  # complete() may be called from several threads at once
            self.errors += sum(found[k].error is not None for k in todo)
            self.sent += len(todo)
            self.hits += len(requests) - len(todo)
        return [found[k] for k in keys]

    async def acomplete(self, request: Request) -> Completion:
        """One request: from the cache, or from the model and committed to the cache where and
        as soon as the answer arrives (a kill loses only the calls in flight)."""
        key = request_key(self.model_id, request)
        hit = self.cache.get(key)
        if hit is not None:
            with self._count:
                self.hits += 1
            return hit
        # An answer is returned only once it is committed: the row that uses it may be written
        # next, and a row on disk whose calls are not in the cache would be asked again (and may
        # come out different) by a rerun that redoes the row or reads the cache from elsewhere.
        if self.loop is not None:  # a client on its own loop: we are on it, the answer arrives here
            c = await self.inner.acomplete(request)
            await asyncio.wrap_future(self._commit(key, c))
            return c
        answered: Future[Completion] = Future()

        def commit(f: Future[Completion]) -> None:  # in the worker thread that computed it
            if (e := f.exception()) is not None:
                answered.set_exception(e)
                return
            c = f.result()
            self._commit(key, c).add_done_callback(
                lambda d: answered.set_result(c) if d.exception() is None else answered.set_exception(d.exception()))

        self.inner.submit(request).add_done_callback(commit)
        return await asyncio.wrap_future(answered)

    def _commit(self, key: str, c: Completion) -> Future[None]:
        with self._count:
            self.sent += 1
            self.errors += c.error is not None
        if c.error is None:
            return self.cache.put_soon(key, self.model_id, c)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self.close_cache:
                self.cache.close()


def cache_path(value: str | None, no_cache: bool, default_dir: Path) -> Path | None:
    """The cache file a command uses: ``--cache PATH`` / ``CAI_CACHE``, else ``default_dir``'s
    ``cache.sqlite``; ``None`` with ``--no-cache`` or a value such as ``off``."""
    if no_cache or (value is not None and value.strip().lower() in OFF):
        return None
    return Path(value) if value else Path(default_dir) / "cache.sqlite"


def with_cache(backend: Backend, path: Path | None) -> CachedBackend | CountingBackend:
    """``backend`` behind the cache at ``path``, or (for ``None``) behind a counter: either way
    the result counts calls sent, served from cache and failed."""
    return CachedBackend(backend, CallCache(path)) if path is not None else CountingBackend(backend)
