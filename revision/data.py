"""Training data: LLaVA-style samples keyed into a memory-mapped embedding table (revision/embedding_table.py;
docs/design.md, "Training").

Text stores (aligned captions from embed_mean.py) are used as they are. Image stores pass through
the alignment's image_map. Either may get Gaussian noise (C3's corruption) before renormalising.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from revision.conversation import count_images, normalise_turns, place_image, render, resolve_template, split_turns
from revision.embedding_rows import normalize_rows
from revision.embedding_table import EmbeddingTable
from revision.errors import InputError, exit_with  # noqa: F401  (exit_with: callers import it from here too)
from revision.model import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from revision.records import RecordsError, read_dicts

MIN_TEXT_TOKENS = 8  # model_max_length must leave at least this much room next to the visual block
logger = logging.getLogger(__name__)


class MissingEmbeddingError(InputError, LookupError):
    """A sample whose id has no embedding in the store."""


def image_map_from(align_stats: str | os.PathLike | None) -> Callable[[np.ndarray], np.ndarray]:
    """The alignment's image_map from its statistics file (embed_mean.py's output); none given: normalise.
    Statistics holding NaN / Inf are refused by load_alignment, naming the file and the statistic."""
    if not align_stats:
        return normalize_rows
    from revision.align import load_alignment

    return load_alignment(align_stats).image_map


def embed_noise(noise_std: float | None, align_stats: str | os.PathLike | None, kind: str) -> tuple[float, str]:
    """The Gaussian noise std for the embeddings and where it comes from (for the log): the flag when given, else
    the statistics file's own (C3 carries one) for aligned text embeddings (stage 1); real images get none."""
    if noise_std is not None:
        return noise_std, "--embed_noise_std"
    if align_stats and kind == "text":
        from revision.align import load_alignment

        alignment = load_alignment(align_stats)
        return alignment.noise_std, f"{align_stats} ({alignment.method})"
    return 0.0, "default: none" + (" on real image embeddings" if align_stats else "")


def load_records(path: str | os.PathLike) -> list[dict]:
    """A JSON list or JSONL file of sample dicts (revision.records); an empty file is an error naming it."""
    try:
        records = read_dicts(path)
    except RecordsError as e:
        raise InputError(str(e)) from None
    if not records:
        raise InputError(f"{path}: empty file (no samples)")
    return records


def check_lengths(model_max_length: int, num_visual_tokens: int) -> None:
    """Refuse at start a length that cannot hold the visual block and some text."""
    if model_max_length < num_visual_tokens + MIN_TEXT_TOKENS:
        raise InputError(f"model_max_length {model_max_length} leaves no room for text: the visual block alone takes "
                         f"num_visual_tokens={num_visual_tokens} positions (need at least {num_visual_tokens + MIN_TEXT_TOKENS})")


def tokenize(segments, tokenizer, num_visual_tokens: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """input_ids and labels of rendered segments; the image becomes num_visual_tokens IMAGE_TOKEN_INDEX positions.

    Too long: text is cut from the end, but the visual block is always kept whole (cutting into it makes
    ranks disagree on the number of visual positions, the source of LLaVA's NCCL hangs).
    """
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        for j, piece in enumerate(seg.text.split(IMAGE_TOKEN)):
            if j:
                ids += [IMAGE_TOKEN_INDEX] * num_visual_tokens
                labels += [IGNORE_INDEX] * num_visual_tokens
            if piece:
                tokens = tokenizer(piece, add_special_tokens=False).input_ids
                ids += tokens
                labels += tokens if seg.train else [IGNORE_INDEX] * len(tokens)
    input_ids, label_ids = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    if len(ids) <= max_length:
        return input_ids, label_ids, False
    visual = input_ids == IMAGE_TOKEN_INDEX
    keep = visual | (torch.cumsum(~visual, 0) <= max_length - int(visual.sum()))
    return input_ids[keep], label_ids[keep], True


def estimate_length(turns: list[dict], num_visual_tokens: int) -> int:
    """A sample's length for --group_by_length without tokenizing: its words plus its visual block."""
    return sum(len(t["content"].split()) for t in turns) + num_visual_tokens


class SupervisedDataset(Dataset):
    """Samples of one data file; the embedding of each is looked up at init (so a missing one fails at start).

    A sample has an image when its text holds `<image>` ({"id", "caption"} records always do). Its key is
    the sample's "image" field (an id of the store, else one of its image paths), else its "id".
    model_max_length must hold the visual block: callers check it once with check_lengths before loading anything
    (revision/settings.py, data_utils.py). `split` makes one sample of each exchange of a conversation (each with the
    image); `image_placement` ("first" / "last") moves the image before or after the first question (None: as written).
    """

    def __init__(self, data_path: str | os.PathLike, tokenizer, table: EmbeddingTable | None, template: str,
                 num_visual_tokens: int, model_max_length: int, image_map: Callable | None = None,
                 embed_noise_std: float = 0.0, skip_missing: bool = False, noise_seed: int = 0,
                 skip_bad_embeddings: bool = False, system_prompt: str | None = None, split: bool = False,
                 image_placement: str | None = None):
        # resolved once here, not per sample (it may log a fallback warning)
        self.data_path, self.tokenizer, self.table = Path(data_path), tokenizer, table
        self.template, self.system_prompt = resolve_template(template, tokenizer), system_prompt
        self.num_visual_tokens, self.model_max_length, self.embed_noise_std = num_visual_tokens, model_max_length, embed_noise_std
        # Real image embeddings go through the alignment's image_map; aligned text embeddings are ready as they are.
        self.image_map = (image_map or normalize_rows) if table is not None and table.kind == "image" else None
        self.skip_missing, self.skip_bad_embeddings, self.noise_seed, self.epoch = skip_missing, skip_bad_embeddings, noise_seed, 0
        raw = load_records(data_path)
        self.records, self.rows = self._resolve(raw, [self._conversations(rec, row) for row, rec in enumerate(raw)])
        if split or image_placement:
            self._reshape(split, image_placement)
        self.lengths = [estimate_length(turns, num_visual_tokens if row >= 0 else 0)
                        for turns, row in zip(self.records, self.rows)]
        # One flag per sample in shared memory: __getitem__ runs in DataLoader workers, whose own counters the
        # trainer never sees; flags also count a sample once however many epochs cut it.
        self._cut = multiprocessing.RawArray("b", len(self.records))
        self._warned = False

    def _reshape(self, split: bool, image_placement: str | None) -> None:
        """Each conversation as one sample per exchange (`split`), the image where `image_placement` says."""
        records, rows, ids = [], [], []
        for turns, row, sample_id in zip(self.records, self.rows, self.ids):
            for piece in split_turns(turns) if split else [turns]:
                records.append(place_image(piece, image_placement) if image_placement else piece)
                rows.append(row)
                ids.append(sample_id)
        if split:
            logger.info("%s: %d conversations split into %d samples of one exchange each", self.data_path,
                        len(self.records), len(records))
        self.records, self.rows, self.ids = records, np.array(rows, np.int64), ids

    @property
    def truncated(self) -> int:
        """Distinct samples whose text was cut to model_max_length so far, in this process and its loader workers."""
        return int(np.frombuffer(self._cut, dtype=np.int8).sum())

    def _conversations(self, rec: dict, row: int) -> list[dict] | None:
        """The sample's turns; None when it has nothing to train on (no assistant text): skipped and counted."""
        where = f"{self.data_path}: sample {row} (id {rec.get('id')!r})"
        if "conversations" in rec:
            try:
                turns = normalise_turns(rec["conversations"])
            except (ValueError, TypeError) as e:
                raise InputError(f"{where}: {e}") from None
        elif "caption" in rec:
            if not isinstance(rec["caption"], str):
                raise InputError(f"{where}: 'caption' is a {type(rec['caption']).__name__}, expected a string")
            turns = [{"role": "user", "content": IMAGE_TOKEN + "\n"}, {"role": "assistant", "content": rec["caption"]}]
        else:
            raise InputError(f"{where}: has neither 'conversations' nor 'caption'")
        if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
            return None  # an empty conversation, or no answer: 0 tokens to learn from (and 0-token batches crash)
        # what render() would refuse mid-training, refused here (the first such sample, named, before a step runs)
        first = next(t["role"] for t in turns if t["role"] != "system")
        if first != "user":
            raise InputError(f"{where}: begins with a gpt turn; a conversation begins with a human turn (the question, "
                             f"or {IMAGE_TOKEN} for a caption)")
        answers = sum(t["role"] == "assistant" for t in turns)
        if self.template == "plain" and answers != 1:
            raise InputError(f"{where}: {answers} gpt turns; pretraining (plain) takes one caption per sample")
        images = count_images(turns)
        if images > 1:
            raise InputError(f"{where}: {images} {IMAGE_TOKEN} placeholders; a sample carries one image embedding")
        if images == 0 and ("image" in rec or self.template == "plain"):
            raise InputError(f"{where}: no {IMAGE_TOKEN} placeholder, but "
                             + ("it names an image" if "image" in rec else "pretraining (plain) needs one per sample"))
        return turns

    def _resolve(self, raw: list[dict], records: list[list[dict] | None]) -> tuple[list[list[dict]], np.ndarray]:
        """Drop (and count) samples with nothing to train on, no embedding (--skip_missing) or an unusable one
        (--skip_bad_embeddings); without the flag, the first such sample is an error."""
        empty = [i for i, turns in enumerate(records) if turns is None]
        self.skipped_empty = len(empty)
        if empty:
            logger.warning("%s: skipped %d samples with no assistant turn to train on (e.g. sample %d, id %r)",
                           self.data_path, len(empty), empty[0], raw[empty[0]].get("id"))
        needs = [turns is not None and count_images(turns) == 1 for turns in records]
        if any(needs) and self.table is None:
            raise InputError(f"{self.data_path}: samples have {IMAGE_TOKEN} but no embedding folder was given")
        keys = [str(rec.get("image", rec.get("id"))) for rec in raw]
        rows = np.full(len(records), -1, np.int64)
        if self.table is not None:
            rows = self.table.lookup(keys)
            fallback = self.table.rows([str(rec.get("id")) for rec in raw])  # "image" not in the store: try the id
            rows = np.where(rows >= 0, rows, fallback)
        missing = [i for i, need in enumerate(needs) if need and rows[i] < 0]
        self.skipped = self._refuse_or_skip(missing, self.skip_missing, "--skip_missing", MissingEmbeddingError,
                                            lambda i: f"id {keys[i]!r} has no embedding in {self.table.root}")
        bad = [int(i) for i in np.flatnonzero(self.table.is_bad(np.where(needs, rows, -1)))] if self.table is not None else []
        self.skipped_bad = self._refuse_or_skip(bad, self.skip_bad_embeddings, "--skip_bad_embeddings", InputError,
                                                lambda i: f"id {keys[i]!r}: unusable embedding in {self.table.describe(int(rows[i]))}")
        drop = set(empty) | set(missing) | set(bad)
        keep = [i for i in range(len(records)) if i not in drop]
        if not keep:
            raise InputError(f"{self.data_path}: no sample left to train on ({len(records)} samples: {len(empty)} with no "
                             f"assistant turn, {len(missing)} with no embedding, {len(bad)} with an unusable one)")
        self.ids = [str(raw[i].get("id")) for i in keep]  # for error messages (the trainer's NaN guard)
        return [records[i] for i in keep], np.where(np.array(needs, bool), rows, -1)[keep]

    def _refuse_or_skip(self, samples: list[int], skip: bool, flag: str, error: type[InputError],
                        problem: Callable[[int], str]) -> int:
        """Without `skip`, raise naming the first of `samples` and the flag that skips them; with it, warn. The count."""
        if samples and not skip:
            raise error(f"{self.data_path}: sample {samples[0]} {problem(samples[0])}"
                        + (f" ({len(samples)} samples like it)" if len(samples) > 1 else "") + f"; pass {flag} to skip such samples")
        if samples:
            logger.warning("%s: skipped %d samples (%s), e.g. sample %d %s", self.data_path, len(samples), flag,
                           samples[0], problem(samples[0]))
        return len(samples)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Fresh noise each epoch; called by the trainer (and by accelerate where it forwards set_epoch)."""
        self.epoch = epoch

    def embedding(self, row: int, index: int) -> torch.Tensor:
        vec = self.table[row][None]
        if self.image_map is not None:
            vec = np.asarray(self.image_map(vec), dtype=np.float32)
            if not np.isfinite(vec).all():
                raise InputError(f"{self.data_path}: sample {index} id {self.ids[index]!r}: the alignment's image_map "
                                 f"turned {self.table.root} row {row} into NaN / Inf (bad --align_stats?)")
        vec = vec[0].astype(np.float64)
        if self.embed_noise_std > 0:  # C3: corrupt, then back onto the sphere
            # Seeded by (seed, epoch, sample), not the global RNG: a resumed run draws the same noise.
            vec = vec + self.embed_noise_std * np.random.default_rng((self.noise_seed, self.epoch, index)).standard_normal(len(vec))
            vec = vec / max(np.linalg.norm(vec), 1e-12)
        return torch.from_numpy(vec.astype(np.float32))

    def __getitem__(self, i: int) -> dict:
        segments = render(self.records[i], self.template, self.tokenizer, self.system_prompt)
        input_ids, labels, cut = tokenize(segments, self.tokenizer, self.num_visual_tokens, self.model_max_length)
        if cut:
            self._cut[i] = 1
            if not self._warned:  # once per process
                self._warned = True
                logger.warning("%s: sample %d is longer than model_max_length=%d; its text is truncated "
                               "(the visual block is kept)", self.data_path, i, self.model_max_length)
        row = int(self.rows[i])
        return {"input_ids": input_ids, "labels": labels, "image_embeds": self.embedding(row, i) if row >= 0 else None,
                "index": i}


class DataCollator:
    """Right-pads input_ids / labels and stacks embeddings (zeros for image-free samples, so the projector
    always takes part in the graph and DDP/ZeRO see its gradients in every step)."""

    def __init__(self, pad_token_id: int | None, embed_dim: int, sample_index: bool = False):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.embed_dim = embed_dim
        self.sample_index = sample_index  # also pass the dataset indices (the trainer names a bad batch's ids)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        def pad(key: str, value: int) -> torch.Tensor:
            return torch.nn.utils.rnn.pad_sequence([f[key] for f in features], batch_first=True, padding_value=value)

        input_ids = pad("input_ids", self.pad_token_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        batch = {
            "input_ids": input_ids,
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": torch.arange(input_ids.shape[1])[None] < lengths[:, None],
            "image_embeds": stack_image_embeds(features, self.embed_dim),
        }
        if self.sample_index:
            batch["sample_index"] = torch.tensor([f.get("index", -1) for f in features])
        return batch


def stack_image_embeds(features: list[dict], embed_dim: int) -> torch.Tensor:
    """[N, D]: each sample's embedding, zeros for image-free samples (the projector stays in every step's graph)."""
    zeros = torch.zeros(embed_dim)
    return torch.stack([zeros if f["image_embeds"] is None else f["image_embeds"] for f in features])
