"""The demo's three training steps in fp32 and under CPU bf16 autocast (what `--bf16 true` gives train.py off a GPU,
and the dual encoder's `bf16` field): seconds a step, medians of interleaved runs, and the ratio to fp32.

encoder: one step of the dual encoder's vision tower on label pretraining (batch 64 of 64x64 pictures drawn anew):
  fp32 drawing in line (before), bf16 drawing in line, bf16 with the pictures drawn in the worker process (now).
stage1: RevisionModel on SmolLM2 with the LLM frozen (projector only), batch 8 x 40 tokens, the caption labelled.
stage2: the same with every weight trained, batch 8 x 100 tokens, 10 labelled a row (the QA turns).
stage2_parts: a stage-2 step under bf16 by part: forward + backward at batch 8 x 100 tokens (the first), 8 x 79 (the
  same QA without SmolLM2's 21-token default system message), 16 x 100 (twice the batch), the fused AdamW step and
  gradient clipping of all 135M weights.
tower: one label-pretraining step of the dual encoder's conv tower under bf16 (pictures drawn once, one thread as in the
  demo: the drawing worker has the other core) by layout: GELU or ReLU after each convolution, two convolutions at
  full resolution or one (the activation and the first stage's batch norms run over the largest maps).
attention: a step under bf16 with SDPA (PyTorch's CPU flash kernel) and with HF's eager attention, at the demo's stage-1
  and stage-2 shapes and at longer rows (what revision.model.default_attn_implementation chooses from, on CPU).
bf16 autocast is fast only where the CPU computes bf16 natively (avx512_bf16 or AMX); elsewhere it emulates.

    python bench/cpu_bf16.py [--sections encoder stage1 stage2 stage2_parts attention tower] [--steps 5] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's demo package (run from anywhere)

from revision import gguf  # noqa: E402
from revision.arguments import cpu_bf16_supported  # noqa: E402
from revision.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, RevisionModel  # noqa: E402

SECTIONS = ("encoder", "stage1", "stage2", "stage2_parts", "attention", "tower")
EMBED_DIM, VISUAL = 128, 4


def medians(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each step function, run interleaved (every variant sees the same machine load)."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(section: str, shape: str, seconds: dict[str, float]) -> None:
    base = next(iter(seconds.values()))
    print(f"{section} ({shape}):")
    for name, value in seconds.items():
        print(f"  {name:32s} {value:.3f} s a step  {value / base:.2f}x")


def encoder_steps(repeats: int) -> None:
    from demo.captions import caption
    from demo.clip import image_processor
    from demo.dual_encoder import (
        AttributeHeads,
        DualEncoderConfig,
        Redraw,
        build_dual_encoder,
        drawing_pool,
        minilm_folder,
        prefetched,
        vision_features,
    )
    from demo.scenes import sample_scene

    rng = np.random.default_rng(0)
    captions = [caption(sample_scene(rng), rng) for _ in range(512)]  # the world's scenes, as its paired captions
    model, _ = build_dual_encoder(DualEncoderConfig(), minilm_folder())
    draw = Redraw(captions, image_processor(), seed=0)
    heads = AttributeHeads(model.config.vision_config.hidden_size, draw)
    optimizer = torch.optim.AdamW([*model.vision_model.parameters(), *heads.parameters()], lr=1e-3)
    model.vision_model.train()
    batches = lambda: (torch.randperm(len(draw), generator=torch.Generator().manual_seed(k))[:64] for k in range(10**9))  # noqa: E731

    def trainer(bf16: bool, source):
        def step() -> None:
            index, pixels = next(source)
            loss = heads.loss(vision_features(model, pixels, bf16)[0], index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    pool = drawing_pool(draw)
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.callback(pool.shutdown, cancel_futures=True)
        steps = {"fp32, drawn in line": trainer(False, prefetched(batches(), draw)),
                 "bf16, drawn in line": trainer(True, prefetched(batches(), draw))}
        if pool is not None:
            steps["bf16, drawn in the worker"] = trainer(True, prefetched(batches(), draw, pool))
        report("encoder", "label pretraining, batch 64 of 64x64", medians(steps, repeats))


def tower_steps(repeats: int) -> None:
    from demo.captions import caption
    from demo.clip import image_processor
    from demo.dual_encoder import AttributeHeads, DualEncoderConfig, Redraw, build_dual_encoder, minilm_folder, vision_features
    from demo.scenes import sample_scene

    rng = np.random.default_rng(0)
    draw = Redraw([caption(sample_scene(rng), rng) for _ in range(64)], image_processor(), seed=0)
    index = torch.arange(64)
    pixels = draw[index]

    def trainer(activation: str, convs: str) -> Callable[[], None]:
        cfg = DualEncoderConfig(activation=activation, convs=convs)
        model, _ = build_dual_encoder(cfg, minilm_folder())
        vision = model.config.vision_config
        heads = AttributeHeads(vision.hidden_size, draw, cfg.cell_weight, vision.widths[-1])
        optimizer = torch.optim.AdamW([*model.vision_model.parameters(), *heads.parameters()], lr=1e-3)
        model.vision_model.train()

        def step() -> None:
            features, grid = vision_features(model, pixels, True)
            loss = heads.loss(features, index, grid)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layouts = (("gelu", "2,2,2,2"), ("relu", "2,2,2,2"), ("gelu", "1,2,2,2"), ("relu", "1,2,2,2"))
        report("tower", "label pretraining with the cell heads, batch 64 of 64x64, bf16, one thread",
               medians({f"{act}, convs {convs}": trainer(act, convs) for act, convs in layouts}, repeats))
    finally:
        torch.set_num_threads(threads)


def smollm2(attn_implementation: str = "sdpa") -> RevisionModel:
    return RevisionModel.from_llm(str(gguf.convert_gguf(gguf.SMOLLM2)), embed_dim=EMBED_DIM, num_visual_tokens=VISUAL,
                                  dtype=torch.float32, attn_implementation=attn_implementation).train()


def batch_of(batch: int, length: int, labelled: int) -> dict[str, torch.Tensor]:
    """Random token rows with the visual block after the first token and the last `labelled` tokens as targets."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (batch, length), generator=generator)
    ids[:, 1:1 + VISUAL] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : length - labelled] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "image_embeds": torch.randn(batch, EMBED_DIM, generator=generator)}


def forward_backward(model: RevisionModel, inputs: dict[str, torch.Tensor], bf16: bool) -> float:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**inputs)
    out.loss.backward()
    return out.loss.item()


def stage2_parts(repeats: int) -> None:
    model = smollm2()
    weights = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weights, lr=1e-5, fused=True)
    steps = {f"forward + backward {b} x {n}": partial(forward_backward, model, batch_of(b, n, 10), True)
             for b, n in ((8, 100), (8, 79), (16, 100))}
    steps |= {"fused AdamW step": optimizer.step, "gradient clipping": partial(torch.nn.utils.clip_grad_norm_, weights, 1.0)}
    report("stage2_parts", f"SmolLM2-135M, every weight ({sum(p.numel() for p in weights) / 1e6:.0f}M), bf16 autocast",
           medians(steps, repeats))


def attention_steps(repeats: int) -> None:
    models = {name: smollm2(name) for name in ("sdpa", "eager")}
    frozen = {name: smollm2(name) for name in models}  # stage 1: the LLM frozen, held in bf16 (as revision.build does)
    for model in frozen.values():
        model.llm.requires_grad_(False).to(torch.bfloat16)
    for stage, chosen, shapes in (("stage1", frozen, ((8, 40),)), ("stage2", models, ((16, 90), (2, 512), (1, 1024)))):
        for batch, length in shapes:
            inputs = batch_of(batch, length, 12)
            report("attention", f"{stage}, batch {batch} x {length} tokens",
                   medians({name: partial(forward_backward, model, inputs, True) for name, model in chosen.items()}, repeats))


def llm_steps(section: str, repeats: int) -> None:
    batch, length, labelled = (8, 40, 14) if section == "stage1" else (8, 100, 10)
    model = smollm2()
    if section == "stage1":
        model.llm.requires_grad_(False)
    inputs = batch_of(batch, length, labelled)
    losses: dict[bool, float] = {}

    def trainer(bf16: bool):
        def step() -> None:
            losses[bf16] = forward_backward(model, inputs, bf16)
        return step

    seconds = medians({"fp32": trainer(False), "bf16 autocast": trainer(True)}, repeats)
    trained = "projector only" if section == "stage1" else "every weight"
    report(section, f"SmolLM2-135M, {trained}, batch {batch} x {length} tokens, {labelled} labelled", seconds)
    print(f"  loss fp32 {losses[False]:.4f}, bf16 {losses[True]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--steps", type=int, default=5, help="interleaved repeats per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU bf16 units: {cpu_bf16_supported()}; torch threads {torch.get_num_threads()}")
    for section in args.sections:
        runners = {"encoder": encoder_steps, "stage2_parts": stage2_parts, "attention": attention_steps, "tower": tower_steps}
        runners.get(section, partial(llm_steps, section))(args.steps)


if __name__ == "__main__":
    main()
