"""One reader for the project's JSON and JSONL inputs (data files, question/answer/reference files, input lists).

A `.jsonl` file holds one JSON value per line (blank lines skipped). Any other file is one JSON document
when its text starts with `[` (a list of records) or when `document=True`; else it is read as JSONL too,
so a LLaVA data file named `.json` may be either. Errors name the file and line: bad JSON, bytes that
are not UTF-8 (a byte-order mark is allowed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RecordsError(ValueError):
    """A JSON / JSONL file that cannot be read; the message names the file and line."""


def _text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise RecordsError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})") from None


def _document(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordsError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def located_records(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """(where, value) per record: where is "FILE:LINE" for a JSONL line, "FILE: record N" (from 1) in a JSON list."""
    path = Path(path)
    text = _text(path)
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        records = _document(path, text)
        return [(f"{path}: record {n}", value) for n, value in enumerate(records, 1)]
    if path.suffix != ".jsonl" and text.lstrip().startswith("{"):
        _refuse_wrapped_list(path, text)
    located = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                located.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise RecordsError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
    return located


def _refuse_wrapped_list(path: Path, text: str) -> None:
    """A .json document that is one object holding a list ({"data": [...]}) is not a list of records: say so, rather
    than read the object as the only record."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return  # JSONL (several lines of objects): read line by line
    lists = [key for key, value in whole.items() if isinstance(value, list) and value and isinstance(value[0], dict)]
    if isinstance(whole, dict) and lists:
        raise RecordsError(f"{path}: a JSON object (keys {', '.join(map(repr, list(whole)[:5]))}), expected a list of records "
                           f"(a JSON array, or JSONL: one record a line); are the records under {lists[0]!r}?")


def read_records(path: str | os.PathLike, document: bool = False) -> Any:
    """The records of a JSON list or JSONL file (a list); with `document`, a `.json` file's whole value
    (a list, or e.g. an object holding lists)."""
    path = Path(path)
    if document and path.suffix != ".jsonl":
        return _document(path, _text(path))
    return [value for _, value in located_records(path)]


def read_dicts(path: str | os.PathLike) -> list[dict]:
    """Records that must all be JSON objects (samples, questions); anything else is an error naming it."""
    records = []
    for where, value in located_records(path):
        if not isinstance(value, dict):
            raise RecordsError(f"{where}: a {type(value).__name__}, expected a JSON object")
        records.append(value)
    return records
