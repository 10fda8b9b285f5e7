"""Encoding with several processes: which part of the inputs this process takes, and the merge that turns the
parts' bookkeeping into one manifest (docs/distributed.md).

A process is part `shard_index * world + rank` of `num_shards * world`, where world/rank come from torchrun
(WORLD_SIZE, RANK) or SLURM (SLURM_NTASKS, SLURM_PROCID), and --num_shards/--shard_index split further (array
jobs). Ranks never talk to each other: each writes its own shards and part file into the store; the last rank
to finish (the first one to get the store's exclusive lock with every part complete) merges, and
`image_embed.py --merge` does the same by hand.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from revision.errors import StoreError
from revision.locks import LockedError, StoreLock, part_tag
from revision.manifest import PART_GLOB, SKIPPED, read_manifest, write_manifest
from revision.shards import FORMAT, atomic_write_bytes

SUMMED = ("inputs", "resumed", "encoded", "skipped", "stored")


@dataclass(frozen=True)
class Rank:
    part: int = 0
    parts: int = 1
    launcher: str = "single process"
    local_rank: int = 0  # which of the node's devices this process uses

    @property
    def partial(self) -> tuple[int, int] | None:
        """The (index, count) a StoreWriter takes: None for a single part (it keeps the manifest itself)."""
        return (self.part, self.parts) if self.parts > 1 else None


def detect_rank(num_shards: int = 1, shard_index: int = 0, env: Mapping[str, str] = os.environ) -> Rank:
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index {shard_index} is not in [0, --num_shards {num_shards})")
    world, rank, local, launcher = 1, 0, 0, "single process"
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank, local, launcher = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        world, rank, local, launcher = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), "slurm"
    if num_shards > 1:
        launcher += f", array task {shard_index} of {num_shards}"
    return Rank(shard_index * world + rank, num_shards * world, launcher, local)


def parts_complete(root: str | os.PathLike) -> bool:
    """Whether a store folder holds every part of one run, each finished (what a merge needs)."""
    books = [read_manifest(root, p.name) for p in Path(root).glob(PART_GLOB)]
    counts = {b.get("part", [0, 0])[1] for b in books}
    return len(counts) == 1 and len(books) == counts.pop() and all(b.get("complete") for b in books)


def merge_parts(root: str | os.PathLike) -> dict:
    """Write the manifest of a store written by several ranks (and skipped.jsonl, all parts' skips); refused while
    any rank still writes (it holds the store lock) and when a part is missing or unfinished. Returns the manifest."""
    root = Path(root)
    lock = StoreLock(root)
    try:
        books = {p.name: read_manifest(root, p.name) for p in sorted(root.glob(PART_GLOB))}
        if not books:
            raise StoreError(f"{root}: nothing to merge (no {PART_GLOB} files: not written by several ranks)")
        counts = sorted({b.get("part", [0, 0])[1] for b in books.values()})
        if len(counts) > 1:
            raise StoreError(f"{root}: holds parts of runs with {' and '.join(map(str, counts))} ranks; rerun with one "
                             "number of ranks and --overwrite")
        parts = counts[0]
        names = [f"{part_tag(i, parts)}.json" for i in range(parts)]
        missing = [n for n in names if n not in books]
        unfinished = [n for n in names if n in books and not books[n].get("complete")]
        if missing or unfinished:
            raise StoreError(f"{root}: cannot merge: {len(missing)} of {parts} parts never started ({', '.join(missing[:4])}) "
                             f"and {len(unfinished)} unfinished ({', '.join(unfinished[:4])}); rerun those ranks with the "
                             "same number of ranks (they resume), then merge")
        first = books[names[0]]
        for name in names:
            for key in ("kind", "encoder", "dim", "dtype"):
                if books[name].get(key) != first.get(key):
                    raise StoreError(f"{root / name}: {key} {books[name].get(key)!r}, but {names[0]} has {first.get(key)!r}")
            for entry in books[name]["shards"]:
                if not (root / entry["name"]).is_file():
                    raise StoreError(f"{root / name}: lists shard {entry['name']} which is missing")
        summaries = [books[n].get("summary", {}) for n in names]
        manifest = {
            "format": FORMAT, **{k: first[k] for k in ("kind", "encoder", "dim", "dtype")}, "normalized": True,
            "count": sum(b["count"] for b in books.values()), "complete": True, "parts": parts,
            "skipped": sum(b.get("skipped", 0) for b in books.values()),
            "summary": {k: sum(s.get(k, 0) for s in summaries) for k in SUMMED},
            "shards": [{k: e[k] for k in ("name", "rows", "sha256")} for n in names for e in books[n]["shards"]],
        }
        logs = [root / f"skipped-{n[:-len('.json')]}.jsonl" for n in names]
        atomic_write_bytes(root / SKIPPED, b"".join(p.read_bytes() for p in logs if p.exists()))
        write_manifest(root, manifest)
        return manifest
    finally:
        lock.release()


def merge_if_last(root: str | os.PathLike) -> dict | None:
    """Merge when every part is complete and no rank still writes; None when another rank is (it will merge)."""
    if not parts_complete(root):
        return None
    try:
        return merge_parts(root)
    except LockedError:
        return None
