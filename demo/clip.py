"""The toy world's CLIP: a small HF CLIPModel and its tokenizer, trained contrastively on the paired set on CPU.

Besides CLIP's loss, the TEXT embeddings of single-object captions feed linear attribute heads (colour, shape,
size, position; `text_attribute_weight`). A web-scale text encoder arrives structured; a 2-layer one trained
for a minute does not: with the contrastive loss alone neither tower encoded position (linear probe 0.12 on
both sides, chance 0.11), so text-only training had nothing about position to transfer. With the heads the
image side learns position from the contrastive loss (probe 0.94 in 600 steps, 0.99 in 1000, on the seed-0
world; images get no labels) and a real gap stays (centroid distance 0.15-0.27 over seeds 0-2). Shape stays
weak on the image side (~0.25, chance 0.17): the image tower would need several times this budget. The heads
are dropped before saving.

It stands in for a web-scale CLIP: trained here, saved with `save_pretrained` (model, tokenizer, image
processor), then loaded by `revision.encoders.load_encoder(folder)` exactly like a downloaded checkpoint.
The tokenizer is demo.tiny.clip's hand-built CLIP BPE over the world's vocabulary.

    python -m demo.clip --world WORLD_DIR --out OUT_DIR [--steps 600] [--seed 0]

After training, the saved folder is loaded back through load_encoder and measured (toy_clip_report.json):
the modality gap between unpaired captions and unpaired images (centroid distance, linear-probe accuracy,
kNN mixing; revision.gap) and paired retrieval on the held-out eval pairs.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, get_cosine_schedule_with_warmup

from demo import add_config_arguments, config_from_arguments
from demo.tiny.clip import word_bpe_clip_tokenizer
from demo.world import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, render_deferred, vocabulary
from revision.encoders import load_encoder
from revision.gap import centroid_and_traces, modality_gap
from revision.records import read_records

REPORT = "toy_clip_report.json"


@dataclass
class ToyClipConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    patch: int = 8
    max_text_len: int = 64
    steps: int = 600  # what the pipeline's default budget gives it too
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    gap_rows: int = 2000  # unpaired captions and images (each) the gap is measured on
    text_attribute_weight: float = 1.0  # attribute heads on single-object caption embeddings (module docstring)


def image_processor() -> CLIPImageProcessorPil:
    """CLIP's image processor at the world's image size."""
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_processor(max_text_len: int) -> CLIPProcessor:
    return CLIPProcessor(image_processor=image_processor(), tokenizer=word_bpe_clip_tokenizer(vocabulary(), max_text_len))


def build_model(cfg: ToyClipConfig, tokenizer) -> CLIPModel:
    tower = dict(hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
                 num_attention_heads=cfg.heads)
    # CLIP pools the text at the first EOS token; the config must name the tokenizer's ids.
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=cfg.max_text_len, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(tower, image_size=IMAGE_SIZE, patch_size=cfg.patch, num_channels=3)
    torch.manual_seed(cfg.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def open_images(world_dir: Path, records: Sequence[dict]) -> list[Image.Image]:
    """The pictures `records` name (their "image" paths under world_dir), drawing any the world deferred first."""
    render_deferred(world_dir)
    images = []
    for rec in records:
        with Image.open(world_dir / rec["image"]) as im:
            images.append(im.convert("RGB"))
    return images


ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "position": POSITIONS}


def attribute_labels(scenes: Sequence[dict]) -> dict[str, np.ndarray]:
    """[N] index into ATTRIBUTES[k] of each scene's object, per attribute k; -100 for scenes of two objects."""
    return {k: np.array([values.index(s["objects"][0][k]) if s["count"] == 1 else -100 for s in scenes])
            for k, values in ATTRIBUTES.items()}


class TextAttributeHeads(torch.nn.Module):
    """One linear classifier per attribute on unit text embeddings (x10: unit rows give tiny logits otherwise),
    trained on the captions of single-object scenes; -100 labels (two-object scenes) are ignored."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, text_embeds: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        if not any((y >= 0).any() for y in labels.values()):
            return text_embeds.new_zeros(())
        losses = [torch.nn.functional.cross_entropy(head(10 * text_embeds), labels[k], ignore_index=-100)
                  for k, head in self.heads.items()]
        return torch.stack(losses).mean()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only (not biases, norms or the temperature)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches without end: each epoch reshuffled, its ragged tail dropped (a tiny last batch is a too-easy task)."""
    order = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=order)[: n // batch_size * batch_size].split(batch_size)


def contrastive_step(loss: torch.Tensor, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                     schedule: Any, logit_scale: torch.nn.Parameter) -> None:
    """Backward, clip gradients at 1, step, and keep the inverse temperature within CLIP's cap of 100."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        logit_scale.clamp_(0, math.log(100))


def read_pairs(world_dir: Path) -> list[dict]:
    """WORLD/paired.jsonl, the contrastive training set; a batch needs at least two pairs."""
    pairs = read_records(world_dir / "paired.jsonl")
    if len(pairs) < 2:
        raise ValueError(f"{world_dir / 'paired.jsonl'}: need at least 2 image-caption pairs, found {len(pairs)}")
    return pairs


def train_toy_clip(world_dir: str | Path, out_dir: str | Path, cfg: ToyClipConfig | None = None, log_every: int = 50) -> dict:
    """Train on WORLD/paired.jsonl with CLIP's symmetric InfoNCE (learnable temperature), save to out_dir.
    Returns the training log: per-step losses, seconds, config."""
    cfg = cfg or ToyClipConfig()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    pairs = read_pairs(world_dir)
    start = time.perf_counter()
    processor = build_processor(cfg.max_text_len)
    pixels = processor.image_processor(images=open_images(world_dir, pairs), return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer([p["caption"] for p in pairs], padding=True, return_tensors="pt")
    if tokens["input_ids"].shape[1] > cfg.max_text_len:  # truncation would cut the EOS token CLIP pools at
        row = int(tokens["attention_mask"].sum(1).argmax())
        raise ValueError(f"{world_dir / 'paired.jsonl'}: caption of {pairs[row]['id']!r} is {tokens['input_ids'].shape[1]} "
                         f"tokens, more than max_text_len={cfg.max_text_len}")
    prep_seconds = time.perf_counter() - start

    model = build_model(cfg, processor.tokenizer).train()
    heads = TextAttributeHeads(cfg.projection_dim)
    scenes = {r["id"]: r["attributes"] for r in read_records(world_dir / "scenes.jsonl")}
    labels = {k: torch.from_numpy(v) for k, v in attribute_labels([scenes[p["id"]] for p in pairs]).items()}
    trained = torch.nn.ModuleList([model, heads]) if cfg.text_attribute_weight else model
    optimizer = torch.optim.AdamW(_param_groups(trained, cfg.weight_decay), lr=cfg.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, cfg.steps // 10), cfg.steps)
    batches = shuffled_batches(len(pairs), min(cfg.batch_size, len(pairs)), cfg.seed)
    losses = []
    start = time.perf_counter()
    for step, index in zip(range(cfg.steps), batches):
        mask = tokens["attention_mask"][index]
        width = int(mask.sum(1).max())
        out = model(input_ids=tokens["input_ids"][index, :width], attention_mask=mask[:, :width],
                    pixel_values=pixels[index], return_loss=True)
        loss = out.loss
        if cfg.text_attribute_weight:
            loss = loss + cfg.text_attribute_weight * heads(out.text_embeds, {k: v[index] for k, v in labels.items()})
        contrastive_step(loss, trained.parameters(), optimizer, schedule, model.logit_scale)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"toy clip step {step + 1}/{cfg.steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"temperature {1 / model.logit_scale.exp().item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - start

    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"config": asdict(cfg), "pairs": len(pairs), "prep_seconds": prep_seconds, "train_seconds": train_seconds,
            "losses": losses, "final_temperature": 1 / model.logit_scale.exp().item()}


def _scene_key(attributes: dict) -> tuple:
    return tuple(sorted((o["shape"], o["colour"], o["size"], o["position"]) for o in attributes["objects"]))


def retrieval(images: np.ndarray, texts: np.ndarray, keys: Sequence[tuple]) -> dict[str, float]:
    """Paired retrieval among N held-out pairs (row i of each is one pair). `scene` counts a hit when the
    retrieved item shows or describes the same attributes (captions of equal scenes are interchangeable)."""
    sims = images @ texts.T
    n = len(images)
    same = np.array([[a == b for b in keys] for a in keys])
    i2t, t2i = sims.argmax(1), sims.argmax(0)
    return {
        "pairs": n,
        "image_to_text_top1": float(np.mean(i2t == np.arange(n))),
        "text_to_image_top1": float(np.mean(t2i == np.arange(n))),
        "image_to_text_scene_top1": float(np.mean(same[np.arange(n), i2t])),
        "text_to_image_scene_top1": float(np.mean(same[t2i, np.arange(n)])),
        "chance_top1": 1 / n,
        "chance_scene_top1": float(same.mean()),
        "paired_cosine": float(np.mean(np.einsum("ij,ij->i", images, texts))),
        "unpaired_cosine": float((sims.sum() - np.trace(sims)) / (n * n - n)) if n > 1 else float("nan"),
    }


def measure(model_dir: str | Path, world_dir: str | Path, gap_rows: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Load the saved CLIP through load_encoder (the pipeline's path) and measure gap and retrieval."""
    model_dir, world_dir = Path(model_dir), Path(world_dir)
    encoder = load_encoder(str(model_dir), device="cpu")
    rng = np.random.default_rng(seed)
    captions = read_records(world_dir / "unpaired_texts.jsonl")
    images = read_records(world_dir / "unpaired_images.jsonl")
    captions = [captions[i] for i in np.sort(rng.permutation(len(captions))[:gap_rows])]
    images = [images[i] for i in np.sort(rng.permutation(len(images))[:gap_rows])]
    text = encoder.encode_texts([c["text"] for c in captions]).numpy()
    image = encoder.encode_images(open_images(world_dir, images)).numpy()
    n = min(len(text), len(image))
    gap = {**centroid_and_traces(text, image), **modality_gap(text[:n], image[:n], rng)[0],  # revision.gap's set
           "rows": {"text": len(text), "image": len(image)}}

    pairs = read_records(world_dir / "eval_captions.jsonl")
    eval_text = encoder.encode_texts([p["caption"] for p in pairs]).numpy()
    eval_image = encoder.encode_images(open_images(world_dir, pairs)).numpy()
    return {"encoder": encoder.name, "dim": encoder.dim, "gap_unpaired": gap,
            "retrieval_eval": retrieval(eval_image, eval_text, [_scene_key(p["attributes"]) for p in pairs])}


def write_report(out: str | Path, world: str | Path, log: dict, gap_rows: int, seed: int, skip_measure: bool) -> dict | None:
    """OUT/toy_clip_report.json: the training log, plus (unless skip_measure) the gap and retrieval measured on the
    saved checkpoint; returns that report, or None when only the log was written (and a line printed)."""
    if skip_measure:
        Path(out, REPORT).write_text(json.dumps(log, indent=1) + "\n")
        print(f"{len(log['losses'])} steps in {log['train_seconds']:.0f} s, loss {np.mean(log['losses'][:10]):.3f} -> "
              f"{np.mean(log['losses'][-10:]):.3f}; saved in {out}")
        return None
    report = {**measure(out, world, gap_rows, seed), **log}
    Path(out, REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by demo.world")
    parser.add_argument("--out", required=True, help="where the CLIP checkpoint and toy_clip_report.json go")
    add_config_arguments(parser, ToyClipConfig())
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 is faster on a machine shared with other jobs)")
    parser.add_argument("--skip_measure", action="store_true",
                        help="no gap/retrieval report (the pipeline measures the gap on its stores with embed_mean.py)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_arguments(args, ToyClipConfig())
    log = train_toy_clip(args.world, args.out, cfg)
    report = write_report(args.out, args.world, log, cfg.gap_rows, cfg.seed, args.skip_measure)
    if report is None:
        return
    gap, ret = report["gap_unpaired"], report["retrieval_eval"]
    first, last = np.mean(log["losses"][:10]), np.mean(log["losses"][-10:])
    print(f"toy clip: {cfg.steps} steps in {log['train_seconds']:.0f} s, loss {first:.3f} -> {last:.3f}; gap: centroid distance "
          f"{gap['centroid_distance']:.3f}, linear probe {gap['linear_probe_acc']:.3f}; eval retrieval i2t top-1 "
          f"{ret['image_to_text_top1']:.3f} (scene {ret['image_to_text_scene_top1']:.3f}), paired cosine "
          f"{ret['paired_cosine']:.3f}; report in {Path(args.out, REPORT)}")


if __name__ == "__main__":
    main()
