"""The model one training stage trains, built from its Settings (revision/settings.py): a fresh projector on an LLM
or a ReVision checkpoint continued, a stage-1 projector loaded into it, and the right parameters trainable.

The refusals left here need the weights themselves: a projector whose shapes do not fit the store's dim or the
LLM's width. They raise ValueError; train.py prints them as one line.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from revision.embedding_table import EmbeddingTable
from revision.model import RevisionModel
from revision.projector import load_projector_state, load_projector_weights, set_input_statistics
from revision.settings import Settings

STANDARDIZE_ROWS = 100_000  # rows (evenly spread over the store) that fix a fresh projector's input statistics
logger = logging.getLogger(__name__)


def build_model(settings: Settings, table: EmbeddingTable,
                image_map: Callable[[np.ndarray], np.ndarray] | None = None) -> RevisionModel:
    """The model for this stage, with the right parameters trainable; `image_map` is what the data applies to the
    store's rows (a fresh projector's input statistics are taken after it)."""
    if settings.continues_model:  # continue from a ReVision checkpoint
        model = RevisionModel.from_pretrained(settings.llm, dtype=settings.dtype, attn_implementation=settings.attn_implementation)
        model.revision_config.template = settings.template
        model.revision_config.num_visual_tokens = settings.num_visual_tokens  # what this run's data is built with
        model.check_embed_dim(table.dim, f"embeddings in {table.root}")
    else:
        model = RevisionModel.from_llm(settings.llm, table.dim, settings.projector_type, settings.num_visual_tokens,
                                       settings.template, table.encoder, settings.dtype, settings.attn_implementation,
                                       settings.projector_tokens)
        if settings.standardize_projector_input and not settings.adapter:
            standardize_input(model, table, image_map)
    model.revision_config.system_prompt = settings.system_prompt
    model.revision_config.image_placement = settings.image_placement
    if settings.adapter:
        load_stage1_projector(model, settings.adapter, table, settings.projector_type)
    set_trainable(model, settings)
    return model


def standardize_input(model: RevisionModel, table: EmbeddingTable,
                      image_map: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """A fresh projector's input statistics from up to STANDARDIZE_ROWS usable rows of the store, as the data feeds them."""
    rows = np.setdiff1d(np.linspace(0, len(table) - 1, min(len(table), STANDARDIZE_ROWS)).astype(np.int64),
                        table.unusable_rows)  # NaN / Inf / zero rows never train, so they set nothing
    sample = np.asarray(table.embeds[rows], dtype=np.float32)
    mean_norm, scale = set_input_statistics(model.projector, image_map(sample) if image_map else sample)
    logger.info("projector input standardised: mean norm %.4f, scalar std %.5f (%d rows of %s)", mean_norm, scale,
                len(sample), table.root)


def load_stage1_projector(model: RevisionModel, adapter: str, table: EmbeddingTable, projector_type: str) -> None:
    """Load --pretrain_mm_mlp_adapter's weights into the projector; refuse weights of another dim, type or width."""
    weights = load_projector_weights(adapter)
    first = weights.get("0.weight")
    if first is not None and first.shape[1] != table.dim:
        raise ValueError(f"{adapter}: projector takes dim {first.shape[1]}, but the "
                         f"embeddings in {table.root} have dim {table.dim} (another encoder?)")
    try:
        load_projector_state(model.projector, weights)
    except RuntimeError as e:  # another projector type or LLM width than this model's
        raise ValueError(f"{adapter}: these projector weights do not fit a {projector_type} projector "
                         f"{table.dim} -> {model.revision_config.hidden_size}: {e}") from None


def set_trainable(model: RevisionModel, settings: Settings) -> None:
    """Stage 1: the projector only; stage 2: projector + LoRA adapters (--lora_enable), or + the LLM's top layers
    (--tune_llm_top_layers), else everything."""
    training = settings.training
    if (settings.projector_only or training.lora_enable) and training.bf16 and not training.deepspeed:
        # a frozen LLM (LoRA: its base; peft keeps the adapters in fp32) under bf16 autocast is held in bf16 once, not
        # cast every step; DeepSpeed loads it in bf16 already
        model.llm.to(torch.bfloat16)
    if settings.projector_only:
        model.freeze_llm()
    elif training.lora_enable:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=training.lora_r, lora_alpha=training.lora_alpha, lora_dropout=training.lora_dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model.llm = get_peft_model(model.llm, lora)
        model.projector.requires_grad_(True)
    elif settings.tune_llm_top_layers is not None:
        model.freeze_llm()
        for module in top_decoder_modules(model.llm, settings.tune_llm_top_layers):
            module.requires_grad_(True)
    else:
        model.requires_grad_(True)


def top_decoder_modules(llm: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The decoder's last `count` layers and its final norm (HF decoders hold them as .layers and .norm)."""
    decoder = llm.get_decoder()
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise ValueError(f"--tune_llm_top_layers needs a decoder with .layers and .norm; {type(decoder).__name__} has not both")
    if not 1 <= count <= len(layers):
        raise ValueError(f"--tune_llm_top_layers {count}: the LLM has {len(layers)} decoder layers")
    return [*layers[len(layers) - count:], norm]
