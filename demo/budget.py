"""How big each stage of the embedded-world pipeline is, and which parts run: `Budget` and its presets."""
from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, fields
from typing import Any

from revision.arguments import cpu_bf16_supported


@dataclass(frozen=True)
class Budget:
    """How big every stage is, and which parts run. `default` (real parts) fits the 10-minute demo on 2 CPU cores;
    `toy` is the all-toy run of docs/results.md's history table; `mini` runs in a test."""
    world: str = "real"
    encoder: str = "minilm"     # minilm: the dual encoder on the real MiniLM (demo/dual_encoder.py); toy: demo/clip.py
    llm: str = "smollm2"        # smollm2: the real SmolLM2-135M-Instruct (revision/gguf.py); toy: demo/llm.py
    clip_steps: int = 600
    clip_pretrain_steps: int = 800  # the minilm dual encoder's conv tower: steps on the captions' words first
    clip_cell_weight: float = 0.0   # ... with heads on what each grid cell holds, at this weight (0: none)
    clip_convs: str = "2,2,2,2"     # the minilm dual encoder's conv tower: 3x3 convolutions per stage
    clip_activation: str = "gelu"   # ... and its activation
    clip_pool_hidden: int = 0       # ... an MLP of this width from its map to the pooled features (0: linear)
    clip_linear_slots: bool = False # ... its slot heads read the pooled features linearly
    clip_pool_queries: int = 0      # ... learned queries that attend over its map's places first (0: the flattened map)
    llm_steps: int = 300
    stage1_epochs: float = 3.0
    stage1_lr: float = 1e-2
    stage2_epochs: float = 2.0
    stage2_lr: float = 1e-3
    batch: int = 32
    stage2_batch: int = 0       # > 0: stage 2's own batch (else batch)
    visual_tokens: int = 1
    projector_tokens: int = 1   # distinct vectors the projector makes of the embedding (they fill the visual tokens)
    projector: str = "mlp2x_gelu"  # the projector's type (revision.projector), made in stage 1 (or stage 2 without it)
    stage2_projector_lr: float = 0.0  # > 0: the projector's own learning rate in stage 2 (--mm_projector_lr)
    stage2_top_layers: int = 0  # > 0: stage 2 trains only the LLM's top N decoder layers (--tune_llm_top_layers); 0: all
    stage2_split_turns: bool = False  # stage 2: one sample per question of each conversation (--split_turns)
    image_placement: str = ""   # stage 2: first / last, the image before or after the question (--image_placement; "": as written)
    max_length: int = 128
    max_steps: int = -1         # > 0: cap every training stage (the mini preset)
    caption_tokens: int = 40
    answer_tokens: int = 8
    threads: int = 1            # torch threads per process: tiny models run fastest on one (threads mostly wait)
    bf16: bool = False          # the dual encoder and both training stages under bf16 autocast (CPUs with bf16 units)
    group_by_length: bool = False  # batches of samples of similar length (less padding)
    empty_system_prompt: bool = False  # stage 2: an empty system message, not the chat template's default (SmolLM2's: 21 tokens a sample)
    captions: bool = True       # caption the eval images with each stage-1 checkpoint (the table's caption columns)
    stage2: bool = True         # false: stop each row after stage 1 and its captions (the stage-1 transfer table)
    show: int = 6               # held-out questions printed at the end with the model's answers and the truth


BUDGETS = {
    # the real parts on CPU (docs/results.md, "A recipe whose model reads", "Binding both objects", "Shape: more
    # pairs, more images", "Heads on every cell"): the conv dual encoder (1000 steps on the captions' words, both objects
    # of a scene, and on what each grid cell holds at weight 10: shape probe 0.996-1.000 over 3 seeds, 0.82-0.94
    # without; 1200 steps took the demo to 10.4 minutes; 700 at weight 1 left shape at 0.66; 100 contrastive; ReLU and
    # one convolution at full resolution: 0.59x a step, probes within 0.01-0.04 of GELU's, "The demo in 546 s"), 8 distinct visual
    # tokens from a standardised projector input (4: QA 0.042 lower and colour 0.72 against 0.81 over 3 seeds,
    # "Binding: what the reader needs"),
    # stage 1 two epochs of the 1000 captions in batches of 8 (one left its loss at 1.9, not 0.94: QA 0.63, not 0.71),
    # stage 2 one epoch of the 1020 QA conversations in batches of 16 (a step of 16 costs 1.65-1.87x one of 8) with the
    # projector at 10x the LLM's learning rate and an empty system message (SmolLM2's default is a fifth of a
    # sample), the LLM's top 15 of 30 layers trained (0.82x a step; with the ReLU tower, over 3 seeds, colour 0.753
    # and shape 0.607 against 0.820 and 0.620 training every weight, "The demo in 546 s"); bf16 autocast where the
    # CPU has bf16 units, length-grouped batches
    "default": Budget(clip_steps=100, clip_pretrain_steps=1000, clip_cell_weight=10.0, clip_convs="1,2,2,2",
                      clip_activation="relu", stage2_top_layers=15, stage1_epochs=2.0, stage1_lr=3e-3,
                      stage2_epochs=1.0, stage2_lr=2e-4, stage2_projector_lr=2e-3, batch=8, stage2_batch=16, visual_tokens=8,
                      projector_tokens=8, max_length=136, answer_tokens=8, captions=False,
                      threads=min(os.cpu_count() or 1, 8), bf16=cpu_bf16_supported(), group_by_length=True,
                      empty_system_prompt=True),
    "toy": Budget(world="default", encoder="toy", llm="toy"),
    # the real-parts world and dual encoder with the toy LLM and its training budget: the full comparison table
    # (every row, 3 seeds) in CPU minutes, beside the real LLM's rows
    "toyllm": Budget(encoder="minilm", llm="toy", clip_steps=300),
    "mini": Budget(world="mini", encoder="toy", llm="toy", clip_steps=10, llm_steps=10, batch=8, max_length=96,
                   max_steps=2, caption_tokens=12, answer_tokens=4),
}


# Budget fields a finished stage's outcome does not depend on: threads and printing (1 and 2 threads gave identical
# demo numbers), and which stages run (captions, stage2): one folder then gives the QA table and, from the same
# stage-1 checkpoints, the transfer table
NOT_RECIPE = ("threads", "show", "captions", "stage2")


def recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings (a Budget as a dict, with the seed) that a finished stage's outcome depends on. A Budget field
    the settings lack takes its default: a field is added with the default that does what was done before it."""
    defaults = {f.name: f.default for f in fields(Budget) if f.default is not MISSING}
    return {k: v for k, v in {**defaults, **settings}.items() if k not in NOT_RECIPE}
