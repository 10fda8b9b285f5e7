"""train.py's flags: the argument schema (three dataclasses HfArgumentParser reads) and the parser.

The parsed dataclasses are what the user said, and nothing changes them afterwards: revision/settings.py settles
what a run uses (inherited from stage 1, read from the store, defaulted) into one frozen Settings. Flag names
follow Bunny / ReVision where they exist; defaults come from revision/defaults.py. `add_flags` gives another
command line (data_utils.py) some of these flags exactly as train.py spells them.
"""
import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser

from revision.defaults import MODEL_MAX_LENGTH, NUM_VISUAL_TOKENS, PROJECTOR_TOKENS, PROJECTOR_TYPE, TEMPLATE


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="", metadata={"help": "HF causal LM folder/id, or a ReVision checkpoint"})
    version: str = field(default=TEMPLATE, metadata={"help": "template: plain (pretraining), chat, vicuna"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "system message of conversations that have none, saved with the checkpoint for inference (default: "
                "inherited, else the chat template's own; '' keeps only its empty frame)"})
    image_placement: str | None = field(default=None, metadata={
        "help": "first or last: move each sample's image before or after its first question, saved with the checkpoint "
                "for inference (default: inherited, else where the data have it; inference then puts it first)"})
    # None: the stage-1 folder's (--pretrain_mm_mlp_adapter) or ReVision checkpoint's, else the default
    mm_projector_type: str | None = field(default=None, metadata={
        "help": f"linear or mlpNx_gelu (default: inherited, else {PROJECTOR_TYPE})"})
    num_visual_tokens: int | None = field(default=None, metadata={
        "help": f"positions the projected embedding fills (default: inherited, else {NUM_VISUAL_TOKENS})"})
    mm_projector_tokens: int | None = field(default=None, metadata={
        "help": "distinct vectors the projector makes of one embedding, filling the visual positions in turn "
                f"(default: inherited, else {PROJECTOR_TOKENS})"})
    standardize_projector_input: bool = field(default=True, metadata={
        "help": "a fresh projector standardises its input with the training embeddings' mean and scalar std (kept in the checkpoint)"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    tune_llm_top_layers: int | None = field(default=None, metadata={
        "help": "stage 2 without LoRA: train the projector and only the LLM's top N decoder layers and final norm (the "
                "embeddings and the lower layers frozen: no weight gradients or optimizer state for them); default: all"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={
        "help": "stage-1 output folder (projector, its settings and alignment) or a projector weights file"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "default: flash_attention_2 if usable, else sdpa; training on CPU with rows of up to 512 tokens: eager (faster there)"})


@dataclass
class DataArguments:
    data_path: str = field(default="", metadata={"help": "LLaVA-style JSON / JSONL"})
    embed_folder: str | None = field(default=None, metadata={"help": "embedding store (overrides data_utils.folder_path)"})
    align_stats: str | None = field(default=None, metadata={
        "help": "embed_mean.py statistics: image_map for image stores (default: inherited, or a text store's own)"})
    embed_noise_std: float | None = field(default=None, metadata={
        "help": "Gaussian noise on embeddings, then renormalise (C3); default: the --align_stats file's (C3: 0.126) in stage 1, else 0"})
    skip_missing: bool = field(default=False, metadata={"help": "skip samples whose id has no embedding (counted)"})
    split_turns: bool = field(default=False, metadata={
        "help": "one sample per question of a multi-turn conversation, each with the image (more steps per epoch)"})
    embed_cache_dir: str | None = field(default=None, metadata={"help": "where the memory-mapped table cache goes"})
    skip_bad_embeddings: bool = field(default=False,
                                      metadata={"help": "skip samples whose embedding holds NaN/Inf or is all zero (counted)"})
    no_verify: bool = field(default=False, metadata={"help": "skip the sha256 checks of the store's shards (table cache) "
                                                            "and of the checkpoint this run starts from"})


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX), where bf16 autocast is fast (0.49x a SmolLM2
    training step on the 2-core machine, bench/cpu_bf16.py) rather than an emulation slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=MODEL_MAX_LENGTH, metadata={"help": "tokens per sample, visual block included"})
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

    def __post_init__(self):  # HF's own construction step: what these spellings mean, before anything reads them
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for
            if self.bf16:  # HF refuses bf16 without a GPU unless told to use the CPU: CPU autocast is what is asked
                if not cpu_bf16_supported():
                    raise ValueError("--bf16 without a GPU runs on the CPU, and this CPU has no bf16 units (avx512_bf16 "
                                     "or AMX): drop --bf16")
                self.use_cpu = True
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        super().__post_init__()


def parse_args(argv: list[str] | None = None,
               default_embed_folder: str = "") -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """The three argument dataclasses of a command line; `default_embed_folder` (data_utils.folder_path) stands in
    for an --embed_folder not given. Values are checked by revision.settings.resolve, not here."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = installed_spelling(sys.argv[1:] if argv is None else argv, {f.name for f in dataclasses.fields(TrainingArguments)})
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    data_args = dataclasses.replace(data_args, embed_folder=data_args.embed_folder or default_embed_folder or None)
    return model_args, data_args, training_args


# transformers renamed --gradient_checkpointing to --activation_checkpointing within the 5.x releases this code
# supports (5.17 knows only the old name, 5.24 both, the old one until v6): the launchers pass the new one
RENAMED_FLAGS = {"activation_checkpointing": "gradient_checkpointing",
                 "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def installed_spelling(argv: Sequence[str], known: set[str]) -> list[str]:
    """`argv` with each renamed flag (RENAMED_FLAGS) spelled as the installed TrainingArguments (`known`: its field
    names) knows it: the new names on a release before the rename become the old ones; anything else is kept."""
    spelled = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name in RENAMED_FLAGS and name not in known and RENAMED_FLAGS[name] in known:
            arg = f"--{RENAMED_FLAGS[name]}{eq}{value}"
        spelled.append(arg)
    return spelled


def _plain_type(annotation: Any) -> Any:
    """int for `int | None` (the type argparse converts a value with)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_flags(parser: argparse.ArgumentParser, schema: type, names: Sequence[str], required: Sequence[str] = (),
              defaults: dict[str, Any] | None = None) -> None:
    """Add the schema's fields `names` to an argparse parser as train.py spells them: flag, type and help from
    the dataclass, its default unless `defaults` names another; a bool that defaults to False is a switch."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for name in names:
        spec, kind = fields[name], _plain_type(fields[name].type)
        default = (defaults or {}).get(name, spec.default)
        kwargs: dict[str, Any] = {"help": spec.metadata.get("help")}
        if name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if kind is bool and default is False:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = kind
        parser.add_argument(f"--{name}", **kwargs)
