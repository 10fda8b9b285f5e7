"""The memory-mapped embedding table training reads (docs/design.md, "Training").

An embedding store (pkl shards) is converted once into a contiguous cache next to it: `embeds.npy` [N, D] in
store order, plus the ids (and, for image stores, the image paths) as one byte blob with row offsets and an index
sorted by a 128-bit digest of each key (32 bytes a row plus the keys' own bytes, however long the longest key is;
a lookup matches the whole digest), and the rows that are unusable (NaN / Inf / all zero). Every rank opens these
with np.load(mmap_mode="r"), so a process holds only the pages it touches, whatever the corpus size. The cache
is keyed by the shards' sha256 (or names, sizes and mtimes for bare reference folders): a changed store gets a
new cache; ranks building the same cache at once race harmlessly (temp folder + rename).
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

from revision.embedding_rows import bad_rows, describe_bad_row
from revision.errors import StoreError
from revision.store import EmbeddingStore

CACHE_VERSION = "4"  # 2: the cache records the store's unusable rows; 4: keys as a blob + a 128-bit digest index
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
        self.ids = KeyIndex(cache, "ids")
        self.sources = KeyIndex(cache, "sources") if (cache / "sources_blob.npy").exists() else None
        self.unusable_rows = np.load(cache / "bad_rows.npy")  # sorted rows holding NaN / Inf or all zeros
        self.shards = json.loads((cache / "shards.json").read_text())  # [[shard file, rows], ...] in store order
        self.dim = int(self.embeds.shape[1])

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def rows(self, keys: list[str], by_source: bool = False) -> np.ndarray:
        """Row of each key (an id, or with by_source an image path); -1 where absent."""
        index = self.sources if by_source else self.ids
        if index is None:
            return np.full(len(keys), -1, np.int64)
        return index.rows(keys)

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
        key = self.ids.key(row)
        return (f"{self.root / self.shards[shard][0]} row {in_shard} (id {key!r}): "
                f"{describe_bad_row(np.asarray(self.embeds[row], np.float64))}")


def _cache_key(store: EmbeddingStore) -> str:
    if store.manifest:
        parts = [f"{e['name']}:{e['sha256']}" for e in store.manifest["shards"]]
    else:
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in store.shard_paths]
    parts.append(f"cache-version:{CACHE_VERSION}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _hashes(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit halves of each key's 128-bit blake2b digest: the first is searched, the second checked."""
    digests = np.frombuffer(b"".join(hashlib.blake2b(k, digest_size=16).digest() for k in keys), np.uint64)
    return digests[0::2].copy(), digests[1::2].copy()


class KeyIndex:
    """Keys (ids or image paths) of a table's rows, memory-mapped like the embeddings: their bytes as one blob with
    row offsets (to name a row's key), and the rows sorted by a 128-bit digest of their key (ties: lowest row first).
    A lookup matches the whole digest: a key one byte away ("trail" and "trail\\0") never matches."""

    def __init__(self, cache: Path, name: str):
        self.blob, self.offsets, self.hashes, self.checks, self.rows_by_hash = (
            np.load(cache / f"{name}_{part}.npy", mmap_mode="r") for part in ("blob", "offsets", "hashes", "checks", "rows"))

    def key(self, row: int) -> str:
        return bytes(self.blob[int(self.offsets[row]): int(self.offsets[row + 1])]).decode()

    def rows(self, keys: list[str]) -> np.ndarray:
        """Row of each key, -1 where absent."""
        found = np.full(len(keys), -1, np.int64)
        if not len(self.hashes) or not keys:
            return found
        wanted, check = _hashes([k.encode() for k in keys])
        pos = np.minimum(np.searchsorted(self.hashes, wanted), len(self.hashes) - 1)
        first = np.asarray(self.hashes[pos]) == wanted
        hit = first & (np.asarray(self.checks[pos]) == check)
        found[hit] = np.asarray(self.rows_by_hash[pos[hit]])
        for i in np.flatnonzero(first & ~hit):  # the first 64 bits shared with another key: look past it
            at = int(pos[i])
            while at < len(self.hashes) and self.hashes[at] == wanted[i]:
                if self.checks[at] == check[i]:
                    found[i] = int(self.rows_by_hash[at])
                    break
                at += 1
        return found


def _write_key_index(folder: Path, name: str, keys: list[str], where: str, unique: bool) -> None:
    """KeyIndex files for `keys` (store order); with `unique`, a repeated key is refused naming it."""
    encoded = [k.encode() for k in keys]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(k) for k in encoded], out=offsets[1:])
    hashes, checks = _hashes(encoded)
    order = np.lexsort((np.arange(len(keys)), checks, hashes))
    if unique and len(order) > 1:
        same = np.flatnonzero((hashes[order][1:] == hashes[order][:-1]) & (checks[order][1:] == checks[order][:-1]))
        for a, b in zip(order[same], order[same + 1]):
            if encoded[a] == encoded[b]:
                raise StoreError(f"{where}: duplicate id {keys[a]!r}; ids must be unique")
    np.save(folder / f"{name}_blob.npy", np.frombuffer(b"".join(encoded), np.uint8))
    np.save(folder / f"{name}_offsets.npy", offsets)
    np.save(folder / f"{name}_hashes.npy", hashes[order])
    np.save(folder / f"{name}_checks.npy", checks[order])
    np.save(folder / f"{name}_rows.npy", order.astype(np.int64))


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
        _write_key_index(tmp, "ids", ids, str(store.root), unique=True)
        if store.kind == "image":
            _write_key_index(tmp, "sources", sources, str(store.root), unique=False)
        os.replace(tmp, cache)
    except OSError:
        if not (cache / "embeds.npy").exists():  # not a lost race with another rank building the same cache
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
