"""Per-run locks: two `hf-zsharp-reproduce` processes on one output folder never train the same run.

A lock is an exclusive `flock` on `<run folder>/.run.lock`, held while the run trains. The kernel releases it when
its holder exits, crash included, so a stale lock never blocks a resumed grid. A multi-process launch (WORLD_SIZE
> 1) trains each run on all of its processes together; they take no lock (run one such launch per folder).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK = ".run.lock"


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[bool]:
    """Hold the run's lock for the block; yields False, holding nothing, if another process holds it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield True
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
