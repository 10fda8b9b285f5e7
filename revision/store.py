"""Embedding stores: folders of pickle shards plus a manifest (see docs/design.md, "Embedding stores").

Every later step loads embeddings only through this module, so the safety rules live here once:
shards are unpickled with an allow-list (no code runs: revision/safe_pickle.py), written under a temp name and renamed
(a killed run never leaves half a shard), and a manifest records what is complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from revision.nofollow import open_nofollow
from revision.safe_pickle import StoreError, UnsafePickleError, check_digest, file_sha256, safe_load  # noqa: F401  (re-exported: the store's errors)

FORMAT = "revision.embeddings/1"
MANIFEST = "manifest.json"
KINDS = ("text", "image")
# The column holding each row's source: a caption for text stores, an image path for image stores.
SOURCE_KEY = {"text": "captions", "image": "image_paths"}
REFERENCE_SOURCE_KEY = {"text": "caption", "image": "image_path"}
PART_GLOB = "part-*-of-*.json"  # a rank's bookkeeping (see StoreWriter(part=...) and revision/distributed.py)
SKIPPED = "skipped.jsonl"


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


def _squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", x, x)  # one pass, no [N, D] temporary


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32 (float64 input stays float64); zero rows stay zero."""
    x = np.asarray(x)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    norms = np.sqrt(_squared_norms(x))[..., None]
    return x / np.where(norms > 0, norms, 1.0)


def bad_rows(embeds: np.ndarray) -> np.ndarray:
    """Indices of rows that hold NaN or Inf or are all zero (no direction to normalise)."""
    embeds = np.asarray(embeds)
    if embeds.dtype in (np.float32, np.float64) and embeds.shape[1]:
        # a NaN, Inf or all-zero row has a non-finite or zero squared norm; only those rows (plus rows whose
        # square overflows or underflows) need the exact element-wise test below
        sq = _squared_norms(embeds)
        suspects = np.flatnonzero(~(np.isfinite(sq) & (sq > 0)))
        return suspects[_exact_bad_rows(embeds[suspects])]
    return np.flatnonzero(_exact_bad_rows(embeds))


def _exact_bad_rows(embeds: np.ndarray) -> np.ndarray:
    finite = np.isfinite(embeds).all(axis=1)
    nonzero = np.abs(embeds).max(axis=1, initial=0) > 0 if embeds.shape[1] else np.zeros(len(embeds), bool)
    return ~(finite & nonzero)


def describe_bad_row(vec: np.ndarray) -> str:
    if np.isnan(vec).any():
        return "NaN"
    if np.isinf(vec).any():
        return "Inf"
    return "all-zero vector"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
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
    _atomic_write_bytes(Path(path), pickle.dumps(records, protocol=4))


def check_shard_name(name: Any, where: str | os.PathLike, index: int) -> str:
    """A manifest's shard name must be a plain file name in the store: never a path that leads elsewhere."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name.startswith(".") or Path(name).name != name):
        raise StoreError(f"{where}: shard entry {index} has name {name!r}, which is not a plain file name inside "
                         "the store (no paths, no '..'); refusing to use the store (no file was touched)")
    return name


def read_manifest(root: str | os.PathLike, name: str = MANIFEST) -> dict | None:
    """The manifest (or a part's bookkeeping file), its shard names checked before anything uses them."""
    path = Path(root) / name
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: manifest is not valid JSON ({e})") from e
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
        raise StoreError(f"{path}: expected an object with a 'shards' list of entries")
    for index, entry in enumerate(shards):
        check_shard_name(entry.get("name"), path, index)
    return manifest


DTYPES = ("float16", "float32")


def check_manifest_fields(manifest: dict, where: str | os.PathLike) -> None:
    """The fields a reader relies on, checked before it relies on them: one line naming the file and the field."""
    def bad(field: str, expected: str) -> StoreError:
        return StoreError(f"{where}: {field} is {manifest.get(field)!r}, expected {expected}")

    if manifest.get("kind") not in KINDS:
        raise bad("kind", " or ".join(map(repr, KINDS)))
    if manifest.get("dtype") not in DTYPES:
        raise bad("dtype", " or ".join(map(repr, DTYPES)))
    if type(manifest.get("dim")) is not int or manifest["dim"] < 1:
        raise bad("dim", "a positive integer")
    rows = [e.get("rows") for e in manifest["shards"]]
    if not all(type(r) is int and r >= 0 for r in rows):
        raise StoreError(f"{where}: a shard entry has rows {next(r for r in rows if not (type(r) is int and r >= 0))!r}, "
                         "expected a count")
    if manifest.get("count") != sum(rows):
        raise bad("count", f"{sum(rows)}, the sum of its shards' rows")


def _write_manifest(root: Path, manifest: dict, name: str = MANIFEST) -> None:
    _atomic_write_bytes(root / name, (json.dumps(manifest, indent=1) + "\n").encode())


class EmbeddingStore:
    """Read side of a store: a folder with manifest.json, or a bare folder of reference-layout pkl shards."""

    def __init__(self, root: str | os.PathLike, kind: str | None = None, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such store folder")
        self.manifest = read_manifest(self.root)
        self.verify_hashes = verify  # every shard read is checked against the manifest's sha256 before unpickling
        self._verified: set[str] = set()  # shards already checked by this reader: later passes do not hash again
        self._first: Shard | None = None
        if self.manifest is None and any(self.root.glob(PART_GLOB)):
            raise StoreError(f"{self.root}: a store written by several ranks that was never merged (part files but no "
                             f"{MANIFEST}): finish the ranks, then run image_embed.py --merge --out ...")
        if self.manifest is not None:
            if self.manifest.get("format") != FORMAT:
                raise StoreError(f"{self.root / MANIFEST}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
            check_manifest_fields(self.manifest, self.root / MANIFEST)
            for entry in self.manifest["shards"]:
                if not (self.root / entry["name"]).exists():
                    raise StoreError(f"{self.root / MANIFEST}: lists shard {entry['name']} which is missing")
            self.shard_paths = [self.root / e["name"] for e in self.manifest["shards"]]
            self.kind = self.manifest["kind"]
            if kind is not None and kind != self.kind:
                raise StoreError(f"{self.root}: is a {self.kind} store, expected {kind}")
            self.encoder = self.manifest.get("encoder")
            self.dim = int(self.manifest["dim"])
            self.count = int(self.manifest["count"])
            self.complete = bool(self.manifest.get("complete", True))
            self.dtype = np.dtype(self.manifest["dtype"])
        else:  # reference layout: *.pkl shards sorted by their trailing number (text_embeds_2 < text_embeds_10)
            self.shard_paths = sorted(self.root.glob("*.pkl"), key=_natural_key)
            if not self.shard_paths:
                raise StoreError(f"{self.root}: no manifest.json and no *.pkl shards")
            first = load_shard(self.shard_paths[0], kind)
            self._first = first  # reused by the first iter_shards (the slow record layout)
            self.kind = kind or first.kind
            self.encoder = None
            self.dim = int(first.embeds.shape[1]) if first.embeds.size else 0
            self.count = None  # unknown until read
            self.dtype = None  # whatever each shard holds
            self.complete = True  # nothing records otherwise

    def require_complete(self) -> EmbeddingStore:
        """Refuse a store whose writer has not finished (killed, or still running): its statistics or its
        training set would silently miss rows."""
        if not self.complete:
            raise StoreError(f"{self.root}: incomplete store ({MANIFEST} says complete: false, {self.count} rows so far): "
                             "the image_embed.py run writing it was stopped or is still running; rerun it to finish")
        return self

    def __len__(self) -> int:
        if self.count is None:
            self.count = sum(len(s) for s in self.iter_shards())
        return self.count

    def iter_shards(self) -> Iterator[Shard]:
        """Yield shards one at a time (memory bounded by one shard), checking rows and dim against the manifest."""
        rows = {e["name"]: e["rows"] for e in self.manifest["shards"]} if self.manifest else {}
        digests = {e["name"]: e.get("sha256") for e in self.manifest["shards"]} if self.manifest and self.verify_hashes else {}
        for index, path in enumerate(self.shard_paths):
            first, self._first = self._first, None
            digest = None if path.name in self._verified else digests.get(path.name)
            shard = first if index == 0 and first is not None else load_shard(path, self.kind, digest)
            if digest:
                self._verified.add(path.name)
            del first
            if shard.kind != self.kind:
                raise StoreError(f"{path}: holds {shard.kind} rows in a {self.kind} store")
            if len(shard) and shard.embeds.shape[1] != self.dim:
                raise StoreError(f"{path}: embeddings of dim {shard.embeds.shape[1]}, store dim is {self.dim}")
            if path.name in rows and rows[path.name] != len(shard):
                raise StoreError(f"{path}: {len(shard)} rows, manifest says {rows[path.name]}")
            if self.dtype is not None and len(shard) and shard.embeds.dtype != self.dtype:
                raise StoreError(f"{path}: holds {shard.embeds.dtype} embeddings, but {MANIFEST} says dtype {self.dtype}")
            yield shard
            del shard  # not held while the next one loads

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest."""
        if self.manifest is None:
            return
        for entry in self.manifest["shards"]:
            check_digest(self.root / entry["name"], file_sha256(self.root / entry["name"]), entry["sha256"])

    def load_all(self) -> Shard:
        """Concatenate every shard (for small stores and tests; large ones should use iter_shards)."""
        shards = list(self.iter_shards())
        if not shards:
            return Shard(self.kind, [], np.zeros((0, self.dim), np.float32))
        return Shard(
            kind=self.kind,
            ids=[i for s in shards for i in s.ids],
            embeds=np.concatenate([s.embeds for s in shards]),
            sources=[x for s in shards for x in s.sources],
            path=str(self.root),
        )


def _natural_key(path: Path) -> tuple:
    stem = path.stem
    digits = "".join(ch for ch in reversed(stem) if ch.isdigit())[::-1] if stem[-1:].isdigit() else ""
    prefix = stem[: len(stem) - len(digits)]
    return (prefix, int(digits) if digits else -1, stem)


def check_unique_ids(ids: Iterable[str], where: str) -> None:
    """Raise StoreError naming the first duplicated id."""
    seen: set[str] = set()
    for row, i in enumerate(ids):
        if i in seen:
            raise StoreError(f"{where}: duplicate id {i!r} (row {row}); ids must be unique")
        seen.add(i)

