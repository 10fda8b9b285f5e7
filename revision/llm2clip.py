"""LLM2CLIP, the paper's encoder, on stock transformers classes: no remote code runs (docs/recipe.md).

Its checkpoints ship Python (`modeling_clip.py`, `modeling_llama_encoder.py`) written for transformers 4.x;
their weights are standard parts, so this module loads the weights into standard classes instead:

  vision checkpoint (microsoft/LLM2CLIP-Openai-L-14-336; config.json: CLIP `vision_config`, `projection_dim`)
    vision_model.*, visual_projection.weight     -> CLIPVisionModelWithProjection (a CLIP ViT-L/14-336)
    text_adapter.adaptor.{0..B-1}.{ln,fn.0,fn.3}  -> TextAdapter below: B residual MLP blocks
    text_adapter.adaptor.{B,B+1}                    LayerNorm, then Linear into the shared space
    logit_scale (and any CLIP text tower)         -> unused
  text checkpoint (microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned, an LLM2Vec Llama)
    embed_tokens.*, layers.*, norm.*              -> LlamaModel, run with bidirectional attention

A caption is embedded as LLM2Vec does it (pooling "mean", max_length 512, the Llama-3 instruct wrapping
`<|start_header_id|>user<|end_header_id|>\\n\\n{text}<|eot_id|>`, mean over the caption's own tokens),
then the adapter maps the L2-normalised LLM embedding into the CLIP space, as in LLM2CLIP's training code
(eva_clip TextProj). Images: the CLIP vision tower and its projection.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER = "text_adapter.adaptor."
LLAMA3_USER = ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
IGNORED = ("logit_scale", "text_model.", "text_projection.")  # in the checkpoint, not part of the encoder


class LinearBlock(nn.Module):
    """x + fn(ln(x)), fn = Linear(d, e*d), GELU, Dropout, Linear(e*d, d): LLM2CLIP's adapter block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.ln(x))


class TextAdapter(nn.Module):
    """LLM embedding -> CLIP space: L2-normalise, `blocks` LinearBlocks, LayerNorm, Linear."""

    def __init__(self, dim: int, hidden: int, out_dim: int, blocks: int, bias: bool):
        super().__init__()
        self.adaptor = nn.Sequential(*[LinearBlock(dim, hidden) for _ in range(blocks)], nn.LayerNorm(dim),
                                     nn.Linear(dim, out_dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adaptor(F.normalize(x, dim=-1))

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], source: str) -> TextAdapter:
        """Sizes read off the tensors (`adaptor.*` keys); every key must be used."""
        blocks = sum(1 for k in tensors if k.startswith("adaptor.") and k.endswith(".fn.0.weight"))
        head = tensors.get(f"adaptor.{blocks + 1}.weight")
        if blocks == 0 or head is None:
            raise ValueError(f"{source}: no LLM2CLIP text adapter ({ADAPTER}{{0..N}}.fn.0.weight and "
                             f"{ADAPTER}{{N+1}}.weight); keys: {sorted(tensors)[:8]}")
        hidden, dim = tensors["adaptor.0.fn.0.weight"].shape
        adapter = cls(dim, hidden, head.shape[0], blocks, bias=f"adaptor.{blocks + 1}.bias" in tensors)
        missing, unexpected = adapter.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: text adapter keys do not match LLM2CLIP's layout: missing {missing}, "
                             f"unexpected {unexpected}")
        return adapter


def local_folder(name: str) -> Path:
    """A folder as is; a hub id downloaded (weights and configs only: no code files)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"LLM2CLIP checkpoint {name!r}: no such folder (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))


def checkpoint_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with `prefix` (prefix removed), from safetensors (sharded or not) or,
    failing that, a torch .bin read with weights_only (no code)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    files = [folder / f for f in files] or sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    if not files:
        for file in sorted(folder.glob("*.bin")):
            state = torch.load(file, map_location="cpu", weights_only=True)
            tensors.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if not files and not tensors and not list(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder}: no *.safetensors or *.bin weights")
    return tensors


def load_vision(folder: Path, dtype: torch.dtype):
    """(CLIPVisionModelWithProjection, TextAdapter) from an LLM2CLIP vision checkpoint folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging

    config = json.loads((folder / "config.json").read_text())
    if "vision_config" not in config or "projection_dim" not in config:
        raise ValueError(f"{folder}/config.json: not an LLM2CLIP checkpoint (no vision_config / projection_dim)")
    fields = {k: v for k, v in config["vision_config"].items() if k not in ("model_type", "architectures")}
    vision_config = CLIPVisionConfig(**{**fields, "projection_dim": config["projection_dim"]})
    quiet = logging.get_logger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its report lists the adapter as unexpected; the keys are checked below
    try:
        vision, info = CLIPVisionModelWithProjection.from_pretrained(folder, config=vision_config, dtype=dtype,
                                                                     output_loading_info=True)
    finally:
        quiet.setLevel(level)
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith((ADAPTER, *IGNORED))]
    if missing or unexpected:
        raise ValueError(f"{folder}: vision weights do not match CLIP's layout: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    adapter = TextAdapter.from_state_dict(checkpoint_tensors(folder, "text_adapter."), str(folder)).to(dtype)
    return vision.eval(), adapter.eval()


class LLM2VecText(nn.Module):
    """An LLM2Vec Llama: LlamaModel with bidirectional attention (padding masked), mean-pooled caption tokens."""

    def __init__(self, name: str, dtype: torch.dtype, max_length: int = 512):
        super().__init__()
        from transformers import AutoTokenizer, LlamaModel

        self.llm, info = LlamaModel.from_pretrained(name, dtype=dtype, attn_implementation="sdpa",
                                                    output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(f"{name}: not a Llama checkpoint; missing {info['missing_keys'][:8]}")
        for layer in self.llm.layers:
            layer.self_attn.is_causal = False
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.tokenizer.padding_side = "left"  # LLM2Vec pools the last tokens of left-padded rows
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        self.max_length = max_length
        # LLM2Vec wraps captions in the Llama-3 user turn for Llama-3 instruct models (what LLM2CLIP uses)
        self.wrap = LLAMA3_USER if LLAMA3_USER[1] in self.tokenizer.get_vocab() else ("", "")

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = self.llm.embed_tokens.weight.device
        captions = [t.strip() + self.wrap[1] for t in texts]
        batch = self.tokenizer([self.wrap[0] + c for c in captions], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(device)
        # the caption's own tokens (LLM2Vec's embed_mask): the last n of each left-padded row
        counts = [len(self.tokenizer(c, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"])
                  for c in captions]
        keep = batch["attention_mask"].bool()
        dtype = self.llm.embed_tokens.weight.dtype
        # bidirectional: every token sees every non-padding token; a 4D mask is used as given
        mask = torch.zeros(keep.shape[0], 1, keep.shape[1], keep.shape[1], dtype=dtype, device=device)
        mask.masked_fill_(~keep[:, None, None, :], torch.finfo(dtype).min)
        hidden = self.llm(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        return torch.stack([hidden[i, -n:].mean(0) if n else hidden[i, -1] for i, n in enumerate(counts)])
