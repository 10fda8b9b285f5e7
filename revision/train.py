"""Training with HF Trainer (and its DeepSpeed integration).

Stage 1 (`--tune_mm_mlp_adapter`): only the projector trains; the data is captions keyed into the
aligned TEXT store (template `plain`). Stage 2: projector + LLM (full) or projector + LoRA
(`--lora_enable`) on instruction data keyed into the IMAGE store, whose embeddings pass through the
alignment's image_map (`--align_stats`). Both stages resume with `--resume_from_checkpoint`.
Flag names follow Bunny / ReVision where they exist.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from revision import checkpoint
from revision.data import (EmbeddingTable, InputError, SupervisedDataset, check_lengths, embed_noise, exit_with,
                           image_map_from)
from revision.gguf import resolve_llm
from revision.model import (CONFIG_FILE, RevisionConfig, RevisionModel, checkpoint_config, inherit_settings,
                            load_projector_state, load_projector_weights, set_input_statistics)
from revision.packing import EpochLengthGroupedSampler, make_collator
from revision.store import StoreError

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="", metadata={"help": "HF causal LM folder/id, or a ReVision checkpoint"})
    version: str = field(default="plain", metadata={"help": "template: plain (pretraining), chat, vicuna"})
    # None: the stage-1 folder's (--pretrain_mm_mlp_adapter) or ReVision checkpoint's, else RevisionConfig's default
    mm_projector_type: str | None = field(default=None, metadata={"help": "linear or mlpNx_gelu (default: inherited, else mlp2x_gelu)"})
    num_visual_tokens: int | None = field(default=None, metadata={"help": "positions the projected embedding fills (default: inherited, else 576)"})
    mm_projector_tokens: int | None = field(default=None, metadata={
        "help": "distinct vectors the projector makes of one embedding, filling the visual positions in turn (default: inherited, else 1)"})
    standardize_projector_input: bool = field(default=True, metadata={
        "help": "a fresh projector standardises its input with the training embeddings' mean and scalar std (kept in the checkpoint)"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={
        "help": "stage-1 output folder (projector, its settings and alignment) or a projector weights file"})
    attn_implementation: str | None = field(default=None, metadata={"help": "default: flash_attention_2 if usable, else sdpa"})


@dataclass
class DataArguments:
    data_path: str = field(default="", metadata={"help": "LLaVA-style JSON / JSONL"})
    embed_folder: str | None = field(default=None, metadata={"help": "embedding store (overrides data_utils.folder_path)"})
    align_stats: str | None = field(default=None, metadata={
        "help": "embed_mean.py statistics: image_map for image stores (default: inherited, or a text store's own)"})
    embed_noise_std: float | None = field(default=None, metadata={
        "help": "Gaussian noise on embeddings, then renormalise (C3); default: the --align_stats file's (C3: 0.126) in stage 1, else 0"})
    skip_missing: bool = field(default=False, metadata={"help": "skip samples whose id has no embedding (counted)"})
    embed_cache_dir: str | None = field(default=None, metadata={"help": "where the memory-mapped table cache goes"})
    skip_bad_embeddings: bool = field(default=False, metadata={"help": "skip samples whose embedding holds NaN/Inf or is all zero (counted)"})
    no_verify: bool = field(default=False, metadata={"help": "skip the sha256 checks of the store's shards (table cache) "
                                                            "and of the checkpoint this run starts from"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "tokens per sample, visual block included"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    mm_projector_lr: float | None = field(default=None, metadata={"help": "projector learning rate (default: --learning_rate)"})
    group_by_length: bool = field(default=False, metadata={"help": "batch samples of similar length"})
    packing: bool = field(default=False, metadata={"help": "pack each step's samples into rows of model_max_length, "
                                                           "no attention across samples (revision/packing.py)"})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Bunny/LLaVA spelling of a fractional --warmup_steps"})
    remove_unused_columns: bool = False

    def __post_init__(self):
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN / Inf: training stops before that step updates the weights."""


class RevisionTrainer(Trainer):
    """Trainer that saves/loads the ReVision checkpoint layout (atomically, with a hash manifest: see
    revision/checkpoint.py), groups by estimated length, can give the projector its own learning rate,
    and stops at the first non-finite loss or gradient norm."""

    def __init__(self, *args, align_stats: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.align_stats = align_stats

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            # The dataset estimates lengths without tokenizing; HF's default would tokenize every sample first.
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                             dataset.lengths, seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        if self.args.mm_projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = model or self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name.startswith("projector."), name in decay), []).append(param)
        param_groups = [
            {"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
             **({"lr": self.args.mm_projector_lr} if is_projector else {})}
            for (is_projector, decayed), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- NaN guard: the loss of every micro-batch, the gradient norm of every step ----------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("sample_index", None)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss.detach()).all():
            ids = getattr(self.train_dataset, "ids", None)
            named = [ids[i] for i in index.tolist() if 0 <= i < len(ids)] if index is not None and ids else []
            raise TrainingDivergedError(
                f"step {self.state.global_step + 1}: the loss is {loss.item()} on the batch of samples "
                f"{named[:8] or '(ids unknown)'}; stopped before updating the weights (no checkpoint of this state). "
                "Check the data (python data_utils.py ...), or lower --learning_rate")
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        value = float(grad_norm) if grad_norm is not None else None
        # fp16's loss scaler meets Inf gradients on purpose and skips those steps; every other case is divergence
        if value is not None and not math.isfinite(value) and not self.args.fp16:
            raise TrainingDivergedError(
                f"step {self.state.global_step + 1}: the gradient norm is {value}; stopped before the optimizer step "
                "(no checkpoint of this state). Lower --learning_rate or check the data (python data_utils.py ...)")
        return grad_norm

    # ---- saving: staged, manifest last, renamed into place ----------------------------------------

    def _fresh_staging(self, staging: Path) -> None:
        if self.args.should_save:
            checkpoint.fresh_staging(staging)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{checkpoint.STAGING_PREFIX}{name}"
        self._fresh_staging(staging)
        self._get_output_dir = lambda trial=None: str(staging)  # HF writes staging/checkpoint-N, every rank
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoint.publish_checkpoint(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:  # inside _save_checkpoint: already staged
            return super().save_model(output_dir, _internal_call)
        out = Path(output_dir or self.args.output_dir)
        staging = out / checkpoint.FINAL_STAGING
        self._fresh_staging(staging)
        super().save_model(str(staging), _internal_call)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoint.publish_final(staging, out)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        weights = model.state_dict() if state_dict is None else state_dict
        bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:  # the last line of defence: a NaN model is never written
            raise TrainingDivergedError(f"step {self.state.global_step}: weight {bad} holds NaN / Inf; nothing saved")
        model.save_pretrained(output_dir, state_dict=state_dict, tokenizer=self.processing_class, alignment=self.align_stats)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        checkpoint.pause_point(f"model-saved:{Path(output_dir).name}")  # tests kill the run here

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        try:
            (model or self.model).load_trainable(resume_from_checkpoint)
        except ValueError as e:  # weights that are not readable, or do not fit: one line (main), not a traceback
            raise checkpoint.CheckpointError(str(e)) from None


class EpochToDataset(TrainerCallback):
    """Tell the dataset the epoch (its noise depends on it); on resume mid-epoch, the epoch being resumed."""

    def __init__(self, dataset: SupervisedDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch + 1e-6) if state.epoch else 0)


def parse_args(argv: list[str] | None = None, default_embed_folder: str = ""):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    data_args.embed_folder = data_args.embed_folder or default_embed_folder or None
    for name, value in (("--model_name_or_path", model_args.model_name_or_path), ("--data_path", data_args.data_path)):
        if not value:
            raise SystemExit(f"{name} is required")
    for name, value in (("learning_rate", training_args.learning_rate), ("mm_projector_lr", training_args.mm_projector_lr),
                        ("weight_decay", training_args.weight_decay), ("embed_noise_std", data_args.embed_noise_std)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"--{name} {value}: expected a finite number >= 0")
    return model_args, data_args, training_args


def continued_checkpoint(model_args: ModelArguments) -> str | None:
    """The checkpoint folder this run continues: a stage-1 folder, else a ReVision --model_name_or_path."""
    for path in (model_args.pretrain_mm_mlp_adapter, model_args.model_name_or_path):
        if checkpoint_config(path) is not None:
            return path
    return None


def settle_settings(model_args: ModelArguments, data_args: DataArguments) -> None:
    """Fill the settings left unset from the checkpoint this run continues (checking those set), else defaults."""
    folder = continued_checkpoint(model_args)
    if folder is not None:
        (model_args.mm_projector_type, model_args.num_visual_tokens, data_args.align_stats,
         model_args.mm_projector_tokens) = inherit_settings(folder, model_args.mm_projector_type, model_args.num_visual_tokens,
                                                            data_args.align_stats, model_args.mm_projector_tokens)
    model_args.mm_projector_tokens = model_args.mm_projector_tokens or RevisionConfig.projector_tokens
    model_args.mm_projector_type = model_args.mm_projector_type or RevisionConfig.projector_type
    if model_args.num_visual_tokens is None:
        model_args.num_visual_tokens = RevisionConfig.num_visual_tokens


def store_alignment(table: EmbeddingTable) -> str | None:
    """The statistics file an aligned text store (embed_mean.py's output) names, so stage 1 records it."""
    name = table.manifest.get("alignment") if table.kind == "text" else None
    return str(table.root / name) if name and (table.root / name).is_file() else None


def _warn_other_encoder(config: RevisionConfig, table: EmbeddingTable, where: str) -> None:
    if table.encoder and config.encoder not in (None, table.encoder):
        logger.warning("%s was trained on embeddings of encoder %s, but %s holds %s", where, config.encoder,
                       table.root, table.encoder)


def model_dtype(training_args: TrainingArguments) -> torch.dtype:
    """Half-precision weights under DeepSpeed (it keeps fp32 master copies); fp32 + autocast otherwise."""
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32


STANDARDIZE_ROWS = 100_000  # rows (evenly spread over the store) that fix a fresh projector's input statistics


def build_model(model_args: ModelArguments, training_args: TrainingArguments, table: EmbeddingTable,
                image_map: Callable[[np.ndarray], np.ndarray] | None = None) -> RevisionModel:
    """The model for this stage, with the right parameters trainable; `image_map` is what the data applies to the
    store's rows (a fresh projector's input statistics are taken after it)."""
    dtype, attn = model_dtype(training_args), model_args.attn_implementation
    if Path(model_args.model_name_or_path, CONFIG_FILE).exists():  # continue from a ReVision checkpoint
        model = RevisionModel.from_pretrained(model_args.model_name_or_path, dtype=dtype, attn_implementation=attn)
        model.revision_config.template = model_args.version
        model.revision_config.num_visual_tokens = model_args.num_visual_tokens  # what this run's data is built with
        model.check_embed_dim(table.dim, f"embeddings in {table.root}")
        _warn_other_encoder(model.revision_config, table, model_args.model_name_or_path)
    else:
        model = RevisionModel.from_llm(model_args.model_name_or_path, table.dim, model_args.mm_projector_type,
                                       model_args.num_visual_tokens, model_args.version, table.encoder, dtype, attn,
                                       model_args.mm_projector_tokens)
        if model_args.standardize_projector_input and not model_args.pretrain_mm_mlp_adapter:
            rows = np.setdiff1d(np.linspace(0, len(table) - 1, min(len(table), STANDARDIZE_ROWS)).astype(np.int64),
                                table.unusable_rows)  # NaN / Inf / zero rows never train, so they set nothing
            sample = np.asarray(table.embeds[rows], dtype=np.float32)
            mean_norm, scale = set_input_statistics(model.projector, image_map(sample) if image_map else sample)
            logger.info("projector input standardised: mean norm %.4f, scalar std %.5f (%d rows of %s)", mean_norm, scale,
                        len(sample), table.root)
    if model_args.pretrain_mm_mlp_adapter:
        adapter = model_args.pretrain_mm_mlp_adapter
        weights = load_projector_weights(adapter)
        first = weights.get("0.weight")
        if first is not None and first.shape[1] != table.dim:
            raise ValueError(f"{adapter}: projector takes dim {first.shape[1]}, but the "
                             f"embeddings in {table.root} have dim {table.dim} (another encoder?)")
        try:
            load_projector_state(model.projector, weights)
        except RuntimeError as e:  # another projector type or LLM width than this model's
            raise ValueError(f"{adapter}: these projector weights do not fit a {model_args.mm_projector_type} projector "
                             f"{table.dim} -> {model.revision_config.hidden_size}: {e}") from None
        stage1 = checkpoint_config(adapter)
        if stage1 is not None:
            _warn_other_encoder(stage1, table, adapter)
            if stage1.base_model and stage1.base_model != model.revision_config.base_model:
                logger.warning("%s trained its projector for LLM %s; this run uses %s", adapter, stage1.base_model,
                               model.revision_config.base_model)
    if model_args.tune_mm_mlp_adapter:
        model.freeze_llm()
    elif training_args.lora_enable:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                          lora_dropout=training_args.lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM")
        model.llm = get_peft_model(model.llm, lora)
        model.projector.requires_grad_(True)
    else:
        model.requires_grad_(True)
    return model


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> RevisionTrainer:
    """Run one stage; returns the trainer (its state holds the log history)."""
    # Seed before anything random: the projector's (and LoRA's) init happen here, before Trainer seeds.
    if training_args.full_determinism:
        transformers.enable_full_determinism(training_args.seed)
    else:
        transformers.set_seed(training_args.seed)
    settle_settings(model_args, data_args)
    check_lengths(training_args.model_max_length, model_args.num_visual_tokens)
    if not data_args.embed_folder:
        raise SystemExit("no embedding folder: pass --embed_folder or set folder_path in data_utils.py")
    with training_args.main_process_first(desc="embedding table cache"):
        table = EmbeddingTable(data_args.embed_folder, data_args.embed_cache_dir, verify=not data_args.no_verify)
    data_args.align_stats = data_args.align_stats or store_alignment(table)
    with training_args.main_process_first(desc="gguf conversion"):  # a .gguf file becomes its converted folder
        model_args.model_name_or_path = resolve_llm(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                              model_max_length=training_args.model_max_length, padding_side="right")
    # A ReVision folder this run starts from: an interrupted save, or a file changed since it was saved, is refused
    for folder in (model_args.model_name_or_path, model_args.pretrain_mm_mlp_adapter):
        if folder and Path(folder).exists():
            checkpoint.check_loadable(folder if Path(folder).is_dir() else Path(folder).parent, hashes=not data_args.no_verify)
    image_map = image_map_from(data_args.align_stats) if table.kind == "image" else None
    try:
        model = build_model(model_args, training_args, table, image_map)
    except ValueError as e:  # a checkpoint, projector or LLM that does not fit this run's embeddings or flags
        raise InputError(str(e)) from e
    noise_std, noise_source = embed_noise(data_args.embed_noise_std, data_args.align_stats, table.kind)
    logger.info("embedding noise std %g (from %s)", noise_std, noise_source)
    dataset = SupervisedDataset(data_args.data_path, tokenizer, table, model_args.version, model_args.num_visual_tokens,
                                training_args.model_max_length, image_map, noise_std, data_args.skip_missing,
                                training_args.seed, data_args.skip_bad_embeddings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%d samples (%d skipped: %d no embedding, %d unusable embedding, %d no assistant turn); "
                "%d trainable parameters of %d", len(dataset), dataset.skipped + dataset.skipped_bad + dataset.skipped_empty,
                dataset.skipped, dataset.skipped_bad, dataset.skipped_empty, trainable, sum(p.numel() for p in model.parameters()))
    collator = make_collator(training_args, tokenizer.pad_token_id, table.dim, model)
    trainer = RevisionTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=collator,
                              align_stats=data_args.align_stats, callbacks=[EpochToDataset(dataset)])
    # Only a complete checkpoint whose every file this run wrote, unchanged, is resumed from (checkpoint.py).
    checkpoint.refuse_links(training_args.output_dir)
    resume = checkpoint.resume_for(training_args)
    with checkpoint.weights_only_loads(resume):  # DeepSpeed's own state files: no pickled code runs
        trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if dataset.truncated:
        logger.warning("%d samples were truncated to model_max_length=%d", dataset.truncated, training_args.model_max_length)
    return trainer


def main(argv: list[str] | None = None, default_embed_folder: str = "") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train(*parse_args(argv, default_embed_folder))
    except (InputError, StoreError, checkpoint.CheckpointError, TrainingDivergedError, OSError) as e:
        exit_with(e)  # bad input, a checkpoint that must not load, divergence: one line, no traceback
