"""The one file hasher: stores (shard digests in their manifest) and checkpoints (every file in theirs) both use it."""
from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, fsync: bool = False) -> str:
    """The file's sha256, read in 4 MiB blocks (hashlib releases the GIL on them: threads hash in parallel).
    `fsync`: also make sure the file is on disk, for a writer about to record the digest as final."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()
