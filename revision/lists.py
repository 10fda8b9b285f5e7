"""The list readers: image and text lists (.txt, .json, .jsonl, a folder of images) and the official repo's data
JSON, read whole into items. Both the input formats (revision/inputs.py, the `list` and `folder` readers) and the CLI
(revision/embed.py, --data_json) import them from here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revision.errors import InputError
from revision.records import RecordsError, read_records


@dataclass(frozen=True)
class ImageItem:
    id: str
    path: Path    # where to open it
    source: str   # what the store records: the path as the input gave it


@dataclass(frozen=True)
class TextItem:
    id: str
    text: str


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
    lines = [line.strip() for line in images.read_text(encoding="utf-8-sig").splitlines()]  # -sig: a BOM is no path
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
    # utf-8-sig: a byte-order mark (Windows editors) is not part of the first text
    return [TextItem(str(n), line) for n, line in enumerate(texts.read_text(encoding="utf-8-sig").splitlines(), 1)]


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
