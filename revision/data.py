"""Training data: LLaVA-style samples keyed into a memory-mapped embedding table (DESIGN.md, "Data").

The embedding store (pkl shards) is converted once into a contiguous cache next to it: `embeds.npy`
[N, D] in store order, plus the ids (and, for image stores, the image paths) sorted, with the row each
sorted entry points to. Every rank opens these with np.load(mmap_mode="r"), so a process holds only
the pages it touches, whatever the corpus size. The cache is keyed by the shards' sha256 (or names,
sizes and mtimes for bare reference folders): a changed store gets a new cache.

Text stores (aligned captions from embed_mean.py) are used as they are. Image stores pass through
the alignment's image_map. Either may get Gaussian noise (C3's corruption) before renormalising.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from revision.conversation import count_images, normalise_turns, render, resolve_template
from revision.model import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from revision.store import EmbeddingStore, StoreError, normalize_rows

MIN_TEXT_TOKENS = 8  # model_max_length must leave at least this much room next to the visual block
logger = logging.getLogger(__name__)


class EmbeddingTable:
    """Read-only, memory-mapped id -> embedding table built from an embedding store."""

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None, verify: bool = True):
        # verify: building the cache checks every shard against the manifest's sha256 as it reads it (a built
        # cache is keyed by those hashes, so later runs read no shard and verify nothing)
        store = EmbeddingStore(root, verify=verify).require_complete()
        self.root, self.kind, self.dim, self.encoder = Path(root), store.kind, store.dim, store.encoder
        self.manifest = store.manifest or {}
        cache = Path(cache_dir or self.root / ".revision_cache") / f"table-{_cache_key(store)}"
        if not (cache / "embeds.npy").exists():
            _build_cache(store, cache)
        self.embeds = np.load(cache / "embeds.npy", mmap_mode="r")
        self.ids = np.load(cache / "ids.npy", mmap_mode="r")
        self.id_rows = np.load(cache / "id_rows.npy", mmap_mode="r")
        self.sources = np.load(cache / "sources.npy", mmap_mode="r") if (cache / "sources.npy").exists() else None
        self.source_rows = np.load(cache / "source_rows.npy", mmap_mode="r") if self.sources is not None else None
        self.dim = int(self.embeds.shape[1])

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def rows(self, keys: list[str], by_source: bool = False) -> np.ndarray:
        """Row of each key (an id, or with by_source an image path); -1 where absent."""
        index, targets = (self.sources, self.source_rows) if by_source else (self.ids, self.id_rows)
        if index is None or not len(index) or not keys:
            return np.full(len(keys), -1, np.int64)
        encoded = [k.encode() for k in keys]
        needles = np.array(encoded, dtype=index.dtype)  # longer keys get cut here: the length check catches them
        pos = np.minimum(np.searchsorted(index, needles), len(index) - 1)
        fits = np.array([len(e) <= index.dtype.itemsize for e in encoded])
        found = fits & (np.asarray(index[pos]) == needles)
        return np.where(found, np.asarray(targets[pos]), -1).astype(np.int64)

    def lookup(self, keys: list[str]) -> np.ndarray:
        """Row of each key read as an id, else as an image path (LLaVA data names either); -1 where neither."""
        rows = self.rows(keys)
        if self.sources is not None:
            rows = np.where(rows >= 0, rows, self.rows(keys, by_source=True))
        return rows

    def __getitem__(self, row: int) -> np.ndarray:
        return np.array(self.embeds[row], dtype=np.float32)  # a copy: the memmap is read-only


def _cache_key(store: EmbeddingStore) -> str:
    if store.manifest:
        parts = [f"{e['name']}:{e['sha256']}" for e in store.manifest["shards"]]
    else:
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in store.shard_paths]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _sorted_index(keys: list[str], where: str, unique: bool) -> tuple[np.ndarray, np.ndarray]:
    encoded = np.array([k.encode() for k in keys], dtype=f"S{max(1, max((len(k.encode()) for k in keys), default=1))}")
    order = np.argsort(encoded, kind="stable")
    encoded = encoded[order]
    if unique and len(encoded) > 1:
        dup = np.flatnonzero(encoded[1:] == encoded[:-1])
        if len(dup):
            raise StoreError(f"{where}: duplicate id {encoded[dup[0]].decode()!r}; ids must be unique")
    return encoded, order.astype(np.int64)


def _build_cache(store: EmbeddingStore, cache: Path) -> None:
    """Write embeds.npy (store order) and sorted id / image-path indexes into `cache`, atomically."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the embedding table cache %s from %s", cache, store.root)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        count = len(store)
        dtype = np.dtype(store.manifest.get("dtype", "float16")) if store.manifest else None
        embeds, ids, sources, offset = None, [], [], 0
        for shard in store.iter_shards():
            if embeds is None:
                embeds = np.lib.format.open_memmap(tmp / "embeds.npy", "w+", dtype or shard.embeds.dtype, (count, store.dim))
            embeds[offset: offset + len(shard)] = shard.embeds
            offset += len(shard)
            ids += shard.ids
            sources += shard.sources
        if embeds is None:
            raise StoreError(f"{store.root}: the store holds no embeddings")
        embeds.flush()
        del embeds
        for name, keys, unique in (("ids", ids, True), ("sources", sources if store.kind == "image" else None, False)):
            if keys is not None:
                index, rows = _sorted_index(keys, str(store.root), unique)
                np.save(tmp / f"{name}.npy", index)
                np.save(tmp / f"{name[:-1]}_rows.npy", rows)
        os.replace(tmp, cache)
    except OSError:
        if not (cache / "embeds.npy").exists():  # not a lost race with another rank building the same cache
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def image_map_from(align_stats: str | os.PathLike | None) -> Callable[[np.ndarray], np.ndarray]:
    """The alignment's image_map from its statistics file (embed_mean.py's output); none given: normalise."""
    if not align_stats:
        return normalize_rows
    from revision.align import load_alignment

    return load_alignment(align_stats).image_map


def load_records(path: str | os.PathLike) -> list[dict]:
    """A JSON list or JSONL file of sample dicts."""
    path = Path(path)
    text = path.read_text()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON / JSONL ({e})") from e
    for row, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: row {row} is a {type(rec).__name__}, expected a dict")
    return records


def check_lengths(model_max_length: int, num_visual_tokens: int) -> None:
    """Refuse at start a length that cannot hold the visual block and some text."""
    if model_max_length < num_visual_tokens + MIN_TEXT_TOKENS:
        raise ValueError(f"model_max_length {model_max_length} leaves no room for text: the visual block alone takes "
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


class SupervisedDataset(Dataset):
    """Samples of one data file; the embedding of each is looked up at init (so a missing one fails at start).

    A sample has an image when its text holds `<image>` ({"id", "caption"} records always do). Its key is
    the sample's "image" field (an id of the store, else one of its image paths), else its "id".
    """

    def __init__(self, data_path: str | os.PathLike, tokenizer, table: EmbeddingTable | None, template: str,
                 num_visual_tokens: int, model_max_length: int, image_map: Callable | None = None,
                 embed_noise_std: float = 0.0, skip_missing: bool = False, noise_seed: int = 0):
        check_lengths(model_max_length, num_visual_tokens)
        # resolved once here, not per sample (it may log a fallback warning)
        self.data_path, self.tokenizer, self.table = Path(data_path), tokenizer, table
        self.template = resolve_template(template, tokenizer)
        self.num_visual_tokens, self.model_max_length, self.embed_noise_std = num_visual_tokens, model_max_length, embed_noise_std
        # Real image embeddings go through the alignment's image_map; aligned text embeddings are ready as they are.
        self.image_map = (image_map or normalize_rows) if table is not None and table.kind == "image" else None
        self.skip_missing, self.noise_seed, self.epoch = skip_missing, noise_seed, 0
        raw = load_records(data_path)
        self.records, self.rows = self._resolve(raw, [self._conversations(rec, row) for row, rec in enumerate(raw)])
        self.lengths = [sum(len(t["content"].split()) for t in turns) + (num_visual_tokens if row >= 0 else 0)
                        for turns, row in zip(self.records, self.rows)]
        # One flag per sample in shared memory: __getitem__ runs in DataLoader workers, whose own counters the
        # trainer never sees; flags also count a sample once however many epochs cut it.
        self._cut = multiprocessing.RawArray("b", len(self.records))
        self._warned = False

    @property
    def truncated(self) -> int:
        """Distinct samples whose text was cut to model_max_length so far, in this process and its loader workers."""
        return int(np.frombuffer(self._cut, dtype=np.int8).sum())

    def _conversations(self, rec: dict, row: int) -> list[dict]:
        where = f"{self.data_path}: sample {row} (id {rec.get('id')!r})"
        if "conversations" in rec:
            try:
                turns = normalise_turns(rec["conversations"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif "caption" in rec:
            turns = [{"role": "user", "content": IMAGE_TOKEN + "\n"}, {"role": "assistant", "content": rec["caption"]}]
        else:
            raise ValueError(f"{where}: has neither 'conversations' nor 'caption'")
        images = count_images(turns)
        if images > 1:
            raise ValueError(f"{where}: {images} {IMAGE_TOKEN} placeholders; a sample carries one image embedding")
        if images == 0 and ("image" in rec or self.template == "plain"):
            raise ValueError(f"{where}: no {IMAGE_TOKEN} placeholder, but "
                             + ("it names an image" if "image" in rec else "pretraining (plain) needs one per sample"))
        return turns

    def _resolve(self, raw: list[dict], records: list[list[dict]]) -> tuple[list[list[dict]], np.ndarray]:
        needs = [count_images(turns) == 1 for turns in records]
        if any(needs) and self.table is None:
            raise ValueError(f"{self.data_path}: samples have {IMAGE_TOKEN} but no embedding folder was given")
        keys = [str(rec.get("image", rec.get("id"))) for rec in raw]
        rows = np.full(len(records), -1, np.int64)
        if self.table is not None:
            rows = self.table.lookup(keys)
            fallback = self.table.rows([str(rec.get("id")) for rec in raw])  # "image" not in the store: try the id
            rows = np.where(rows >= 0, rows, fallback)
        missing = [i for i, need in enumerate(needs) if need and rows[i] < 0]
        if missing and not self.skip_missing:
            first = missing[0]
            raise LookupError(f"{self.data_path}: sample {first} id {keys[first]!r} has no embedding in "
                           f"{self.table.root}" + (f" ({len(missing)} samples lack one)" if len(missing) > 1 else "")
                           + "; pass --skip_missing to skip such samples")
        self.skipped = len(missing)
        if missing:
            logger.warning("%s: skipped %d samples with no embedding in %s (e.g. id %r)",
                           self.data_path, len(missing), self.table.root, keys[missing[0]])
        keep = [i for i in range(len(records)) if not (needs[i] and rows[i] < 0)]
        return [records[i] for i in keep], np.where(np.array(needs, bool), rows, -1)[keep]

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Fresh noise each epoch; called by the trainer (and by accelerate where it forwards set_epoch)."""
        self.epoch = epoch

    def embedding(self, row: int, index: int) -> torch.Tensor:
        vec = self.table[row][None]
        if self.image_map is not None:
            vec = np.asarray(self.image_map(vec), dtype=np.float32)
        vec = vec[0].astype(np.float64)
        if self.embed_noise_std > 0:  # C3: corrupt, then back onto the sphere
            # Seeded by (seed, epoch, sample), not the global RNG: a resumed run draws the same noise.
            vec = vec + self.embed_noise_std * np.random.default_rng((self.noise_seed, self.epoch, index)).standard_normal(len(vec))
            vec = vec / max(np.linalg.norm(vec), 1e-12)
        return torch.from_numpy(vec.astype(np.float32))

    def __getitem__(self, i: int) -> dict:
        segments = render(self.records[i], self.template, self.tokenizer)
        input_ids, labels, cut = tokenize(segments, self.tokenizer, self.num_visual_tokens, self.model_max_length)
        if cut:
            self._cut[i] = 1
            if not self._warned:  # once per process
                self._warned = True
                logger.warning("%s: sample %d is longer than model_max_length=%d; its text is truncated "
                               "(the visual block is kept)", self.data_path, i, self.model_max_length)
        row = int(self.rows[i])
        return {"input_ids": input_ids, "labels": labels, "image_embeds": self.embedding(row, i) if row >= 0 else None}


class DataCollator:
    """Right-pads input_ids / labels and stacks embeddings (zeros for image-free samples, so the projector
    always takes part in the graph and DDP/ZeRO see its gradients in every step)."""

    def __init__(self, pad_token_id: int | None, embed_dim: int):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.embed_dim = embed_dim

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        def pad(key: str, value: int) -> torch.Tensor:
            return torch.nn.utils.rnn.pad_sequence([f[key] for f in features], batch_first=True, padding_value=value)

        input_ids = pad("input_ids", self.pad_token_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        zeros = torch.zeros(self.embed_dim)
        return {
            "input_ids": input_ids,
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": torch.arange(input_ids.shape[1])[None] < lengths[:, None],
            "image_embeds": torch.stack([zeros if f["image_embeds"] is None else f["image_embeds"] for f in features]),
        }
