"""Embedding stores: folders of pickle shards plus a manifest (see docs/design.md, "Embedding stores").

Every later step loads embeddings only through this module, so the safety rules live here once:
shards are unpickled with an allow-list (no code runs), written under a temp name and renamed
(a killed run never leaves half a shard), and a manifest records what is complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

FORMAT = "revision.embeddings/1"
MANIFEST = "manifest.json"
KINDS = ("text", "image")
# The column holding each row's source: a caption for text stores, an image path for image stores.
SOURCE_KEY = {"text": "captions", "image": "image_paths"}
REFERENCE_SOURCE_KEY = {"text": "caption", "image": "image_path"}


class StoreError(ValueError):
    """A store or shard that cannot be used as it is (the message names the file and, where known, the row)."""


class UnsafePickleError(StoreError):
    """A pickle that asks for anything beyond plain data and numpy arrays."""


# Globals a pickle of plain data + numpy arrays needs (numpy 1.x and 2.x spellings). Nothing here
# can run a command, open a file or import a module.
_ALLOWED_GLOBALS = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "str"), ("builtins", "int"),
    ("builtins", "float"), ("builtins", "bool"), ("builtins", "tuple"), ("builtins", "bytes"),
    ("builtins", "bytearray"), ("_codecs", "encode"), ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_NUMPY_DTYPE_MODULES = ("numpy.dtypes",)  # numpy 2 pickles dtypes as e.g. numpy.dtypes.Float16DType


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module in _NUMPY_DTYPE_MODULES and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to unpickle global '{module}.{name}'; embedding shards may hold only "
            "numpy arrays, dicts, lists, strings and numbers. The file was not executed. If you trust it, "
            "convert it to the revision.embeddings/1 layout in a separate, sandboxed process."
        )


def safe_load(path: str | os.PathLike) -> Any:
    """Unpickle a file allowing only plain data and numpy arrays; anything else raises UnsafePickleError."""
    path = str(path)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated file, garbage bytes, ...
            raise StoreError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


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


def load_shard(path: str | os.PathLike, kind_hint: str | None = None) -> Shard:
    """Load one shard (our columnar layout or the reference record layout) with the safe unpickler."""
    path = str(path)
    obj = safe_load(path)
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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashingFile:
    """File wrapper that hashes what is written, so a pickle can stream to disk without a copy in memory."""

    def __init__(self, f: io.BufferedWriter):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)


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
    with open(tmp, "wb") as f:
        out = _HashingFile(f)
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: str | os.PathLike) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: manifest is not valid JSON ({e})") from e


def _write_manifest(root: Path, manifest: dict) -> None:
    _atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


class EmbeddingStore:
    """Read side of a store: a folder with manifest.json, or a bare folder of reference-layout pkl shards."""

    def __init__(self, root: str | os.PathLike, kind: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such store folder")
        self.manifest = read_manifest(self.root)
        self._first: Shard | None = None
        if self.manifest is not None:
            if self.manifest.get("format") != FORMAT:
                raise StoreError(f"{self.root / MANIFEST}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
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
        for index, path in enumerate(self.shard_paths):
            first, self._first = self._first, None
            shard = first if index == 0 and first is not None else load_shard(path, self.kind)
            del first
            if shard.kind != self.kind:
                raise StoreError(f"{path}: holds {shard.kind} rows in a {self.kind} store")
            if len(shard) and shard.embeds.shape[1] != self.dim:
                raise StoreError(f"{path}: embeddings of dim {shard.embeds.shape[1]}, store dim is {self.dim}")
            if path.name in rows and rows[path.name] != len(shard):
                raise StoreError(f"{path}: {len(shard)} rows, manifest says {rows[path.name]}")
            yield shard
            del shard  # not held while the next one loads

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest."""
        if self.manifest is None:
            return
        for entry in self.manifest["shards"]:
            digest = _sha256_file(self.root / entry["name"])
            if digest != entry["sha256"]:
                raise StoreError(f"{self.root / entry['name']}: sha256 {digest[:12]}… differs from manifest")

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


class StoreWriter:
    """Write side of a store: buffers rows, writes full shards atomically, keeps the manifest current.

    A rerun on the same folder resumes: `done_ids` holds every id of the complete shards, and the
    caller skips those. Shards a killed run renamed into place but had not yet recorded are adopted.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        kind: str,
        encoder: str,
        dim: int,
        dtype: str = "float16",
        shard_size: int = 200_000,
        overwrite: bool = False,
        extra: dict | None = None,
        drop_page_cache: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.root, self.kind, self.dim, self.dtype, self.shard_size = Path(root), kind, int(dim), dtype, shard_size
        self.drop_page_cache = drop_page_cache  # see write_shard
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob("*.tmp"):  # leftovers of a killed write
            tmp.unlink()
        manifest = read_manifest(self.root)
        if manifest is not None and overwrite:
            for entry in manifest["shards"]:
                (self.root / entry["name"]).unlink(missing_ok=True)
            manifest = None
        if manifest is not None:
            mismatch = [
                f"{key} {manifest.get(key)!r} (asked for {want!r})"
                for key, want in (("kind", kind), ("encoder", encoder), ("dim", self.dim), ("dtype", dtype))
                if manifest.get(key) != want
            ]
            if mismatch:
                raise StoreError(
                    f"{self.root}: existing store has {', '.join(mismatch)}; pass --overwrite to replace it"
                )
        elif overwrite or not any(self.root.glob("*.pkl")):
            for stale in self.root.glob(f"{kind}_embeds_*.pkl"):
                stale.unlink()
        else:
            raise StoreError(f"{self.root}: holds *.pkl files but no {MANIFEST}; pass --overwrite to replace them")
        self.manifest = manifest or {
            "format": FORMAT, "kind": kind, "encoder": encoder, "dim": self.dim, "dtype": dtype,
            "normalized": True, "count": 0, "complete": False, "shards": [],
        }
        self.manifest.update(extra or {})
        self.manifest["complete"] = False
        self.done_ids: set[str] = set()
        for entry in self.manifest["shards"]:
            self.done_ids.update(load_shard(self.root / entry["name"]).ids)
        self._adopt_orphans()
        self._ids: list[str] = []
        self._sources: list[str] = []
        # Rows are copied into a shard-sized buffer (no concatenation). A full one is written (pickled, hashed,
        # fsynced) by a background thread while the next fills the spare buffer; it enters the manifest once on
        # disk. Killed in between: a renamed shard is adopted on rerun, a half-written temp file removed.
        self._buffer: np.ndarray | None = None
        self._spare: np.ndarray | None = None
        self._shard_writer: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, str, list[str]] | None = None
        self._buffered = 0
        _write_manifest(self.root, self.manifest)

    def _shard_name(self, index: int) -> str:
        return f"{self.kind}_embeds_{index:05d}.pkl"

    def _adopt_orphans(self) -> None:
        listed = {e["name"] for e in self.manifest["shards"]}
        index = len(self.manifest["shards"])
        while (self.root / self._shard_name(index)).exists() and self._shard_name(index) not in listed:
            path = self.root / self._shard_name(index)
            try:
                shard = load_shard(path)
            except StoreError:
                path.unlink()
                break
            self._record(path.name, shard.ids, _sha256_file(path))
            index += 1

    def _record(self, name: str, ids: Sequence[str], sha256: str) -> None:
        self.manifest["shards"].append({"name": name, "rows": len(ids), "sha256": sha256})
        self.manifest["count"] += len(ids)
        self.done_ids.update(ids)
        _write_manifest(self.root, self.manifest)

    def add(
        self, ids: Sequence[str], embeds: np.ndarray | Any, sources: Sequence[str] | None = None, unit_rows: bool = False
    ) -> None:
        """Buffer rows (normalised here); a full buffer is written as one shard. `unit_rows=True`: the caller
        guarantees finite unit rows (e.g. alignment output), copied as they are, unchecked."""
        embeds = np.asarray(embeds.float().cpu() if hasattr(embeds, "float") else embeds)
        if embeds.ndim != 2 or embeds.shape != (len(ids), self.dim):
            raise StoreError(f"{self.root}: got embeddings of shape {embeds.shape} for {len(ids)} ids, dim {self.dim}")
        bad = bad_rows(embeds) if not unit_rows else []
        if len(bad):
            row = int(bad[0])
            raise StoreError(f"{self.root}: id {ids[row]!r} has an unusable embedding ({describe_bad_row(embeds[row])})")
        sources = list(sources) if sources is not None else [""] * len(ids)
        start = 0
        while start < len(ids):
            if self._buffer is None:
                self._buffer = np.empty((self.shard_size, self.dim), self.dtype)
            take = min(self.shard_size - self._buffered, len(ids) - start)
            # normalise straight into the buffer: no temporary the size of the input
            chunk, into = embeds[start : start + take], self._buffer[self._buffered : self._buffered + take]
            if unit_rows:
                np.copyto(into, chunk, casting="unsafe")
            else:
                chunk = chunk.astype(np.float64 if chunk.dtype == np.float64 else np.float32, copy=False)
                norms = np.sqrt(_squared_norms(chunk))[:, None]
                np.divide(chunk, np.where(norms > 0, norms, 1.0), out=into, casting="unsafe")
            self._ids.extend(ids[start : start + take])
            self._sources.extend(sources[start : start + take])
            self._buffered += take
            start += take
            if self._buffered == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        self._record_pending()  # the spare buffer is free again once its shard is on disk
        shard = Shard(self.kind, self._ids, self._buffer[: self._buffered], self._sources)
        name = self._shard_name(len(self.manifest["shards"]))
        self._shard_writer = self._shard_writer or ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        written = self._shard_writer.submit(write_shard, self.root / name, shard, self.dtype, self.drop_page_cache)
        self._pending = (written, name, shard.ids)
        self._ids, self._sources, self._buffered = [], [], 0
        self._buffer, self._spare = self._spare, self._buffer

    def _record_pending(self) -> None:
        if self._pending is not None:
            written, name, ids = self._pending
            self._pending = None
            self._record(name, ids, written.result())

    def shutdown(self) -> None:
        """Stop the background shard writer (after a write in flight). close() calls it; so should a failed run."""
        if self._shard_writer is not None:
            self._shard_writer.shutdown()
            self._shard_writer = None

    def close(self, **summary: Any) -> dict:
        """Write what is buffered, mark the store complete and return the manifest."""
        try:
            if self._buffered:
                self._flush()
            self._record_pending()
        finally:
            self.shutdown()
        self._buffer = self._spare = None
        self.manifest["complete"] = True
        self.manifest.update(summary)
        _write_manifest(self.root, self.manifest)
        return self.manifest


def write_store(
    root: str | os.PathLike,
    kind: str,
    ids: Sequence[str],
    embeds: np.ndarray,
    sources: Sequence[str] | None = None,
    encoder: str = "unknown",
    dtype: str = "float16",
    shard_size: int = 200_000,
    overwrite: bool = False,
    extra: dict | None = None,
) -> dict:
    """Write a whole store in one call (used by alignment and tests)."""
    check_unique_ids(ids, str(root))
    writer = StoreWriter(root, kind, encoder, np.asarray(embeds).shape[1], dtype, shard_size, overwrite, extra)
    writer.add(list(ids), embeds, sources)
    return writer.close()


def check_unique_ids(ids: Iterable[str], where: str) -> None:
    """Raise StoreError naming the first duplicated id."""
    seen: set[str] = set()
    for row, i in enumerate(ids):
        if i in seen:
            raise StoreError(f"{where}: duplicate id {i!r} (row {row}); ids must be unique")
        seen.add(i)
