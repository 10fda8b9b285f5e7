"""Close the modality gap without training: fit statistics on unpaired sets, then map embeddings.

DESIGN.md "Alignment" is the contract. Each method is an object with `fit(text_store, image_store)`
(float64 sums, streaming shard by shard: memory is bounded by one shard, never by the corpus),
`text_map` (text embeddings -> synthetic image embeddings) and `image_map` (applied to every real
image embedding at finetuning and inference). `save`/`load_alignment` keep the statistics in one
small JSON file that travels with the model.

`align_stores` is what `embed_mean.py` runs: fit, write the aligned text store, report the gap.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from revision.store import (
    EmbeddingStore, Shard, StoreError, StoreWriter, bad_rows, describe_bad_row, safe_load,
)

METHODS = ("realign", "mean_shift", "c3", "none")
STATS_FILE = "align_stats.json"
STATS_FORMAT = "revision.align/1"
DEFAULT_MEMORY_BUDGET = 1 << 29  # bytes of decoded text embeddings kept in RAM between passes (beyond: a temp disk cache)
CHUNK_ROWS = 256  # float64 working set of one chunk: 256 x 1280 x 8 B = 2.6 MB, stays in the L2 cache
C3_NOISE_STD = math.sqrt(0.016)  # C3's default corruption; the data loader adds it (DESIGN.md)

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


def _chunks(
    shard: Shard, bad: BadRows, lo: int = 0, hi: int | None = None, buf: np.ndarray | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, float64 rows, 1/‖row‖) chunk by chunk over rows lo:hi; one reused buffer (`buf`, if given:
    [CHUNK_ROWS, dim] float64, so a caller looping over many blocks touches the same pages every time).
    Bad rows go to `bad` (which raises, or lets them through as zeros with weight 0)."""
    embeds = shard.embeds
    hi = len(embeds) if hi is None else hi
    if buf is None:
        buf = np.empty((max(0, min(CHUNK_ROWS, hi - lo)), embeds.shape[1]))
    for start in range(lo, hi, CHUNK_ROWS):
        rows = buf[: min(CHUNK_ROWS, hi - start)]
        np.copyto(rows, embeds[start : start + len(rows)])
        sq = np.einsum("ij,ij->i", rows, rows)
        ok = np.isfinite(sq) & (sq > 0)  # a NaN or Inf anywhere makes the row's norm non-finite
        if not ok.all():
            bad.reject(shard, start + np.flatnonzero(~ok))
            rows[~ok] = 0.0
            sq[~ok] = 1.0
        inv_norm = np.where(ok, 1.0 / np.sqrt(sq), 0.0)
        yield start, rows, inv_norm


def _unit_mean(stream: Stream, bad: BadRows, what: str) -> tuple[np.ndarray, int]:
    """Mean of n(x) over every usable row of a stream, and how many rows that was."""
    total, count = None, 0
    for shard in stream():
        for _, rows, inv_norm in _chunks(shard, bad):
            part = inv_norm @ rows  # sum of the unit rows of this chunk
            total = part if total is None else total + part
            count += int(np.count_nonzero(inv_norm))
        del shard
    if not count:
        raise StoreError(f"{what}: no usable rows to fit alignment statistics on (empty store, or every row dropped)")
    return total / count, count


def _as_input(x: np.ndarray, kind: str) -> Shard:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a [rows, dim] array, got shape {x.shape}")
    return Shard(kind, _RowNames(), x, path="input")


class _RowNames:
    """Stands in for ids of an in-memory array in error messages: row i is called 'row i'."""

    def __getitem__(self, i: int) -> str:
        return f"row {i}"


class Alignment:
    """`none`: text_map = image_map = n. The other methods subclass this and add statistics."""

    method = "none"

    def __init__(self, dim: int | None = None, info: dict | None = None):
        self.dim = dim
        self.info: dict[str, Any] = dict(info or {})  # counts, encoder, sample size, ... (for people)

    # ---- fitting -------------------------------------------------------------------------------
    def fit(
        self, text_store: Any, image_store: Any, sample: int | None = None, seed: int = 0, drop_bad: bool = False
    ) -> "Alignment":
        """Fit on two stores (anything with `iter_shards()` and `dim`), optionally on a uniform sample per side."""
        if text_store.dim != image_store.dim:
            raise StoreError(f"text store has dim {text_store.dim}, image store dim {image_store.dim}")
        bad = BadRows(drop_bad)
        self._names = (str(getattr(text_store, "root", "text store")), str(getattr(image_store, "root", "image store")))
        texts, images = text_store.iter_shards, image_store.iter_shards
        if sample:
            text_sample = sample_rows(text_store.iter_shards(), sample, seed, bad)
            image_sample = sample_rows(image_store.iter_shards(), sample, seed + 1, bad)
            texts, images = (lambda: [text_sample]), (lambda: [image_sample])
        self.dim = int(text_store.dim)
        self.info = {"fit_sample": sample or None, "seed": seed, "encoder": getattr(text_store, "encoder", None)}
        self._fit(texts, images, bad)
        self.info["dropped_rows"] = bad.counts()
        return self

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        pass

    # ---- mapping -------------------------------------------------------------------------------
    def text_map(self, x: np.ndarray) -> np.ndarray:
        """Text embeddings [N, D] (any float dtype, any norm) -> float32 unit rows; bad rows raise."""
        return self._map(_as_input(x, "text"), self._text_rows, BadRows())[0]

    def image_map(self, x: np.ndarray) -> np.ndarray:
        """Real image embeddings [N, D] -> float32 unit rows, as the projector sees them."""
        return self._map(_as_input(x, "image"), self._image_rows, BadRows())[0]

    def map_text_rows(
        self, shard: Shard, bad: BadRows, lo: int = 0, hi: int | None = None,
        out: np.ndarray | None = None, scratch: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """text_map of rows lo:hi of a shard under a bad-row policy: (float32 rows, mask of usable rows).
        `out` ([hi - lo, dim] float32) and `scratch` (see `_chunks`) are reused buffers, if given."""
        return self._map(shard, self._text_rows, bad, lo, hi, out, scratch)

    def _map(self, shard: Shard, rows_fn: Callable, bad: BadRows, lo: int = 0, hi: int | None = None,
             out: np.ndarray | None = None, scratch: np.ndarray | None = None):
        if self.dim is not None and shard.embeds.shape[1] != self.dim:
            raise StoreError(f"{shard.path}: embeddings of dim {shard.embeds.shape[1]}, alignment was fitted on {self.dim}")
        hi = len(shard.embeds) if hi is None else hi
        out = np.empty((hi - lo, shard.embeds.shape[1]), np.float32) if out is None else out
        keep = np.ones(hi - lo, bool)
        for start, rows, inv_norm in _chunks(shard, bad, lo, hi, scratch):
            rows_fn(rows, inv_norm, out[start - lo : start - lo + len(rows)])
            keep[start - lo : start - lo + len(rows)] = inv_norm > 0
        return out, keep

    def _text_rows(self, rows: np.ndarray, inv_norm: np.ndarray, out: np.ndarray) -> None:
        np.multiply(rows, inv_norm[:, None], out=out)

    _image_rows = _text_rows

    # ---- statistics file -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The fitted statistics (float64 vectors as lists: JSON keeps them exactly)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATS_FORMAT, "method": self.method, "dim": self.dim, "info": self.info, **self.state()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics as JSON (atomically); a folder gets `align_stats.json` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        os.replace(tmp, path)
        return path


def _vector(v: Any, dim: int, name: str) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.shape != (dim,) or not np.isfinite(v).all():
        raise StoreError(f"alignment statistic {name!r} has shape {v.shape} (expected ({dim},)) or non-finite values")
    return v


class MeanShift(Alignment):
    """Unicorn's mean shift: each modality minus its own mean, renormalised."""

    method = "mean_shift"

    def __init__(self, dim: int | None = None, info: dict | None = None, mu_text=None, mu_image=None):
        super().__init__(dim, info)
        self.mu_text = None if mu_text is None else _vector(mu_text, dim, "mu_text")
        self.mu_image = None if mu_image is None else _vector(mu_image, dim, "mu_image")

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        self.mu_image, self.info["image_rows"] = _unit_mean(images, bad, self._names[1])
        self.mu_text, self.info["text_rows"] = _unit_mean(texts, bad, self._names[0])

    @staticmethod
    def _centred(rows: np.ndarray, inv_norm: np.ndarray, mu: np.ndarray, out: np.ndarray) -> None:
        rows *= inv_norm[:, None]
        rows -= mu
        norm = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        np.divide(rows, np.where(norm > 0, norm, 1.0)[:, None], out=out)

    def _text_rows(self, rows, inv_norm, out) -> None:
        self._centred(rows, inv_norm, self.mu_text, out)

    def _image_rows(self, rows, inv_norm, out) -> None:
        self._centred(rows, inv_norm, self.mu_image, out)

    def state(self) -> dict[str, Any]:
        return {"mu_text": self.mu_text.tolist(), "mu_image": self.mu_image.tolist()}


class C3(MeanShift):
    """C3 = mean shift's centring; its Gaussian corruption (std C3_NOISE_STD) is added by the data loader."""

    method = "c3"

    def state(self) -> dict[str, Any]:
        return {**super().state(), "noise_std": C3_NOISE_STD}


class ReAlign(Alignment):
    """The paper's ReAlign (DESIGN.md steps 1-4): one scalar trace match, then a centroid correction.

    With x = n(t), c = mu_image - s*mu_text and ‖x‖ = 1, step 3 is y = (s*x + c)/r with
    r² = s² + 2s(x·c) + ‖c‖², and step 4 is n(y + d) with d = mu_image - mu_hat and
    ‖y + d‖² = 1 + 2(y·d) + ‖d‖². So each row needs only two dot products (one small matmul per chunk)
    and one scaled sum: the same numbers as forming every intermediate vector, at a fraction of the cost.
    """

    method = "realign"

    def __init__(self, dim=None, info=None, mu_text=None, mu_image=None, scale=None, mu_hat=None):
        super().__init__(dim, info)
        self.mu_text = None if mu_text is None else _vector(mu_text, dim, "mu_text")
        self.mu_image = None if mu_image is None else _vector(mu_image, dim, "mu_image")
        self.mu_hat = None if mu_hat is None else _vector(mu_hat, dim, "mu_hat")
        self.scale = None if scale is None else float(scale)

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        # 1-2: anchors and traces (for unit rows, mean‖x - mu‖² = 1 - ‖mu‖²); images first, so the image store
        # lets go of the shard it read when opened before the text shards come
        self.mu_image, self.info["image_rows"] = _unit_mean(images, bad, self._names[1])
        self.mu_text, self.info["text_rows"] = _unit_mean(texts, bad, self._names[0])
        self.info["trace_text"] = 1.0 - float(self.mu_text @ self.mu_text)
        self.info["trace_image"] = 1.0 - float(self.mu_image @ self.mu_image)
        self.scale = math.sqrt(self.info["trace_image"] / (self.info["trace_text"] + 1e-10))
        # 3: mu_hat = mean of y over the whole text set (a second pass: y depends on every statistic above)
        c = self._shift()
        sum_x_over_r, sum_inv_r, count = np.zeros(self.dim), 0.0, 0
        for shard in texts():
            for _, rows, inv_norm in _chunks(shard, bad):
                inv_r = self._inv_r(rows, inv_norm, c)
                sum_x_over_r += (inv_r * inv_norm) @ rows
                sum_inv_r += float(inv_r.sum())
                count += int(np.count_nonzero(inv_norm))
            del shard
        self.mu_hat = (self.scale * sum_x_over_r + sum_inv_r * c) / count

    def _shift(self) -> np.ndarray:
        return self.mu_image - self.scale * self.mu_text

    def _inv_r(self, rows: np.ndarray, inv_norm: np.ndarray, c: np.ndarray) -> np.ndarray:
        """1/‖s·x + c‖ per row (0 for dropped rows)."""
        s = self.scale
        xc = (rows @ c) * inv_norm
        r2 = np.maximum(s * s + 2 * s * xc + c @ c, 1e-300)
        return np.where(inv_norm > 0, 1.0 / np.sqrt(r2), 0.0)

    def _text_rows(self, rows, inv_norm, out) -> None:
        s, c, d = self.scale, self._shift(), self.mu_image - self.mu_hat
        cd = np.stack([c, d])
        dots = (rows @ cd.T) * inv_norm[:, None]  # x·c, x·d
        inv_r = 1.0 / np.sqrt(np.maximum(s * s + 2 * s * dots[:, 0] + c @ c, 1e-300))
        y_dot_d = (s * dots[:, 1] + c @ d) * inv_r
        inv_q = 1.0 / np.sqrt(np.maximum(1.0 + 2.0 * y_dot_d + d @ d, 1e-300))
        rows *= (s * inv_r * inv_q * inv_norm)[:, None]
        np.add(rows, np.stack([inv_r * inv_q, inv_q], axis=1) @ cd, out=out, casting="same_kind")  # float64 -> out

    def state(self) -> dict[str, Any]:
        return {
            "mu_text": self.mu_text.tolist(), "mu_image": self.mu_image.tolist(),
            "scale": self.scale, "mu_hat": self.mu_hat.tolist(),
        }


CLASSES: dict[str, type[Alignment]] = {"none": Alignment, "mean_shift": MeanShift, "c3": C3, "realign": ReAlign}


def make_alignment(method: str) -> Alignment:
    if method not in CLASSES:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {METHODS}")
    return CLASSES[method]()


def alignment_from_dict(d: dict) -> Alignment:
    """Rebuild an alignment from `Alignment.to_dict()` (e.g. the copy a checkpoint's config carries)."""
    if d.get("format") != STATS_FORMAT or d.get("method") not in CLASSES:
        raise StoreError(f"not alignment statistics (format {d.get('format')!r}, method {d.get('method')!r})")
    method, dim, info = d["method"], d.get("dim"), d.get("info", {})
    if method == "none":
        return Alignment(dim, info)
    keys = {"mean_shift": ("mu_text", "mu_image"), "c3": ("mu_text", "mu_image"),
            "realign": ("mu_text", "mu_image", "scale", "mu_hat")}[method]
    missing = [k for k in keys if k not in d]
    if missing or not dim:
        raise StoreError(f"{method} statistics lack {missing or ['dim']}")
    return CLASSES[method](dim, info, **{k: d[k] for k in keys})


def load_alignment(path: str | os.PathLike) -> Alignment:
    """Load statistics saved by `Alignment.save` (the JSON file, or the folder holding align_stats.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    if not path.is_file():
        raise StoreError(f"{path}: no alignment statistics here")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    try:
        return alignment_from_dict(d)
    except StoreError as e:
        raise StoreError(f"{path}: {e}") from e


# ---- sampling and multi-pass reading ------------------------------------------------------------
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
    (a memory map would count every page read towards RSS until it is closed). Enough of an array for `_chunks`."""

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


# ---- embed_mean.py ---------------------------------------------------------------------------------
def _check_inputs(texts: EmbeddingStore, images: EmbeddingStore | None, stats: Alignment | None, force: bool) -> None:
    for store in (texts, images):
        if store is not None and (store.dim == 0 or store.count == 0):
            raise StoreError(f"{store.root}: empty {store.kind} store")
    if images is not None and texts.dim != images.dim:
        raise StoreError(f"{texts.root} holds {texts.dim}-d embeddings but {images.root} holds {images.dim}-d")
    if stats is not None and stats.dim != texts.dim:
        raise StoreError(f"alignment statistics are {stats.dim}-d but {texts.root} holds {texts.dim}-d embeddings")
    encoders = {str(store.root): store.encoder for store in (texts, images) if store is not None and store.encoder}
    if stats is not None and stats.info.get("encoder"):
        encoders["the alignment statistics"] = stats.info["encoder"]
    if len(set(encoders.values())) > 1 and not force:
        named = ", ".join(f"{where}: {enc!r}" for where, enc in encoders.items())
        raise StoreError(f"embeddings come from different encoders ({named}); pass --force if that is intended")


def align_stores(
    text_dir: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    method: str = "realign",
    dtype: str = "float32",
    stats_sample: int | None = None,
    apply_stats: str | os.PathLike | None = None,
    drop_bad: bool = False,
    force: bool = False,
    overwrite: bool = False,
    report: bool = True,
    report_sample: int = 10_000,
    seed: int = 0,
    shard_size: int = 16_384,  # small shards: fewer fresh pages for the writer's two buffers and the page cache
    progress: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    verify: bool = True,
) -> dict:
    """Fit `method` on the text and image stores (or load `apply_stats`), write the aligned text store to
    `out_dir` (same ids and captions) with its statistics file, and the gap report. Text shards read more than
    once stay in RAM up to `memory_budget` bytes of embeddings; beyond that they go to a temp cache in `out_dir`.
    Returns a summary."""
    clock = time.perf_counter()
    out = Path(out_dir)
    for source in (text_dir, image_dir):
        if source is not None and out.resolve() == Path(source).resolve():
            raise StoreError(f"--out {out} is the input folder {source}; write the aligned store to a new folder")
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {METHODS}")
    if image_dir is None and apply_stats is None:
        raise ValueError("an image store is needed to fit statistics (or pass --apply_stats FILE)")
    loaded = load_alignment(apply_stats) if apply_stats is not None else None
    if loaded is not None and loaded.method != method:
        raise StoreError(f"{apply_stats}: statistics are for {loaded.method!r}, not {method!r}")
    texts = EmbeddingStore(text_dir, "text", verify).require_complete()  # verify: each shard's sha256, as it is read
    images = EmbeddingStore(image_dir, "image", verify).require_complete() if image_dir is not None else None
    _check_inputs(texts, images, loaded, force)

    encoder = texts.encoder or (images.encoder if images is not None else None) or "unknown"
    writer = StoreWriter(out, "text", encoder, texts.dim, dtype, shard_size, overwrite,
                         extra={"method": method, "aligned_from": str(text_dir), "alignment": STATS_FILE},
                         drop_page_cache=True)
    stats_path = out / STATS_FILE
    if overwrite:
        for old in (stats_path, out / "gap_report.json", out / "gap_report.png"):
            old.unlink(missing_ok=True)
    if writer.done_ids:  # a rerun after a crash: finish with the statistics the first run wrote
        if not stats_path.exists():
            raise StoreError(f"{out}: a partial aligned store without {STATS_FILE}; pass --overwrite to start again")
        loaded = load_alignment(stats_path)
        if loaded.method != method:
            raise StoreError(f"{out}: a partial store aligned with {loaded.method!r}; pass --overwrite to replace it")

    cache_dir = out / ".align_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    passes_over_text = 1 if method == "none" or loaded is not None else 2 + (method == "realign" and not stats_sample)
    sample = report_sample if report else 0
    text_source = PassCache(texts, cache_dir if passes_over_text > 1 else None, sample, seed, progress, memory_budget)
    image_source = PassCache(images, None, sample, seed + 1, progress) if images is not None else None
    timings = {}
    gap_report = None
    try:
        if loaded is not None:
            alignment = loaded
        else:
            alignment = make_alignment(method).fit(text_source, image_source, stats_sample, seed, drop_bad)
            alignment.save(stats_path)
        timings["fit_s"] = time.perf_counter() - clock
        _return_free_heap()  # what unpickling the records left free: the writer's buffers need no extra pages
        if report and image_source is not None and text_source.ensure_sample() is not None:
            # The report needs only the samples and the fitted maps: it is drawn on a second thread (the second
            # core: numpy and Agg release the GIL) while this one runs the write pass.
            before = (text_source.sample.embeds, image_source.ensure_sample().embeds)
            after = (alignment.text_map(before[0]), alignment.image_map(before[1]))
            report_thread = ThreadPoolExecutor(1, thread_name_prefix="gap-report")
            gap_report = report_thread.submit(_timed_gap_report, out, before, after, method, seed)
        bad = BadRows(drop_bad)
        _write_aligned(alignment, text_source, writer, bad)
        timings["write_s"] = time.perf_counter() - clock - timings["fit_s"]
        summary = {"method": method, "text_rows_dropped": bad.counts()["text"],
                   "image_rows_dropped": alignment.info.get("dropped_rows", {}).get("image", 0)}
        summary["rows_written"] = writer.close(**summary)["count"]
        if gap_report is not None:
            gap_summary, timings["report_s"] = gap_report.result()
            summary["gap"] = {k: gap_summary[k] for k in ("before", "after")}
    finally:
        writer.shutdown()
        if gap_report is not None:
            report_thread.shutdown(wait=True)  # a failed write pass still waits for the report thread
        shutil.rmtree(cache_dir, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - clock
    return {**summary, "timings": timings, "out": str(out)}


def _timed_gap_report(out: Path, before: tuple, after: tuple, method: str, seed: int) -> tuple[dict, float]:
    from revision import gap  # matplotlib is imported only when a report is drawn

    clock = time.perf_counter()
    return gap.write_report(out, before, after, method=method, seed=seed), time.perf_counter() - clock


def _return_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc only; elsewhere a no-op). Unpickling the record layout
    leaves ~0.6 GB of freed small blocks there that would otherwise count towards peak RSS until the end."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_aligned(alignment: Alignment, texts: PassCache, writer: StoreWriter, bad: BadRows, block: int = 16_384) -> None:
    """The last pass: text_map every row (block by block: memory stays one shard) into the writer."""
    done = set(writer.done_ids)  # written by an earlier, interrupted run
    out, scratch = np.empty((block, texts.dim), np.float32), np.empty((CHUNK_ROWS, texts.dim))  # reused: no fresh pages
    for shard in texts.iter_shards():
        for lo in range(0, len(shard), block):
            hi = min(lo + block, len(shard))
            ids = shard.ids[lo:hi]
            if done and all(i in done for i in ids):
                continue
            rows, keep = alignment.map_text_rows(shard, bad, lo, hi, out[: hi - lo], scratch)
            if done:
                keep &= np.array([i not in done for i in ids])
            sources = shard.sources[lo:hi] if shard.sources else [""] * (hi - lo)
            if not keep.all():
                rows = rows[keep]
                ids = [i for i, k in zip(ids, keep) if k]
                sources = [x for x, k in zip(sources, keep) if k]
            if len(ids):
                writer.add(ids, rows, sources, unit_rows=True)
        del shard
