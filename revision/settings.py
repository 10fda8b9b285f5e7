"""The settings resolver: a run's parsed arguments, the checkpoint it continues and its store's manifest, settled in
one pass into one frozen Settings (docs/checkpoints.md, "What stage 2 inherits").

Every refusal and warning about a run's settings is here: flags out of range, a flag that contradicts the stage-1
folder, a length that leaves no room for text, no store, a checkpoint whose save did not finish or whose files
changed, another encoder or LLM than the checkpoint's. Nothing after resolve() changes the arguments: the model
build (revision/build.py), the data and the trainer read the Settings. Only the checks that need the weights
themselves (a projector's shapes against the store's dim) are left to the model build. Defaults:
revision/defaults.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from revision import checkpoint
from revision.arguments import DataArguments, ModelArguments, TrainingArguments
from revision.conversation import IMAGE_PLACEMENTS
from revision.data import check_lengths, embed_noise
from revision.defaults import NUM_VISUAL_TOKENS, PROJECTOR_TOKENS, PROJECTOR_TYPE
from revision.errors import InputError
from revision.gguf import resolve_llm
from revision.model import CONFIG_FILE, RevisionConfig, checkpoint_config, default_attn_implementation
from revision.store import EmbeddingStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Store:
    """What a run takes from its embedding store's manifest (a bare reference-layout folder: its first shard)."""

    root: Path
    kind: str  # text (stage 1: aligned captions) or image
    dim: int
    encoder: str | None
    alignment: str | None  # the statistics file an aligned text store names (embed_mean.py), when it is there


@dataclass(frozen=True)
class Settings:
    """Everything one training stage uses, settled once by resolve(); the model build, data and trainer read it."""

    # the model
    llm: str  # what from_pretrained loads: --model_name_or_path, a .gguf file converted
    continues_model: bool  # llm is a ReVision checkpoint folder (its projector loads with it)
    adapter: str | None  # --pretrain_mm_mlp_adapter: a stage-1 folder or a projector weights file
    projector_type: str
    projector_tokens: int
    num_visual_tokens: int
    template: str
    system_prompt: str | None  # for conversations without one; None: the chat template's own default
    image_placement: str | None  # first / last in the first question; None: where the data have it
    standardize_projector_input: bool
    attn_implementation: str | None
    dtype: torch.dtype
    projector_only: bool  # stage 1 (--tune_mm_mlp_adapter): the LLM stays frozen
    tune_llm_top_layers: int | None  # stage 2: only the LLM's top N decoder layers train (None: all of it)
    # the data
    data_path: str
    store: Store
    embed_cache_dir: str | None
    verify: bool  # sha256 checks of the store's shards and of the checkpoint this run starts from
    align_stats: str | None
    noise_std: float
    noise_source: str  # where noise_std comes from (for the log)
    skip_missing: bool
    skip_bad_embeddings: bool
    split_turns: bool  # one sample per exchange of a conversation
    model_max_length: int
    seed: int
    # HF's arguments as parsed, for the Trainer (LoRA, learning rates, saving ...); never changed
    training: TrainingArguments


def resolve(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> Settings:
    """The Settings of a run: flags given, else the continued checkpoint's (checked where both are given), else the
    store's, else revision/defaults.py. Reads the arguments, never changes them."""
    check_values(model_args, data_args, training_args)
    projector_type, visual, align_stats, projector_tokens = (model_args.mm_projector_type, model_args.num_visual_tokens,
                                                             data_args.align_stats, model_args.mm_projector_tokens)
    folder = continued_checkpoint(model_args)
    if folder is not None:
        projector_type, visual, align_stats, projector_tokens = inherit_settings(folder, projector_type, visual,
                                                                                 align_stats, projector_tokens)
    visual = NUM_VISUAL_TOKENS if visual is None else visual
    check_lengths(training_args.model_max_length, visual)
    if not data_args.embed_folder:
        raise InputError("no embedding folder: pass --embed_folder or set folder_path in data_utils.py")
    store = read_store(data_args.embed_folder)
    align_stats = align_stats or store.alignment
    noise_std, noise_source = embed_noise(data_args.embed_noise_std, align_stats, store.kind)
    with training_args.main_process_first(desc="gguf conversion"):  # a .gguf file becomes its converted folder
        llm = resolve_llm(model_args.model_name_or_path)
    adapter = model_args.pretrain_mm_mlp_adapter
    # A ReVision folder this run starts from: an interrupted save, or a file changed since it was saved, is refused
    for path in (llm, adapter):
        if path and Path(path).exists():
            checkpoint.check_loadable(path if Path(path).is_dir() else Path(path).parent, hashes=not data_args.no_verify)
    continued_model = checkpoint_config(llm)
    warn_other_parts(store, llm, continued_model, adapter)
    return Settings(
        llm=llm, continues_model=continued_model is not None, adapter=adapter,
        projector_type=projector_type or PROJECTOR_TYPE, projector_tokens=projector_tokens or PROJECTOR_TOKENS,
        num_visual_tokens=visual, template=model_args.version,
        system_prompt=(model_args.system_prompt if model_args.system_prompt is not None
                       else continued_model.system_prompt if continued_model else None),
        image_placement=model_args.image_placement or (continued_model.image_placement if continued_model else None),
        standardize_projector_input=model_args.standardize_projector_input,
        attn_implementation=model_args.attn_implementation or default_attn_implementation(training_args.model_max_length),
        dtype=model_dtype(training_args),
        projector_only=model_args.tune_mm_mlp_adapter, tune_llm_top_layers=model_args.tune_llm_top_layers,
        data_path=data_args.data_path, store=store, embed_cache_dir=data_args.embed_cache_dir,
        verify=not data_args.no_verify, align_stats=align_stats, noise_std=noise_std, noise_source=noise_source,
        skip_missing=data_args.skip_missing, skip_bad_embeddings=data_args.skip_bad_embeddings, split_turns=data_args.split_turns,
        model_max_length=training_args.model_max_length, seed=training_args.seed, training=training_args)


def check_values(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """The flags every run needs, and the numbers that must be finite and >= 0."""
    for name, value in (("--model_name_or_path", model_args.model_name_or_path), ("--data_path", data_args.data_path)):
        if not value:
            raise InputError(f"{name} is required")
    for name, value in (("learning_rate", training_args.learning_rate), ("mm_projector_lr", training_args.mm_projector_lr),
                        ("weight_decay", training_args.weight_decay), ("embed_noise_std", data_args.embed_noise_std)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"--{name} {value}: expected a finite number >= 0")
    if model_args.image_placement is not None and model_args.image_placement not in IMAGE_PLACEMENTS:
        raise InputError(f"--image_placement {model_args.image_placement!r}: choose from {', '.join(IMAGE_PLACEMENTS)}")
    if model_args.tune_llm_top_layers is not None:
        other = "--tune_mm_mlp_adapter" if model_args.tune_mm_mlp_adapter else "--lora_enable" if training_args.lora_enable else None
        if other:
            raise InputError(f"--tune_llm_top_layers trains part of the LLM; {other} says what trains otherwise: pass one of them")
        if model_args.tune_llm_top_layers < 1:
            raise InputError(f"--tune_llm_top_layers {model_args.tune_llm_top_layers}: expected at least 1 layer")


def continued_checkpoint(model_args: ModelArguments) -> str | None:
    """The checkpoint folder this run continues: a stage-1 folder, else a ReVision --model_name_or_path."""
    for path in (model_args.pretrain_mm_mlp_adapter, model_args.model_name_or_path):
        if checkpoint_config(path) is not None:
            return path
    return None


def inherit_settings(folder: str | os.PathLike, projector_type: str | None, num_visual_tokens: int | None,
                     align_stats: str | None, projector_tokens: int | None = None) -> tuple[str, int, str | None, int]:
    """(projector_type, num_visual_tokens, align_stats, projector_tokens) for a run that continues the checkpoint
    `folder`.

    A setting not given (None) is the folder's. A given one must agree with it, except num_visual_tokens
    (a warning): the projector maps one embedding to one vector, however many positions that vector fills.
    --align_stats may add an alignment to a folder that records none; against a recorded one it must hold
    the same statistics (the projector learned on inputs that alignment produced). The embedding dim is no
    flag: the model build refuses embeddings whose dim is not the projector's.
    """
    config, where = RevisionConfig.load(folder), Path(folder, CONFIG_FILE)
    if projector_type is not None and projector_type != config.projector_type:
        raise InputError(f"--mm_projector_type {projector_type} contradicts projector_type {config.projector_type} "
                         f"recorded in {where}; drop the flag to continue that projector")
    if num_visual_tokens is not None and num_visual_tokens != config.num_visual_tokens:
        logger.warning("--num_visual_tokens %d differs from num_visual_tokens %d recorded in %s: the projector's vector "
                       "now fills %d positions", num_visual_tokens, config.num_visual_tokens, where, num_visual_tokens)
    if projector_tokens is not None and projector_tokens != config.projector_tokens:
        raise InputError(f"--mm_projector_tokens {projector_tokens} contradicts projector_tokens {config.projector_tokens} "
                         f"recorded in {where}; drop the flag to continue that projector")
    return (config.projector_type, config.num_visual_tokens if num_visual_tokens is None else num_visual_tokens,
            _inherit_alignment(Path(folder), config, align_stats), config.projector_tokens)


def _inherit_alignment(folder: Path, config: RevisionConfig, align_stats: str | None) -> str | None:
    if not config.alignment:
        return align_stats
    recorded = folder / config.alignment
    if not align_stats:
        logger.info("alignment from %s (%s)", recorded, folder / CONFIG_FILE)
        return str(recorded)
    from revision.align import load_alignment

    given, saved = load_alignment(align_stats), load_alignment(recorded)
    if _statistics(given) != _statistics(saved):
        other = " with other statistics" if given.method == saved.method else ""
        raise InputError(f"--align_stats {align_stats} (method {given.method}{other}) contradicts the alignment "
                         f"{recorded} (method {saved.method}) recorded in {folder / CONFIG_FILE}; drop the flag to use the "
                         "recorded one")
    return align_stats


def _statistics(alignment) -> str:
    """An alignment's method and fitted numbers (not its free-form info), comparable as a string."""
    fitted = {k: v for k, v in alignment.to_dict().items() if k != "info"}
    return json.dumps(fitted, sort_keys=True, default=lambda v: np.asarray(v).tolist())


def read_store(root: str | os.PathLike) -> Store:
    """The store's kind, dim, encoder and the alignment an aligned text store names (embed_mean.py's output, which
    stage 1 records so stage 2 applies its image_map). Refuses a missing or unfinished store."""
    store = EmbeddingStore(root, verify=False).require_complete()  # shards are verified when the table reads them
    name = (store.manifest or {}).get("alignment") if store.kind == "text" else None
    alignment = str(store.root / name) if name and (store.root / name).is_file() else None
    return Store(store.root, store.kind, store.dim, store.encoder, alignment)


def warn_other_parts(store: Store, llm: str, continued_model: RevisionConfig | None, adapter: str | None) -> None:
    """Warn when the checkpoint this run continues was trained on another encoder's embeddings or another LLM."""
    if continued_model is not None:
        _warn_other_encoder(continued_model, store, llm)
    stage1 = checkpoint_config(adapter)
    if stage1 is not None:
        _warn_other_encoder(stage1, store, adapter)
        # the LLM this run's model records: the continued checkpoint's, else the folder or hub id (as from_llm records it)
        base = continued_model.base_model if continued_model is not None else (
            str(Path(llm).resolve()) if Path(llm).exists() else llm)
        if stage1.base_model and stage1.base_model != base:
            logger.warning("%s trained its projector for LLM %s; this run uses %s", adapter, stage1.base_model, base)


def _warn_other_encoder(config: RevisionConfig, store: Store, where: str) -> None:
    if store.encoder and config.encoder not in (None, store.encoder):
        logger.warning("%s was trained on embeddings of encoder %s, but %s holds %s", where, config.encoder,
                       store.root, store.encoder)


def model_dtype(training_args: TrainingArguments) -> torch.dtype:
    """Half-precision weights under DeepSpeed (it keeps fp32 master copies); fp32 + autocast otherwise."""
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32
