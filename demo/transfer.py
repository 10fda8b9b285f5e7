"""What text-only training can transfer, per alignment: a linear readout of each attribute trained on caption
embeddings (after the method's text map) and read off real image embeddings (after its image map).

    python -m demo.transfer outputs/toy-demo/seed-0 [--methods none,mean_shift,realign]

Single-object scenes of the unpaired captions and unpaired images of one pipeline run. `image->image` is the
ceiling: the same readout trained on half of the images and tested on the other half. If a method's
text->image accuracy equals `none`'s, the gap is not in the way of that readout (docs/results.md).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from demo.clip import ATTRIBUTES, attribute_labels
from revision.align import load_alignment
from revision.records import read_records
from revision.store import EmbeddingStore


def ridge_readout(x: np.ndarray, labels: np.ndarray, classes: int, ridge: float = 1e-2) -> np.ndarray:
    """[D + 1, classes] least-squares one-hot classifier with a bias (closed form, deterministic)."""
    x = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    targets = np.eye(classes)[labels]
    return np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ targets)


def readout_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                     classes: int) -> float:
    weights = ridge_readout(train, train_labels, classes)
    predicted = (np.hstack([test, np.ones((len(test), 1))]) @ weights).argmax(1)
    return float(np.mean(predicted == test_labels))


def _single_object_rows(store: EmbeddingStore, scenes: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    shard = store.load_all()
    labels = attribute_labels([scenes[item_id] for item_id in shard.ids])
    keep = labels["colour"] >= 0  # single-object scenes
    return shard.embeds[keep].astype(np.float32), {k: v[keep] for k, v in labels.items()}


def transfer(run_dir: str | Path, methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """{method or 'image->image': {attribute: accuracy}} for one pipeline run folder (OUT/seed-N)."""
    run_dir = Path(run_dir)
    scenes = {r["id"]: r["attributes"] for r in read_records(run_dir / "world" / "scenes.jsonl")}
    images, image_labels = _single_object_rows(EmbeddingStore(run_dir / "embeds" / "unpaired" / "image"), scenes)
    half = len(images) // 2
    results = {"image->image": {k: readout_accuracy(images[:half], y[:half], images[half:], y[half:], len(ATTRIBUTES[k]))
                                for k, y in image_labels.items()}}
    for method in methods:
        texts, text_labels = _single_object_rows(EmbeddingStore(run_dir / "align" / method), scenes)  # text map applied
        mapped = load_alignment(run_dir / "align" / method).image_map(images)
        results[method] = {k: readout_accuracy(texts, text_labels[k], mapped, image_labels[k], len(ATTRIBUTES[k]))
                           for k in ATTRIBUTES}
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a pipeline run folder, e.g. outputs/toy-demo/seed-0")
    parser.add_argument("--methods", default="none,mean_shift,realign")
    args = parser.parse_args(argv)
    results = transfer(args.run_dir, [m for m in args.methods.split(",") if m])
    print("| readout trained on -> read on | " + " | ".join(ATTRIBUTES) + " |")
    print("|---" * (len(ATTRIBUTES) + 1) + "|")
    for name, accuracy in results.items():
        label = name if name == "image->image" else f"{name}: text -> image"
        print(f"| {label} | " + " | ".join(f"{accuracy[k]:.3f}" for k in ATTRIBUTES) + " |")
    Path(args.run_dir, "transfer.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
