"""Streaming reads for alignment: float64 chunks of a shard, bad-row policy, a one-pass row sampler, and the
pass cache that lets a method read the text store several times without unpickling it again.

Memory is bounded by one shard (and `memory_budget` of cached text), never by the corpus.
"""
from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from revision.embedding_rows import bad_rows, describe_bad_row
from revision.errors import StoreError
from revision.safe_pickle import safe_load
from revision.shards import Shard
from revision.store import EmbeddingStore

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of decoded text embeddings kept in RAM between passes (beyond: a temp disk cache)
CHUNK_ROWS = 64  # one chunk's rows: 64 x 1280 x 8 B = 0.65 MB stays in the L2 cache (measured fastest: 64-128)
WORKERS = max(1, min(4, os.cpu_count() or 1))  # threads sharing a shard's chunks (numpy releases the GIL in them)

Stream = Callable[[], Iterable[Shard]]  # a fresh pass over a store's shards on every call


class BadRows:
    """What to do with NaN, Inf or all-zero rows: raise naming shard and row, or (drop=True) skip and count."""

    def __init__(self, drop: bool = False):
        self.drop = drop
        self._seen: dict[str, set[tuple[str, int]]] = {"text": set(), "image": set()}

    def reject(self, shard: Shard, rows: np.ndarray) -> None:
        if not self.drop:
            row = int(rows[0])
            what = describe_bad_row(np.asarray(shard.embeds[row], np.float64))
            raise StoreError(
                f"{shard.path or 'input'}: row {row} (id {shard.ids[row]!r}) has an unusable embedding ({what}); "
                "fix the input or pass --drop_bad to skip such rows"
            )
        self._seen[shard.kind].update((shard.path, int(r)) for r in rows)

    def counts(self) -> dict[str, int]:
        return {kind: len(rows) for kind, rows in self._seen.items()}


def chunks(
    shard: Shard, bad: BadRows, lo: int = 0, hi: int | None = None, buf: np.ndarray | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, rows, 1/‖row‖) chunk by chunk over rows lo:hi; one reused buffer (`buf`, if given:
    [rows, dim] float64 or float32, so a caller looping over many blocks touches the same pages every time; its
    dtype is the rows' and its length the chunk's). Bad rows go to `bad` (which raises, or lets them through as
    zeros with weight 0)."""
    embeds = shard.embeds
    hi = len(embeds) if hi is None else hi
    if buf is None:
        buf = np.empty((max(0, min(CHUNK_ROWS, hi - lo)), embeds.shape[1]))
    step = max(1, len(buf))
    for start in range(lo, hi, step):
        rows = buf[: min(step, hi - start)]
        np.copyto(rows, embeds[start : start + len(rows)])
        sq = np.einsum("ij,ij->i", rows, rows)
        ok = np.isfinite(sq) & (sq > 0)  # a NaN or Inf anywhere makes the row's norm non-finite
        if not ok.all():
            bad.reject(shard, start + np.flatnonzero(~ok))
            rows[~ok] = 0.0
            sq[~ok] = 1.0
        inv_norm = np.where(ok, 1.0 / np.sqrt(sq, dtype=np.float64), 0.0)
        yield start, rows, inv_norm


def row_dtype(shard: Shard) -> type:
    """float32 rows for float16 embeddings: every float16 row's squared norm is a normal float32 (at most
    1280 x 65504² for D = 1280, at least the smallest subnormal squared), and BLAS runs float32 at twice the
    rate; float64 for anything wider, whose squares float32 could overflow."""
    return np.float32 if shard.embeds.dtype == np.float16 else np.float64


_pool: ThreadPoolExecutor | None = None
_local = threading.local()  # each thread's chunk buffer, reused: no fresh pages per shard


def _buffer(dim: int, dtype: type) -> np.ndarray:
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (dim, np.dtype(dtype).char)
    if key not in buffers:
        buffers[key] = np.empty((CHUNK_ROWS, dim), dtype)
    return buffers[key]


def map_chunks(shard: Shard, bad: BadRows, fn: Callable[[int, np.ndarray, np.ndarray], Any],
               lo: int = 0, hi: int | None = None, dtype: type = np.float64, workers: int | None = None) -> list:
    """[fn(first row, rows, 1/‖row‖) for every chunk of rows lo:hi], in chunk order; rows are `dtype` (float64 or
    float32). The range is split between `workers` (default WORKERS) threads at chunk boundaries: every chunk, hence
    every number, is the one a single thread would see, and callers reduce the results in order (the same sums,
    bit for bit)."""
    global _pool
    hi = len(shard.embeds) if hi is None else hi
    count = -(-(hi - lo) // CHUNK_ROWS)
    parts = min(workers or WORKERS, count)
    dim = shard.embeds.shape[1]

    def run(a: int, b: int) -> list:
        return [fn(*chunk) for chunk in chunks(shard, bad, a, b, _buffer(dim, dtype))]

    if parts <= 1:
        return run(lo, hi)
    if _pool is None:
        _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="align")
    bounds = [lo + (count * k // parts) * CHUNK_ROWS for k in range(parts)] + [hi]
    futures = [_pool.submit(run, a, b) for a, b in zip(bounds, bounds[1:])]
    wait(futures)  # all done before anything is raised: no thread still writes into a caller's buffer
    return [result for future in futures for result in future.result()]  # the first part's error first


def unit_mean(stream: Stream, bad: BadRows, what: str) -> tuple[np.ndarray, int]:
    """Mean of n(x) over every usable row of a stream (one pass), and how many rows that was."""
    total, count = None, 0
    for shard in stream():
        for part, rows in map_chunks(shard, bad, lambda _, x, inv_norm: (inv_norm @ x, int(np.count_nonzero(inv_norm)))):
            total = part if total is None else total + part  # sum of the unit rows, chunk by chunk, in order
            count += rows
        del shard
    if not count:
        raise StoreError(f"{what}: no usable rows to fit alignment statistics on (empty store, or every row dropped)")
    return total / count, count


class RowSampler:
    """A uniform sample of n usable rows from a stream of shards, in one pass, memory O(n): every row draws a
    random key and the n smallest keys win (priority sampling). Deterministic for a seed and shard order."""

    def __init__(self, n: int, seed: int = 0, bad: BadRows | None = None):
        self.n, self.rng, self.bad = n, np.random.default_rng(seed), bad or BadRows(drop=True)
        self.kind, self.keys, self.ids, self.sources, self.embeds = "text", np.empty(0), [], [], None

    def add(self, shard: Shard) -> None:
        self.kind = shard.kind
        key = self.rng.random(len(shard))
        rows = np.sort(np.argsort(key, kind="stable")[: self.n])  # only this shard's n best can make the cut
        broken = bad_rows(shard.embeds[rows])
        if len(broken):
            self.bad.reject(shard, rows[broken])
            rows = np.delete(rows, broken)
        new = np.array(shard.embeds[rows])
        self.keys = np.concatenate([self.keys, key[rows]])
        self.ids += [shard.ids[i] for i in rows]
        self.sources += [shard.sources[i] for i in rows] if shard.sources else [""] * len(rows)
        self.embeds = new if self.embeds is None else np.concatenate([self.embeds, new.astype(self.embeds.dtype)])
        if len(self.keys) > self.n:
            keep = np.sort(np.argsort(self.keys, kind="stable")[: self.n])
            self.keys, self.embeds = self.keys[keep], self.embeds[keep]
            self.ids, self.sources = [self.ids[i] for i in keep], [self.sources[i] for i in keep]

    def result(self) -> Shard:
        if self.embeds is None or not len(self.ids):
            raise StoreError("no usable rows to sample from (empty store, or every row dropped)")
        return Shard(self.kind, self.ids, self.embeds, self.sources, path=f"sample of {len(self.ids)} {self.kind} rows")


def sample_rows(shards: Iterable[Shard], n: int, seed: int = 0, bad: BadRows | None = None) -> Shard:
    """`RowSampler` over a whole stream."""
    sampler = RowSampler(n, seed, bad)
    for shard in shards:
        sampler.add(shard)
    return sampler.result()


class SpilledRows:
    """The rows of a .npy file, read slice by slice on demand: memory stays one slice however large the file
    (a memory map would count every page read towards RSS until it is closed). Enough of an array for `chunks`."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            self.shape, fortran, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran or len(self.shape) != 2:
            raise StoreError(f"{path}: expected a C-ordered [rows, dim] array")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if not isinstance(key, slice):
            return self[key : key + 1][0]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("SpilledRows reads contiguous slices only")
        out = np.empty((max(0, stop - start), self.shape[1]), self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * out.itemsize * self.shape[1])
            view, done = memoryview(out).cast("B"), 0
            while done < out.nbytes:  # a raw read may return fewer bytes than asked
                got = f.readinto(view[done:])
                if not got:
                    raise StoreError(f"{self.path}: truncated (temp cache file changed while in use?)")
                done += got
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


class PassCache:
    """A store read several times: the first pass keeps each shard's decoded columns, so later passes skip the
    slow unpickling of the record layout. Shards are kept in RAM while their embeddings fit `memory_budget`
    bytes (no temp file: on a VM, fresh page-cache pages cost as much as fresh memory), the rest are saved
    under `cache_dir` (embeddings as .npy, read back slice by slice): peak memory is bounded by the budget,
    not by the corpus. The first pass also draws a uniform sample of rows (for the gap report) as it goes by."""

    def __init__(
        self, store: EmbeddingStore, cache_dir: Path | None = None, sample: int = 0, seed: int = 0,
        progress: bool = True, memory_budget: int = 0,
    ):
        self.store, self.cache_dir, self.sample_size, self.seed, self.progress = store, cache_dir, sample, seed, progress
        self.memory_budget = memory_budget
        self.kind, self.dim, self.encoder, self.root = store.kind, store.dim, store.encoder, store.root
        self._cached: list[Shard | tuple[Path, Path, str]] | None = None
        self._passes = 0
        self.rows = None  # known after the first full pass
        self.sample: Shard | None = None

    def iter_shards(self) -> Iterator[Shard]:
        self._passes += 1
        total = self.rows if self.rows is not None else self.store.count
        bar = tqdm(total=total, unit="row", unit_scale=True, desc=f"{self.kind} pass {self._passes}",
                   disable=not self.progress, leave=False)
        with bar:
            for shard in self._shards():
                yield shard
                bar.update(len(shard))
                del shard  # (here and in the loops over shards) not held while the next one loads

    def _shards(self) -> Iterator[Shard]:
        if self._cached is not None:
            for kept in self._cached:
                if isinstance(kept, Shard):
                    yield kept
                    continue
                embeds_path, columns_path, source = kept
                ids, sources = safe_load(columns_path)
                yield Shard(self.kind, ids, SpilledRows(embeds_path), sources, path=source)
            return
        cached, rows, in_ram = [], 0, 0
        sampler = RowSampler(self.sample_size, self.seed) if self.sample_size else None
        # no enumerate(): its reused result tuple would keep the previous shard alive while the next one loads
        for shard in self.store.iter_shards():
            index = len(cached)
            if sampler is not None:
                sampler.add(shard)
            if self.cache_dir is not None:
                if in_ram + shard.embeds.nbytes <= self.memory_budget:
                    in_ram += shard.embeds.nbytes
                    cached.append(shard)
                else:
                    cached.append(self._save(index, shard))
            rows += len(shard)
            yield shard
            del shard
        self.rows = rows
        self.sample = sampler.result() if sampler is not None and rows else None
        if self.cache_dir is not None:
            self._cached = cached

    def _save(self, index: int, shard: Shard) -> tuple[Path, Path, str]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        embeds_path = self.cache_dir / f"{self.kind}_{index:05d}.npy"
        columns_path = self.cache_dir / f"{self.kind}_{index:05d}.pkl"
        np.save(embeds_path, shard.embeds)
        with open(columns_path, "wb") as f:
            pickle.dump((list(shard.ids), list(shard.sources)), f, protocol=5)
        return embeds_path, columns_path, shard.path

    def ensure_sample(self) -> Shard | None:
        """The first pass's sample, reading the store once if nothing has yet (e.g. `none` fits nothing)."""
        if self.sample_size and self.sample is None and self.rows is None:
            for _ in self.iter_shards():
                pass
        return self.sample
