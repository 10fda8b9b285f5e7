"""Less compute on padding: padding-free packing (`--packing`) and length-grouped sampling (`--group_by_length`).

Packing works per step, as transformers' padding-free path (`DataCollatorWithFlattening`) does: the samples a
step draws are concatenated into rows of at most `model_max_length` tokens (first fit, longest first; one sample
a row where that pads less), each sample whole, so a visual block is never split across rows. position_ids
restart at 0 for every sample and the first label of every sample is masked (it would be predicted from the
previous sample's last token). With the same samples a packed step computes the same loss and gradients as a
padded one; only the padding is gone.
So the sampler, the number of steps, resuming and the optimisation are those of the padded run; to fill rows,
raise per_device_train_batch_size and lower gradient_accumulation_steps by the same factor.

Attention never crosses samples:
- flash-attn (any attn_implementation naming flash): all samples of the step go into one row [1, total] with
  cu_seq_lens / max_length kwargs, so the varlen kernel sees each sample alone (no padding at all);
- SDPA / eager: rows [R, L] and no attention_mask; transformers builds the block-diagonal causal mask from the
  restarting position_ids (masking_utils.find_packed_sequence_indices), provided no KV cache is made, which
  RevisionModel.forward ensures (use_cache=False for packed batches). The row padding is a segment of its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from revision.data import DataCollator, stack_image_embeds
from revision.model import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the samples in each row: first fit, longest first; every row's total <= capacity."""
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"sample {too_long[0]} of the batch has {lengths[too_long[0]]} tokens, more than a packed row "
                         f"holds (model_max_length={capacity})")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep batch order
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def row_layout(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """pack_rows, unless one sample per row makes a smaller padded tensor (long samples of similar length: 8 of
    600 tokens pack 3+3+2 into rows of 2048, padded to 1800, 11% padding; one per row pads only up to the longest)."""
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    if len(rows) * width > len(lengths) * max(lengths):
        return [[i] for i in range(len(lengths))]
    return rows


def padding_share(lengths: Sequence[int], batch_size: int, capacity: int | None = None) -> float:
    """Share of pad positions when consecutive `batch_size` samples form a batch: padded to the longest sample,
    or with `capacity`, packed into rows of at most `capacity` tokens padded to the longest row."""
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = list(lengths[start: start + batch_size])
        real += sum(batch)
        if capacity is None:
            padded += len(batch) * max(batch)
        else:
            rows = [sum(batch[i] for i in row) for row in row_layout(batch, capacity)]
            padded += len(rows) * max(rows)
    return 1 - real / padded


class PackingCollator:
    """Packs a step's samples into rows (see the module docstring); `flatten` makes one row for flash-attn varlen.

    Returns input_ids, labels, position_ids [R, L], image_embeds [N, D] (one per sample, zeros for image-free
    ones, as DataCollator) and image_index [R, L] (the image_embeds row of each position's sample, -1 on row
    padding), plus with `flatten` cu_seq_lens_q/k (int32) and max_length_q/k.
    """

    def __init__(self, pad_token_id: int | None, embed_dim: int, max_length: int, flatten: bool = False):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.embed_dim, self.max_length, self.flatten = embed_dim, max_length, flatten

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        lengths = [len(f["input_ids"]) for f in features]
        rows = [list(range(len(features)))] if self.flatten else row_layout(lengths, self.max_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
        columns: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "position_ids": [], "image_index": []}
        for row in rows:
            pad = width - sum(lengths[i] for i in row)
            labels = [features[i]["labels"].clone() for i in row]
            for sample_labels in labels:
                sample_labels[0] = IGNORE_INDEX  # never predicted from the previous sample's last token
            # the row's padding is one more segment (positions restart), so no real token attends to it
            columns["input_ids"].append(torch.cat([features[i]["input_ids"] for i in row]
                                                  + [torch.full((pad,), self.pad_token_id)]))
            columns["labels"].append(torch.cat(labels + [torch.full((pad,), IGNORE_INDEX)]))
            columns["position_ids"].append(torch.cat([torch.arange(lengths[i]) for i in row] + [torch.arange(pad)]))
            columns["image_index"].append(torch.cat([torch.full((lengths[i],), i) for i in row]
                                                    + [torch.full((pad,), -1)]))
        batch: dict[str, torch.Tensor | int] = {k: torch.stack(v) for k, v in columns.items()}
        batch["image_embeds"] = stack_image_embeds(features, self.embed_dim)
        batch["sample_index"] = torch.tensor([f.get("index", -1) for f in features])  # the trainer names a bad batch's ids
        if self.flatten:
            cu_seq_lens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
            batch["max_length_q"] = batch["max_length_k"] = max(lengths)
        return batch


def uses_flash_attention(model) -> bool:
    return "flash" in str(getattr(model.config, "_attn_implementation", ""))


def make_collator(training_args, pad_token_id: int | None, embed_dim: int, model) -> DataCollator | PackingCollator:
    """DataCollator, or with --packing a PackingCollator (one flattened row when the model uses flash-attn)."""
    if not training_args.packing:
        return DataCollator(pad_token_id, embed_dim, sample_index=True)
    if training_args.n_gpu > 1:  # nn.DataParallel would split rows and image_embeds apart
        raise ValueError("--packing needs one GPU per process (torchrun / deepspeed), not DataParallel over "
                         f"{training_args.n_gpu} GPUs")
    return PackingCollator(pad_token_id, embed_dim, training_args.model_max_length, flatten=uses_flash_attention(model))


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """HF's LengthGroupedSampler, drawing each epoch's order from (seed, epoch) rather than the global RNG.

    The global RNG is not where a resumed run left it when the sampler draws, so HF's sampler (generator=None)
    can put a resumed epoch's samples in another order; accelerate calls set_epoch on the sampler each epoch.
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int = 0):
        super().__init__(batch_size, lengths=list(lengths), generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)  # the same order however often an epoch is iterated
        return super().__iter__()
