"""Training-step time of RevisionModel against the bare LLM fed inputs_embeds of the same length.

The multimodal step adds the projector (once per sample) and the splice; the target is <= 5% over the
bare LLM. Also shows how step time grows with num_visual_tokens (1, 64, 576 by default). On CPU it
uses a small Llama config in float32; with CUDA, a ~0.5B Qwen2-shaped config in bf16 with SDPA (and
flash-attn 2 when installed), reporting tokens/s.

    python bench/train_step.py [--steps 10] [--visual 1 64 576] [--threads 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from revision.model import IMAGE_TOKEN_INDEX, RevisionConfig, RevisionModel
from revision.tiny.lm import tiny_config
from transformers import AutoModelForCausalLM

CPU_CONFIG = dict(family="llama", vocab_size=8000, hidden_size=256, num_layers=4, num_heads=4)
GPU_CONFIG = dict(family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True)
EMBED_DIM = 768


def build(config: dict, attn: str, device: str, dtype: torch.dtype) -> RevisionModel:
    config = dict(config)
    llm_config = tiny_config(config.pop("family"), config.pop("vocab_size"), config.pop("hidden_size"),
                             config.pop("num_layers"), config.pop("num_heads"), **config)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn, dtype=dtype).to(device)
    revision_config = RevisionConfig(embed_dim=EMBED_DIM, hidden_size=llm_config.hidden_size)
    return RevisionModel(llm, revision_config).to(device)


def step_times(model: RevisionModel, visual: int, args, device: str) -> tuple[list[float], list[float]]:
    """Interleaved timings (seconds) of multimodal and bare steps, so machine load drifts hit both alike."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, model.config.vocab_size, (args.batch, args.text_len), generator=g)
    ids = torch.cat([text[:, :1], torch.full((args.batch, visual), IMAGE_TOKEN_INDEX), text[:, 1:]], 1).to(device)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
    embeds = torch.randn(args.batch, EMBED_DIM, generator=g).to(device)
    text_ids = ids.clamp(min=0)  # the same length, visual positions replaced by token 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn().loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    multimodal = lambda: model(input_ids=ids, labels=labels, image_embeds=embeds)  # noqa: E731
    # The bare LLM gets inputs_embeds from its own embedding layer, so both steps train the same LLM weights.
    bare = lambda: model.llm(inputs_embeds=model.llm.get_input_embeddings()(text_ids), labels=labels)  # noqa: E731
    for _ in range(args.warmup):
        timed(multimodal), timed(bare)
    mm, base = [], []
    for _ in range(args.steps):
        mm.append(timed(multimodal))
        base.append(timed(bare))
    return mm, base


def report(model: RevisionModel, args, device: str, label: str) -> None:
    params = sum(p.numel() for p in model.llm.parameters()) / 1e6
    projector = sum(p.numel() for p in model.projector.parameters()) / 1e6
    print(f"\n{label}: {params:.1f}M-parameter LLM + {projector:.2f}M projector ({EMBED_DIM} -> {model.config.hidden_size}), "
          f"batch {args.batch}, {args.text_len} text tokens + visual block")
    print(f"{'visual':>6} {'seq':>5} {'bare ms':>9} {'revision ms':>12} {'overhead':>9} {'tokens/s':>10}")
    for visual in args.visual:
        mm, base = step_times(model, visual, args, device)
        mm_ms, base_ms = statistics.median(mm) * 1e3, statistics.median(base) * 1e3
        seq = args.text_len + visual
        print(f"{visual:>6} {seq:>5} {base_ms:>9.1f} {mm_ms:>12.1f} {100 * (mm_ms / base_ms - 1):>+8.1f}% "
              f"{args.batch * seq / (mm_ms / 1e3):>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text_len", type=int, default=64)
    parser.add_argument("--visual", type=int, nargs="+", default=[1, 64, 576])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
    report(build(CPU_CONFIG, "sdpa", "cpu", torch.float32), args, "cpu", "cpu fp32 sdpa")
    if torch.cuda.is_available():
        attns = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
        for attn in attns:
            report(build(GPU_CONFIG, attn, "cuda", torch.bfloat16), args, "cuda", f"cuda bf16 {attn} ({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
