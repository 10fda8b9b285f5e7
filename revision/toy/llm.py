"""The toy world's LLM: a small HF Llama with a word-level tokenizer, pre-trained as a causal LM on the world's
text (corpus.txt: training captions and QA lines). It stands in for a pretrained LLM: saved with
`save_pretrained`, then loaded by train.py / predict through `from_pretrained` like a downloaded checkpoint.
Each line is preceded by a summary vector built from the LM's own input embeddings of the line's keywords
(`with_summary`), so that, like a real LLM, it can be steered by a vector in its input: the projector's
output in stage 1. It never sees a CLIP embedding.

    python -m revision.toy.llm --world WORLD_DIR --out OUT_DIR [--steps 300] [--hidden 128] [--layers 2]

The tokenizer is revision.tiny.lm's word-level tokenizer (with its chat template) over the world's
vocabulary, so every corpus word is one token and nothing maps to [UNK].
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from revision.tiny.lm import build_tiny_lm, build_tokenizer
from revision.toy import add_config_arguments, config_from_arguments
from revision.toy.world import COUNT_WORDS, parse_caption, vocabulary

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
    summary_share: float = 1.0  # share of batches whose lines get a summary vector after <s> (see with_summary)


def keywords(line: str) -> list[str]:
    """What a line is about: for a caption, the count word and each object's canonical colour, shape, size and
    position words ("two red circle small top left ..."); for a question, the attributes it names; [] for a
    line naming none (an answer such as "blue" is then summarised by its own tokens)."""
    objects = parse_caption(line)
    words = [COUNT_WORDS[min(len(objects), len(COUNT_WORDS) - 1)]] if objects and "?" not in line else []
    for obj in objects:
        words += [w for kind in ("colour", "shape", "size", "position") if obj[kind] for w in obj[kind].split()]
    return words


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, max len] ids and their 0/1 mask (at least one column)."""
    width = max(1, max(map(len, rows)))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def corpus_batches(lines: Sequence[str], tokenizer, batch_size: int, seed: int):
    """Endless shuffled batches of whole lines, each `<s> line </s>`, right-padded (pads are ignored in the loss),
    with each line's keyword ids (padded, and their mask) for its summary."""
    ids = [[tokenizer.bos_token_id, *tokenizer(line, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
           for line in lines]
    keyword_ids = [tokenizer.convert_tokens_to_ids(keywords(line)) for line in lines]
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(ids))
        for lo in range(0, len(order) - batch_size + 1, batch_size):
            chosen = order[lo:lo + batch_size]
            input_ids, mask = _padded([ids[i] for i in chosen], tokenizer.pad_token_id)
            yield (input_ids, mask, input_ids.masked_fill(mask == 0, -100),
                   *_padded([keyword_ids[i] for i in chosen], tokenizer.pad_token_id))


def with_summary(model, input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                 keyword_ids: torch.Tensor | None = None, keyword_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Model inputs with one extra position after <s>: the mean of the LM's input embeddings of the line's
    keywords (`keywords`), or of all its tokens where it has none (or none are given).

    A pretrained LLM can be steered by a vector spliced into its input (that is what the projector's output
    is); a small LM trained on independent lines cannot: it never needs its context, and stage 1 (projector
    trained, LLM frozen) stayed at chance. Reading a summary of the line it is about to write gives the toy LLM
    that skill from text alone. The whole-line mean was not enough (greedy captions still at chance); the mean
    of the keywords, in every batch, with tied embeddings, is (docs/results.md). The summary is not a target.
    """
    embed = model.get_input_embeddings()
    tokens = embed(input_ids)
    content = mask.clone()
    content[:, 0] = 0  # not <s>
    summary = (tokens * content.unsqueeze(-1)).sum(1) / content.sum(1, keepdim=True).clamp(min=1)
    if keyword_ids is not None:
        has = keyword_mask.sum(1, keepdim=True)
        named = (embed(keyword_ids) * keyword_mask.unsqueeze(-1)).sum(1) / has.clamp(min=1)
        summary = torch.where(has > 0, named, summary)
    one = torch.ones_like(mask[:, :1])
    return {"inputs_embeds": torch.cat([tokens[:, :1], summary.unsqueeze(1), tokens[:, 1:]], 1),
            "attention_mask": torch.cat([one, mask], 1),
            "labels": torch.cat([labels[:, :1], torch.full_like(labels[:, :1], -100), labels[:, 1:]], 1)}


def train_toy_llm(world_dir: str | Path, out_dir: str | Path, cfg: ToyLlmConfig | None = None, log_every: int = 100) -> dict:
    """Pre-train on WORLD/corpus.txt and save model + tokenizer to out_dir; returns the training log."""
    cfg = cfg or ToyLlmConfig()
    corpus = Path(world_dir) / "corpus.txt"
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError(f"{corpus}: need at least 2 lines of text, found {len(lines)}")
    tokenizer = build_tokenizer(vocabulary())
    unknown = sum(tokenizer(line, add_special_tokens=False).input_ids.count(tokenizer.unk_token_id) for line in lines[:1000])
    if unknown:
        raise ValueError(f"{corpus}: {unknown} words in the first 1000 lines are not in the world's vocabulary")
    model = build_tiny_lm("llama", tokenizer, cfg.seed, hidden_size=cfg.hidden, num_layers=cfg.layers,
                          num_heads=cfg.heads, intermediate_size=4 * cfg.hidden, tie_word_embeddings=cfg.tie_embeddings).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup, cfg.steps // 10), cfg.steps)
    batches = corpus_batches(lines, tokenizer, min(cfg.batch_size, len(lines)), cfg.seed)
    losses, start, rng = [], time.perf_counter(), np.random.default_rng([cfg.seed, 1])
    for step in range(cfg.steps):
        input_ids, mask, labels, keyword_ids, keyword_mask = next(batches)
        summarised = rng.random() < cfg.summary_share
        inputs = (with_summary(model, input_ids, mask, labels, keyword_ids, keyword_mask) if summarised else
                  {"input_ids": input_ids, "attention_mask": mask, "labels": labels})
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
    return {"config": asdict(cfg), "lines": len(lines), "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": time.perf_counter() - start, "losses": losses}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="a folder written by revision.toy.world")
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
