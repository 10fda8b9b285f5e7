"""The embed_mean.py run: fit a method on a text and an image store (or load its statistics), write the aligned
text store with its statistics file, and draw the gap report on the side.

Passes over the text store: one per pass the method's fit makes over the whole set (`text_passes`; one, for
the sample, with --stats_sample), then the write pass. Read more than once, the text store goes through a
`PassCache` (decoded once; kept in RAM up to a budget, the rest in a temp cache in the output folder).

Applying statistics scales out (docs/distributed.md "Applying an alignment over parts"): part i of n maps the
i-th contiguous range of the text store's shards into its own part of the output store, and the last part to
finish merges; fitting stays in one process.
"""
from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from revision.align.base import REGISTRY, STATS_FILE, Alignment, load_alignment, make_alignment, method_names
from revision.align.streams import DEFAULT_MEMORY_BUDGET, BadRows, PassCache
from revision.distributed import merge_if_last, merge_parts
from revision.errors import StoreError
from revision.locks import StoreLock
from revision.manifest import PART_GLOB, read_manifest, write_manifest
from revision.nofollow import refuse_links
from revision.store import EmbeddingStore
from revision.store_writer import StoreWriter


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


def _check_out(out: Path, method: str) -> None:
    """Before any file in --out is touched: refuse a folder holding another store than an aligned one of this method
    (the writer would mark it incomplete and restamp it), or a partial one that lost its statistics."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("parts"):
        return
    if manifest.get("method") != method:
        what = f"a store aligned with {manifest['method']!r}" if manifest.get("method") else "a store not written by embed_mean.py"
        raise StoreError(f"--out {out} holds {what} ({manifest.get('count')} rows); nothing was changed. Write the "
                         f"{method} alignment to a new folder, or pass --overwrite to replace that store")
    if manifest.get("shards") and not manifest.get("complete") and not (out / STATS_FILE).exists():
        raise StoreError(f"{out}: a partial aligned store without {STATS_FILE}; pass --overwrite to start again")


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
    part: tuple[int, int] | None = None,
) -> dict:
    """Fit `method` on the text and image stores (or load `apply_stats`), write the aligned text store to
    `out_dir` (same ids and captions) with its statistics file, and the gap report. Text shards read more than
    once stay in RAM up to `memory_budget` bytes of embeddings; beyond that they go to a temp cache in `out_dir`.
    `part=(index, count)` (with `apply_stats` only): map this part's range of text shards into its own part of
    `out_dir`; the last part to finish merges (no gap report for parts). Returns a summary."""
    clock = time.perf_counter()
    out = Path(out_dir)
    for source in (text_dir, image_dir):
        if source is not None and out.resolve() == Path(source).resolve():
            raise StoreError(f"--out {out} is the input folder {source}; write the aligned store to a new folder")
    if method not in REGISTRY:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {method_names()}")
    if image_dir is None and apply_stats is None:
        raise ValueError("an image store is needed to fit statistics (or pass --apply_stats FILE)")
    if part is not None and apply_stats is None:
        raise ValueError(f"fitting runs in one process, not over {part[1]} parts: fit once (on a sample: --stats_sample "
                         "N), then map the texts over the parts with --apply_stats OUT/align_stats.json")
    loaded = load_alignment(apply_stats) if apply_stats is not None else None
    if loaded is not None and loaded.method != method:
        raise StoreError(f"{apply_stats}: statistics are for {loaded.method!r}, not {method!r}")
    texts = EmbeddingStore(text_dir, "text", verify).require_complete()  # verify: each shard's sha256, as it is read
    images = EmbeddingStore(image_dir, "image", verify).require_complete() if image_dir is not None else None
    _check_inputs(texts, images, loaded, force)
    if part is not None:
        texts, report = _shard_range(texts, *part), False  # the report belongs to the fit, drawn once
    stats_path = out / STATS_FILE
    if loaded is not None and not overwrite:
        _check_same_stats(loaded, stats_path, apply_stats)

    if part is None and not overwrite:
        _check_out(out, method)
    refuse_links(out / "gap_report.json", out / "gap_report.png")  # written late, on a thread: checked now
    encoder = texts.encoder or (images.encoder if images is not None else None) or "unknown"
    writer = StoreWriter(out, "text", encoder, texts.dim, dtype, shard_size, overwrite,
                         extra={"method": method, "aligned_from": str(text_dir), "alignment": STATS_FILE},
                         drop_page_cache=True, part=part, inputs=_part_inputs(texts, loaded) if part else None)
    if overwrite and part is None:  # a part leaves what the other parts share
        for old in (stats_path, out / "gap_report.json", out / "gap_report.png"):
            old.unlink(missing_ok=True)
    if part is not None and writer.was_complete:  # a finished part run again: nothing to read or write
        summary = {k: writer.manifest.get(k) for k in ("method", "text_rows_dropped", "image_rows_dropped")}
        summary["rows_written"] = writer.close()["count"]
        return _part_summary(out, part, summary, {"total_s": time.perf_counter() - clock})
    if loaded is not None and (overwrite or not stats_path.exists()):  # the folder carries the statistics it maps with
        os.replace(loaded.save(stats_path.with_name(f"{STATS_FILE}.{os.getpid()}")), stats_path)  # own temp: parts start at once
    if writer.done_ids:  # a rerun after a crash: finish with the statistics the first run wrote
        if not stats_path.exists():
            raise StoreError(f"{out}: a partial aligned store without {STATS_FILE}; pass --overwrite to start again")
        loaded = load_alignment(stats_path)
        if loaded.method != method:
            raise StoreError(f"{out}: a partial store aligned with {loaded.method!r}; pass --overwrite to replace it")

    cache_dir = out / ".align_cache"
    if cache_dir.is_symlink():  # our temp name: a link there would send the spill files elsewhere
        cache_dir.unlink()
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
    if part is not None:
        return _part_summary(out, part, summary, timings)
    return {**summary, "timings": timings, "out": str(out)}


def _shard_range(store: EmbeddingStore, index: int, count: int) -> EmbeddingStore:
    """Part `index` of `count`: a contiguous range of the store's shards (parts in order hold the rows in store
    order; with fewer shards than parts, some parts get none and write an empty part)."""
    lo, hi = index * len(store.shard_paths) // count, (index + 1) * len(store.shard_paths) // count
    view = copy.copy(store)
    view.shard_paths = store.shard_paths[lo:hi]
    view._first = None  # the reference layout's first shard, decoded when the store was opened: not this range's
    rows = {e["name"]: e["rows"] for e in store.manifest["shards"]} if store.manifest else None
    view.count = sum(rows[p.name] for p in view.shard_paths) if rows is not None else None
    return view


def _part_inputs(texts: EmbeddingStore, alignment: Alignment) -> str:
    """What a part maps (its shards, by sha256 or size, and the statistics): a rerun on anything else is refused."""
    digests = {e["name"]: e.get("sha256") for e in texts.manifest["shards"]} if texts.manifest else {}
    shards = [(p.name, digests.get(p.name) or p.stat().st_size) for p in texts.shard_paths]
    return hashlib.sha256(json.dumps([shards, alignment.to_dict()]).encode()).hexdigest()


def _check_same_stats(alignment: Alignment, path: Path, source: str | os.PathLike) -> None:
    """The statistics already in the output folder (an earlier run's, another part's) must be the ones applied."""
    if path.exists() and load_alignment(path).to_dict() != alignment.to_dict():
        raise StoreError(f"{path}: holds other statistics than --apply_stats {source} (every part of a store, and "
                         "every rerun, maps with the same ones); write to another --out, or pass --overwrite")


def _part_summary(out: Path, part: tuple[int, int], summary: dict, timings: dict) -> dict:
    merged = merge_aligned(out, when_last=True)
    return {**summary, "part": list(part), "merged_rows": merged["count"] if merged else None, "timings": timings,
            "out": str(out)}


def merge_aligned(out_dir: str | os.PathLike, when_last: bool = False) -> dict | None:
    """Merge an aligned store written by parts (revision.distributed) and keep in its manifest what
    embed_mean.py records (method, statistics file, rows dropped). `when_last`: only if every part is complete and
    none still writes (else None)."""
    out = Path(out_dir)
    merged = merge_if_last(out) if when_last else merge_parts(out)
    if merged is None:
        return None
    books = [read_manifest(out, p.name) for p in sorted(out.glob(PART_GLOB))]
    merged.update({k: books[0][k] for k in ("method", "aligned_from", "alignment", "image_rows_dropped") if k in books[0]})
    merged.update(text_rows_dropped=sum(b.get("text_rows_dropped", 0) for b in books), rows_written=merged["count"])
    lock = StoreLock(out)  # as the merge: no part writes meanwhile
    try:
        write_manifest(out, merged)
    finally:
        lock.release()
    return merged


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


# Threads mapping rows in the write pass: one, since the shard writer's thread (hashing, writing) needs the other
# core; measured on 2 cores, 200k rows: 2.6 s for the pass with one, 3.2 s with two.
WRITE_WORKERS = 1


def _write_aligned(alignment: Alignment, texts: PassCache, writer: StoreWriter, bad: BadRows, block: int = 16_384) -> None:
    """The last pass: text_map every row (block by block: memory stays one shard) into the writer; float32 rows are
    mapped straight into the writer's shard buffer (no copy)."""
    done = set(writer.done_ids)  # written by an earlier, interrupted run
    out = np.empty((block, texts.dim), np.float32)  # reused: no fresh pages
    for shard in texts.iter_shards():
        lo = 0
        while lo < len(shard):
            target = writer.free_rows(min(block, len(shard) - lo)) if writer.dtype == "float32" else None
            hi = lo + len(target) if target is not None else min(lo + block, len(shard))
            ids = shard.ids[lo:hi]
            if not (done and all(i in done for i in ids)):
                target = out[: hi - lo] if target is None else target
                rows, keep = alignment.map_text_rows(shard, bad, lo, hi, target, check_unit=True, workers=WRITE_WORKERS)
                if done:
                    keep &= np.array([i not in done for i in ids])
                sources = shard.sources[lo:hi] if shard.sources else [""] * (hi - lo)
                if not keep.all():
                    rows = rows[keep]
                    ids = [i for i, k in zip(ids, keep) if k]
                    sources = [x for x, k in zip(sources, keep) if k]
                if len(ids):
                    writer.add(ids, rows, sources, unit_rows=True)
            lo = hi
        del shard
