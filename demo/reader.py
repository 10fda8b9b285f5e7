"""How much supervision reading a two-object scene takes: a stand-in for the model's conditional reading.

    python -m demo.reader --world WORLD_DIR --train EMBEDS/unpaired/image --eval EMBEDS/eval/image
                          [--images N] [--per_image K] [--epochs 60]

The held-out questions the demo misses are conditional ("what colour is the star?", "which shape is the object on the
left?"): on a two-object scene the answer is the asked attribute of the object that the question's other attribute
names. demo.probes says whether each object's attributes are in the embedding (by reading-order slot); this says
whether a reader can *use* them from as many images as stage 2 has. The reader is an MLP (embedding standardised as the
projector's input is, plus the question: the naming attribute's value one-hot and which attribute is asked) trained on
every such question of the first N images' two-object scenes (or K of them per image, as a conversation asks few), and
scored on every such question of the eval store's scenes. It is cheaper than the LLM by orders of magnitude and reads
about as well as stage 2's model does from the same 1000 images (docs/results.md, "Binding: what the reader needs"), so
it measures an encoder, or a number of instruction images, in seconds.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo.clip import ATTRIBUTES
from demo.probes import store_scenes
from revision.projector import input_statistics

ASKED = ("colour", "shape")  # the categories the demo's bar names
QUERY_WIDTH = sum(len(v) for v in ATTRIBUTES.values()) + len(ASKED)
ANSWERS = [*(("colour", v) for v in ATTRIBUTES["colour"]), *(("shape", v) for v in ATTRIBUTES["shape"])]


def binding_questions(embeds: np.ndarray, scenes: Sequence[dict], per_image: int | None = None,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(embedding rows [n, D], queries [n, QUERY_WIDTH], answers [n] into ANSWERS, asked [n]) of every conditional
    question on the two-object scenes: per object, per attribute that tells it from the other object, per asked
    attribute (colour, shape) other than that one. `per_image`: keep that many of an image's, drawn at random."""
    kinds, rng = list(ATTRIBUTES), np.random.default_rng(seed)
    offsets = np.cumsum([0, *(len(v) for v in ATTRIBUTES.values())])
    rows: list[tuple[int, np.ndarray, int, str]] = []
    for index, scene in enumerate(scenes):
        if scene["count"] != 2:
            continue
        mine, (first, second) = [], scene["objects"]
        for target, other in ((first, second), (second, first)):
            for by in kinds:
                if target[by] == other[by]:  # this attribute does not single the object out
                    continue
                for asked in ASKED:
                    if asked == by:
                        continue
                    query = np.zeros(QUERY_WIDTH, np.float32)
                    query[offsets[kinds.index(by)] + ATTRIBUTES[by].index(target[by])] = 1
                    query[-len(ASKED) + ASKED.index(asked)] = 1
                    mine.append((index, query, ANSWERS.index((asked, target[asked])), asked))
        if per_image is not None and len(mine) > per_image:
            mine = [mine[i] for i in sorted(rng.choice(len(mine), per_image, replace=False))]
        rows += mine
    if not rows:
        raise ValueError("no two-object scenes to ask about")
    index, queries, answers, asked = zip(*rows)
    return embeds[list(index)], np.stack(queries), np.array(answers), np.array(asked)


def reader_accuracy(train_embeds: np.ndarray, train_scenes: Sequence[dict], eval_embeds: np.ndarray,
                    eval_scenes: Sequence[dict], per_image: int | None = None, epochs: int = 60, hidden: int = 512,
                    seed: int = 0) -> dict[str, float]:
    """{"colour", "shape": held-out accuracy, "train": accuracy on its own rows, "train_rows", "eval_rows"} of a reader
    trained on train_embeds' conditional questions (AdamW 1e-3, batch 64)."""
    x, q, y, _ = binding_questions(train_embeds, train_scenes, per_image, seed)
    xe, qe, ye, asked = binding_questions(eval_embeds, eval_scenes)
    mean, scale = input_statistics(train_embeds)  # as the projector standardises its input

    def inputs(e: np.ndarray, query: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([(e - mean) / scale, query], 1).astype(np.float32))

    train_x, eval_x, train_y = inputs(x, q), inputs(xe, qe), torch.from_numpy(y)
    torch.manual_seed(seed)
    reader = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                 torch.nn.GELU(), torch.nn.Linear(hidden, len(ANSWERS)))
    optimizer = torch.optim.AdamW(reader.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x)).split(64):
            loss = F.cross_entropy(reader(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        right = reader(eval_x).argmax(1).numpy() == ye
        train = float((reader(train_x).argmax(1) == train_y).float().mean())
    return {**{k: float(right[asked == k].mean()) for k in ASKED}, "train": train, "train_rows": len(y), "eval_rows": len(ye)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by demo.world")
    parser.add_argument("--train", required=True, help="an image embedding store of the world's scenes: the reader learns here")
    parser.add_argument("--eval", required=True, help="an image embedding store of other scenes: the reader is scored here")
    parser.add_argument("--images", type=int, help="train on the first N images of --train (default: all)")
    parser.add_argument("--per_image", type=int, help="at most K questions per image (default: every one)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    train, train_scenes = store_scenes(args.train, args.world, args.images)
    held_out, eval_scenes = store_scenes(args.eval, args.world)
    result = reader_accuracy(train, train_scenes, held_out, eval_scenes, args.per_image, args.epochs, seed=args.seed)
    print(f"binding reader ({len(train)} images, {result['train_rows']} questions; scored on {result['eval_rows']}): "
          f"colour {result['colour']:.3f}, shape {result['shape']:.3f} (own questions {result['train']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps({**vars(args), **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
