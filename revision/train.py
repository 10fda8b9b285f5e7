"""Training with HF Trainer (and its DeepSpeed integration).

Stage 1 (`--tune_mm_mlp_adapter`): only the projector trains; the data is captions keyed into the
aligned TEXT store (template `plain`). Stage 2: projector + LLM (full) or projector + LoRA
(`--lora_enable`) on instruction data keyed into the IMAGE store, whose embeddings pass through the
alignment's image_map (`--align_stats`). Both stages resume with `--resume_from_checkpoint`.
Flag names follow Bunny / ReVision where they exist.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import get_last_checkpoint

from revision.data import DataCollator, EmbeddingTable, SupervisedDataset, check_lengths, image_map_from
from revision.gguf import resolve_llm
from revision.model import CONFIG_FILE, RevisionModel, load_projector_weights

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="", metadata={"help": "HF causal LM folder/id, or a ReVision checkpoint"})
    version: str = field(default="plain", metadata={"help": "template: plain (pretraining), chat, vicuna"})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear or mlpNx_gelu"})
    num_visual_tokens: int = field(default=576, metadata={"help": "positions the projected embedding fills"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "projector weights from stage 1"})
    attn_implementation: str | None = field(default=None, metadata={"help": "default: flash_attention_2 if usable, else sdpa"})


@dataclass
class DataArguments:
    data_path: str = field(default="", metadata={"help": "LLaVA-style JSON / JSONL"})
    embed_folder: str | None = field(default=None, metadata={"help": "embedding store (overrides data_utils.folder_path)"})
    align_stats: str | None = field(default=None, metadata={"help": "embed_mean.py statistics: image_map for image stores"})
    embed_noise_std: float = field(default=0.0, metadata={"help": "Gaussian noise on embeddings, then renormalise (C3)"})
    skip_missing: bool = field(default=False, metadata={"help": "skip samples whose id has no embedding (counted)"})
    embed_cache_dir: str | None = field(default=None, metadata={"help": "where the memory-mapped table cache goes"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "tokens per sample, visual block included"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    mm_projector_lr: float | None = field(default=None, metadata={"help": "projector learning rate (default: --learning_rate)"})
    group_by_length: bool = field(default=False, metadata={"help": "batch samples of similar length"})
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


class RevisionTrainer(Trainer):
    """Trainer that saves/loads the ReVision checkpoint layout, groups by estimated length, and can give
    the projector its own learning rate."""

    def __init__(self, *args, align_stats: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.align_stats = align_stats

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            # The dataset estimates lengths without tokenizing; HF's default would tokenize every sample first.
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)
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

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir, state_dict=state_dict, tokenizer=self.processing_class, alignment=self.align_stats)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        (model or self.model).load_trainable(resume_from_checkpoint)


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
    return model_args, data_args, training_args


def model_dtype(training_args: TrainingArguments) -> torch.dtype:
    """Half-precision weights under DeepSpeed (it keeps fp32 master copies); fp32 + autocast otherwise."""
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32


def build_model(model_args: ModelArguments, training_args: TrainingArguments, table: EmbeddingTable) -> RevisionModel:
    """The model for this stage, with the right parameters trainable."""
    dtype, attn = model_dtype(training_args), model_args.attn_implementation
    if Path(model_args.model_name_or_path, CONFIG_FILE).exists():  # continue from a ReVision checkpoint
        model = RevisionModel.from_pretrained(model_args.model_name_or_path, dtype=dtype, attn_implementation=attn)
        model.revision_config.template = model_args.version
        model.revision_config.num_visual_tokens = model_args.num_visual_tokens  # what this run's data is built with
        model.check_embed_dim(table.dim, f"embeddings in {table.root}")
        if table.encoder and model.revision_config.encoder not in (None, table.encoder):
            logger.warning("%s was trained on embeddings of encoder %s, but %s holds %s", model_args.model_name_or_path,
                           model.revision_config.encoder, table.root, table.encoder)
    else:
        model = RevisionModel.from_llm(model_args.model_name_or_path, table.dim, model_args.mm_projector_type,
                                       model_args.num_visual_tokens, model_args.version, table.encoder, dtype, attn)
    if model_args.pretrain_mm_mlp_adapter:
        weights = load_projector_weights(model_args.pretrain_mm_mlp_adapter)
        first = weights.get("0.weight")
        if first is not None and first.shape[1] != table.dim:
            raise ValueError(f"{model_args.pretrain_mm_mlp_adapter}: projector takes dim {first.shape[1]}, but the "
                             f"embeddings in {table.root} have dim {table.dim} (another encoder?)")
        model.projector.load_state_dict(weights)
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
    check_lengths(training_args.model_max_length, model_args.num_visual_tokens)
    if not data_args.embed_folder:
        raise SystemExit("no embedding folder: pass --embed_folder or set folder_path in data_utils.py")
    with training_args.main_process_first(desc="embedding table cache"):
        table = EmbeddingTable(data_args.embed_folder, data_args.embed_cache_dir)
    with training_args.main_process_first(desc="gguf conversion"):  # a .gguf file becomes its converted folder
        model_args.model_name_or_path = resolve_llm(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                              model_max_length=training_args.model_max_length, padding_side="right")
    model = build_model(model_args, training_args, table)
    image_map = image_map_from(data_args.align_stats) if table.kind == "image" else None
    dataset = SupervisedDataset(data_args.data_path, tokenizer, table, model_args.version, model_args.num_visual_tokens,
                                training_args.model_max_length, image_map, data_args.embed_noise_std, data_args.skip_missing,
                                training_args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%d samples (%d skipped); %d trainable parameters of %d", len(dataset), dataset.skipped, trainable,
                sum(p.numel() for p in model.parameters()))
    trainer = RevisionTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=DataCollator(tokenizer.pad_token_id, table.dim), align_stats=data_args.align_stats,
                              callbacks=[EpochToDataset(dataset)])
    resume = training_args.resume_from_checkpoint
    if resume == "latest":
        resume = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if dataset.truncated:
        logger.warning("%d samples were truncated to model_max_length=%d", dataset.truncated, training_args.model_max_length)
    return trainer


def main(argv: list[str] | None = None, default_embed_folder: str = "") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(*parse_args(argv, default_embed_folder))
