"""Decoding images for image_embed.py: a pixel cap read from the header, and a pool of worker processes decoding
chunks of a stream of samples (file paths, or tar/parquet bytes) in input order."""
from __future__ import annotations

import io
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from revision.encoders import to_rgb
from revision.inputs import Sample

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: ~300 MB as RGB, ~1 GB with a decoder's copies; x16 workers fits a node
# The short side an encoder resizes to when the caller does not know its encoder's (CLIP ViT-L/14-336: 336): the
# resized size, not only the decoded one, must stay under the cap (a 100000x1 PNG of 377 bytes resizes to GBs).
DEFAULT_INPUT_SIDE = 448
ORIENTATION = 0x0112  # the EXIF tag that says how the stored pixels are turned


def check_size(width: int, height: int, max_pixels: int | None, side: int = DEFAULT_INPUT_SIDE) -> None:
    """Refuse an image whose decoded size, or its size once resized to `side` pixels on its short side (what CLIP
    preprocessing does before cropping), is over `max_pixels`: memory is bounded for any aspect ratio."""
    if not width or not height:
        raise ValueError(f"{width}x{height}: an image with no pixels")
    if not max_pixels:
        return
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} = {width * height / 1e6:.0f} MP is over the {max_pixels / 1e6:g} MP "
                         "pixel cap (--max_pixels)")
    aspect = max(width, height) / min(width, height)
    if side * side * aspect > max_pixels:
        raise ValueError(f"{width}x{height}: resized to {side} px on its short side it would be {side * side * aspect / 1e6:.0f} "
                         f"MP (aspect ratio {aspect:.0f}:1), over the {max_pixels / 1e6:g} MP pixel cap (--max_pixels)")


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: turned by its EXIF orientation (phone photos store pixels sideways)."""
    if image.getexif().get(ORIENTATION, 1) in (1, None):
        return image  # nothing to turn: no copy
    return ImageOps.exif_transpose(image)


def load_image(source: Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, side: int = DEFAULT_INPUT_SIDE
               ) -> Image.Image:
    """Open and fully decode an image (a file or its bytes) as upright RGB: the one loader of image_embed.py, predict
    and the lmms-eval adapter. PIL opens lazily: the size comes from the header, so an image over `max_pixels`
    (decoded, or resized to `side` on its short side: check_size) is refused before a pixel is decoded (a 20 KB PNG
    can declare 13000x13000), and truncation shows only when the pixels are read."""
    with warnings.catch_warnings():  # PIL warns from 89 MP on: our cap decides (and says so in the skip list)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if isinstance(source, (bytes, bytearray)):
            opened = Image.open(io.BytesIO(source)) if source else None
        else:
            opened = Image.open(source) if Path(source).stat().st_size else None
    if opened is None:
        raise ValueError("empty file (0 bytes)")
    with opened as image:
        check_size(*image.size, max_pixels, side)
        image.load()
        return to_rgb(upright(image))


def input_side(preprocess: Any) -> int:
    """The short side `preprocess` resizes to, from the pixels it makes of a small square image."""
    return int(min(preprocess(Image.new("RGB", (64, 64))).shape[-2:]))


class DecodeError(RuntimeError):
    """The decoding workers failed as a whole (one died); single bad images are skipped, never raised."""


_WORKER: dict[str, Any] = {}  # a decoding worker's preprocess and pixel cap (set once, before any task)


def _init_worker(preprocess: Any, max_pixels: int | None, side: int = DEFAULT_INPUT_SIDE) -> None:
    torch.set_num_threads(1)  # workers decode; several torch thread pools per worker only oversubscribe the CPU
    _WORKER.update(preprocess=preprocess, max_pixels=max_pixels, side=side)


def _decode_chunk(payloads: list[tuple[Any, str]], preprocess: Any = None, max_pixels: int | None = None,
                  side: int = DEFAULT_INPUT_SIDE) -> tuple[torch.Tensor | None, list[str]]:
    """Pixels [k, C, H, W] of the decodable payloads, and each payload's failure reason ("" when decoded)."""
    if preprocess is None:
        preprocess, max_pixels, side = _WORKER["preprocess"], _WORKER["max_pixels"], _WORKER["side"]
    pixels, reasons = [], []
    for payload, error in payloads:
        if error:
            reasons.append(error)
            continue
        try:
            pixels.append(preprocess(load_image(payload, max_pixels, side)))
            reasons.append("")
        except Exception as e:  # any decoder error on any file format means "skip this item", never "stop the run"
            reasons.append(f"{type(e).__name__}: {e}")
    return (torch.stack(pixels) if pixels else None), reasons


def worker_chunk(batch_size: int, num_workers: int) -> int:
    """Images per worker task: batch_size split over at least num_workers tasks (a divisor, so that whole
    chunks make whole batches)."""
    if num_workers <= 1:
        return batch_size
    if num_workers >= batch_size:
        return 1
    parts = next(d for d in range(num_workers, batch_size + 1) if batch_size % d == 0)
    return batch_size // parts


def chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decoded(chunks: Iterator[list[Sample]], preprocess: Any, max_pixels: int | None, num_workers: int
             ) -> Iterator[tuple[list[Sample], tuple[torch.Tensor | None, list[str]]]]:
    """Each chunk with its decoded pixels, in order. Workers: a process pool fed by this process, which reads the
    inputs (files are opened by the workers, tar and parquet bytes are sent to them) with `4 * num_workers` chunks
    in flight; pixels come back through shared memory (torch's reductions). A worker that dies (killed for memory,
    a crashing decoder) stops the run with an error naming the chunk, never a hang."""
    side = input_side(preprocess)  # the cap bounds the resized size too (check_size)
    if num_workers == 0:
        for chunk in chunks:
            yield chunk, _decode_chunk([(s.payload, s.error) for s in chunk], preprocess, max_pixels, side)
        return
    pool = ProcessPoolExecutor(num_workers, torch.multiprocessing.get_context("fork"), _init_worker,
                               (preprocess, max_pixels, side))
    in_flight: deque[tuple[list[Sample], Future]] = deque()

    def first_done() -> tuple[list[Sample], tuple[torch.Tensor | None, list[str]]]:
        chunk, result = in_flight.popleft()
        try:
            return chunk, result.result()
        except BrokenProcessPool as e:
            raise DecodeError(f"a decoding worker died (out of memory? lower --num_workers or --max_pixels); the "
                               f"images being decoded start at id {chunk[0].id!r} ({chunk[0].source})") from e

    try:
        for chunk in chunks:
            in_flight.append((chunk, pool.submit(_decode_chunk, [(s.payload, s.error) for s in chunk])))
            if len(in_flight) >= 4 * num_workers:
                yield first_done()
        while in_flight:
            yield first_done()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _pinned(decoded: Iterator[tuple[list[Sample], tuple[torch.Tensor | None, list[str]]]], depth: int = 8
            ) -> Iterator[tuple[list[Sample], tuple[torch.Tensor | None, list[str]]]]:
    """Chunks with their pixels copied to pinned memory by a thread, ahead of the encoder (fast, async H2D copies)."""
    def pin(item: tuple) -> tuple:
        chunk, (pixels, reasons) = item
        return chunk, (pixels.pin_memory() if pixels is not None else None, reasons)

    with ThreadPoolExecutor(1, thread_name_prefix="pin-memory") as pinner:
        ahead: deque[Future] = deque()
        for item in decoded:
            ahead.append(pinner.submit(pin, item))
            if len(ahead) > depth:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def image_batches(
    samples: Iterable[Sample], preprocess: Any, batch_size: int, num_workers: int, pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[list[Sample], list[torch.Tensor], list[tuple[Sample, str]]]]:
    """Batches (decoded samples, pixel chunks [b, C, H, W] making up [B, C, H, W], [(sample, reason)] skipped), in
    input order. Each worker decodes a chunk of the batch, not a whole batch: the first batch (and the last) then
    takes one chunk's time, not batch_size images decoded by a single worker while the rest wait."""
    kept: list[Sample] = []
    pixels: list[torch.Tensor] = []
    failed: list[tuple[Sample, str]] = []
    seen = 0
    decoded = _decoded(chunks(samples, worker_chunk(batch_size, num_workers)), preprocess, max_pixels, num_workers)
    for chunk, (chunk_pixels, reasons) in (_pinned(decoded) if pin_memory else decoded):
        for sample, reason in zip(chunk, reasons):
            (failed.append((sample, reason)) if reason else kept.append(sample))
        if chunk_pixels is not None:
            pixels.append(chunk_pixels)
        seen += len(chunk)
        if seen >= batch_size:
            yield kept, pixels, failed
            kept, pixels, failed, seen = [], [], [], 0
    if seen:
        yield kept, pixels, failed
