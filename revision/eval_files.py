"""Reading answer and reference files for revision.evaluate: JSONL rows keyed by question_id, each located as
"file:line" so that every message names the file and the line (the format: revision/evaluate.py's docstring)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from revision.errors import InputError
from revision.records import RecordsError, located_records


class EvalError(InputError):
    """A malformed answer or reference file; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSONL file (or JSON list) as ("file:line", object); every object must carry a question_id."""
    try:
        rows = located_records(path)
    except RecordsError as e:
        raise EvalError(str(e)) from None
    for where, row in rows:
        if not isinstance(row, dict) or "question_id" not in row:
            raise EvalError(f"{where}: expected a JSON object with a question_id")
    return rows


def keyed_rows(rows: list[tuple[str, dict]]) -> dict[str, tuple[str, dict]]:
    """question_id (as a string: 7 and "7" are one question) -> ("file:line", row); a repeated id is an error."""
    keyed: dict[str, tuple[str, dict]] = {}
    for where, row in rows:
        qid = str(row["question_id"])
        if qid in keyed:
            raise EvalError(f"{where}: question_id {qid!r} already given at {keyed[qid][0]}")
        keyed[qid] = (where, row)
    return keyed


def load_answers(path: str | Path) -> dict[str, str | None]:
    """question_id -> answer text, or None for an answer recorded as an error."""
    answers = {}
    for qid, (where, row) in keyed_rows(read_jsonl(path)).items():
        if row.get("error"):
            answers[qid] = None
        elif isinstance(row.get("text"), str):
            answers[qid] = row["text"]
        else:
            raise EvalError(f"{where}: answer {qid!r} has neither a string 'text' nor an 'error'")
    return answers




def reference_rows(path: str | Path) -> Iterator[tuple[dict, dict, list[str] | None, str]]:
    """Each reference row checked for the fields every task reads, as (common fields {"question_id", "category",
    "image_id"}, the raw row, its answers as a list of strings or None, "file:line")."""
    for qid, (where, row) in keyed_rows(read_jsonl(path)).items():
        ref = {"question_id": qid, "category": str(row.get("category", "all")), "image_id": row.get("image_id")}
        answers = row.get("answers", row.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if isinstance(answers, list):  # VQA files give [{"answer": ...}] as often as plain strings
            answers = [a["answer"] if isinstance(a, dict) and "answer" in a else a for a in answers]
        if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise EvalError(f"{where}: 'answer'/'answers' must be a string or a list of strings")
        for key in ("options", "attributes"):
            if not isinstance(row.get(key) or {}, dict):
                raise EvalError(f"{where}: '{key}' must be an object like {{\"A\": \"red\"}}")
        yield ref, row, answers, where
