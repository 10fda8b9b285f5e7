"""What image_embed.py reads: one table of readers keyed by input format (READERS), each turning an --images or
--texts argument into units (a file list, one tar, one parquet file) that stream their samples in a fixed order.

Formats (detect_format picks one from the argument; see docs/distributed.md):
  folder      every file under DIR (recursive, hidden files ignored); id = path relative to DIR
  list        .txt (image paths / texts, one a line), .json / .jsonl records (revision/lists.py)
  webdataset  tar shards, brace patterns allowed ("data/{00000..00099}.tar"): img2dataset's layout, one sample per
              key (KEY.jpg + KEY.txt / KEY.json); id = the key. A truncated tar keeps what it could read.
  parquet     .parquet files (or a folder of them): image bytes ({bytes, path} structs too) or paths, a caption
              column for texts; id = the id column, else FILE:ROW. Read in record batches, never whole.
Lists are read whole (they are lists already); tars and parquet files are only named up front, never listed.
Work is split between ranks by unit (tars, parquet files; list items round-robin), so a rank's part and the
position of every sample in it (unit, offset) are the same on every run: that is what a rerun resumes from.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from revision.lists import read_images, read_texts
from revision.registry import Registry

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
ID_COLUMNS = ("key", "id")
IMAGE_COLUMNS = ("image", "jpg", "png", "img", "image_bytes", "image_path")
TEXT_COLUMNS = ("caption", "text", "txt")


@dataclass(frozen=True)
class Sample:
    """One input: `payload` is a Path or bytes (images) or a str (texts); `error` set: unreadable, skip it."""

    id: str
    payload: Any
    source: str  # what the store records: the image's path (as the input named it) or the caption
    position: tuple[int, int] = (0, 0)  # (unit, offset) in this rank's part of the inputs
    error: str = ""


@dataclass
class Unit:
    """A piece of the input that one rank reads whole, in a fixed order: `items` (a list) or `read()` (a stream)."""

    name: str
    items: list[Sample] | None = None
    read: Callable[[], Iterator[Sample]] | None = field(default=None, repr=False)
    size: int = 0  # bytes on disk (fingerprints streamed units)

    def samples(self) -> Iterator[Sample]:
        return iter(self.items) if self.items is not None else self.read()


@dataclass
class Inputs:
    kind: str
    units: list[Unit]
    fingerprint: str
    limit: int | None = None  # --max_items over a stream: samples this rank reads at most

    def stream(self, start: tuple[int, int] = (0, 0), limit: int | None = None) -> Iterator[Sample]:
        """Samples from `start` on (earlier units are not opened; the start unit's first items are passed over)."""
        count = 0
        for u in range(start[0], len(self.units)):
            for offset, sample in enumerate(self.units[u].samples()):
                if u == start[0] and offset < start[1]:
                    continue
                if limit is not None and count >= limit:
                    return
                count += 1
                yield Sample(sample.id, sample.payload, sample.source, (u, offset), sample.error)


# ---------------------------------------------------------------------------------------------- readers


def read_list(spec: str, kind: str, options: dict) -> list[Unit]:
    if kind == "image":
        items = [Sample(i.id, i.path, i.source) for i in read_images(spec, options.get("image_root"))]
    else:
        items = [Sample(t.id, t.text, t.text) for t in read_texts(spec)]
    return [Unit(spec, items=items)]


def _tar_samples(url: str, kind: str) -> Iterator[Sample]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:  # a truncated or corrupt tar: keep what was read, list the rest
        errors.append(exn)
        return False

    with open(url, "rb") as stream:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=stop)
        for sample in group_by_keys(files, handler=stop):
            yield _tar_sample(sample, url, kind)
    if errors:
        reason = f"unreadable from here on ({type(errors[0]).__name__}: {str(errors[0].args[0] if errors[0].args else '')[:200]})"
        yield Sample(f"{Path(url).name}#rest", None, url, error=f"truncated or corrupt tar: {reason}")


def _tar_sample(sample: dict, url: str, kind: str) -> Sample:
    key, name = sample["__key__"], Path(url).name
    members = sorted(k for k in sample if not k.startswith("__"))
    if kind == "image":
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return Sample(key, None, f"{name}/{key}", error=f"no image member (members: {', '.join(members)})")
        return Sample(key, sample[ext], f"{name}/{key}.{ext}")
    try:
        text = sample["txt"].decode("utf-8-sig") if "txt" in sample else _caption(json.loads(sample["json"])) if "json" in sample else None
    except (UnicodeDecodeError, ValueError) as e:
        return Sample(key, None, f"{name}/{key}", error=f"unreadable caption ({type(e).__name__}: {e})")
    if not isinstance(text, str):
        return Sample(key, None, f"{name}/{key}", error=f"no caption (.txt, or .json 'caption'/'text'; members: {', '.join(members)})")
    return Sample(key, text, text)


def _caption(record: Any) -> Any:
    return next((record[c] for c in TEXT_COLUMNS if isinstance(record, dict) and c in record), None)


def _expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand  # webdataset's dependency (the `data` extra), like pyarrow
    except ImportError as e:
        raise ImportError("tar and parquet inputs need webdataset and pyarrow: pip install -e '.[data]'") from e
    return list(braceexpand(pattern))


def read_webdataset(spec: str, kind: str, options: dict) -> list[Unit]:
    urls = [u for part in spec.split("::") for u in _expand(part)]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{spec}: {len(missing)} of {len(urls)} tar files missing, e.g. {missing[0]}")
    return [Unit(u, read=lambda u=u: _tar_samples(u, kind), size=Path(u).stat().st_size) for u in urls]


def _parquet_samples(path: Path, kind: str, options: dict) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except Exception as e:  # not a parquet file, truncated footer, ...
        yield Sample(f"{path.name}#all", None, str(path), error=f"unreadable parquet file ({type(e).__name__}: {e})")
        return
    id_column = options.get("id_column") or next((c for c in ID_COLUMNS if c in names), None)
    wanted = options.get("image_column" if kind == "image" else "text_column")
    column = wanted or next((c for c in (IMAGE_COLUMNS if kind == "image" else TEXT_COLUMNS) if c in names), None)
    if column not in names or (id_column is not None and id_column not in names):
        missing = column if column not in names else id_column
        raise ValueError(f"{path}: no column {missing!r} (columns: {', '.join(names)}); name it with "
                         f"--{'image' if kind == 'image' else 'text'}_column / --id_column")
    root = Path(options.get("image_root") or path.parent)
    row = 0
    try:
        for batch in table.iter_batches(batch_size=256, columns=[c for c in (id_column, column) if c]):
            ids = batch.column(id_column).to_pylist() if id_column else [None] * batch.num_rows
            for given, value in zip(ids, batch.column(column).to_pylist()):
                yield _parquet_sample(f"{path.stem}:{row}" if given is None else str(given), value, kind, root, f"{path.name}:{row}")
                row += 1
    except Exception as e:  # a corrupt page: the rows before it are kept, the rest listed
        yield Sample(f"{path.name}#rest", None, str(path), error=f"rows from {row} on unreadable ({type(e).__name__}: {e})")


def _parquet_sample(id_: str, value: Any, kind: str, root: Path, where: str) -> Sample:
    if kind == "text":
        return (Sample(id_, value, value) if isinstance(value, str)
                else Sample(id_, None, where, error=f"caption is {type(value).__name__}, not text"))
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return Sample(id_, value, where)
    if isinstance(value, str) and value:
        return Sample(id_, root / value, value)
    return Sample(id_, None, where, error=f"no image in the row ({type(value).__name__})")


def read_parquet(spec: str, kind: str, options: dict) -> list[Unit]:
    path = Path(spec)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [Path(u) for u in _expand(spec)]
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"{spec}: no parquet files" if not files else f"{spec}: missing {missing[0]}")
    return [Unit(str(f), read=lambda f=f: _parquet_samples(f, kind, options), size=f.stat().st_size) for f in files]


READERS: Registry[Callable[[str, str, dict], list[Unit]]] = Registry("input format")
READERS.update({
    "folder": read_list,  # revision.lists.read_images handles folders
    "list": read_list,
    "webdataset": read_webdataset,
    "parquet": read_parquet,
})


def detect_format(spec: str) -> str:
    if ".tar" in spec:
        return "webdataset"
    if spec.endswith(".parquet") or ".parquet" in spec or (Path(spec).is_dir() and any(Path(spec).glob("*.parquet"))):
        return "parquet"
    return "folder" if Path(spec).is_dir() else "list"


def open_inputs(specs: list[str], kind: str, part: int = 0, parts: int = 1, options: dict | None = None,
                fmt: str | None = None, max_items: int | None = None, units: list[Unit] | None = None) -> Inputs:
    """This rank's part of the inputs (`units` given, e.g. from --data_json, come first): list items round-robin (as
    one unit), streamed units (tars, parquet files) round-robin by unit. `max_items` cuts the whole input before it
    is split (lists) or each rank's stream (others)."""
    options = options or {}
    units = list(units or []) + [u for spec in specs for u in READERS.lookup(fmt or detect_format(spec))(spec, kind, options)]
    listed = [s for u in units if u.items is not None for s in u.items]
    streamed = [u for u in units if u.items is None]
    if max_items is not None:
        listed = listed[:max_items]
    mine = ([Unit("list", items=listed[part::parts])] if listed else []) + streamed[part::parts]
    digest = hashlib.sha256(json.dumps([kind, part, parts, max_items]).encode())
    for sample in listed:
        digest.update(f"{sample.id}\0{sample.source}\0".encode())
    for unit in streamed:
        digest.update(f"{unit.name}\0{unit.size}\0".encode())
    return Inputs(kind, mine, digest.hexdigest()[:32], max_items if streamed else None)
