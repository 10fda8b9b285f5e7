"""Training-step figures of RevisionModel, in three sections (all by default):

overhead: step time against the bare LLM fed inputs_embeds of the same length. The multimodal step adds the
  projector (once per sample) and the splice; the target is <= 5% over the bare LLM. Also shows how step time
  grows with num_visual_tokens (1, 64, 576 by default).
padding: the share of pad positions in stage-1 and stage-2 batches, on the toy world and on a LLaVA-Pretrain-like
  caption length distribution, with 1 and 576 visual tokens: padded (random batches, as the default sampler
  draws them), length-grouped (--group_by_length) and packed (--packing) batches.
throughput: stage-1 real (non-pad) tokens/s on LLaVA-Pretrain-like captions for padded, length-grouped and
  packed batches of the same samples, and packed batches of --fill times as many samples (what packing allows at
  the same memory: the same optimisation with gradient accumulation lowered as much), interleaved in one run;
  ratios against padded.

On CPU a small Llama config in float32; with CUDA, a ~0.5B Qwen2-shaped config in bf16 with SDPA (and
flash-attn 2 when installed: packed steps then go through the varlen kernel), reporting tokens/s.

    python bench/train_step.py [--sections overhead padding throughput] [--steps 10] [--visual 1 64 576]
        [--throughput_visual 1 576] [--fill 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: demo/ is not installed
from demo.tiny.lm import build_tokenizer, tiny_config
from demo.world import WorldSizes, make_world, vocabulary
from revision.conversation import normalise_turns, render
from revision.data import DataCollator, estimate_length, tokenize
from revision.model import IMAGE_TOKEN_INDEX, RevisionConfig, RevisionModel
from revision.packing import EpochLengthGroupedSampler, PackingCollator, padding_share, uses_flash_attention

CPU_CONFIG = dict(family="llama", vocab_size=8000, hidden_size=256, num_layers=4, num_heads=4)
GPU_CONFIG = dict(family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True)
EMBED_DIM = 768
SECTIONS = ["overhead", "padding", "throughput"]


def build(config: dict, attn: str, device: str, dtype: torch.dtype) -> RevisionModel:
    config = dict(config)
    llm_config = tiny_config(config.pop("family"), config.pop("vocab_size"), config.pop("hidden_size"),
                             config.pop("num_layers"), config.pop("num_heads"), **config)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=attn, dtype=dtype).to(device)
    revision_config = RevisionConfig(embed_dim=EMBED_DIM, hidden_size=llm_config.hidden_size)
    return RevisionModel(llm, revision_config).to(device)


def step_seconds(fn, optimizer: torch.optim.Optimizer, device: str) -> float:
    """Seconds of one training step: fn() (a forward returning .loss), backward, optimizer step."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn().loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_times(model: RevisionModel, visual: int, args, device: str) -> tuple[list[float], list[float]]:
    """Interleaved timings (seconds) of multimodal and bare steps, so machine load drifts hit both alike."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, model.config.vocab_size, (args.batch, args.text_len), generator=g)
    ids = torch.cat([text[:, :1], torch.full((args.batch, visual), IMAGE_TOKEN_INDEX), text[:, 1:]], 1).to(device)
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
    embeds = torch.randn(args.batch, EMBED_DIM, generator=g).to(device)
    text_ids = ids.clamp(min=0)  # the same length, visual positions replaced by token 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    timed = lambda fn: step_seconds(fn, optimizer, device)  # noqa: E731
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


def report(model: RevisionModel, args, device: str, label: str) -> dict[int, dict[str, float]]:
    """Prints the overhead table; returns {visual tokens: {bare_ms, revision_ms, overhead, tokens_per_s}}."""
    params = sum(p.numel() for p in model.llm.parameters()) / 1e6
    projector = sum(p.numel() for p in model.projector.parameters()) / 1e6
    print(f"\n{label}: {params:.1f}M-parameter LLM + {projector:.2f}M projector ({EMBED_DIM} -> {model.config.hidden_size}), "
          f"batch {args.batch}, {args.text_len} text tokens + visual block")
    print(f"{'visual':>6} {'seq':>5} {'bare ms':>9} {'revision ms':>12} {'overhead':>9} {'tokens/s':>10}")
    rows = {}
    for visual in args.visual:
        mm, base = step_times(model, visual, args, device)
        mm_ms, base_ms = statistics.median(mm) * 1e3, statistics.median(base) * 1e3
        seq = args.text_len + visual
        rows[visual] = {"bare_ms": base_ms, "revision_ms": mm_ms, "overhead": mm_ms / base_ms - 1,
                        "tokens_per_s": args.batch * seq / (mm_ms / 1e3)}
        print(f"{visual:>6} {seq:>5} {base_ms:>9.1f} {mm_ms:>12.1f} {100 * rows[visual]['overhead']:>+8.1f}% "
              f"{rows[visual]['tokens_per_s']:>10.0f}")
    return rows


# ---- padding share -------------------------------------------------------------------------------------

# LLaVA-Pretrain (LCS-558K, BLIP captions of LAION/CC/SBU images) caption lengths, from published statistics:
# - ShareGPT4V (arXiv 2311.12793), Table 1: BLIP-LCS 558K captions average 54 characters (COCO-Caption: 52);
# - BLIP3-KALE (arXiv 2411.07461), Table 1: LAION-COCO, BLIP captions of LAION images, average 8.99 words;
# so about 10 words a caption. Not published, so assumed: a log-normal spread with sigma 0.35 (BLIP captions are
# one short sentence; this puts 90% of captions between 5.6 and 17.8 words), clipped to 3..40 words, and 1.3
# Llama-family BPE tokens per English word. Plain template: bos + visual block + caption + eos.
LLAVA_WORDS_MEAN, LLAVA_WORDS_SIGMA, LLAVA_TOKENS_PER_WORD = 10.0, 0.35, 1.3


def llava_pretrain_lengths(visual: int, n: int, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(token lengths, the dataset's length estimates, visual tokens of each sample) of n LLaVA-Pretrain-like
    stage-1 samples (every one with an image)."""
    rng = np.random.default_rng(seed)
    mu = np.log(LLAVA_WORDS_MEAN) - LLAVA_WORDS_SIGMA ** 2 / 2  # so the mean is LLAVA_WORDS_MEAN
    words = np.clip(np.round(rng.lognormal(mu, LLAVA_WORDS_SIGMA, n)), 3, 40).astype(int)
    tokens = np.ceil(words * LLAVA_TOKENS_PER_WORD).astype(int) + visual + 2
    return tokens.tolist(), (words + visual).tolist(), [visual] * n


def toy_lengths(stage: int, visual: int, n: int, max_length: int) -> tuple[list[int], list[int], list[int]]:
    """(token lengths, the dataset's length estimates, visual tokens of each sample: 0 for an image-free one) of n
    toy-world samples of stage 1 (captions, plain template) or stage 2 (QA conversations and image-free chats, the
    tokenizer's chat template), tokenized as training does."""
    world = make_world(0, WorldSizes(paired=0, unpaired_images=n, unpaired_texts=n, instruct=n, text_only=n // 40, eval=0))
    tokenizer = build_tokenizer(vocabulary())
    if stage == 1:
        samples = [[{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": item.caption}]
                   for item in world.unpaired_texts]
    else:
        samples = [rec["conversations"] for rec in world.instruct]
    template = "plain" if stage == 1 else "chat"
    tokens, estimates, visuals = [], [], []
    for conversation in samples:
        has_image = any("<image>" in turn["value"] for turn in conversation)
        ids, _, _ = tokenize(render(conversation, template, tokenizer), tokenizer, visual, max_length)
        tokens.append(len(ids))
        visuals.append(visual if has_image else 0)
        estimates.append(estimate_length(normalise_turns(conversation), visuals[-1]))
    return tokens, estimates, visuals


def padding_report(args) -> None:
    print(f"\npadding share: batches of {args.batch} samples (per_device_train_batch_size), model_max_length "
          f"{args.max_length}; padded = random batches, grouped = --group_by_length order, packed = --packing rows")
    print(f"{'data':<26} {'visual':>6} {'mean len':>8} {'padded':>7} {'grouped':>8} {'packed':>7}")
    for visual in (1, 576):
        sources = [("toy stage 1 (captions)", toy_lengths(1, visual, args.samples, args.max_length)),
                   ("toy stage 2 (QA)", toy_lengths(2, visual, args.samples, args.max_length)),
                   ("LLaVA-Pretrain-like", llava_pretrain_lengths(visual, args.samples))]
        for name, (tokens, estimates, _) in sources:
            tokens = np.asarray(tokens)
            shuffled = tokens[np.random.default_rng(0).permutation(len(tokens))].tolist()
            grouped = tokens[list(EpochLengthGroupedSampler(args.batch, estimates))].tolist()
            print(f"{name:<26} {visual:>6} {tokens.mean():>8.1f} {padding_share(shuffled, args.batch):>7.1%} "
                  f"{padding_share(grouped, args.batch):>8.1%} {padding_share(shuffled, args.batch, args.max_length):>7.1%}")
    print("(packed with flash-attn: one row per step, no padding at all)")


# ---- real tokens/s ---------------------------------------------------------------------------------------


def caption_samples(lengths: list[int], visuals: list[int], vocab_size: int, seed: int = 0) -> list[dict]:
    """Samples of the given lengths as the dataset returns them: bos, the visual block (`visuals[i]` tokens; none,
    and no image embedding, for an image-free sample), text; labels on the text after the block."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n, visual in zip(lengths, visuals, strict=True):
        text = torch.randint(10, vocab_size, (n - visual,), generator=g)
        ids = torch.cat([text[:1], torch.full((visual,), IMAGE_TOKEN_INDEX), text[1:]])
        labels = torch.where(torch.arange(n) > visual, ids, -100)
        samples.append({"input_ids": ids, "labels": labels,
                        "image_embeds": torch.randn(EMBED_DIM, generator=g) if visual else None})
    return samples


def layouts(samples: list[dict], estimates: list[int], args, flatten: bool) -> dict[str, tuple[object, list[list[int]]]]:
    """name -> (collator, batches of sample indices): padded (random batches), length-grouped, packed with the same
    samples a step, and packed with `--fill` times as many (gradient accumulation lowered as much: the same
    optimisation in fewer, fuller steps)."""
    def batches(indices: list[int], size: int) -> list[list[int]]:
        return [indices[i: i + size] for i in range(0, len(indices) - size + 1, size)][: args.steps + args.warmup]

    order = np.random.default_rng(0).permutation(len(samples)).tolist()
    grouped = list(EpochLengthGroupedSampler(args.batch, estimates))
    padded, packing = DataCollator(0, EMBED_DIM), PackingCollator(0, EMBED_DIM, args.max_length, flatten)
    return {"padded": (padded, batches(order, args.batch)), "grouped": (padded, batches(grouped, args.batch)),
            "packed": (packing, batches(order, args.batch)),
            f"packed x{args.fill}": (packing, batches(order, args.batch * args.fill))}


def throughput_report(model: RevisionModel, args, device: str, label: str, stage: int = 1) -> dict[int, dict[str, float]]:
    """Prints the tokens/s table; returns {visual tokens: {layout: real tokens/s}}. Stage 1: LLaVA-Pretrain-like
    captions, LLM frozen; stage 2: the toy world's QA conversations (tokenized as training does), LLM trained."""
    data = "LLaVA-Pretrain-like captions" if stage == 1 else "toy-world QA conversations"
    print(f"\n{label}: stage-{stage} real (non-pad) tokens/s, {data}, {args.batch} samples a step "
          f"(packed x{args.fill}: {args.batch * args.fill}), model_max_length {args.max_length}")
    print(f"{'visual':>6} {'layout':<11} {'last tensor':>12} {'pad':>6} {'ms/step':>8} {'real tok/s':>11} {'vs padded':>9}")
    if stage == 1:
        model.freeze_llm()  # stage 1, where captions are short: the projector trains, gradients pass through the LLM
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rates = {}
    for visual in args.throughput_visual:
        n = (args.steps + args.warmup) * args.batch * args.fill
        tokens, estimates, visuals = (llava_pretrain_lengths(visual, n) if stage == 1
                                      else toy_lengths(2, visual, n, args.max_length))
        samples = caption_samples(tokens, visuals, model.config.vocab_size)
        steps = {}  # name -> [(inputs on the device, real tokens)]
        for name, (collate, batches) in layouts(samples, estimates, args, uses_flash_attention(model)).items():
            steps[name] = [({k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([samples[i] for i in b]).items()},
                            sum(tokens[i] for i in b)) for b in batches]
        seconds = {name: [] for name in steps}
        for j in range(args.steps + args.warmup):  # interleaved, so load drifts hit every layout alike
            for name, batches in steps.items():
                seconds[name].append(step_seconds(lambda inputs=batches[j][0]: model(**inputs), optimizer, device))
        rate = {}
        for name, batches in steps.items():
            timed, measured = seconds[name][args.warmup:], batches[args.warmup:]
            real = sum(n for _, n in measured)
            pad = 1 - real / sum(inputs["input_ids"].numel() for inputs, _ in measured)
            rate[name] = real / sum(timed)
            print(f"{visual:>6} {name:<11} {str(tuple(measured[-1][0]['input_ids'].shape)):>12} {pad:>6.1%} "
                  f"{1e3 * statistics.median(timed):>8.1f} {rate[name]:>11.0f} {rate[name] / rate['padded']:>8.2f}x")
        rates[visual] = rate
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="samples per step (launch.sh's BATCH)")
    parser.add_argument("--text_len", type=int, default=64)
    parser.add_argument("--visual", type=int, nargs="+", default=[1, 64, 576])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--throughput_visual", type=int, nargs="+", default=[1, 576])
    parser.add_argument("--fill", type=int, default=4, help="packed xN: N times the samples a step")
    parser.add_argument("--max_length", type=int, default=2048, help="model_max_length for padding and packing")
    parser.add_argument("--samples", type=int, default=2000, help="samples per length distribution")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
    if "padding" in args.sections:
        padding_report(args)
    for section, run in (("overhead", report), ("throughput", throughput_report)):
        if section not in args.sections:
            continue
        run(build(CPU_CONFIG, "sdpa", "cpu", torch.float32), args, "cpu", "cpu fp32 sdpa")
        if torch.cuda.is_available():
            for attn in ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []):
                run(build(GPU_CONFIG, attn, "cuda", torch.bfloat16), args, "cuda",
                    f"cuda bf16 {attn} ({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
