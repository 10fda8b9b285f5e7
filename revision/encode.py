"""The encode loops of image_embed.py: this rank's inputs, from the writer's resume point on, through the encoder
into the store writer (images decoded in worker processes meanwhile: revision/decode.py). Unreadable items are
skipped and listed by the writer; the summary goes into the manifest."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

from tqdm import tqdm

from revision.decode import DEFAULT_MAX_PIXELS, chunks, image_batches
from revision.encoders import Encoder
from revision.inputs import Inputs, Sample
from revision.store_writer import StoreWriter

# Sleep after every batch: a throttle for slow shared disks, and how the tests get a run to kill mid-way.
BATCH_DELAY_ENV = "REVISION_EMBED_BATCH_DELAY"


def embed_images(inputs: Inputs, encoder: Encoder, writer: StoreWriter, batch_size: int = 256, num_workers: int = 4,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """Encode this rank's inputs from the writer's resume point on; returns the summary (also in the manifest)."""
    delay = float(os.environ.get(BATCH_DELAY_ENV, 0))
    start, seen, encoded = time.perf_counter(), 0, 0
    if not writer.was_complete:
        with tqdm(desc="images", unit="img", total=_known_total(inputs, writer)) as bar:
            batches = image_batches(_todo(inputs, writer), encoder.preprocess, batch_size, num_workers,
                                    encoder.device.type == "cuda", max_pixels)
            for kept, pixels, failed in batches:
                for sample, reason in failed:
                    writer.skip({"id": sample.id, "path": sample.source, "reason": reason}, sample.position)
                if kept:
                    writer.add([s.id for s in kept], encoder.encode_pixels(pixels), [s.source for s in kept],
                               positions=[s.position for s in kept])
                seen, encoded = seen + len(kept) + len(failed), encoded + len(kept)
                bar.update(len(kept) + len(failed))
                if delay:
                    time.sleep(delay)
    return _close(writer, seen, encoded, time.perf_counter() - start)


def embed_texts(inputs: Inputs, encoder: Encoder, writer: StoreWriter, batch_size: int = 256) -> dict:
    """As embed_images, for texts: an empty or whitespace-only text is skipped and listed."""
    delay = float(os.environ.get(BATCH_DELAY_ENV, 0))
    start, seen, encoded = time.perf_counter(), 0, 0
    if not writer.was_complete:
        with tqdm(desc="texts", unit="text", total=_known_total(inputs, writer)) as bar:
            for chunk in chunks(_todo(inputs, writer), batch_size):
                kept = []
                for sample in chunk:
                    reason = sample.error or ("" if sample.payload.strip() else "empty or whitespace-only text")
                    if reason:
                        writer.skip({"id": sample.id, "reason": reason}, sample.position)
                    else:
                        kept.append(sample)
                if kept:
                    captions = [s.payload.strip() for s in kept]
                    writer.add([s.id for s in kept], encoder.encode_texts(captions, batch_size), captions,
                               positions=[s.position for s in kept])
                seen, encoded = seen + len(chunk), encoded + len(kept)
                bar.update(len(chunk))
                if delay:
                    time.sleep(delay)
    return _close(writer, seen, encoded, time.perf_counter() - start)


def _todo(inputs: Inputs, writer: StoreWriter) -> Iterator[Sample]:
    limit = None if inputs.limit is None else max(0, inputs.limit - writer.resume.consumed)
    return inputs.stream(writer.resume.end, limit)


def _known_total(inputs: Inputs, writer: StoreWriter) -> int | None:
    if any(u.items is None for u in inputs.units):
        return None  # streamed: never counted up front
    return sum(len(u.items) for u in inputs.units) - writer.resume.consumed


def _close(writer: StoreWriter, seen: int, encoded: int, seconds: float) -> dict:
    before = writer.manifest.get("summary", {}) if writer.was_complete else {}
    inputs = before.get("inputs", 0) if writer.was_complete else writer.resume.consumed + seen
    summary = {
        "inputs": inputs, "resumed": inputs - seen, "encoded": encoded, "skipped": writer.skipped,
        "seconds": round(seconds, 3), "items_per_s": round(encoded / seconds, 1) if seconds > 0 and encoded else None,
    }
    summary["stored"] = writer.close(summary=summary)["count"]
    return summary
