"""Embed unpaired images and texts with a CLIP-style encoder into `OUT/image/` and `OUT/text/` stores.

Inputs (ids are stable across reruns: the given id, else the image's relative path / the text's row number):
  --images DIR            every file under DIR (recursive, hidden files ignored); id = path relative to DIR
  --images LIST.txt       one image path per line (relative to --image_root, else to the list's folder)
  --images LIST.json(l)   records {"id", "image"} (a list, JSONL, or {"images": [...]})
  --texts FILE.txt        one text per line; id = line number (from 1)
  --texts FILE.jsonl      records {"id", "text" | "caption"}; --texts FILE.json: a list of records or strings
  --data_json FILE.json   the official layout {"images": [{"id", "image"}], "texts": [{"id", "text"}]}

Images are decoded and preprocessed in DataLoader workers while the main process encodes. Unreadable
images are skipped, counted and listed in OUT/image/skipped.jsonl; empty texts are skipped and counted
(OUT/text/skipped.jsonl). Shards are written atomically; a rerun resumes after the last complete shard.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from revision.encoders import Encoder, load_encoder, to_rgb
from revision.records import RecordsError, read_records
from revision.store import StoreError, StoreWriter, check_unique_ids

# Sleep after every batch: a throttle for slow shared disks, and how the tests get a run to kill mid-way.
BATCH_DELAY_ENV = "REVISION_EMBED_BATCH_DELAY"


class InputError(ValueError):
    """An input list that cannot be read as it is (the message names the file and row)."""


@dataclass(frozen=True)
class ImageItem:
    id: str
    path: Path    # where to open it
    source: str   # what the store records: the path as the input gave it


@dataclass(frozen=True)
class TextItem:
    id: str
    text: str


# ----------------------------------------------------------------------------------------------- inputs


def _read_records(path: Path) -> list[Any]:
    """A .json file (a list, or a dict holding lists) or a .jsonl file (one JSON value per line)."""
    try:
        return read_records(path, document=True)
    except RecordsError as e:
        raise InputError(str(e)) from None


def _record_list(records: Any, key: str, where: Path) -> list:
    """The records themselves, or the list under `key` of a {"images": [...], "texts": [...]} file."""
    if isinstance(records, dict) and key in records:
        records = records[key]
    if not isinstance(records, list):
        raise InputError(f"{where}: expected a list of records (or an object with a {key!r} list)")
    return records


def _image_items_from_records(records: Any, where: Path, image_root: Path) -> list[ImageItem]:
    items = []
    for row, rec in enumerate(_record_list(records, "images", where), 1):
        image = rec.get("image", rec.get("image_path")) if isinstance(rec, dict) else rec if isinstance(rec, str) else None
        if not isinstance(image, str) or not image:
            raise InputError(f"{where}: record {row} has no 'image' path: {str(rec)[:200]}")
        given_id = rec.get("id") if isinstance(rec, dict) else None
        items.append(ImageItem(str(given_id) if given_id is not None else image, image_root / image, image))
    return items


def read_images(images: str | Path, image_root: str | Path | None = None) -> list[ImageItem]:
    """Image items from a folder (recursive), a .txt list of paths, or JSON/JSONL records with id + image."""
    images = Path(images)
    if images.is_dir():
        files = sorted(
            p for p in images.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(images).parts)
        )
        return [ImageItem(p.relative_to(images).as_posix(), p, p.relative_to(images).as_posix()) for p in files]
    if not images.is_file():
        raise InputError(f"--images {images}: no such file or folder")
    root = Path(image_root) if image_root else images.parent
    if images.suffix in (".json", ".jsonl"):
        return _image_items_from_records(_read_records(images), images, root)
    if images.suffix != ".txt":
        raise InputError(f"--images {images}: expected a folder, a .txt list of paths or .json/.jsonl records")
    lines = [line.strip() for line in images.read_text(encoding="utf-8").splitlines()]
    return [ImageItem(line, root / line, line) for line in lines if line]


def _text_items_from_records(records: Any, where: Path) -> list[TextItem]:
    items = []
    for row, rec in enumerate(_record_list(records, "texts", where), 1):
        if isinstance(rec, str):
            items.append(TextItem(str(row), rec))
            continue
        text = rec.get("text", rec.get("caption")) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise InputError(f"{where}: record {row} has no 'text' or 'caption' string: {str(rec)[:200]}")
        items.append(TextItem(str(rec["id"]) if rec.get("id") is not None else str(row), text))
    return items


def read_texts(texts: str | Path) -> list[TextItem]:
    """Text items from a .txt (one per line), .jsonl (records) or .json (list of records or strings)."""
    texts = Path(texts)
    if not texts.is_file():
        raise InputError(f"--texts {texts}: no such file")
    if texts.suffix in (".json", ".jsonl"):
        return _text_items_from_records(_read_records(texts), texts)
    if texts.suffix != ".txt":
        raise InputError(f"--texts {texts}: expected a .txt (one text per line), .jsonl or .json file")
    return [TextItem(str(n), line) for n, line in enumerate(texts.read_text(encoding="utf-8").splitlines(), 1)]


def read_data_json(path: str | Path, image_root: str | Path | None = None) -> tuple[list[ImageItem], list[TextItem]]:
    """The official repo's {"images": [{"id", "image"}], "texts": [{"id", "text"}]} file."""
    path = Path(path)
    data = _read_records(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object with 'images' and/or 'texts' lists")
    root = Path(image_root) if image_root else path.parent
    images = _image_items_from_records(data.get("images", []), path, root)
    texts = _text_items_from_records(data.get("texts", []), path)
    return images, texts


# ------------------------------------------------------------------------------------------- decoding


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image (PIL opens lazily; truncation only shows when pixels are read), as RGB."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


class ImageFiles(Dataset):
    """Decodes and preprocesses one image per item; failures come back as a reason instead of a tensor."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Any):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.preprocess(load_image(self.items[index].path)), ""
        except Exception as e:  # any decoder error on any file format means "skip this file", never "stop the run"
            return index, None, f"{type(e).__name__}: {e}"


def collate_images(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, px) for i, px, _ in batch if px is not None]
    failed = [(i, reason) for i, px, reason in batch if px is None]
    pixels = torch.stack([px for _, px in good]) if good else None
    return [i for i, _ in good], pixels, failed


def _single_threaded_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; several torch thread pools per worker only oversubscribe the CPU


def worker_chunk(batch_size: int, num_workers: int) -> int:
    """Images per worker task: batch_size split over at least num_workers tasks (a divisor, so that whole
    chunks make whole batches)."""
    if num_workers <= 1:
        return batch_size
    if num_workers >= batch_size:
        return 1
    parts = next(d for d in range(num_workers, batch_size + 1) if batch_size % d == 0)
    return batch_size // parts


def image_batches(
    items: Sequence[ImageItem], preprocess: Any, batch_size: int, num_workers: int, pin_memory: bool = False
) -> Iterator[tuple[list[int], list[torch.Tensor], list[tuple[int, str]]]]:
    """Batches (indices into items, pixel chunks [b, C, H, W] making up [B, C, H, W], [(index, reason)] of skipped
    files), in input order. Each worker decodes a chunk of the batch, not a whole batch: the first batch (and the
    last) then takes one chunk's time, not batch_size images decoded by a single worker while the rest wait."""
    chunk = worker_chunk(batch_size, num_workers)
    loader = DataLoader(
        ImageFiles(items, preprocess), batch_size=chunk, num_workers=num_workers, collate_fn=collate_images,
        worker_init_fn=_single_threaded_worker if num_workers else None, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,  # 4 chunks a worker: at least a batch in flight (parts >= workers)
        persistent_workers=False,
    )
    indices: list[int] = []
    pixels: list[torch.Tensor] = []
    failed: list[tuple[int, str]] = []
    chunks = 0
    for chunk_indices, chunk_pixels, chunk_failed in loader:
        indices += chunk_indices
        failed += chunk_failed
        pixels += [chunk_pixels] if chunk_pixels is not None else []
        chunks += 1
        if chunks * chunk >= batch_size:
            yield indices, pixels, failed
            indices, pixels, failed, chunks = [], [], [], 0
    if chunks:
        yield indices, pixels, failed


# ------------------------------------------------------------------------------------------- encoding


def _skip_log(writer: StoreWriter):
    # Rewritten on every run: skipped items never enter the store, so a rerun retries and re-lists them.
    return open(writer.root / "skipped.jsonl", "w", encoding="utf-8")


def embed_images(
    items: Sequence[ImageItem], encoder: Encoder, writer: StoreWriter, batch_size: int = 256, num_workers: int = 4
) -> dict:
    """Encode every item not yet in the store; returns the summary (also stored in the manifest)."""
    todo = [it for it in items if it.id not in writer.done_ids]
    delay = float(os.environ.get(BATCH_DELAY_ENV, 0))
    start, encoded, skipped = time.perf_counter(), 0, 0
    with _skip_log(writer) as log, tqdm(total=len(todo), desc="images", unit="img") as bar:
        batches = image_batches(todo, encoder.preprocess, batch_size, num_workers, encoder.device.type == "cuda")
        for indices, pixels, failed in batches:
            for index, reason in failed:
                log.write(json.dumps({"id": todo[index].id, "path": todo[index].source, "reason": reason}) + "\n")
            if indices:
                writer.add([todo[i].id for i in indices], encoder.encode_pixels(pixels), [todo[i].source for i in indices])
            encoded, skipped = encoded + len(indices), skipped + len(failed)
            bar.update(len(indices) + len(failed))
            if delay:
                time.sleep(delay)
    return _close(writer, len(items), len(items) - len(todo), encoded, skipped, time.perf_counter() - start)


def embed_texts(items: Sequence[TextItem], encoder: Encoder, writer: StoreWriter, batch_size: int = 256) -> dict:
    todo = [it for it in items if it.id not in writer.done_ids]
    delay = float(os.environ.get(BATCH_DELAY_ENV, 0))
    start, encoded, skipped = time.perf_counter(), 0, 0
    with _skip_log(writer) as log, tqdm(total=len(todo), desc="texts", unit="text") as bar:
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            kept = [(it.id, it.text.strip()) for it in chunk if it.text.strip()]
            for it in chunk:
                if not it.text.strip():
                    log.write(json.dumps({"id": it.id, "reason": "empty or whitespace-only text"}) + "\n")
            if kept:
                captions = [text for _, text in kept]
                writer.add([i for i, _ in kept], encoder.encode_texts(captions, batch_size), captions)
            encoded, skipped = encoded + len(kept), skipped + len(chunk) - len(kept)
            bar.update(len(chunk))
            if delay:
                time.sleep(delay)
    return _close(writer, len(items), len(items) - len(todo), encoded, skipped, time.perf_counter() - start)


def _close(writer: StoreWriter, inputs: int, resumed: int, encoded: int, skipped: int, seconds: float) -> dict:
    summary = {
        "inputs": inputs, "resumed": resumed, "encoded": encoded, "skipped": skipped,
        "seconds": round(seconds, 3), "items_per_s": round(encoded / seconds, 1) if seconds > 0 else None,
    }
    manifest = writer.close(summary=summary)
    summary["stored"] = manifest["count"]
    return summary


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image_embed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", help="folder, .txt list of paths, or .json/.jsonl records {id, image}")
    parser.add_argument("--texts", help=".txt (one per line), .jsonl records {id, text|caption}, or .json list")
    parser.add_argument("--data_json", help='official layout {"images": [{"id", "image"}], "texts": [{"id", "text"}]}')
    parser.add_argument("--image_root", help="folder that relative image paths in list/JSON files start from")
    parser.add_argument("--encoder", required=True, help="hf:ORG/NAME, a local HF folder, open_clip:ARCH/TAG, llm2clip:...")
    parser.add_argument("--out", required=True, help="output folder; stores go to OUT/image and OUT/text")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=200_000)
    parser.add_argument("--num_workers", type=int, default=min(16, max(1, (os.cpu_count() or 2) - 1)),
                        help="DataLoader workers decoding images while the main process encodes (0: decode inline)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on CUDA), float32, bfloat16, float16")
    parser.add_argument("--store_dtype", default="float16", choices=["float16", "float32"], help="dtype of stored embeddings")
    parser.add_argument("--max_items", type=int, help="embed at most this many images and this many texts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store made with another encoder/dim")
    return parser


def run(args: argparse.Namespace) -> dict:
    if not (args.images or args.texts or args.data_json):
        raise InputError("nothing to embed: give --images, --texts and/or --data_json")
    images, texts = read_data_json(args.data_json, args.image_root) if args.data_json else ([], [])
    if args.images:
        images += read_images(args.images, args.image_root)
    if args.texts:
        texts += read_texts(args.texts)
    check_unique_ids([it.id for it in images], "images")  # before any model is loaded or row encoded
    check_unique_ids([it.id for it in texts], "texts")
    if args.max_items is not None:
        images, texts = images[: args.max_items], texts[: args.max_items]

    encoder = load_encoder(args.encoder, args.device, args.dtype, args.batch_size)
    out = Path(args.out)
    # Open both stores first, so a store made with another encoder is refused before anything is encoded.
    writers = {
        kind: StoreWriter(out / kind, kind, encoder.name, encoder.dim, args.store_dtype, args.shard_size, args.overwrite)
        for kind, todo in (("image", images), ("text", texts)) if todo
    }
    summary: dict[str, Any] = {"encoder": encoder.name, "dim": encoder.dim}
    try:
        if images:
            summary["image"] = embed_images(images, encoder, writers["image"], args.batch_size, args.num_workers)
        if texts:
            summary["text"] = embed_texts(texts, encoder, writers["text"], args.batch_size)
    finally:
        for writer in writers.values():
            writer.shutdown()
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"encoder {summary['encoder']} (dim {summary['dim']})"]
    for kind in ("image", "text"):
        if kind in summary:
            s = summary[kind]
            lines.append(
                f"{kind:5s}: {s['inputs']} inputs, {s['encoded']} encoded, {s['resumed']} already stored, "
                f"{s['skipped']} skipped, {s['stored']} in store, {s['items_per_s']} items/s"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (InputError, StoreError, OSError, ImportError) as e:  # OSError: a model or file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
