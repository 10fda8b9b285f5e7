"""What every alignment method is: fitted statistics, two maps, one registry, one small JSON file.

A method is one class registered with `@register`. It declares
- `stats`: its fitted statistics, name -> check (`vector`, `positive`, `non_negative`); they are what the
  statistics file holds, what loading validates, and all the method needs at training and inference;
- `text_passes`: how many passes over the whole text set its `_fit` makes (the embed_mean run caches the
  text store when it is read more than once);
- `_fit(texts, images, bad)`: sets the statistics (streaming, float64; see `revision.align.streams`);
- `text_unit(x)` / `image_unit(u)`: unit float64 rows -> the direction of the mapped rows (renormalised
  here); a method may override `_text_rows` instead for a faster fused form (ReAlign does).
Its math, as implemented, is written down in docs/design.md "Alignment".
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from revision import nofollow
from revision.align.streams import BadRows, Stream, map_chunks, row_dtype, sample_rows
from revision.errors import AlignmentError, StoreError
from revision.registry import Registry
from revision.shards import Shard

STATS_FILE = "align_stats.json"
STATS_FORMAT = "revision.align/1"

Check = Callable[[Any, int, str], Any]  # (value, dim, name) -> the validated value; raises AlignmentError


def vector(value: Any, dim: int, name: str) -> np.ndarray:
    """A finite float64 vector of the embedding dim."""
    try:
        v = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise AlignmentError(f"alignment statistic {name!r} is not a vector of numbers") from None
    if v.shape != (dim,):
        raise AlignmentError(f"alignment statistic {name!r} has shape {v.shape}, expected ({dim},)")
    if not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise AlignmentError(f"alignment statistic {name!r} holds {v[bad]} at index {bad} "
                         f"({int((~np.isfinite(v)).sum())} non-finite values of {dim})")
    return v


def _number(value: Any, name: str, ok: Callable[[float], bool], rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise AlignmentError(f"alignment statistic {name!r} is {value!r}; it must be a finite number {rule}")
    return float(value)


def positive(value: Any, dim: int, name: str) -> float:
    """A finite number > 0 (a scale: 0 would send every row to one point)."""
    return _number(value, name, lambda x: x > 0, "> 0")


def non_negative(value: Any, dim: int, name: str) -> float:
    """A finite number >= 0 (a noise std)."""
    return _number(value, name, lambda x: x >= 0, ">= 0")


REGISTRY: Registry[type[Alignment]] = Registry("alignment method")


def register(cls: type[Alignment]) -> type[Alignment]:
    """Class decorator: make a method available by its `method` name (embed_mean.py --method, stats files)."""
    return REGISTRY.add(cls.method, cls)


def method_names() -> tuple[str, ...]:
    return REGISTRY.names()


class _RowNames:
    """Stands in for ids of an in-memory array in error messages: row i is called 'row i'."""

    def __getitem__(self, i: int) -> str:
        return f"row {i}"


def _as_input(x: np.ndarray, kind: str) -> Shard:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a [rows, dim] array, got shape {x.shape}")
    return Shard(kind, _RowNames(), x, path="input")


def _normalise_into(y: np.ndarray, out: np.ndarray) -> None:
    norm = np.sqrt(np.einsum("ij,ij->i", y, y))
    np.divide(y, np.where(norm > 0, norm, 1.0)[:, None], out=out)


@register
class Alignment:
    """`none`: text_map = image_map = n. Every method subclasses this."""

    method = "none"
    stats: dict[str, Check] = {}
    text_passes = 0
    noise_std = 0.0  # Gaussian noise stage 1 adds to the (aligned) text embeddings; a statistic of C3

    def __init__(self, dim: int | None = None, info: dict | None = None, **stats: Any):
        unknown = sorted(set(stats) - set(self.stats))
        if unknown:
            raise TypeError(f"{self.method} has no statistics {unknown}")
        self.dim = dim
        self.info: dict[str, Any] = dict(info or {})  # counts, encoder, sample size, ... (for people)
        for name, check in self.stats.items():
            setattr(self, name, check(stats[name], dim, name) if name in stats else None)

    # ---- fitting -------------------------------------------------------------------------------
    def fit(
        self, text_store: Any, image_store: Any, sample: int | None = None, seed: int = 0, drop_bad: bool = False
    ) -> Alignment:
        """Fit on two stores (anything with `iter_shards()` and `dim`), optionally on a uniform sample per side."""
        if text_store.dim != image_store.dim:
            raise StoreError(f"text store has dim {text_store.dim}, image store dim {image_store.dim}")
        bad = BadRows(drop_bad)
        self._names = (str(getattr(text_store, "root", "text store")), str(getattr(image_store, "root", "image store")))
        texts, images = text_store.iter_shards, image_store.iter_shards
        if sample and self.stats:
            text_sample = sample_rows(text_store.iter_shards(), sample, seed, bad)
            image_sample = sample_rows(image_store.iter_shards(), sample, seed + 1, bad)
            texts, images = (lambda: [text_sample]), (lambda: [image_sample])
        self.dim = int(text_store.dim)
        self.info = {"fit_sample": sample or None, "seed": seed, "encoder": getattr(text_store, "encoder", None)}
        self._fit(texts, images, bad)
        for name, check in self.stats.items():  # a degenerate input (e.g. identical images: scale 0) stops here
            try:
                setattr(self, name, check(getattr(self, name), self.dim, name))
            except StoreError as e:
                raise StoreError(f"fitting {self.method} on {self._names[0]} and {self._names[1]}: {e}") from None
        self.info["dropped_rows"] = bad.counts()
        return self

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        pass

    # ---- mapping -------------------------------------------------------------------------------
    def text_unit(self, x: np.ndarray) -> np.ndarray:
        """Unit text rows [n, D] float32 or float64 (may be changed in place) -> directions of the synthetic image
        embeddings (renormalised after). This base keeps n(x) as it is."""
        return x

    def image_unit(self, u: np.ndarray) -> np.ndarray:
        """Unit real image rows [n, D] float64 -> the directions the projector sees. This base keeps n(u)."""
        return u

    def text_map(self, x: np.ndarray) -> np.ndarray:
        """Text embeddings [N, D] (any float dtype, any norm) -> float32 unit rows; bad rows raise."""
        return self._map(_as_input(x, "text"), self._text_rows, BadRows())[0]

    def image_map(self, x: np.ndarray) -> np.ndarray:
        """Real image embeddings [N, D] -> float32 unit rows, as the projector sees them."""
        return self._map(_as_input(x, "image"), self._image_rows, BadRows())[0]

    def map_text_rows(
        self, shard: Shard, bad: BadRows, lo: int = 0, hi: int | None = None, out: np.ndarray | None = None,
        check_unit: bool = False, workers: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """text_map of rows lo:hi of a shard under a bad-row policy: (float32 rows, mask of usable rows).
        `out` ([hi - lo, dim] float32) is a reused buffer, if given. `check_unit`: a mapped row that is not a finite
        unit vector raises StoreError (checked chunk by chunk, while the chunk is in the cache). `workers`: threads
        sharing the rows (default: streams.WORKERS)."""
        return self._map(shard, self._text_rows, bad, lo, hi, out, check_unit, workers)

    def _map(self, shard: Shard, rows_fn: Callable, bad: BadRows, lo: int = 0, hi: int | None = None,
             out: np.ndarray | None = None, check_unit: bool = False, workers: int | None = None):
        if self.dim is not None and shard.embeds.shape[1] != self.dim:
            raise StoreError(f"{shard.path}: embeddings of dim {shard.embeds.shape[1]}, alignment was fitted on {self.dim}")
        hi = len(shard.embeds) if hi is None else hi
        out = np.empty((hi - lo, shard.embeds.shape[1]), np.float32) if out is None else out
        keep = np.ones(hi - lo, bool)

        def one_chunk(start: int, rows: np.ndarray, inv_norm: np.ndarray) -> None:  # writes only its own rows
            rows_fn(rows, inv_norm, out[start - lo : start - lo + len(rows)])
            keep[start - lo : start - lo + len(rows)] = inv_norm > 0
            if check_unit:
                _check_unit(out[start - lo : start - lo + len(rows)], inv_norm > 0, shard, start, self)

        map_chunks(shard, bad, one_chunk, lo, hi, row_dtype(shard), workers)  # float32 out: float32 maths for float16 rows
        return out, keep

    def _text_rows(self, rows: np.ndarray, inv_norm: np.ndarray, out: np.ndarray) -> None:
        """One chunk: raw rows (float32 or float64) and their 1/‖row‖ -> mapped float32 unit rows in `out`."""
        self._unit_rows(self.text_unit, rows, inv_norm, out)

    def _image_rows(self, rows: np.ndarray, inv_norm: np.ndarray, out: np.ndarray) -> None:
        self._unit_rows(self.image_unit, rows, inv_norm, out)

    @staticmethod
    def _unit_rows(unit_fn: Callable, rows: np.ndarray, inv_norm: np.ndarray, out: np.ndarray) -> None:
        inv_norm = inv_norm.astype(rows.dtype, copy=False)[:, None]
        if unit_fn.__func__ in _KEEPS_UNIT:  # n(x) as it is: one rounding to float32, no renormalisation
            np.multiply(rows, inv_norm, out=out)
            return
        rows *= inv_norm
        _normalise_into(unit_fn(rows), out)

    # ---- statistics file -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The fitted statistics (float64 vectors as lists: JSON keeps them exactly)."""
        return {name: getattr(self, name).tolist() if isinstance(getattr(self, name), np.ndarray) else getattr(self, name)
                for name in self.stats}

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATS_FORMAT, "method": self.method, "dim": self.dim, "info": self.info, **self.state()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics as JSON (atomically); a folder gets `align_stats.json` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        tmp = path.with_name(path.name + ".tmp")
        nofollow.write_bytes(tmp, (json.dumps(self.to_dict()) + "\n").encode())
        os.replace(tmp, path)
        return path


_KEEPS_UNIT = (Alignment.text_unit, Alignment.image_unit)


def make_alignment(method: str) -> Alignment:
    """A fresh (unfitted) alignment of the registered method; an unknown name raises ValueError naming the choices."""
    return REGISTRY.lookup(method)()


def alignment_from_dict(d: Any) -> Alignment:
    """Rebuild an alignment from `Alignment.to_dict()` (e.g. the copy a checkpoint's config carries)."""
    if not isinstance(d, dict):
        raise AlignmentError(f"not alignment statistics: a JSON {type(d).__name__}, expected an object with 'format' and 'method'")
    if d.get("format") != STATS_FORMAT or d.get("method") not in REGISTRY:
        raise AlignmentError(f"not alignment statistics (format {d.get('format')!r}, method {d.get('method')!r})")
    cls, dim, info = REGISTRY[d["method"]], d.get("dim"), d.get("info", {})
    missing = [k for k in cls.stats if k not in d]
    if missing or (cls.stats and not (isinstance(dim, int) and dim > 0)):
        raise AlignmentError(f"{cls.method} statistics lack {missing or ['dim']}")
    return cls(dim, info, **{k: d[k] for k in cls.stats})


def load_alignment(path: str | os.PathLike) -> Alignment:
    """Load statistics saved by `Alignment.save` (the JSON file, or the folder holding align_stats.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    if not path.is_file():
        raise AlignmentError(f"{path}: no alignment statistics here")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignmentError(f"{path}: not valid JSON ({e})") from e
    try:
        return alignment_from_dict(d)
    except AlignmentError as e:
        raise AlignmentError(f"{path}: {e}") from e


def _check_unit(rows: np.ndarray, keep: np.ndarray, shard, lo: int, alignment: Alignment) -> None:
    """The writer copies mapped rows unchecked (`unit_rows=True`): a row that is not a finite unit vector stops
    the run here, before it reaches a shard."""
    sq = np.einsum("ij,ij->i", rows, rows)
    wrong = keep & ~(np.abs(sq - 1.0) < 1e-3)  # NaN fails the comparison too
    if wrong.any():
        row = lo + int(np.flatnonzero(wrong)[0])
        what = "non-finite" if not np.isfinite(rows[row - lo]).all() else f"norm {np.sqrt(sq[row - lo]):.3g}"
        raise AlignmentError(f"{shard.path}: row {row} (id {shard.ids[row]!r}) maps to a {what} embedding under the "
                         f"{alignment.method} statistics; check them (align_stats.json)")
