"""One writer per output folder: an OS file lock held while a run writes there.

``writer(folder)`` takes an exclusive ``flock`` on ``folder/.cai.lock`` (made if missing) and
writes this process's id in it. The OS lets the lock go when the process ends, however it ends
(kill -9 too), so a lock is never stale; the file itself stays (removing it would race with a
run opening it). A second writer is refused at once, with one line naming the folder and the
process that holds it. Readers (`cai report`, `cai export`, `cai review`) never take it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

LOCK_FILE = ".cai.lock"


@contextmanager
def writer(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s writer lock for the block (the folder is made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise InputError(f"{folder}: another cai run is writing here (process {holder}); wait for it to "
                             "end, or pass another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor
