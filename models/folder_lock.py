"""One writer per folder: `FOLDER/.lock`, an advisory lock the kernel drops when its holder dies.

Two processes writing one training run (or one index) would interleave their checkpoints or
shards and wreck both; the second is refused at once, naming the first one's pid. A `kill -9`
leaves no stale lock behind: the lock lives with the open file, not with the file on disk.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"

# folders this process holds, and how many times: a recipe that holds its run folder runs a
# trainer in it, which takes the lock again (flock locks belong to an open file, so a second open
# in the same process would refuse itself)
_held: dict[Path, int] = {}


class FolderBusy(RuntimeError):
    """Another process is writing the folder."""


@contextmanager
def folder_lock(folder: Path, writer: str, reentrant: bool = False) -> Iterator[None]:
    """Hold `folder/.lock` while the block runs; raise `FolderBusy` at once if another writer holds
    it. `writer` names what writes the folder, for the message: "another {writer} (pid N)".
    `reentrant`: a hold of this process's own (taken with `reentrant` too) is shared, not refused."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if reentrant and key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    with (folder / LOCK_NAME).open("a+") as fp:
        try:
            fcntl.flock(fp.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fp.seek(0)
            holder = fp.read().strip() or "unknown"
            raise FolderBusy(f"{folder}: another {writer} (pid {holder}); wait for it to finish") from None
        fp.seek(0)
        fp.truncate()
        fp.write(str(os.getpid()))
        fp.flush()
        if reentrant:
            _held[key] = 1
        try:
            yield
        finally:
            _held.pop(key, None)
            fcntl.flock(fp.fileno(), fcntl.LOCK_UN)


def ensure_not_busy(folder: Path, writer: str, reentrant: bool = False) -> None:
    """Raise `FolderBusy` now if another writer holds `folder`. Front ends call this before work
    that takes a while (a model load, decoding every image), so a refused run is refused at once;
    the run still takes the lock itself."""
    if (folder / LOCK_NAME).exists():
        with folder_lock(folder, writer, reentrant):
            pass
