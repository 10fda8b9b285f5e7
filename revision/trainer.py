"""RevisionTrainer: HF Trainer (and its DeepSpeed integration) with ReVision's checkpoint layout.

It saves and loads the ReVision checkpoint layout atomically, with a hash manifest (revision/checkpoint.py,
docs/checkpoints.md), groups batches by estimated length, can give the projector its own learning rate, and stops
at the first non-finite loss or gradient norm (TrainingDivergedError). It reads HF's TrainingArguments (`self.args`)
and changes nothing in them.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from revision import checkpoint
from revision.data import SupervisedDataset
from revision.packing import EpochLengthGroupedSampler


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
