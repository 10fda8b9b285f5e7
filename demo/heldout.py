"""More held-out questions for a finished demo run, each score with its binomial standard error.

The demo's held-out set (150 images, 300 questions) asks about 50 questions a category, 25 of them on two-object
scenes: a binomial SE of 0.06-0.10 a category, so recipe differences smaller than that are noise there
(docs/results.md, "Three hundred questions are too few"). This draws the run's eval streams further (the run's own
eval images are their first), embeds the new images with the run's encoder, lets each stage-2 checkpoint answer,
and scores the answers by category and by the scene's number of objects, each with n and SE.

    python -m demo.heldout --run OUT/seed-0 --images 1000            # every row's stage-2 checkpoint of the run
    python -m demo.heldout --run OUT/seed-0 --images 1000 --checkpoint NAME=FOLDER ...

Written to RUN/heldout-N/: the extra world files, their image store (emb/), answers_NAME.jsonl, scores.json.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from demo.pipeline import qa_arguments
from demo.report import binomial_se, qa_binding
from demo.world import write_more_eval
from revision import predict
from revision.embed import main as image_embed
from revision.errors import InputError, exit_with

CATEGORIES = ("colour", "shape", "size", "position", "count", "yes/no")


def prepare(run_dir: Path, images: int) -> Path:
    """RUN/heldout-N with the extra world files and their image store (made once; a killed run is completed)."""
    return drawn_further(run_dir, f"heldout-{images}", lambda world, out: write_more_eval(world, images, out),
                         "eval_images.jsonl")


def check_run(run_dir: Path) -> None:
    if not (run_dir / "world" / "world.json").is_file() or not (run_dir / "clip").is_dir():
        raise InputError(f"{run_dir}: not a seed folder of demo.pipeline (no world/world.json or clip/)")


def drawn_further(run_dir: Path, folder: str, write: Callable[[Path, Path], object], images: str) -> Path:
    """RUN/FOLDER: written once by write(RUN/world, RUN/FOLDER) (its world.json last), then the image list `images`
    in it embedded into RUN/FOLDER/emb with the run's encoder, as the run embedded its own. image_embed.py resumes a
    store: a finished one is kept, a killed one completed."""
    check_run(run_dir)
    out = run_dir / folder
    if not (out / "world.json").is_file():
        write(run_dir / "world", out)
    code = image_embed(["--encoder", str(run_dir / "clip"), "--store_dtype", "float32", "--num_workers", "0",
                        "--images", str(out / images), "--out", str(out / "emb")])
    if code:
        raise InputError(f"embedding {out / images} with {run_dir / 'clip'} failed (exit {code})")
    return out


def with_se(accuracy: float, n: int) -> dict[str, float]:
    return {"accuracy": accuracy, "n": n, "se": binomial_se(accuracy, n)}


def score(folder: Path, answers: Path) -> dict[str, Any]:
    """Accuracy overall, per category and per category and number of objects, each with n and binomial SE."""
    metrics = json.loads(answers.with_suffix(".metrics.json").read_text())
    binding = qa_binding(answers, folder)
    return {"all": with_se(metrics["accuracy"], metrics["answered"]),
            **{c: with_se(v["accuracy"], v["n"]) for c, v in sorted(metrics["per_category"].items())},
            **{k: with_se(binding["accuracy"][k], binding["n"][k]) for k in binding["accuracy"]}}


def answer(folder: Path, name: str, checkpoint: Path, batch_size: int, max_new_tokens: int) -> Path:
    answers = folder / f"answers_{name}.jsonl"
    code = predict.main(["--image_root", str(folder), "--embed_folder", str(folder / "emb" / "image"), "--batch_size",
                         str(batch_size), *qa_arguments(folder / "eval_questions.jsonl", checkpoint, max_new_tokens),
                         "--answers", str(answers)])
    if code:
        raise InputError(f"answering with {checkpoint} failed (exit {code})")
    return answers


def table(scores: dict[str, dict[str, Any]]) -> str:
    """Markdown: a row per checkpoint, accuracy ± SE per column (n in the header)."""
    first = next(iter(scores.values()))
    keys = ["all", *(c for c in CATEGORIES if c in first), *(k for k in first if ", " in k)]
    lines = ["| checkpoint | " + " | ".join(f"{k} (n {first[k]['n']})" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{s[k]['accuracy']:.3f} ± {s[k]['se']:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a seed folder of demo.pipeline (OUT/seed-N)")
    parser.add_argument("--images", type=int, default=1000, help="held-out images to add (2 questions each)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=FOLDER",
                        help="a checkpoint to score (default: every RUN/runs/ROW/stage2)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    try:
        if args.images < 1:
            raise InputError(f"--images {args.images}: expected at least 1")
        check_run(run_dir)
        bad = [c for c in args.checkpoint if "=" not in c]
        if bad:
            raise InputError(f"--checkpoint {bad[0]!r}: expected NAME=FOLDER")
        checkpoints = dict(c.split("=", 1) for c in args.checkpoint) or {
            p.parent.name: str(p) for p in sorted(run_dir.glob("runs/*/stage2")) if p.is_dir()}
        if not checkpoints:
            raise InputError(f"{run_dir}: no stage-2 checkpoint under runs/*/stage2; name one with --checkpoint")
        folder = prepare(run_dir, args.images)
        scores = {name: score(folder, answer(folder, name, Path(path), args.batch_size, args.max_new_tokens))
                  for name, path in checkpoints.items()}
    except (InputError, ValueError, OSError) as e:
        exit_with(e, prog=parser.prog)
    (folder / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    print(f"{args.images} more held-out images of {run_dir} ({folder}):\n\n{table(scores)}")


if __name__ == "__main__":
    main()
