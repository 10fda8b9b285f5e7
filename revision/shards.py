"""Shards: the files of an embedding store, in our columnar layout or the reference (official ReVision) record
layout, read with the allow-list unpickler (no code runs: revision/safe_pickle.py) and written atomically (under a
temp name, then renamed: a killed run never leaves half a shard)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from revision.errors import StoreError
from revision.nofollow import open_nofollow
from revision.safe_pickle import safe_load

FORMAT = "revision.embeddings/1"
KINDS = ("text", "image")
# The column holding each row's source: a caption for text stores, an image path for image stores.
SOURCE_KEY = {"text": "captions", "image": "image_paths"}
REFERENCE_SOURCE_KEY = {"text": "caption", "image": "image_path"}


@dataclass
class Shard:
    """One shard in columnar form, whichever layout it was stored in."""

    kind: str
    ids: list[str]
    embeds: np.ndarray  # [N, D]
    sources: list[str] = field(default_factory=list)  # captions (text) or image paths (image)
    path: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def captions(self) -> list[str]:
        return self.sources if self.kind == "text" else []

    @property
    def image_paths(self) -> list[str]:
        return self.sources if self.kind == "image" else []


def _columnar_from_records(records: list, path: str, kind_hint: str | None) -> Shard:
    """Convert the reference layout (a list of {"id", "caption"|"image_path", "embed"}) to columns."""
    if not records:
        return Shard(kind=kind_hint or "text", ids=[], embeds=np.zeros((0, 0), np.float32), path=path)
    first = records[0]
    if not isinstance(first, dict):
        raise StoreError(f"{path}: row 0 is a {type(first).__name__}, expected a dict with 'id' and 'embed'")
    kind = "image" if "image_path" in first else "text" if "caption" in first else (kind_hint or "text")
    source_key = REFERENCE_SOURCE_KEY[kind]
    try:  # fast path for well-formed records; anything unusual falls through to the row-by-row checks below
        vectors = [rec["embed"] for rec in records]
        shape = vectors[0].shape
        if all(type(v) is np.ndarray and v.shape == shape for v in vectors) and len(shape) == 1:
            ids = [str(rec["id"]) for rec in records]
            sources = [str(rec.get(source_key, "")) for rec in records]
            # one concatenation of the flat rows: np.stack would make a [1, D] view of each of them first
            return Shard(kind=kind, ids=ids, embeds=np.concatenate(vectors).reshape(len(vectors), shape[0]),
                         sources=sources, path=path)
    except (TypeError, KeyError, AttributeError):
        pass
    ids, sources, vectors = [], [], []
    dim = None
    for row, rec in enumerate(records):
        if not isinstance(rec, dict) or "id" not in rec or "embed" not in rec:
            raise StoreError(f"{path}: row {row} lacks 'id' or 'embed' (reference layout needs both)")
        vec = np.asarray(rec["embed"])
        if vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
            raise StoreError(f"{path}: row {row} (id {rec['id']!r}) has embedding shape {vec.shape}, expected ({dim},)")
        dim = vec.shape[0]
        ids.append(str(rec["id"]))
        sources.append(str(rec.get(source_key, "")))
        vectors.append(vec)
    return Shard(kind=kind, ids=ids, embeds=np.stack(vectors), sources=sources, path=path)


def load_shard(path: str | os.PathLike, kind_hint: str | None = None, sha256: str | None = None) -> Shard:
    """Load one shard (our columnar layout or the reference record layout) with the safe unpickler; with `sha256`,
    verified against it before it is unpickled."""
    path = str(path)
    obj = safe_load(path, sha256)
    if isinstance(obj, list):
        shard = _columnar_from_records(obj, path, kind_hint)
    elif isinstance(obj, dict) and obj.get("format") == FORMAT:
        kind = obj.get("kind")
        if kind not in KINDS:
            raise StoreError(f"{path}: unknown kind {kind!r}")
        embeds = np.asarray(obj["embeds"])
        ids = [str(i) for i in obj["ids"]]
        sources = list(obj.get(SOURCE_KEY[kind]) or [""] * len(ids))
        if embeds.ndim != 2 or embeds.shape[0] != len(ids) or len(sources) != len(ids):
            raise StoreError(f"{path}: {len(ids)} ids, {len(sources)} sources but embeds of shape {embeds.shape}")
        shard = Shard(kind=kind, ids=ids, embeds=embeds, sources=sources, path=path)
    else:
        raise StoreError(f"{path}: neither a '{FORMAT}' dict nor a list of records")
    return shard


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write under a temp name, sync, rename: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open_nofollow(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashingFile:
    """File wrapper that hashes what is written, so a pickle can stream to disk without a copy in memory.
    `early_writeback`: a large piece (an embeddings array) starts going to disk before it is hashed, so the disk
    writes while the CPU hashes and the fsync after has little left to wait for."""

    def __init__(self, f: io.BufferedWriter, early_writeback: bool = False):
        self.f, self.sha256, self.early_writeback = f, hashlib.sha256(), early_writeback

    def write(self, data: bytes) -> int:
        written = self.f.write(data)
        if self.early_writeback and memoryview(data).nbytes >= 1 << 20 and hasattr(os, "posix_fadvise"):
            self.f.flush()
            os.posix_fadvise(self.f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # on dirty pages: starts their write-back
        self.sha256.update(data)
        return written


def write_shard(path: str | os.PathLike, shard: Shard, dtype: str = "float16", drop_page_cache: bool = False) -> str:
    """Write a shard in our columnar layout atomically; returns the sha256 of the bytes written.
    `drop_page_cache` evicts the (synced) file from the page cache: a writer of many shards then reuses the
    same few pages instead of touching fresh memory for every byte it writes (costly on a VM)."""
    payload = {
        "format": FORMAT,
        "kind": shard.kind,
        "ids": list(shard.ids),
        "embeds": np.ascontiguousarray(shard.embeds, dtype=dtype),
        SOURCE_KEY[shard.kind]: list(shard.sources) if shard.sources else [""] * len(shard.ids),
    }
    # pickle.dump streams large arrays straight to the file: no second copy of the shard in memory
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open_nofollow(tmp, "wb") as f:
        out = _HashingFile(f, early_writeback=drop_page_cache)
        pickle.dump(payload, out, protocol=5)
        f.flush()
        os.fsync(f.fileno())
        if drop_page_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(tmp, path)
    return out.sha256.hexdigest()


def write_reference_shard(path: str | os.PathLike, shard: Shard, dtype: str = "float16") -> None:
    """Write a shard in the reference (official ReVision) record layout, for interoperability and tests."""
    key = REFERENCE_SOURCE_KEY[shard.kind]
    embeds = np.asarray(shard.embeds, dtype=dtype)
    sources = shard.sources or [""] * len(shard.ids)
    records = [{"id": i, key: s, "embed": e} for i, s, e in zip(shard.ids, sources, embeds)]
    atomic_write_bytes(Path(path), pickle.dumps(records, protocol=4))
