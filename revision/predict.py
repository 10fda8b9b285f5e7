"""Ask a checkpoint about images from the command line; answer a question file; score the answers.

    python -m revision.predict --model CKPT --image cat.png --prompt "what colour is it ?"
    python -m revision.predict --model CKPT --embedding cat.npy --prompt "..."      # a precomputed [D] embedding
    python -m revision.predict --model CKPT --questions q.jsonl --image_root IMAGES --answers answers.jsonl \\
        [--references refs.jsonl --task mc|yesno|short|caption]                   # score right away

Question files are JSONL (or a JSON list), one object per question: {"question_id", "text", and one of
  "image": a path (relative ones resolve against --image_root, default the question file's folder); with
           --embed_folder, first looked up in that image store by id, then by image path;
  "embedding": a list of floats (a raw image embedding), or an id in --embed_folder;
  neither: a text-only question}.
answers.jsonl gets {"question_id", "prompt", "text"} per question, or {"question_id", "prompt", "error"} when
its image is missing or unreadable; the run goes on and the summary counts the errors. Answers are
written batch by batch, in question order. revision.evaluate reads this file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from revision.data import EmbeddingTable
from revision.errors import report
from revision.eval_tasks import TASKS, task_help
from revision.evaluate import evaluate_files
from revision.infer import Predictor, Visual
from revision.records import read_dicts


def read_questions(path: str | Path) -> list[dict]:
    """Question rows, each checked for a question_id and a string text (errors name the file and row)."""
    questions, seen = read_dicts(path), set()
    for row, q in enumerate(questions):
        if "question_id" not in q:
            raise ValueError(f"{path}: row {row} has no question_id")
        if not isinstance(q.get("text"), str):
            raise ValueError(f"{path}: row {row} (question_id {q['question_id']!r}) has no string 'text'")
        if str(q["question_id"]) in seen:
            raise ValueError(f"{path}: row {row}: question_id {q['question_id']!r} appears twice")
        seen.add(str(q["question_id"]))
    return questions


def store_embedding(table: EmbeddingTable, key: str) -> np.ndarray:
    """The raw embedding of an id (or image path) in an image store."""
    row = int(table.lookup([key])[0])
    if row < 0:
        raise LookupError(f"{key!r} is not an id or image path in {table.root}")
    if table.is_bad([row])[0]:
        raise ValueError(f"{key!r}: unusable embedding in {table.describe(row)}")
    return table[row]


def question_visual(question: dict, image_root: Path, table: EmbeddingTable | None) -> Visual:
    """What a question asks about: an embedding (inline or from the store), an image path, or None."""
    embedding, image = question.get("embedding"), question.get("image")
    if isinstance(embedding, str):
        if table is None:
            raise ValueError(f"'embedding' {embedding!r} is an id, but no --embed_folder was given")
        return store_embedding(table, embedding)
    if embedding is not None:
        return np.asarray(embedding, dtype=np.float32)
    if image is None:
        return None
    if table is not None:
        try:
            return store_embedding(table, str(image))
        except LookupError:
            pass  # not in the store: a file then
    return image_root / str(image)


def answer_questions(predictor: Predictor, questions: list[dict], answers_path: Path, image_root: Path,
                     table: EmbeddingTable | None = None, batch_size: int = 8, **options: Any) -> dict:
    """Answer every question into answers_path (JSONL); a question whose visual fails is recorded as an error."""
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    counts, first_error, start = {"questions": len(questions), "answered": 0, "errors": 0}, None, time.time()
    with open(answers_path, "w", encoding="utf-8") as out:
        for lo in range(0, len(questions), batch_size):
            rows, good, visuals = [], [], []
            for q in questions[lo:lo + batch_size]:
                row = {"question_id": q["question_id"], "prompt": q["text"]}
                try:
                    visuals.append(predictor.prepare(question_visual(q, image_root, table)))
                    good.append(row)
                except (ValueError, LookupError, OSError) as e:
                    row["error"] = str(e)
                    counts["errors"] += 1
                    first_error = first_error or f"question {q['question_id']!r}: {e}"
                rows.append(row)
            texts = predictor.answer_batch([r["prompt"] for r in good], visuals, batch_size=batch_size, **options) if good else []
            for row, text in zip(good, texts):
                row["text"] = text
            counts["answered"] += len(good)
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            out.flush()
    return {**counts, "answers": str(answers_path), "seconds": round(time.time() - start, 2),
            **({"first_error": first_error} if first_error else {})}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m revision.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (holds revision_config.json)")
    one = parser.add_argument_group("one question")
    one.add_argument("--image", help="image file")
    one.add_argument("--embedding", help=".npy file holding a precomputed [D] image embedding")
    one.add_argument("--prompt", default="", help="the question (ignored by a plain-template captioning checkpoint)")
    many = parser.add_argument_group("a question file")
    many.add_argument("--questions", help="JSONL of {question_id, text, image | embedding}")
    many.add_argument("--answers", default="answers.jsonl", help="where answers go (JSONL)")
    many.add_argument("--image_root", help="folder relative image paths resolve against (default: the question file's)")
    many.add_argument("--embed_folder", help="image store holding precomputed embeddings (by id or image path)")
    many.add_argument("--mapped", action="store_true",
                      help="the embeddings are in the projector's input space already (a text store aligned by "
                           "embed_mean.py): skip the checkpoint's image_map, e.g. to caption synthetic image embeddings")
    many.add_argument("--references", help="score the answers against this file right away (revision.evaluate)")
    many.add_argument("--task", choices=tuple(TASKS), help=f"the scorer --references needs ({task_help()})")
    many.add_argument("--metrics", help="metrics JSON (default: next to --answers)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top_p", type=float, default=1.0)
    gen.add_argument("--num_beams", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0, help="for sampling (temperature > 0)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=8)
    add_loading_arguments(run)
    return parser


def add_loading_arguments(group: argparse._ActionsContainer) -> None:
    """How a checkpoint is loaded (revision.serve takes the same flags)."""
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on CUDA), float32, bfloat16, float16")
    group.add_argument("--encoder", help="override the encoder the checkpoint names (e.g. its folder moved)")
    group.add_argument("--base_model", help="override the base LLM of a LoRA / projector-only checkpoint")
    group.add_argument("--trust_remote_code", action="store_true",
                       help="let a Hugging Face encoder folder run the Python it ships (its config's auto_map); off: such an "
                            "encoder is refused (LLM2CLIP and open_clip run none, and never need it)")
    group.add_argument("--no_verify", action="store_true",
                       help="load the checkpoint without checking its files' sha256 against its manifest")


def load_predictor(args: argparse.Namespace) -> Predictor:
    """The checkpoint --model, loaded as the add_loading_arguments flags say."""
    return Predictor(args.model, args.device, args.dtype, encoder=args.encoder, base_model=args.base_model,
                     trust_remote_code=args.trust_remote_code, verify=not args.no_verify)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.questions) == bool(args.image or args.embedding):
        parser.error("give either --questions FILE, or --image / --embedding with --prompt")
    if args.references and not args.task:
        parser.error("--references needs --task")
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   num_beams=args.num_beams, mapped=args.mapped)
    torch.manual_seed(args.seed)
    try:
        predictor = load_predictor(args)
        if not args.questions:
            visual = np.load(args.embedding) if args.embedding else args.image
            print(predictor.answer(args.prompt, predictor.prepare(visual), **options))
            return 0
        questions = read_questions(args.questions)
        table = EmbeddingTable(args.embed_folder) if args.embed_folder else None
        image_root = Path(args.image_root) if args.image_root else Path(args.questions).parent
        if table is None and any(q.get("image") is not None and q.get("embedding") is None for q in questions):
            predictor.encoder  # noqa: B018 (a property: loads it now, so an encoder that does not fit fails before any answer)
        summary = answer_questions(predictor, questions, Path(args.answers), image_root, table, args.batch_size, **options)
        print(json.dumps(summary), file=sys.stderr)
        if args.references:
            metrics = evaluate_files(args.answers, args.references, args.task)
            metrics_path = Path(args.metrics or Path(args.answers).with_suffix(".metrics.json"))
            metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
            print(json.dumps({k: metrics[k] for k in ("task", "n", "answered", "errors", "accuracy") if k in metrics}))
    except (ValueError, LookupError, OSError) as e:  # bad checkpoint (CheckpointError), question file or references: one line
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
