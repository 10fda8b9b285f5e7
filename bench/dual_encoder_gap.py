"""What shapes the world's modality gap: the dual encoder (demo.dual_encoder) trained under several settings
(temperature, its learning, training length, initialisation), each measured with revision.gap on the unpaired
captions and images, before any alignment. Prints one line per setting and writes OUT/gap_sweep.json.

    python bench/dual_encoder_gap.py --world WORLD_DIR --out OUT [--variants base,t01,...] [--rows 1000]

The frozen text tower's features and the pixels are computed once and reused by every setting.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: demo/ is not installed
from demo.clip import open_images
from demo.dual_encoder import DualEncoderConfig, build_dual_encoder, fit, minilm_folder, text_tower_features
from revision.gap import centroid_and_traces, modality_gap
from revision.records import read_records

VARIANTS = {  # name -> overrides of DualEncoderConfig
    "base": {"temperature": 0.07, "learn_temperature": True},      # CLIP's init 0.07, learnt (capped at 0.01)
    "t01_fixed": {"temperature": 0.01, "learn_temperature": False},  # where real CLIPs' learnt temperature ends
    "t01_fixed_long": {"temperature": 0.01, "learn_temperature": False, "steps": 600},
    "t01_fixed_short": {"temperature": 0.01, "learn_temperature": False, "steps": 100},
    "t02_learnt": {"temperature": 0.02, "learn_temperature": True},
    "t07_fixed_long": {"steps": 600, "temperature": 0.07, "learn_temperature": False},
    "t1_fixed": {"temperature": 1.0, "learn_temperature": False},   # a high temperature: the gap should close
}


def features(world: Path, rows: int, cfg: DualEncoderConfig) -> dict[str, torch.Tensor]:
    model, processor = build_dual_encoder(cfg, minilm_folder())
    pairs = read_records(world / "paired.jsonl")
    texts = read_records(world / "unpaired_texts.jsonl")[:rows]
    images = read_records(world / "unpaired_images.jsonl")[:rows]

    def pixels(recs):
        return processor.image_processor(images=open_images(world, recs), return_tensors="pt")["pixel_values"]

    def tower(strings):
        return text_tower_features(model, processor.tokenizer, strings)

    return {"pair_pixels": pixels(pairs), "pair_text": tower([p["caption"] for p in pairs]),
            "text": tower([t["text"] for t in texts]), "image_pixels": pixels(images)}


@torch.no_grad()
def gap(model, feats: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    model.eval()
    image = F.normalize(model.get_image_features(pixel_values=feats["image_pixels"]).pooler_output, dim=-1).numpy()
    text = F.normalize(model.text_projection(feats["text"]), dim=-1).numpy()
    stats, _ = modality_gap(text, image, np.random.default_rng(seed))
    return {**centroid_and_traces(text, image), **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = DualEncoderConfig(steps=args.steps)
    start = time.perf_counter()
    feats = features(Path(args.world), args.rows, base)
    print(f"features in {time.perf_counter() - start:.0f} s", flush=True)
    results = json.loads((out / "gap_sweep.json").read_text()) if (out / "gap_sweep.json").exists() else {}
    for name in args.variants.split(","):
        cfg = replace(base, **VARIANTS[name])
        model, _ = build_dual_encoder(cfg, minilm_folder())
        init = gap(model, feats, cfg.seed)
        start = time.perf_counter()
        losses = fit(model, feats["pair_pixels"], feats["pair_text"], cfg, log_every=0)
        results[name] = {"config": asdict(cfg), "init": init, "trained": gap(model, feats, cfg.seed),
                         "loss_end": float(np.mean(losses[-10:])), "temperature_end": 1 / model.logit_scale.exp().item(),
                         "seconds": time.perf_counter() - start}
        g = results[name]["trained"]
        print(f"{name:<16} init: centroid {init['centroid_distance']:.3f} kNN {init['knn_mixing']:.4f} | trained "
              f"({cfg.steps} steps, T_end {results[name]['temperature_end']:.3f}, loss {results[name]['loss_end']:.2f}): "
              f"centroid {g['centroid_distance']:.3f} probe {g['linear_probe_acc']:.3f} kNN {g['knn_mixing']:.4f} "
              f"trace ratio {g['trace_ratio']:.3f} alpha {g['alpha_text']:.2f}/{g['alpha_image']:.2f} JS {g['cosine_js']:.3f}",
              flush=True)
        (out / "gap_sweep.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
