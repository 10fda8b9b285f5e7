"""Score benchmark answers against references: multiple choice, yes/no, short answer and captions.

    python -m revision.evaluate --answers answers.jsonl --references refs.jsonl --task mc --out metrics.json

Both files are JSONL keyed by `question_id` (compared as strings, so 7 and "7" are one question):
  answers     {"question_id", "text"}, or {"question_id", "error": "..."} when prediction failed
  references  {"question_id", "answer" | "answers", "category"?, "options"? {"A": text, ...},
               "image_id"?, "attributes"? {attr: value}}
Every reference is one question. An answer recorded as an error (missing or corrupt image at
prediction time) and a reference with no answer at all both count as wrong; the summary counts them
("errors", "missing"). Answers to questions the references do not have are ignored and counted
("extra"). Accuracies are shares in [0, 1] over all references; MME scores use MME's 0-200 scale.

Multiple choice (`extract_option`; the valid letters are the reference's option keys, A-Z without
options). The first rule that yields one valid letter wins; a rule that yields several is skipped:
  1. the whole answer is a letter, possibly wrapped or followed by punctuation: "B", "(b)", "C.", "**D**";
  2. it starts with a letter and a delimiter: "A. red", "(B) blue", "c) ...", "D: ..."
     ("A red circle" does not count: there "A" is an article);
  3. an answer phrase: "The answer is C", "Answer: (d)", "Option B: ...", "the correct choice is A";
     after such a phrase a lowercase letter counts only when wrapped or followed by punctuation or the
     end ("the answer is a red circle" names no letter);
  4. option text instead of a letter (case- and punctuation-insensitive): the answer equals one option's
     text, or contains exactly one option's text as whole words (an option whose text is part of a
     longer matched option's text does not count: "dark red" is not also "red");
  5. exactly one uppercase option letter standing alone ("I think B is right"), as MMBench does,
     except "A" and "I" in answers of more than three words (article / pronoun).
  Nothing found: the answer is "unmatched" (wrong, counted).
Yes/no (`parse_yes_no`): the answer's first word, case- and punctuation-insensitive, is "yes" or "no"
("Yes.", "yes, it is", "No," count); anything else is "unknown" (wrong, counted; POPE's own script
would call "There is no dog" a no, we do not guess). POPE precision/recall/F1 take "yes" as positive.
MME score per category = acc + acc+ (both in %): acc over questions, acc+ over images whose questions
are all right (MME asks two per image); totals are sums over categories (perception and cognition
when the categories carry MME's names). Needs `image_id` on every reference.
Short answer (`normalize_answer`, the VQA evaluation's documented processing): lowercase; drop periods
except decimal points; drop commas between digits ("100,978" -> "100978"); every other punctuation
except apostrophe and colon becomes a space; number words zero-ten (and "none") become digits; the
articles a/an/the are dropped; common contractions written without the apostrophe get it back
("dont" -> "don't"). A reference "answer" is scored by exact match of the normalised strings;
"answers" (a list of human answers) by VQA accuracy: min(#humans who gave the answer / 3, 1),
averaged over the leave-one-out subsets of the humans as VQA does (VQA has 10 answers per question).
Captions: with reference captions ("answer" or "answers") and pycocoevalcap installed
(`pip install 'revision[eval]'`): BLEU-1..4, ROUGE-L and CIDEr-D as the COCO caption evaluation
computes them (PTB tokenizer when java is on PATH, else lowercase words; CIDEr needs many images: its
IDF comes from the evaluated references). With `attributes`: the share of attribute values that appear
as whole words in the caption, per attribute and overall, and the share of captions with all of them.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from revision.answers import (attribute_hits, extract_option, normalize_answer, parse_yes_no,  # noqa: F401 (API)
                              plain_words, vqa_accuracy)
from revision.records import RecordsError, located_records

MME_PERCEPTION = frozenset(
    "existence count position color posters celebrity scene landmark artwork ocr".split()
)
MME_COGNITION = frozenset(
    "commonsense_reasoning numerical_calculation text_translation code_reasoning".split()
)
logger = logging.getLogger(__name__)


class EvalError(ValueError):
    """A malformed answer or reference file; the message names the file and line."""


# ---------------------------------------------------------------------------------------- reading

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


def _keyed(rows: list[tuple[str, dict]]) -> dict[str, tuple[str, dict]]:
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
    for qid, (where, row) in _keyed(read_jsonl(path)).items():
        if row.get("error"):
            answers[qid] = None
        elif isinstance(row.get("text"), str):
            answers[qid] = row["text"]
        else:
            raise EvalError(f"{where}: answer {qid!r} has neither a string 'text' nor an 'error'")
    return answers


def load_references(path: str | Path, task: str) -> list[dict]:
    """References checked and reduced to what `task` scores: {"question_id", "category", "target", ...}."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASKS)}")
    refs = []
    for qid, (where, row) in _keyed(read_jsonl(path)).items():
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
        refs.append(TASKS[task].reference(ref, row, answers, where))
    return refs


def _answered(ref: dict, answers: list[str] | None, where: str) -> list[str]:
    if not answers:
        raise EvalError(f"{where}: reference {ref['question_id']!r} has no 'answer' or 'answers'")
    return answers


def mc_reference(ref: dict, row: dict, answers: list[str] | None, where: str) -> dict:
    options = {str(k).strip().upper(): str(v) for k, v in (row.get("options") or {}).items()}
    return {**ref, "options": options, "target": _reference_letter(_answered(ref, answers, where)[0], options, where)}


def yesno_reference(ref: dict, row: dict, answers: list[str] | None, where: str) -> dict:
    answer = _answered(ref, answers, where)[0]
    target = parse_yes_no(answer)
    if target is None:
        raise EvalError(f"{where}: yes/no reference {ref['question_id']!r} answer {answer!r} is neither yes nor no")
    return {**ref, "target": target}


def short_reference(ref: dict, row: dict, answers: list[str] | None, where: str) -> dict:
    return {**ref, "answers": _answered(ref, answers, where), "soft": "answers" in row}


def caption_reference(ref: dict, row: dict, answers: list[str] | None, where: str) -> dict:
    attributes = row.get("attributes") or {}
    if not answers and not attributes:
        raise EvalError(f"{where}: caption reference {ref['question_id']!r} has no 'answer(s)' and no 'attributes'")
    return {**ref, "captions": answers or [], "attributes": {str(k): str(v) for k, v in attributes.items()}}


def _reference_letter(answer: str, options: dict[str, str], where: str) -> str:
    letter = answer.strip().strip("().").upper()
    if letter in options or (not options and re.fullmatch(r"[A-Z]", letter)):
        return letter
    by_text = [k for k, v in options.items() if plain_words(v) == plain_words(answer)]
    if len(by_text) == 1:
        return by_text[0]
    raise EvalError(f"{where}: multiple-choice answer {answer!r} is not one of the options {sorted(options)}")



# ---------------------------------------------------------------------------------------- scoring

def _share(hits: Sequence[float]) -> float:
    return float(sum(hits) / len(hits)) if hits else 0.0


def _per_category(items: list[tuple[str, float]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for category, value in items:
        groups[category].append(value)
    return {c: {"n": len(v), "accuracy": _share(v)} for c, v in sorted(groups.items())}


def score_mc(pairs: list[tuple[dict, str | None]]) -> dict[str, Any]:
    items, unmatched = [], 0
    for ref, text in pairs:
        letter = None if text is None else extract_option(text, ref["options"])
        unmatched += text is not None and letter is None
        items.append((ref["category"], float(letter == ref["target"])))
    return {"accuracy": _share([v for _, v in items]), "unmatched": unmatched, "per_category": _per_category(items)}


def score_yesno(pairs: list[tuple[dict, str | None]]) -> dict[str, Any]:
    refs = [ref for ref, _ in pairs]
    preds = [None if text is None else parse_yes_no(text) for _, text in pairs]
    truth = [r["target"] for r in refs]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, truth))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, truth))
    tn = sum(p == "no" and t == "no" for p, t in zip(preds, truth))
    fn = sum(p != "yes" and t == "yes" for p, t in zip(preds, truth))  # a no, an unknown or no answer
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    correct = [float(p == t) for p, t in zip(preds, truth)]
    metrics = {
        "accuracy": _share(correct),
        "unknown": sum(text is not None and p is None for (_, text), p in zip(pairs, preds)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "yes_ratio": _share([p == "yes" for p in preds]),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "per_category": _per_category([(r["category"], c) for r, c in zip(refs, correct)]),
    }
    if refs and all(r["image_id"] is not None for r in refs):
        metrics["mme"] = mme_scores([(r["category"], str(r["image_id"]), c) for r, c in zip(refs, correct)])
    return metrics


def mme_scores(items: list[tuple[str, str, float]]) -> dict[str, Any]:
    """MME: per category acc (% of questions right) + acc+ (% of images with all their questions right)."""
    by_category: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for category, image_id, correct in items:
        by_category[category][image_id].append(correct)
    per_category = {}
    for category, images in sorted(by_category.items()):
        acc = 100 * _share([c for answers in images.values() for c in answers])
        acc_plus = 100 * _share([float(all(answers)) for answers in images.values()])
        per_category[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    scores = {c: v["score"] for c, v in per_category.items()}
    return {
        "per_category": per_category,
        "total": sum(scores.values()),
        "perception": sum(s for c, s in scores.items() if c.lower() in MME_PERCEPTION),
        "cognition": sum(s for c, s in scores.items() if c.lower() in MME_COGNITION),
    }


def score_short(pairs: list[tuple[dict, str | None]]) -> dict[str, Any]:
    items = []
    for ref, text in pairs:
        if text is None:
            value = 0.0
        elif ref["soft"]:
            value = vqa_accuracy(text, ref["answers"])
        else:
            value = float(normalize_answer(text) == normalize_answer(ref["answers"][0]))
        items.append((ref["category"], value))
    return {"accuracy": _share([v for _, v in items]), "per_category": _per_category(items)}


def score_caption(pairs: list[tuple[dict, str | None]], tokenizer: str = "auto") -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    with_attributes = [(ref, text or "") for ref, text in pairs if ref["attributes"]]
    if with_attributes:
        per_attribute: dict[str, list[bool]] = defaultdict(list)
        all_right = []
        for ref, text in with_attributes:
            hits = attribute_hits(text, ref["attributes"])
            for attr, hit in hits.items():
                per_attribute[attr].append(hit)
            all_right.append(all(hits.values()))
        metrics["attributes"] = {
            "n": len(with_attributes),
            "overall": _share([h for hits in per_attribute.values() for h in hits]),
            "all_correct": _share(all_right),
            "per_attribute": {a: _share(h) for a, h in sorted(per_attribute.items())},
        }
    with_captions = {ref["question_id"]: (ref["captions"], text or "") for ref, text in pairs if ref["captions"]}
    if with_captions:
        try:
            metrics["caption_metrics"] = coco_caption_scores(
                {q: c for q, (_, c) in with_captions.items()}, {q: r for q, (r, _) in with_captions.items()}, tokenizer
            )
        except ImportError as e:
            metrics["caption_metrics"] = None
            metrics["caption_metrics_note"] = f"{e}; pip install 'revision[eval]' for BLEU/ROUGE-L/CIDEr"
    return metrics


def coco_caption_scores(
    captions: dict[str, str], references: dict[str, list[str]], tokenizer: str = "auto"
) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, CIDEr-D from pycocoevalcap. tokenizer: "ptb" (needs java), "simple", or "auto"."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") else "simple"
    if tokenizer == "ptb":
        try:
            res, gts = _ptb_tokenize(captions), _ptb_tokenize(references)
        except (OSError, subprocess.CalledProcessError) as e:  # e.g. a read-only site-packages for its temp file
            logger.warning("PTB tokenizer failed (%s); using lowercase words", e)
            tokenizer = "simple"
    if tokenizer == "simple":
        res = {q: [plain_words(c)] for q, c in captions.items()}
        gts = {q: [plain_words(r) for r in refs] for q, refs in references.items()}
    elif tokenizer != "ptb":
        raise ValueError(f"unknown caption tokenizer {tokenizer!r}; expected auto, ptb or simple")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    return {**scores, "ROUGE-L": float(rouge), "CIDEr": float(cider), "n": len(captions), "tokenizer": tokenizer}


def _ptb_tokenize(texts: dict[str, str | list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    as_lists = {q: [t] if isinstance(t, str) else t for q, t in texts.items()}
    return PTBTokenizer().tokenize({q: [{"caption": t} for t in ts] for q, ts in as_lists.items()})


@dataclass(frozen=True)
class Task:
    """An evaluation task: `reference` reduces one reference row (its common fields, the raw row, its answers,
    "file:line") to what `score` needs; `score` turns [(reference, answer text or None)] into metrics."""

    help: str
    reference: Callable[[dict, dict, list[str] | None, str], dict]
    score: Callable[..., dict[str, Any]]


# The registry predict.py and this module's CLI offer: a new task is one entry here (and its test).
TASKS: dict[str, Task] = {
    "mc": Task("multiple choice: the option letter", mc_reference, score_mc),
    "yesno": Task("yes/no: accuracy, POPE precision/recall/F1, MME scores", yesno_reference, score_yesno),
    "short": Task("short answer: VQA normalisation, soft accuracy with several answers", short_reference, score_short),
    "caption": Task("captions: BLEU/ROUGE-L/CIDEr and/or attribute match", caption_reference, score_caption),
}


def evaluate(answers: dict[str, str | None], references: list[dict], task: str, **options: Any) -> dict[str, Any]:
    """Pair answers with references and score them; errors and missing answers count as wrong."""
    pairs = [(ref, answers.get(ref["question_id"])) for ref in references]
    summary = {
        "task": task,
        "n": len(references),
        "errors": sum(ref["question_id"] in answers and answers[ref["question_id"]] is None for ref in references),
        "missing": sum(ref["question_id"] not in answers for ref in references),
        "extra": len(set(answers) - {ref["question_id"] for ref in references}),
    }
    summary["answered"] = summary["n"] - summary["errors"] - summary["missing"]
    if summary["missing"] or summary["extra"]:
        logger.warning("answer ids do not match reference ids: %s", id_mismatch(answers, references))
    return {**summary, **TASKS[task].score(pairs, **options)}


def id_mismatch(answers: dict[str, str | None], references: list[dict]) -> str:
    """What differs between the answers' and the references' question ids, with examples ('' when nothing)."""
    wanted = [ref["question_id"] for ref in references]
    missing = [q for q in wanted if q not in answers]
    extra = sorted(set(answers) - set(wanted))
    if not missing and not extra:
        return ""
    return (f"{len(missing)} of {len(wanted)} references have no answer (e.g. {missing[:3]}) and {len(extra)} answers "
            f"match no reference (e.g. {extra[:3]}); the missing ones score 0. Were these answers made for these references?")


def evaluate_files(answers: str | Path, references: str | Path, task: str, **options: Any) -> dict[str, Any]:
    metrics = evaluate(load_answers(answers), load_references(references, task), task, **options)
    return {**metrics, "answers_file": str(answers), "references_file": str(references)}


def task_help() -> str:
    return "; ".join(f"{name}: {task.help}" for name, task in TASKS.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m revision.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--answers", required=True, help="answers JSONL ({question_id, text} or {question_id, error})")
    parser.add_argument("--references", required=True, help="references JSONL ({question_id, answer|answers, ...})")
    parser.add_argument("--task", required=True, choices=tuple(TASKS), help=task_help())
    parser.add_argument("--out", required=True, help="where to write the metrics JSON")
    parser.add_argument("--caption-tokenizer", default="auto", choices=("auto", "ptb", "simple"),
                        help="tokenizer for caption metrics: ptb needs java; auto uses it when java is found")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 3, no metrics written) when answer ids and reference ids do not match")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = {"tokenizer": args.caption_tokenizer} if args.task == "caption" else {}
    try:
        metrics = evaluate_files(args.answers, args.references, args.task, **options)
    except (EvalError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.strict and (metrics["missing"] or metrics["extra"]):
        print(f"error: {args.answers} vs {args.references}: answer ids do not match reference ids (--strict)", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    headline = {k: metrics[k] for k in ("task", "n", "answered", "errors", "missing", "accuracy") if k in metrics}
    print(json.dumps(headline), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
