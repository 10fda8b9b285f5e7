"""Training with HF Trainer (and its DeepSpeed integration): the flow of one stage.

Stage 1 (`--tune_mm_mlp_adapter`): only the projector trains; the data is captions keyed into the
aligned TEXT store (template `plain`). Stage 2: projector + LLM (full) or projector + LoRA
(`--lora_enable`) on instruction data keyed into the IMAGE store, whose embeddings pass through the
alignment's image_map (`--align_stats`). Both stages resume with `--resume_from_checkpoint`.

argv -> arguments (revision/arguments.py: the flags) -> Settings (revision/settings.py: one pass over the
arguments, the checkpoint continued and the store; every refusal) -> the table, tokenizer, model
(revision/build.py) and dataset -> RevisionTrainer (revision/trainer.py) -> the checkpoint folder.
"""
from __future__ import annotations

import logging

import transformers
from transformers import AutoTokenizer

from revision import checkpoint
from revision.arguments import DataArguments, ModelArguments, TrainingArguments, parse_args
from revision.build import build_model
from revision.data import EmbeddingTable, SupervisedDataset, image_map_from
from revision.errors import InputError, StoreError, exit_with
from revision.packing import make_collator
from revision.settings import Settings, resolve
from revision.trainer import EpochToDataset, RevisionTrainer, TrainingDivergedError

__all__ = ["DataArguments", "ModelArguments", "RevisionTrainer", "TrainingArguments", "TrainingDivergedError",
           "main", "parse_args", "run", "train"]
logger = logging.getLogger(__name__)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> RevisionTrainer:
    """Run one stage from its parsed arguments; returns the trainer (its state holds the log history)."""
    # Seed before anything random: the projector's (and LoRA's) init happen in the build, before Trainer seeds.
    if training_args.full_determinism:
        transformers.enable_full_determinism(training_args.seed)
    else:
        transformers.set_seed(training_args.seed)
    return run(resolve(model_args, data_args, training_args))


def run(settings: Settings) -> RevisionTrainer:
    """Build the table, model and dataset the settings describe, train, save; returns the trainer."""
    training = settings.training
    with training.main_process_first(desc="embedding table cache"):
        table = EmbeddingTable(settings.store.root, settings.embed_cache_dir, verify=settings.verify)
    tokenizer = AutoTokenizer.from_pretrained(settings.llm, model_max_length=settings.model_max_length, padding_side="right")
    image_map = image_map_from(settings.align_stats) if table.kind == "image" else None
    try:
        model = build_model(settings, table, image_map)
    except ValueError as e:  # a checkpoint, projector or LLM that does not fit this run's embeddings or flags
        raise InputError(str(e)) from e
    logger.info("embedding noise std %g (from %s)", settings.noise_std, settings.noise_source)
    dataset = SupervisedDataset(settings.data_path, tokenizer, table, settings.template, settings.num_visual_tokens,
                                settings.model_max_length, image_map, settings.noise_std, settings.skip_missing,
                                settings.seed, settings.skip_bad_embeddings, settings.system_prompt, settings.split_turns,
                                settings.image_placement)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%d samples (%d skipped: %d no embedding, %d unusable embedding, %d no assistant turn); "
                "%d trainable parameters of %d", len(dataset), dataset.skipped + dataset.skipped_bad + dataset.skipped_empty,
                dataset.skipped, dataset.skipped_bad, dataset.skipped_empty, trainable, sum(p.numel() for p in model.parameters()))
    collator = make_collator(training, tokenizer.pad_token_id, table.dim, model)
    trainer = RevisionTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=collator, align_stats=settings.align_stats, callbacks=[EpochToDataset(dataset)])
    # Only a complete checkpoint whose every file this run wrote, unchanged, is resumed from (checkpoint.py).
    checkpoint.refuse_links(training.output_dir)
    resume = checkpoint.resume_for(training)
    with checkpoint.weights_only_loads(resume):  # DeepSpeed's own state files: no pickled code runs
        trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training.output_dir)
    trainer.save_state()
    if dataset.truncated:
        logger.warning("%d samples were truncated to model_max_length=%d", dataset.truncated, settings.model_max_length)
    return trainer


def main(argv: list[str] | None = None, default_embed_folder: str = "") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train(*parse_args(argv, default_embed_folder))
    except (InputError, StoreError, checkpoint.CheckpointError, TrainingDivergedError, OSError) as e:
        exit_with(e)  # bad input, a checkpoint that must not load, divergence: one line, no traceback
