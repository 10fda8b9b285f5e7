"""Tiny, randomly initialised CLIP / SigLIP checkpoints built from a config, for tests, the demo and benchmarks.

They are saved with `save_pretrained` exactly like a downloaded checkpoint (model, tokenizer, image
processor, processor config), so `revision.encoders.load_encoder(folder)` goes through the same code path
as it does for `openai/clip-vit-large-patch14-336`. The tokenizer is a real byte-level BPE whose
merges spell out the words of a small corpus, in the model's own tokenizer class.

    python -m demo.tiny.clip OUT_DIR [--size tiny|small|large] [--seed 0] [--siglip]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    TokenizersBackend,
)

# Words of a small procedural world (shapes, colours, places): enough for BPE to learn whole words.
DEFAULT_CORPUS = [
    f"a {size} {colour} {shape} {where}"
    for size in ("small", "large", "tiny", "big")
    for colour in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    for shape in ("circle", "square", "triangle", "star", "cross")
    for where in ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
]

# Model sizes. "tiny" is for unit tests (milliseconds per batch); "small" makes CPU throughput figures mean something.
SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=2, image_size=32, patch=8, projection_dim=16, max_text_len=32),
    "small": dict(hidden=256, layers=4, heads=4, image_size=224, patch=16, projection_dim=128, max_text_len=64),
    # The shapes of openai/clip-vit-large-patch14-336 (random weights): GPU throughput figures without a download.
    "large": dict(hidden=1024, layers=24, heads=16, image_size=336, patch=14, projection_dim=768, max_text_len=77),
}

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word: repeatedly merge the adjacent pair with the lowest rank, as BPE does."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def word_bpe_clip_tokenizer(corpus: Sequence[str], max_len: int) -> CLIPTokenizer:
    """A CLIP-style byte-level BPE (words end in </w>) in which every corpus word is one token.

    Built by hand rather than with `tokenizers`' BpeTrainer because that trainer breaks ties between
    equally frequent pairs in hash order, so two builds could differ; this one is the same for a corpus.
    Each word's pieces under the merges so far are joined by new, lower-priority merges, which cannot
    change how earlier words tokenize. Words outside the corpus still tokenize, into pieces down to bytes.
    """
    backend = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer and pre-tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1}
    for symbol in alphabet + [ch + "</w>" for ch in alphabet]:
        vocab[symbol] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    words = sorted({w for text in corpus for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))})
    for word in words:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks[(left, right)] = len(ranks)
            left += right
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=max_len)


def _word_bpe_siglip_tokenizer(corpus: Sequence[str], max_len: int) -> TokenizersBackend:
    """SigLIP's own tokenizer needs sentencepiece; a generic fast BPE ending texts in EOS serves the same role."""
    clip_tok = word_bpe_clip_tokenizer(corpus, max_len)
    backend = clip_tok.backend_tokenizer
    eos_id = backend.token_to_id(EOS)
    backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, eos_id)])
    return TokenizersBackend(
        tokenizer_object=backend, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=max_len
    )


def build_tiny_clip(
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    corpus: Sequence[str] | None = None,
    siglip: bool = False,
) -> Path:
    """Build and save a randomly initialised CLIPModel (or SiglipModel) with tokenizer and processor.

    The same (size, seed, corpus) gives bit-identical weights and tokenizer.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    s = SIZES[size]
    out_dir = Path(out_dir)
    corpus = list(corpus or DEFAULT_CORPUS)
    text = dict(
        hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], max_position_embeddings=s["max_text_len"],
    )
    vision = dict(
        hidden_size=s["hidden"], intermediate_size=4 * s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], image_size=s["image_size"], patch_size=s["patch"], num_channels=3,
    )
    crop = {"height": s["image_size"], "width": s["image_size"]}
    if siglip:
        tokenizer = _word_bpe_siglip_tokenizer(corpus, s["max_text_len"])
        text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.eos_token_id, projection_size=s["hidden"])
        config = SiglipConfig(text_config=text, vision_config=vision)
        image_processor = SiglipImageProcessorPil(size=crop)
        processor_cls, model_cls = SiglipProcessor, SiglipModel
    else:
        tokenizer = word_bpe_clip_tokenizer(corpus, s["max_text_len"])
        # CLIP pools the text at the first EOS token; the config must name the tokenizer's ids.
        text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["projection_dim"])
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": s["image_size"]}, crop_size=crop)
        processor_cls, model_cls = CLIPProcessor, CLIPModel
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor_cls(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--siglip", action="store_true", help="build a SiglipModel instead of a CLIPModel")
    args = parser.parse_args(argv)
    print(build_tiny_clip(args.out_dir, size=args.size, seed=args.seed, siglip=args.siglip))


if __name__ == "__main__":
    main()
