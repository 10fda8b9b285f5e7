"""Write side of embedding stores (the format: revision/shards.py and revision/manifest.py; the read side:
revision/store.py; docs/distributed.md for locks, rank parts and the merge)."""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from revision import shards
from revision.embedding_rows import bad_rows, describe_bad_row, squared_norms
from revision.errors import StoreError
from revision.locks import StoreLock, part_tag
from revision.manifest import MANIFEST, PART_GLOB, SKIPPED, read_manifest, write_manifest
from revision.nofollow import open_nofollow, refuse_links
from revision.shards import FORMAT, KINDS, Shard, load_shard
from revision.store import check_unique_ids

logger = logging.getLogger(__name__)
Position = tuple  # (unit, offset): an input's place in the writer's input stream (unit index, item in the unit)


@dataclass(frozen=True)
class Resume:
    """Where a rerun starts: the input position after the last recorded shard, and what came before it."""

    end: Position = (0, 0)
    consumed: int = 0  # inputs before `end` (stored or skipped)
    skipped: int = 0


class StoreWriter:
    """Write side of a store: buffers rows, writes full shards atomically, keeps its bookkeeping current.

    One writer per store: a lock (revision.locks) is held from construction until close() or shutdown(); a second
    writer is refused, naming the first. `part=(index, count)`: one of `count` ranks writing its own rank-named
    shards into the same folder, its bookkeeping in part-INDEX-of-COUNT.json; only the merge
    (revision.distributed.merge_parts) writes the manifest. Without `part`, the writer keeps manifest.json itself.

    Ids: with `positions` (a stream of inputs), an id this run already stored is skipped and listed, its first row
    kept (e.g. one key in two tars); the set of ids costs ~100 bytes a row. Ids of an earlier, resumed run are not
    in it: the training table refuses a duplicate there.

    Resume: a caller that gives each row's input `positions` and reports skipped inputs with skip() finds, on a
    rerun, `resume`: the position after the last recorded shard (read the inputs again from there: skipped inputs
    before it stay listed, later ones are retried). `inputs` fingerprints what is being encoded: a rerun on other
    inputs is refused. `done_ids` (read from the shards on first use) serves callers that resume by id.
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
        part: tuple[int, int] | None = None,
        inputs: str | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if part is not None and not (part[1] > 1 and 0 <= part[0] < part[1]):
            raise ValueError(f"part must be (index, count) with 0 <= index < count and count > 1, got {part}")
        self.root, self.kind, self.dim, self.dtype, self.shard_size = Path(root), kind, int(dim), dtype, shard_size
        self.part = part
        self.drop_page_cache = drop_page_cache  # see write_shard
        tag = part_tag(*part) if part else ""
        self.book_name = f"{tag}.json" if part else MANIFEST
        self.shard_prefix = f"{kind}_embeds_{tag}_" if part else f"{kind}_embeds_"
        self.skip_log_path = self.root / (f"skipped-{tag}.jsonl" if part else SKIPPED)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = StoreLock(self.root, part)  # before any file of the store is read or touched
        try:
            self._open(encoder, overwrite, extra or {}, inputs)
        except BaseException:
            self.lock.release()
            raise
        self._ids: list[str] = []
        self._sources: list[str] = []
        self._end: Position | None = None  # input position of the last buffered row
        self._skips: list[tuple[Position, str]] = []  # skipped inputs not yet in the log (their shard is not recorded)
        # Rows are copied into a shard-sized buffer (no concatenation). A full one is written (pickled, hashed,
        # fsynced) by a background thread while the next fills the spare buffer; it enters the bookkeeping once on
        # disk. Killed in between: the rerun starts before it and writes it again.
        self._buffer: np.ndarray | None = None
        self._spare: np.ndarray | None = None
        self._shard_writer: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, dict, list[str]] | None = None
        self._buffered = 0
        self._done_ids: set[str] | None = None
        self._seen: set[str] = set()  # ids this run stored: a repeat (the same key in two tars) is skipped and listed
        if not self.was_complete:  # a complete store stays as it is on disk until this writer adds to it or closes
            write_manifest(self.root, self.manifest, self.book_name)

    def _open(self, encoder: str, overwrite: bool, extra: dict, inputs: str | None) -> None:
        # checked before any file is read or touched
        refuse_links(*(self.root / name for name in (MANIFEST, self.book_name, self.skip_log_path.name)))
        manifest = read_manifest(self.root)  # every shard name checked before any file is touched
        parts = {p.name: read_manifest(self.root, p.name) for p in sorted(self.root.glob(PART_GLOB))}
        if self.part is None:
            book, others = manifest, dict(parts)
            if manifest is not None and manifest.get("parts"):
                others[MANIFEST] = manifest
        else:
            book = parts.pop(self.book_name, None)
            others = {n: b for n, b in parts.items() if b.get("part", [0, 0])[1] != self.part[1]}
            if manifest is not None and manifest.get("parts") != self.part[1]:
                others[MANIFEST] = manifest
        if others and not overwrite:
            raise StoreError(f"{self.root}: {_layout(manifest, parts)}, but this run writes it {_layout_of(self.part)}; "
                             "rerun with the same number of ranks (--num_shards), or pass --overwrite to start again")
        if overwrite:
            for name, old in [(self.book_name, book), *others.items()]:
                if old is not None:
                    for entry in old["shards"]:
                        (self.root / entry["name"]).unlink(missing_ok=True)
                    (self.root / name).unlink(missing_ok=True)
            if self.part is not None:
                (self.root / MANIFEST).unlink(missing_ok=True)  # lists this part's old shards; the merge writes it anew
            book = None
        if book is not None:
            mismatch = [
                f"{key} {book.get(key)!r} (asked for {want!r})"
                for key, want in (("kind", self.kind), ("encoder", encoder), ("dim", self.dim), ("dtype", self.dtype))
                if book.get(key) != want
            ]
            if mismatch:
                raise StoreError(f"{self.root}: existing store has {', '.join(mismatch)}; pass --overwrite to replace it")
            if inputs is not None and book["shards"] and book.get("inputs") != inputs:
                raise StoreError(f"{self.root / self.book_name}: written from other inputs than this run's (or by an "
                                 "older version without input bookkeeping); write to another --out, or pass --overwrite")
        elif self.part is None and any(self.root.glob("*.pkl")) and not overwrite:
            raise StoreError(f"{self.root}: holds *.pkl files but no {MANIFEST}; pass --overwrite to replace them")
        listed = {e["name"] for e in book["shards"]} if book else set()
        # Leftovers of this writer's own killed runs only (names it gives: shard_prefix + 5 digits, .pkl or .pkl.tmp):
        # shards written but never recorded, and temp files. Anything else is the user's: left alone, and named.
        ours = re.compile(re.escape(self.shard_prefix) + r"\d{5}\.pkl(\.tmp)?")
        for stale in sorted(self.root.glob(f"{self.kind}_embeds_*")):
            if stale.name in listed:
                continue
            if ours.fullmatch(stale.name) and not stale.is_symlink():
                stale.unlink()
            elif stale.name.endswith(".pkl") and self.part is None:
                logger.warning("%s: looks like a shard but is not one this store lists; left alone (not read, not "
                               "deleted)", stale)
        (self.root / f"{self.book_name}.tmp").unlink(missing_ok=True)
        self._fresh = book is None  # the manifest this writer writes next is its own: removed if it fails before a shard
        self.was_complete = bool(book and book.get("complete"))
        self.manifest = book or {
            "format": FORMAT, "kind": self.kind, "encoder": encoder, "dim": self.dim, "dtype": self.dtype,
            "normalized": True, "count": 0, "complete": False, "shards": [],
        }
        if self.part is not None:
            self.manifest["part"] = list(self.part)
        if inputs is not None:
            self.manifest["inputs"] = inputs
        self.manifest.update(extra)
        self.manifest["complete"] = False
        last = self.manifest["shards"][-1] if self.manifest["shards"] else {}
        self.resume = Resume(tuple(last.get("end", (0, 0))), last.get("consumed", 0), last.get("skipped", 0))
        self._skipped = self.resume.skipped
        if not self.was_complete and self.skip_log_path.exists():  # the log holds exactly the skips before the resume point
            with open_nofollow(self.skip_log_path, "r+b") as log:
                log.truncate(last.get("skip_log_bytes", 0))

    @property
    def done_ids(self) -> set[str]:
        if self._done_ids is None:
            self._done_ids = set()
            for entry in self.manifest["shards"]:
                self._done_ids.update(load_shard(self.root / entry["name"], sha256=entry.get("sha256")).ids)
        return self._done_ids

    @property
    def skipped(self) -> int:
        """Inputs listed as skipped so far (earlier runs of this store included)."""
        return self._skipped + len(self._skips)

    def _shard_name(self, index: int) -> str:
        return f"{self.shard_prefix}{index:05d}.pkl"

    def skip(self, record: dict, position: Position) -> None:
        """List a skipped input (written to the skip log with the shard that covers its position)."""
        self._skips.append((tuple(position), json.dumps(record, ensure_ascii=False) + "\n"))

    def _log_skips_before(self, end: Position | None) -> tuple[int, int]:
        """Append the pending skips before `end` (all: None) to the log; returns (how many, log size after)."""
        due = [line for pos, line in self._skips if end is None or pos < end]
        self._skips = [(pos, line) for pos, line in self._skips if end is not None and pos >= end]
        if not due and not self.skip_log_path.exists():
            return 0, 0  # no skips, no log (stores written by alignment never have one)
        with open_nofollow(self.skip_log_path, "a", encoding="utf-8") as log:
            log.writelines(due)
            log.flush()
            os.fsync(log.fileno())  # on disk before the bookkeeping that counts it
            size = log.tell()
        self._skipped += len(due)
        return len(due), size

    def _record(self, entry: dict, ids: Sequence[str]) -> None:
        self.manifest["shards"].append(entry)
        self.manifest["count"] += len(ids)
        if self._done_ids is not None:
            self._done_ids.update(ids)
        write_manifest(self.root, self.manifest, self.book_name)

    def add(
        self, ids: Sequence[str], embeds: np.ndarray | Any, sources: Sequence[str] | None = None,
        unit_rows: bool = False, positions: Sequence[Position] | None = None,
    ) -> None:
        """Buffer rows (normalised here); a full buffer is written as one shard. `unit_rows=True`: the caller
        guarantees finite unit rows (e.g. alignment output), copied as they are, unchecked. `positions`: each
        row's input position, increasing (see the class docstring)."""
        embeds = np.asarray(embeds.float().cpu() if hasattr(embeds, "float") else embeds)
        if embeds.ndim != 2 or embeds.shape != (len(ids), self.dim):
            raise StoreError(f"{self.root}: got embeddings of shape {embeds.shape} for {len(ids)} ids, dim {self.dim}")
        if positions is not None:  # a stream of inputs: a repeated id is skipped (listed), its first row kept
            keep = []
            for i, id_ in enumerate(ids):
                if id_ in self._seen:
                    self.skip({"id": id_, "reason": "duplicate id: an earlier input of this run has the same id (kept)"},
                              positions[i])
                else:
                    self._seen.add(id_)
                    keep.append(i)
            if len(keep) < len(ids):
                ids, embeds, positions = [ids[i] for i in keep], embeds[keep], [positions[i] for i in keep]
                sources = [sources[i] for i in keep] if sources is not None else None
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
                if not _same_rows(chunk, into):  # rows written in place (free_rows) are where they belong
                    np.copyto(into, chunk, casting="unsafe")
            else:
                chunk = chunk.astype(np.float64 if chunk.dtype == np.float64 else np.float32, copy=False)
                norms = np.sqrt(squared_norms(chunk))[:, None]
                np.divide(chunk, np.where(norms > 0, norms, 1.0), out=into, casting="unsafe")
            self._ids.extend(ids[start : start + take])
            self._sources.extend(sources[start : start + take])
            self._end = tuple(positions[start + take - 1]) if positions is not None else None
            self._buffered += take
            start += take
            if self._buffered == self.shard_size:
                self._flush()

    def free_rows(self, n: int) -> np.ndarray:
        """A view of the next rows of the shard being filled (at most n; fewer when the shard has less room): a
        caller may write finite unit rows into it, then pass that view to add(..., unit_rows=True), which keeps them
        where they are instead of copying them."""
        if self._buffer is None:
            self._buffer = np.empty((self.shard_size, self.dim), self.dtype)
        return self._buffer[self._buffered : self._buffered + min(n, self.shard_size - self._buffered)]

    def _flush(self) -> None:
        self._record_pending()  # the spare buffer is free again once its shard is on disk
        shard = Shard(self.kind, self._ids, self._buffer[: self._buffered], self._sources)
        name = self._shard_name(len(self.manifest["shards"]))
        entry: dict[str, Any] = {"name": name, "rows": len(shard)}
        if self._end is not None:  # the shard covers every input before `end`: rows, and the skips among them
            end = (self._end[0], self._end[1] + 1)
            skips, log_bytes = self._log_skips_before(end)
            consumed = (self.manifest["shards"][-1].get("consumed", 0) if self.manifest["shards"] else 0) + len(shard) + skips
            entry.update(end=list(end), consumed=consumed, skipped=self._skipped, skip_log_bytes=log_bytes)
        self._shard_writer = self._shard_writer or ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        # looked up in revision.shards at call time: the tests that kill a write mid-way patch it there
        written = self._shard_writer.submit(shards.write_shard, self.root / name, shard, self.dtype, self.drop_page_cache)
        self._pending = (written, entry, shard.ids)
        self._ids, self._sources, self._buffered = [], [], 0
        self._buffer, self._spare = self._spare, self._buffer

    def _record_pending(self) -> None:
        if self._pending is not None:
            written, entry, ids = self._pending
            self._pending = None
            self._record({**entry, "sha256": written.result()}, ids)

    def shutdown(self) -> None:
        """Stop the background shard writer (after a write in flight) and release the lock. close() calls it; so
        should a failed run."""
        if self._shard_writer is not None:
            self._shard_writer.shutdown()
            self._shard_writer = None
        if self._fresh and not self.manifest["shards"] and not self.manifest["complete"]:
            (self.root / self.book_name).unlink(missing_ok=True)  # a failed first run leaves no empty, incomplete store
        self._fresh = False
        self.lock.release()

    def close(self, **summary: Any) -> dict:
        """Write what is buffered, list the remaining skips, mark the store (or part) complete; returns its manifest."""
        try:
            if self._buffered:
                self._flush()
            self._record_pending()
            self._log_skips_before(None)
            self._buffer = self._spare = None
            self.manifest["complete"] = True
            self.manifest["skipped"] = self._skipped
            self.manifest.update(summary)
            write_manifest(self.root, self.manifest, self.book_name)
        finally:
            self.shutdown()
        return self.manifest


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def _layout_of(part: tuple[int, int] | None) -> str:
    return f"as one of {part[1]} ranks" if part else "as a single process"


def _layout(manifest: dict | None, parts: dict[str, dict]) -> str:
    counts = sorted({b.get("part", [0, 0])[1] for b in parts.values()}
                    | ({manifest["parts"]} if manifest and manifest.get("parts") else set()))
    if counts:
        return f"was written by {' and '.join(map(str, counts))} ranks"
    return "was written by a single process"


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
