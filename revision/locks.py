"""One writer per store, or one writer per part of a store (see docs/distributed.md, "Locks").

Two flock locks per writer:
- `STORE/.lock`: the whole-store writer (one process, or the merge that writes manifest.json) holds it
  exclusively; each part writer (a rank) holds it shared, so ranks coexist but never beside a whole-store writer.
- `STORE/.lock-part-00001-of-00004`: held exclusively by the part's writer, so one rank runs once at a time.
The holder writes who it is (pid, host, command) into the file it holds exclusively; a refused writer reads
that back and names it. The kernel drops the locks when the process dies (kill -9 included), so no lock is ever
stale; the holder line it leaves behind is overwritten by the next holder. On NFS, Linux maps flock onto POSIX
byte-range locks (lockd); Lustre needs its `flock` mount option.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from revision.nofollow import open_fd

STORE_LOCK = ".lock"


def part_tag(part: int, parts: int) -> str:
    return f"part-{part:05d}-of-{parts:05d}"


class LockedError(OSError):
    """The store (or the part) is held by another writer; the message names it."""


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500]}


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return f"{path.name}: holder unknown"
    return f"pid {info.get('pid')} on host {info.get('host')} ({info.get('command')!r})"


def _is_held(path: Path) -> bool:
    """Whether another open file holds `path` exclusively (probed with a shared lock, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class StoreLock:
    """Held from construction until release() (or until the process ends). `part=(index, count)`: a part writer."""

    def __init__(self, root: str | os.PathLike, part: tuple[int, int] | None = None):
        self.root = Path(root)
        self._files: list[int] = []
        self._mine: int | None = None  # the fd of the file this writer holds exclusively (holds its holder line)
        try:
            self._take(self.root / STORE_LOCK, shared=part is not None)
            if part is not None:
                self._take(self.root / f"{STORE_LOCK}-{part_tag(*part)}", shared=False)
        except BaseException:
            self.release()
            raise
        os.ftruncate(self._mine, 0)
        os.pwrite(self._mine, json.dumps(_holder()).encode(), 0)

    def _take(self, path: Path, shared: bool) -> None:
        fd = open_fd(path, os.O_RDWR | os.O_CREAT)  # a link planted here is refused, never written through
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{self.root}: store is being written by {self._holders(path)}; a second writer would "
                              "lose data. Wait for it to finish, stop it, or write to another --out") from None
        self._files.append(fd)
        if not shared:
            self._mine = fd

    def _holders(self, refused: Path) -> str:
        """Who holds what we were refused: the whole-store writer, else every part writer still running."""
        if refused.name != STORE_LOCK:  # this very part is running elsewhere
            return f"{refused.name[len(STORE_LOCK) + 1:]}: {_describe(refused)}"
        if _is_held(refused):
            return _describe(refused)
        parts = sorted(self.root.glob(f"{STORE_LOCK}-part-*"))
        held = [f"{p.name[len(STORE_LOCK) + 1:]}: {_describe(p)}" for p in parts if _is_held(p)]
        return "; ".join(held) if held else _describe(refused)

    def release(self) -> None:
        if self._mine is not None:
            os.ftruncate(self._mine, 0)  # no holder line outlives the hold
            self._mine = None
        for fd in reversed(self._files):
            os.close(fd)  # closing the last descriptor of a file drops its flock
        self._files = []

    def __del__(self) -> None:
        self.release()
