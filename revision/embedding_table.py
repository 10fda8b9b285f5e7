"""The memory-mapped embedding table training reads (docs/design.md, "Training").

An embedding store (pkl shards) is converted once into a contiguous cache next to it: `embeds.npy` [N, D] in
store order, plus the ids (and, for image stores, the image paths) sorted, with the row each sorted entry points
to, and the rows that are unusable (NaN / Inf / all zero). Every rank opens these with np.load(mmap_mode="r"), so a
process holds only the pages it touches, whatever the corpus size. The cache is keyed by the shards' sha256 (or
names, sizes and mtimes for bare reference folders): a changed store gets a new cache; ranks building the same
cache at once race harmlessly (temp folder + rename).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from revision.store import EmbeddingStore, StoreError, bad_rows, describe_bad_row

CACHE_VERSION = "2"  # 2: the cache records the store's unusable (NaN / Inf / all-zero) rows
logger = logging.getLogger(__name__)


class EmbeddingTable:
    """Read-only, memory-mapped id -> embedding table built from an embedding store."""

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, verify: bool = True):
        # verify: building the cache checks every shard against the manifest's sha256 as it reads it (a built
        # cache is keyed by those hashes, so later runs read no shard and verify nothing)
        store = EmbeddingStore(root, verify=verify).require_complete()
        self.root, self.kind, self.dim, self.encoder = Path(root), store.kind, store.dim, store.encoder
        self.manifest = store.manifest or {}
        cache = Path(cache_dir or self.root / ".revision_cache") / f"table-{_cache_key(store)}"
        if not (cache / "embeds.npy").exists():
            _build_cache(store, cache)
        self.embeds = np.load(cache / "embeds.npy", mmap_mode="r")
        self.ids = np.load(cache / "ids.npy", mmap_mode="r")
        self.id_rows = np.load(cache / "id_rows.npy", mmap_mode="r")
        self.sources = np.load(cache / "sources.npy", mmap_mode="r") if (cache / "sources.npy").exists() else None
        self.source_rows = np.load(cache / "source_rows.npy", mmap_mode="r") if self.sources is not None else None
        self.unusable_rows = np.load(cache / "bad_rows.npy")  # sorted rows holding NaN / Inf or all zeros
        self.shards = json.loads((cache / "shards.json").read_text())  # [[shard file, rows], ...] in store order
        self.dim = int(self.embeds.shape[1])

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def rows(self, keys: list[str], by_source: bool = False) -> np.ndarray:
        """Row of each key (an id, or with by_source an image path); -1 where absent."""
        index, targets = (self.sources, self.source_rows) if by_source else (self.ids, self.id_rows)
        if index is None or not len(index) or not keys:
            return np.full(len(keys), -1, np.int64)
        encoded = [k.encode() for k in keys]
        needles = np.array(encoded, dtype=index.dtype)  # longer keys get cut here: the length check catches them
        pos = np.minimum(np.searchsorted(index, needles), len(index) - 1)
        fits = np.array([len(e) <= index.dtype.itemsize for e in encoded])
        found = fits & (np.asarray(index[pos]) == needles)
        return np.where(found, np.asarray(targets[pos]), -1).astype(np.int64)

    def lookup(self, keys: list[str]) -> np.ndarray:
        """Row of each key read as an id, else as an image path (LLaVA data names either); -1 where neither."""
        rows = self.rows(keys)
        if self.sources is not None:
            rows = np.where(rows >= 0, rows, self.rows(keys, by_source=True))
        return rows

    def __getitem__(self, row: int) -> np.ndarray:
        return np.array(self.embeds[row], dtype=np.float32)  # a copy: the memmap is read-only

    def is_bad(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` hold NaN / Inf or are all zero (no direction: unusable)."""
        return np.isin(np.asarray(rows), self.unusable_rows)

    def describe(self, row: int) -> str:
        """Where a row lives and what is wrong with it: 'STORE/SHARD row R (id ID): NaN'."""
        ends = np.cumsum([n for _, n in self.shards])
        shard = int(np.searchsorted(ends, row, side="right"))
        in_shard = row - (int(ends[shard - 1]) if shard else 0)
        hits = np.flatnonzero(np.asarray(self.id_rows) == row)
        key = self.ids[hits[0]].decode() if len(hits) else "?"
        return (f"{self.root / self.shards[shard][0]} row {in_shard} (id {key!r}): "
                f"{describe_bad_row(np.asarray(self.embeds[row], np.float64))}")


def _cache_key(store: EmbeddingStore) -> str:
    if store.manifest:
        parts = [f"{e['name']}:{e['sha256']}" for e in store.manifest["shards"]]
    else:
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in store.shard_paths]
    parts.append(f"cache-version:{CACHE_VERSION}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _sorted_index(keys: list[str], where: str, unique: bool) -> tuple[np.ndarray, np.ndarray]:
    encoded = np.array([k.encode() for k in keys], dtype=f"S{max(1, max((len(k.encode()) for k in keys), default=1))}")
    order = np.argsort(encoded, kind="stable")
    encoded = encoded[order]
    if unique and len(encoded) > 1:
        dup = np.flatnonzero(encoded[1:] == encoded[:-1])
        if len(dup):
            raise StoreError(f"{where}: duplicate id {encoded[dup[0]].decode()!r}; ids must be unique")
    return encoded, order.astype(np.int64)


def _unusable_rows(embeds: np.ndarray) -> np.ndarray:
    """Rows holding NaN / Inf or all zeros, in one pass: a row's float32 sum is non-finite exactly when the row
    holds NaN / Inf, and 0 for a zero row; only rows like that (or summing to 0 by chance) are checked closely."""
    sums = embeds.sum(axis=1, dtype=np.float32 if embeds.dtype.itemsize < 8 else np.float64)
    suspects = np.flatnonzero(~np.isfinite(sums) | (sums == 0))
    return suspects[bad_rows(np.asarray(embeds[suspects], np.float64))] if len(suspects) else suspects


def _build_cache(store: EmbeddingStore, cache: Path) -> None:
    """Write embeds.npy (store order) and sorted id / image-path indexes into `cache`, atomically."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the embedding table cache %s from %s", cache, store.root)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        count = len(store)
        dtype = np.dtype(store.manifest.get("dtype", "float16")) if store.manifest else None
        embeds, ids, sources, offset, bad, shards = None, [], [], 0, [], []
        for path, shard in zip(store.shard_paths, store.iter_shards()):
            if embeds is None:
                embeds = np.lib.format.open_memmap(tmp / "embeds.npy", "w+", dtype or shard.embeds.dtype, (count, store.dim))
            embeds[offset: offset + len(shard)] = shard.embeds
            bad.append(offset + _unusable_rows(shard.embeds))
            shards.append([path.name, len(shard)])
            offset += len(shard)
            ids += shard.ids
            sources += shard.sources
        if embeds is None:
            raise StoreError(f"{store.root}: the store holds no embeddings")
        embeds.flush()
        del embeds
        np.save(tmp / "bad_rows.npy", np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, np.int64))
        (tmp / "shards.json").write_text(json.dumps(shards))
        for name, keys, unique in (("ids", ids, True), ("sources", sources if store.kind == "image" else None, False)):
            if keys is not None:
                index, rows = _sorted_index(keys, str(store.root), unique)
                np.save(tmp / f"{name}.npy", index)
                np.save(tmp / f"{name[:-1]}_rows.npy", rows)
        os.replace(tmp, cache)
    except OSError:
        if not (cache / "embeds.npy").exists():  # not a lost race with another rank building the same cache
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
