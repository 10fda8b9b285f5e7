"""The toy world's LLM: a small HF Llama with a word-level tokenizer, pre-trained on the world's text. It stands
in for a pretrained, instruction-tuned LLM: saved with `save_pretrained`, then loaded by train.py / predict
through `from_pretrained` like a downloaded checkpoint.

Its pretraining samples are the world's training captions (paired and unpaired) rendered exactly as the two
stages render theirs: each caption after the image slot (template `plain`, stage 1's) and a QA conversation
about the same scene (the tokenizer's chat template, stage 2's, the image slot opening the first question).
The image slot holds a summary vector: the mean of the LM's own input embeddings of the caption's keywords
(`keywords`, `with_summary`). So, like a real LLM, it can be steered by a vector in its input (the projector's
output) and it knows its chat format. It never sees a CLIP embedding.

    python -m demo.llm --world WORLD_DIR --out OUT_DIR [--steps 300] [--hidden 192] [--layers 1]

The tokenizer is demo.tiny.lm's word-level tokenizer (with its chat template) over the world's
vocabulary, so every word is one token and nothing maps to [UNK].
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from demo import add_config_arguments, config_from_arguments
from demo.tiny.lm import build_tiny_lm, build_tokenizer
from demo.world import COUNT_WORDS, Scene, parse_caption, qa_conversation, vocabulary
from revision.conversation import render, resolve_template
from revision.data import tokenize
from revision.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from revision.records import read_records

REPORT = "toy_llm_report.json"


@dataclass
class ToyLlmConfig:
    # One layer, 192 wide, tied embeddings, lr 1e-3: of the shapes that train in ~30 s on one CPU thread, the one
    # whose stage-1 projector (trained on paired image embeddings) named eval images' colours best (docs/results.md).
    hidden: int = 192
    layers: int = 1
    heads: int = 4
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 30
    seed: int = 0
    tie_embeddings: bool = True
    max_length: int = 96  # tokens per sample (the world's longest QA conversation is about 50)


def keywords(line: str) -> list[str]:
    """What a caption is about: the count word and each object's canonical colour, shape, size and position
    words ("two red circle small top left ..."); for a question, only the attributes it names; [] for a text
    naming none."""
    objects = parse_caption(line)
    words = [COUNT_WORDS[min(len(objects), len(COUNT_WORDS) - 1)]] if objects and "?" not in line else []
    for obj in objects:
        words += [w for kind in ("colour", "shape", "size", "position") if obj[kind] for w in obj[kind].split()]
    return words


def pretraining_samples(world_dir: str | Path, seed: int) -> list[tuple[list[dict], str, str]]:
    """(LLaVA conversation, template, caption whose keywords fill the image slot) for every training caption:
    the caption itself (plain) and a QA conversation about its scene (chat), both keyed to text-only scenes."""
    world_dir = Path(world_dir)
    scenes = {r["id"]: r["attributes"] for r in read_records(world_dir / "scenes.jsonl")}
    max_turns = json.loads((world_dir / "world.json").read_text())["sizes"]["max_turns"]
    captions = [(r["id"], r["caption"]) for r in read_records(world_dir / "paired.jsonl")]
    captions += [(r["id"], r["text"]) for r in read_records(world_dir / "unpaired_texts.jsonl")]
    rng = np.random.default_rng([seed, 2])
    samples = []
    for item_id, caption in captions:
        samples.append(([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": caption}], "plain", caption))
        samples.append((qa_conversation(Scene.from_attributes(scenes[item_id]), rng, max_turns), "chat", caption))
    return samples


def encode_samples(samples: Sequence[tuple[list[dict], str, str]], tokenizer, max_length: int) -> list[tuple[torch.Tensor, ...]]:
    """(input_ids with one IMAGE_TOKEN_INDEX slot, labels, keyword ids) per sample, as train.py tokenizes them."""
    templates = {name: resolve_template(name, tokenizer) for name in ("plain", "chat")}
    encoded = []
    for conversation, template, caption in samples:
        ids, labels, _ = tokenize(render(conversation, templates[template], tokenizer), tokenizer, 1, max_length)
        named = tokenizer.convert_tokens_to_ids(keywords(caption))
        if not named or tokenizer.unk_token_id in named:
            raise ValueError(f"caption {caption!r}: no keywords in the world's vocabulary")
        encoded.append((ids, labels, torch.tensor(named)))
    return encoded


def _padded(rows: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=pad)


def sample_batches(encoded: Sequence[tuple[torch.Tensor, ...]], batch_size: int, seed: int, pad_id: int):
    """Endless shuffled batches: input_ids, attention mask, labels, keyword ids, keyword mask (right-padded)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(encoded))
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            ids, labels, named = zip(*(encoded[i] for i in order[lo:lo + batch_size]))
            mask = _padded([torch.ones_like(x) for x in ids], 0)
            keyword_mask = _padded([torch.ones_like(x) for x in named], 0)
            yield _padded(ids, pad_id), mask, _padded(labels, IGNORE_INDEX), _padded(named, pad_id), keyword_mask


def with_summary(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                 keyword_ids: torch.Tensor, keyword_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs whose image slot (IMAGE_TOKEN_INDEX) holds the mean of the LM's input embeddings of the
    sample's keywords.

    A pretrained LLM can be steered by a vector spliced into its input (that is what the projector's output
    is); a small LM trained on independent lines cannot: it never needs its context, and stage 1 (projector
    trained, LLM frozen) stayed at chance. Reading a summary of what it is about to write gives the toy LLM
    that skill from text alone. A whole-line mean in half the batches was not enough; the mean of the keywords,
    in every sample, with tied embeddings, is (docs/results.md).
    """
    embed = model.get_input_embeddings()
    slot = input_ids == IMAGE_TOKEN_INDEX
    tokens = embed(input_ids.masked_fill(slot, 0))
    summary = (embed(keyword_ids) * keyword_mask.unsqueeze(-1)).sum(1) / keyword_mask.sum(1, keepdim=True).clamp(min=1)
    inputs_embeds = torch.where(slot.unsqueeze(-1), summary.unsqueeze(1).to(tokens.dtype), tokens)
    return {"inputs_embeds": inputs_embeds, "attention_mask": mask, "labels": labels}


def train_toy_llm(world_dir: str | Path, out_dir: str | Path, cfg: ToyLlmConfig | None = None, log_every: int = 100) -> dict:
    """Pre-train on the world's captions and QA about their scenes (`pretraining_samples`) and save model +
    tokenizer to out_dir; returns the training log."""
    cfg = cfg or ToyLlmConfig()
    samples = pretraining_samples(world_dir, cfg.seed)
    if len(samples) < 2:
        raise ValueError(f"{world_dir}: need at least one training caption, found {len(samples) // 2}")
    tokenizer = build_tokenizer(vocabulary())
    encoded = encode_samples(samples, tokenizer, cfg.max_length)
    unknown = sum(int((ids == tokenizer.unk_token_id).sum()) for ids, _, _ in encoded)
    if unknown:
        raise ValueError(f"{world_dir}: {unknown} words of the pretraining samples are not in the world's vocabulary")
    model = build_tiny_lm("llama", tokenizer, cfg.seed, hidden_size=cfg.hidden, num_layers=cfg.layers,
                          num_heads=cfg.heads, intermediate_size=4 * cfg.hidden, tie_word_embeddings=cfg.tie_embeddings).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, cfg.steps // 10), cfg.steps)
    batches = sample_batches(encoded, min(cfg.batch_size, len(encoded)), cfg.seed, tokenizer.pad_token_id)
    losses, start = [], time.perf_counter()
    for step in range(cfg.steps):
        inputs = with_summary(model, *next(batches))
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"toy llm step {step + 1}/{cfg.steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"config": asdict(cfg), "samples": len(samples), "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": time.perf_counter() - start, "losses": losses}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by demo.world")
    parser.add_argument("--out", required=True, help="where the LLM checkpoint and toy_llm_report.json go")
    add_config_arguments(parser, ToyLlmConfig())
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_arguments(args, ToyLlmConfig())
    log = train_toy_llm(args.world, args.out, cfg)
    Path(args.out, REPORT).write_text(json.dumps(log, indent=1) + "\n")
    first, last = np.mean(log["losses"][:10]), np.mean(log["losses"][-10:])
    print(f"toy llm: {log['parameters']:,} parameters, {cfg.steps} steps in {log['train_seconds']:.0f} s, "
          f"loss {first:.3f} -> {last:.3f}; saved to {args.out}")


if __name__ == "__main__":
    main()
