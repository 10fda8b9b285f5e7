"""The evaluation tasks: for each, what it reads from a reference row and how it scores the answers, and the
registry (TASKS) that revision.evaluate's CLI and revision.predict offer. The rules each scorer applies are written
out in revision/evaluate.py's docstring.

A new task is a reference function, a scorer and one TASKS entry, here (and its test).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from revision.answers import attribute_hits, extract_option, normalize_answer, parse_yes_no, plain_words, vqa_accuracy
from revision.caption_metrics import coco_caption_scores
from revision.eval_files import EvalError
from revision.registry import Registry

MME_PERCEPTION = frozenset(
    "existence count position color posters celebrity scene landmark artwork ocr".split()
)
MME_COGNITION = frozenset(
    "commonsense_reasoning numerical_calculation text_translation code_reasoning".split()
)


# ------------------------------------------------------------------------------- reading a reference

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


@dataclass(frozen=True)
class Task:
    """An evaluation task: `reference` reduces one reference row (its common fields, the raw row, its answers,
    "file:line") to what `score` needs; `score` turns [(reference, answer text or None)] into metrics."""

    help: str
    reference: Callable[[dict, dict, list[str] | None, str], dict]
    score: Callable[..., dict[str, Any]]


# The registry predict.py and revision.evaluate's CLI offer: a new task is one entry here (and its test).
TASKS: Registry[Task] = Registry("evaluation task")
TASKS.update({
    "mc": Task("multiple choice: the option letter", mc_reference, score_mc),
    "yesno": Task("yes/no: accuracy, POPE precision/recall/F1, MME scores", yesno_reference, score_yesno),
    "short": Task("short answer: VQA normalisation, soft accuracy with several answers", short_reference, score_short),
    "caption": Task("captions: BLEU/ROUGE-L/CIDEr and/or attribute match", caption_reference, score_caption),
})


def task_help() -> str:
    """One line per task for --task's help."""
    return "; ".join(f"{name}: {task.help}" for name, task in TASKS.items())
