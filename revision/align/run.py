"""The embed_mean.py run: fit a method on a text and an image store (or load its statistics), write the aligned
text store with its statistics file, and draw the gap report on the side.

Passes over the text store: one per pass the method's fit makes over the whole set (`text_passes`; one, for
the sample, with --stats_sample), then the write pass. Read more than once, the text store goes through a
`PassCache` (decoded once; kept in RAM up to a budget, the rest in a temp cache in the output folder).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from revision.align.base import REGISTRY, STATS_FILE, Alignment, load_alignment, make_alignment, method_names
from revision.align.streams import DEFAULT_MEMORY_BUDGET, BadRows, PassCache
from revision.store import EmbeddingStore, StoreError, StoreWriter


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
    if method not in REGISTRY:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {method_names()}")
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
    fit_passes = REGISTRY[method].text_passes if loaded is None else 0  # passes the fit makes over the texts
    if stats_sample:
        fit_passes = min(fit_passes, 1)  # the sample is drawn in one pass, the fit reads only the sample
    sample = report_sample if report else 0
    # read again by the write pass: keep what the fit decoded
    text_source = PassCache(texts, cache_dir if fit_passes else None, sample, seed, progress, memory_budget)
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
    out = np.empty((block, texts.dim), np.float32)  # reused: no fresh pages
    for shard in texts.iter_shards():
        for lo in range(0, len(shard), block):
            hi = min(lo + block, len(shard))
            ids = shard.ids[lo:hi]
            if done and all(i in done for i in ids):
                continue
            rows, keep = alignment.map_text_rows(shard, bad, lo, hi, out[: hi - lo])
            _check_unit(rows, keep, shard, lo, alignment)
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


def _check_unit(rows: np.ndarray, keep: np.ndarray, shard, lo: int, alignment: Alignment) -> None:
    """The writer copies mapped rows unchecked (`unit_rows=True`): a row that is not a finite unit vector stops
    the run here, before it reaches a shard."""
    sq = np.einsum("ij,ij->i", rows, rows)
    wrong = keep & ~(np.abs(sq - 1.0) < 1e-3)  # NaN fails the comparison too
    if wrong.any():
        row = lo + int(np.flatnonzero(wrong)[0])
        what = "non-finite" if not np.isfinite(rows[row - lo]).all() else f"norm {np.sqrt(sq[row - lo]):.3g}"
        raise StoreError(f"{shard.path}: row {row} (id {shard.ids[row]!r}) maps to a {what} embedding under the "
                         f"{alignment.method} statistics; check them (align_stats.json)")
