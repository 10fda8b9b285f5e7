"""Tiny HF causal LMs, a word-level tokenizer and a learnable tiny corpus, all built locally.

They stand in for real checkpoints in tests and in the launchers' embedded default: the same
`from_pretrained` paths load them as load a real 8B model. Captions name a colour and a shape, and each
caption's embedding is the sum of a colour and a shape prototype plus noise, so a projector can learn
to tell the LLM which caption an embedding stands for.

    python -m demo.tiny.lm OUT [--family llama] [--kind text] [--n 256] [--dim 32]
writes OUT/model (LLM + tokenizer; kept if there) and OUT/KIND/{store,train.json}.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star"]
QUESTIONS = ["what colour is it ?", "what shape is it ?"]
# Words the templates and questions use, so nothing maps to [UNK].
WORDS = COLOURS + SHAPES + "a an the is it what colour shape USER ASSISTANT : ? . , picture of describe this".split()
SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "<s>", "eos_token": "</s>"}
CHAT_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# A minimal chat template so the tokenizer-owned template path is exercised like a real instruct model's.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
FAMILIES = {  # model_type -> config overrides a tiny model of that family needs
    "llama": {},
    "qwen2": {},
    "phi3": {},
    "gemma": {"head_dim": 16},
}


def build_tokenizer(words: list[str] | None = None, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (whitespace + punctuation split) over `words`."""
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL.values()) + CHAT_ROLES + sorted(set(words or WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL, additional_special_tokens=CHAT_ROLES)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str, vocab_size: int, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                **overrides) -> PreTrainedConfig:
    """A small config of any causal-LM family AutoConfig knows."""
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    kwargs.update(FAMILIES.get(family, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_tiny_lm(family: str = "llama", tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0,
                  **config_overrides) -> PreTrainedModel:
    """A randomly initialised tiny causal LM whose vocabulary matches `tokenizer`."""
    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(family, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def save_tiny_lm(out_dir: str | os.PathLike, family: str = "llama", seed: int = 0, chat_template: bool = True,
                 **config_overrides) -> Path:
    """Build and save a tiny LM and its tokenizer in HF format; returns the folder."""
    tokenizer = build_tokenizer(chat_template=chat_template)
    model = build_tiny_lm(family, tokenizer, seed, **config_overrides)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_embeddings(n: int, dim: int, seed: int = 0, noise: float = 0.1) -> tuple[list[str], np.ndarray]:
    """n captions and their embeddings: colour prototype + shape prototype + noise (unit rows)."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(1234).standard_normal((len(COLOURS) + len(SHAPES), dim))
    colour = rng.integers(len(COLOURS), size=n)
    shape = rng.integers(len(SHAPES), size=n)
    embeds = protos[colour] + protos[len(COLOURS) + shape] + noise * rng.standard_normal((n, dim))
    embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
    captions = [f"a {COLOURS[c]} {SHAPES[s]}" for c, s in zip(colour, shape)]
    return captions, embeds.astype(np.float32)


def make_tiny_corpus(out_dir: str | os.PathLike, kind: str = "text", n: int = 256, dim: int = 32,
                     seed: int = 0) -> tuple[Path, Path]:
    """Write an embedding store and a LLaVA-style data file; returns (store folder, data file).

    kind "text": pretraining data (caption after the image). kind "image": instruction data asking for
    the colour or the shape, two turns, plus a few image-free samples.
    """
    from revision.store_writer import write_store

    out_dir = Path(out_dir)
    captions, embeds = tiny_embeddings(n, dim, seed)
    ids = [f"{kind}{i:06d}" for i in range(n)]
    store = out_dir / "store"
    write_store(store, kind, ids, embeds, captions if kind == "text" else [f"images/{i}.png" for i in ids],
                encoder="tiny/random-prototypes", dtype="float32", overwrite=True)
    if kind == "text":
        samples = [{"id": i, "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": c}]}
                   for i, c in zip(ids, captions)]
    else:
        samples = []
        for i, c in zip(ids, captions):
            _, colour, shape = c.split()
            samples.append({"id": i, "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTIONS[0]}"}, {"from": "gpt", "value": colour},
                {"from": "human", "value": QUESTIONS[1]}, {"from": "gpt", "value": shape}]})
        samples += [{"id": f"textonly{j}", "conversations": [
            {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a shape ."}]} for j in range(4)]
    data = out_dir / "train.json"
    data.write_text(json.dumps(samples, indent=0))
    return store, data


def make_tiny_training_world(root: str | os.PathLike, hidden_size: int = 32, num_layers: int = 1, n: int = 64,
                             dim: int = 16) -> dict[str, str | tuple[str, str]]:
    """A tiny LM plus a text (pretraining) and an image (instruction) corpus under root: {"model": folder,
    "text": (store, data file), "image": (store, data file)}, all as strings."""
    root = Path(root)
    model = save_tiny_lm(root / "model", "llama", hidden_size=hidden_size, num_layers=num_layers)
    corpora = {kind: make_tiny_corpus(root / kind, kind, n=n, dim=dim) for kind in ("text", "image")}
    return {"model": str(model), **{kind: (str(store), str(data)) for kind, (store, data) in corpora.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    parser.add_argument("--kind", default="text", choices=["text", "image"], help="text: pretraining, image: instruction")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out_dir)
    if not (out / "model" / "config.json").exists():
        save_tiny_lm(out / "model", args.family, hidden_size=args.hidden_size)
    store, data = make_tiny_corpus(out / args.kind, args.kind, args.n, args.dim)
    print(f"model {out / 'model'}\nstore {store}\ndata {data}")


if __name__ == "__main__":
    main()
