"""Score benchmark answers against references: multiple choice, yes/no, short answer and captions.

    python -m revision.evaluate --answers answers.jsonl --references refs.jsonl --task mc --out metrics.json

(The files are read by revision/eval_files.py; the tasks, each a reference reader and a scorer, are registered in
revision/eval_tasks.py; the rules they apply are written out here.)

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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from revision.errors import report
from revision.eval_files import EvalError, load_answers, reference_rows
from revision.eval_tasks import TASKS, task_help

logger = logging.getLogger(__name__)


def load_references(path: str | Path, task: str) -> list[dict]:
    """References checked and reduced to what `task` scores: {"question_id", "category", "target", ...}."""
    reference = TASKS.lookup(task).reference
    return [reference(ref, row, answers, where) for ref, row, answers, where in reference_rows(path)]


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
    """`evaluate` on an answers file and a references file; the metrics name both files."""
    metrics = evaluate(load_answers(answers), load_references(references, task), task, **options)
    return {**metrics, "answers_file": str(answers), "references_file": str(references)}


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
        return report(e)
    if args.strict and (metrics["missing"] or metrics["extra"]):
        return report(f"{args.answers} vs {args.references}: answer ids do not match reference ids (--strict)", code=3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    headline = {k: metrics[k] for k in ("task", "n", "answered", "errors", "missing", "accuracy") if k in metrics}
    print(json.dumps(headline), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
