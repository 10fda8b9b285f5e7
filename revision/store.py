"""Embedding stores, read side: a folder of shards plus a manifest (see docs/design.md, "Embedding stores"), or a
bare folder of reference-layout *.pkl shards.

Every later step loads embeddings through EmbeddingStore, so the safety rules apply once: each shard is checked
against the manifest's sha256 before it is unpickled, unpickled with an allow-list (revision/shards.py,
revision/safe_pickle.py), and checked for its kind, width, rows and dtype. The write side: revision/store_writer.py.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from revision.errors import StoreError
from revision.hashing import file_sha256
from revision.manifest import MANIFEST, PART_GLOB, check_manifest_fields, read_manifest
from revision.safe_pickle import check_digest
from revision.shards import FORMAT, Shard, load_shard


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
