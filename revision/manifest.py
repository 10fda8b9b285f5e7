"""A store's manifest (manifest.json: what is complete, each shard's rows and sha256) and the file names of a store's
bookkeeping, checked before anything relies on them."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from revision.errors import StoreError
from revision.shards import KINDS, atomic_write_bytes

MANIFEST = "manifest.json"
PART_GLOB = "part-*-of-*.json"  # a rank's bookkeeping (see StoreWriter(part=...) and revision/distributed.py)
SKIPPED = "skipped.jsonl"


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


def write_manifest(root: Path, manifest: dict, name: str = MANIFEST) -> None:
    """Write the manifest (or a part's bookkeeping file) atomically."""
    atomic_write_bytes(root / name, (json.dumps(manifest, indent=1) + "\n").encode())
