"""How much supervision reading a two-object scene takes: a stand-in for the model's conditional reading.

    python -m demo.reader --world WORLD_DIR --train EMBEDS/unpaired/image --eval EMBEDS/eval/image
                          [--images N] [--per_image K] [--epochs 60 | --epochs 1,3,10,60] [--code objects|places|pairs]

The held-out questions the demo misses are conditional ("what colour is the star?", "which shape is the object on the
left?"): on a two-object scene the answer is the asked attribute of the object that the question's other attribute
names. demo.probes says whether each object's attributes are in the embedding (by reading-order slot); this says
whether a reader can *use* them from as many images as stage 2 has. The reader is an MLP (embedding standardised as the
projector's input is, plus the question: the naming attribute's value one-hot and which attribute is asked) trained on
every such question of the first N images' two-object scenes (or K of them per image, as a conversation asks few), and
scored on every such question of the eval store's scenes. It is cheaper than the LLM by orders of magnitude and reads
about as well as stage 2's model does from the same 1000 images (docs/results.md, "Binding: what the reader needs"), so
it measures an encoder, or a number of instruction images, in seconds.

`--code` replaces the stores' embeddings by a noise-free code of the same scenes (IDEAL_CODES: each object's
attributes in reading-order slots, what each grid cell holds, or which attribute pairs occur), rotated into the
embeddings' width: what the reader makes of a perfect code of each layout, after as many passes (`--epochs 1,3,10`
scores one training at each count), calibrates the real one (docs/results.md, "Any code is read late").
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
from demo.dual_encoder import CELL_ATTRIBUTES
from demo.probes import store_scenes
from demo.scenes import POSITIONS, Obj, reading_order
from revision.projector import input_statistics

ASKED = ("colour", "shape")  # the categories the demo's bar names
QUERY_WIDTH = sum(len(v) for v in ATTRIBUTES.values()) + len(ASKED)
ANSWERS = [*(("colour", v) for v in ATTRIBUTES["colour"]), *(("shape", v) for v in ATTRIBUTES["shape"])]


def _one_hots(obj: dict, kinds: Sequence[str]) -> np.ndarray:
    """The object's value of each kind, one-hot, concatenated in the order of `kinds`."""
    return np.concatenate([np.eye(len(ATTRIBUTES[k]), dtype=np.float32)[ATTRIBUTES[k].index(obj[k])] for k in kinds])


def object_code(scene: dict) -> np.ndarray:
    """Each object's attributes one-hot in its reading-order slot (zeros for a missing second object), and the count:
    every attribute bound to its object, the code a reader binds from most easily (docs/results.md, "A code by
    object")."""
    slots = [_one_hots(vars(o), ATTRIBUTES) for o in reading_order([Obj(**o) for o in scene["objects"]])]
    width = sum(len(v) for v in ATTRIBUTES.values())
    return np.concatenate([*slots, *[np.zeros(width, np.float32)] * (2 - len(slots)), [scene["count"] == 2]]).astype(np.float32)


def place_code(scene: dict) -> np.ndarray:
    """Per grid cell: the shape, colour and size one-hot of the object there (zeros where empty): the layout of the
    conv tower's pooled map, binding by place."""
    cells = np.zeros((len(POSITIONS), sum(len(ATTRIBUTES[k]) for k in CELL_ATTRIBUTES)), np.float32)
    for o in scene["objects"]:
        cells[POSITIONS.index(o["position"])] = _one_hots(o, CELL_ATTRIBUTES)
    return cells.ravel()


def pair_code(scene: dict) -> np.ndarray:
    """Which pair of values occurs together in one object, for every pair of attributes (colour x shape, ...), and
    the count: a bag of conjunctions, where "what colour is the star" is read from one direction per colour."""
    kinds, parts = list(ATTRIBUTES), []
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            pairs = np.zeros((len(ATTRIBUTES[a]), len(ATTRIBUTES[b])), np.float32)
            for o in scene["objects"]:
                pairs[ATTRIBUTES[a].index(o[a]), ATTRIBUTES[b].index(o[b])] = 1
            parts.append(pairs.ravel())
    return np.concatenate([*parts, [scene["count"] == 2]]).astype(np.float32)


IDEAL_CODES = {"objects": object_code, "places": place_code, "pairs": pair_code}


def ideal_embeddings(scenes: Sequence[dict], code: str, width: int = 128, seed: int = 0) -> np.ndarray:
    """[N, width]: IDEAL_CODES[code] of each scene through one fixed random orthonormal map (no noise); a code wider
    than `width` is projected, as a tower's linear projection would."""
    codes = np.stack([IDEAL_CODES[code](s) for s in scenes])
    side = max(width, codes.shape[1])
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((side, side)))
    return (codes @ rotation[:codes.shape[1], :width]).astype(np.float32)


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


def reader_curve(train_embeds: np.ndarray, train_scenes: Sequence[dict], eval_embeds: np.ndarray,
                 eval_scenes: Sequence[dict], per_image: int | None = None, epochs: Sequence[int] = (60,),
                 hidden: int = 512, seed: int = 0) -> list[dict[str, float]]:
    """Per count in `epochs`: {"colour", "shape": held-out accuracy, "train": accuracy on its own rows, "train_rows",
    "eval_rows"} of a reader trained for that many passes over train_embeds' conditional questions (AdamW 1e-3, batch
    64). One training to the largest count, scored as it passes each: the same reader a run of that length ends with."""
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

    def score() -> dict[str, float]:
        with torch.no_grad():
            right = reader(eval_x).argmax(1).numpy() == ye
            train = float((reader(train_x).argmax(1) == train_y).float().mean())
        return {**{k: float(right[asked == k].mean()) for k in ASKED}, "train": train, "train_rows": len(y), "eval_rows": len(ye)}

    scores = {0: score()} if 0 in epochs else {}
    for epoch in range(1, max(epochs, default=0) + 1):
        for batch in torch.randperm(len(train_x)).split(64):
            loss = F.cross_entropy(reader(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch in epochs:
            scores[epoch] = score()
    return [scores[count] for count in epochs]


def reader_accuracy(train_embeds: np.ndarray, train_scenes: Sequence[dict], eval_embeds: np.ndarray,
                    eval_scenes: Sequence[dict], per_image: int | None = None, epochs: int = 60, hidden: int = 512,
                    seed: int = 0) -> dict[str, float]:
    """reader_curve at one count of epochs."""
    return reader_curve(train_embeds, train_scenes, eval_embeds, eval_scenes, per_image, [epochs], hidden, seed)[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by demo.world")
    parser.add_argument("--train", required=True, help="an image embedding store of the world's scenes: the reader learns here")
    parser.add_argument("--eval", required=True, help="an image embedding store of other scenes: the reader is scored here")
    parser.add_argument("--images", type=int, help="train on the first N images of --train (default: all)")
    parser.add_argument("--per_image", type=int, help="at most K questions per image (default: every one)")
    parser.add_argument("--epochs", default="60", help="passes over the questions; a comma list scores one training at each count")
    parser.add_argument("--code", choices=tuple(IDEAL_CODES), help="read a noise-free code of the same scenes instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        epochs = [int(e) for e in args.epochs.split(",")]
    except ValueError:
        parser.error(f"--epochs: whole numbers, comma-separated (got {args.epochs!r})")
    train, train_scenes = store_scenes(args.train, args.world, args.images)
    held_out, eval_scenes = store_scenes(args.eval, args.world)
    if args.code:
        both = ideal_embeddings([*train_scenes, *eval_scenes], args.code, train.shape[1], args.seed)
        train, held_out = both[:len(train)], both[len(train):]
    results = [{"epochs": count, **result} for count, result in
               zip(epochs, reader_curve(train, train_scenes, held_out, eval_scenes, args.per_image, epochs, seed=args.seed))]
    for result in results:
        count = result["epochs"]
        print(f"binding reader ({len(train)} images, {result['train_rows']} questions, {count} epochs"
              f"{f', {args.code} code' if args.code else ''}; scored on {result['eval_rows']}): "
              f"colour {result['colour']:.3f}, shape {result['shape']:.3f} (own questions {result['train']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps({**vars(args), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
