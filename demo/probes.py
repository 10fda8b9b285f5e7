"""What the world's embeddings carry: a linear probe per attribute the world asks about.

    python -m demo.probes --world WORLD_DIR --store EMBEDS/unpaired/image [--store EMBEDS/unpaired/text]

Per store (image or caption embeddings keyed by the world's ids): multinomial logistic regression fitted on half of
the single-object scenes and scored on the other half, for colour, shape, size and position; count (one or two
objects) over every scene; and binding ("two-object colour", ...): on the two-object scenes, each attribute of the
first and of the second object in reading order (the position grid's order), the mean of the two probes. A question
about one of two objects needs that attribute bound to its object in the one embedding. `chance` is the score of
always answering the fitting half's most common class. A probe near chance means the encoder does not carry that
attribute, and no model reading its embeddings can answer it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from demo.clip import ATTRIBUTES, attribute_labels
from demo.scenes import Obj, reading_order
from revision.records import read_records
from revision.store import EmbeddingStore

PROBED = (*ATTRIBUTES, "count", *(f"two-object {k}" for k in ATTRIBUTES))


def logistic_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                   l2: float = 1e-4, iterations: int = 200) -> float:
    """Accuracy on (test, test_labels) of a multinomial logistic regression fitted on (train, train_labels) with
    full-batch L-BFGS (deterministic). Features are standardised with the fitting half's mean and scalar std."""
    mean, scale = train.mean(0), train.std() + 1e-12
    x, xt = (torch.from_numpy((a - mean) / scale).double() for a in (train, test))
    y = torch.from_numpy(train_labels).long()
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((xt @ weight + bias).argmax(1).numpy() == test_labels).mean())


def _halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(labels))
    return order[: len(order) // 2], order[len(order) // 2:]


def probe_embeddings(embeds: np.ndarray, scenes: Sequence[dict], seed: int = 0) -> dict[str, dict[str, float]]:
    """{attribute: {"acc", "chance", "rows"}} for embeddings [N, D] of the N scenes (their attributes dicts)."""
    labels = attribute_labels(scenes)
    labels["count"] = np.array([s["count"] - 1 for s in scenes])
    results = {name: _probe(embeds, labels[name], name, seed) for name in PROBED[:len(ATTRIBUTES) + 1]}
    ordered = [reading_order([Obj(**o) for o in s["objects"]]) if s["count"] == 2 else None for s in scenes]
    for k, values in ATTRIBUTES.items():
        slots = [_probe(embeds, np.array([values.index(getattr(objs[slot], k)) if objs else -100 for objs in ordered]),
                        f"two-object {k}", seed) for slot in (0, 1)]
        results[f"two-object {k}"] = {key: float(np.mean([r[key] for r in slots])) for key in ("acc", "chance")} | {
            "rows": slots[0]["rows"]}
    return results


def _probe(embeds: np.ndarray, y: np.ndarray, name: str, seed: int) -> dict[str, float]:
    """One probe on the rows labelled (>= 0): fitted on one half, scored on the other."""
    rows = np.flatnonzero(y >= 0)
    fit, score = _halves(rows, seed)
    fit, score = rows[fit], rows[score]
    if len(fit) < 2 or len(score) < 1 or len(np.unique(y[fit])) < 2:
        raise ValueError(f"too few scenes to probe {name}: {len(rows)} (need two classes in each half)")
    majority = np.bincount(y[fit]).argmax()
    return {"acc": logistic_probe(embeds[fit].astype(np.float64), y[fit], embeds[score].astype(np.float64), y[score]),
            "chance": float(np.mean(y[score] == majority)), "rows": int(len(rows))}


def store_scenes(store_dir: str | Path, world_dir: str | Path, images: int | None = None) -> tuple[np.ndarray, list[dict]]:
    """The first `images` (default: all) embeddings of a store of the world's images, with their scenes' attributes;
    a ValueError naming the store when an id is not a scene of the world."""
    scenes = {r["id"]: r["attributes"] for r in read_records(Path(world_dir) / "scenes.jsonl")}
    shard = EmbeddingStore(store_dir).load_all()
    ids = list(shard.ids)[:images]
    missing = [i for i in ids if i not in scenes]
    if missing:
        raise ValueError(f"{store_dir}: {len(missing)} ids are not scenes of {world_dir} (first: {missing[0]!r})")
    return np.asarray(shard.embeds[:len(ids)], dtype=np.float32), [scenes[i] for i in ids]


def probe_store(store_dir: str | Path, world_dir: str | Path, seed: int = 0) -> dict[str, dict[str, float]]:
    """probe_embeddings on every row of an embedding store whose ids are scenes of the world."""
    return probe_embeddings(*store_scenes(store_dir, world_dir), seed)


def probe_line(results: dict[str, dict[str, float]]) -> str:
    """'colour 0.98 (chance 0.13), shape ...' for printing."""
    return ", ".join(f"{k} {v['acc']:.3f} (chance {v['chance']:.2f})" for k, v in results.items())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by demo.world")
    parser.add_argument("--store", action="append", required=True, help="an embedding store of the world's scenes (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="which half of the scenes fits the probe")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = {store: probe_store(store, args.world, args.seed) for store in args.store}
    for store, result in results.items():
        print(f"probes {store}: {probe_line(result)}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
