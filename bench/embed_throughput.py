"""Throughput of image_embed's full pipeline (decode + preprocess + encode + write shards) against the
encoder's forward-only speed on pre-decoded pixel tensors: same model, same batch size, one run.

    python bench/embed_throughput.py                      # built 'small' CLIP (4 layers, 256 wide, 224 px)
    python bench/embed_throughput.py --size large          # ViT-L/14-336 shapes, random weights (GPU)
    python bench/embed_throughput.py --encoder hf:openai/clip-vit-large-patch14-336
    python bench/embed_throughput.py --processes 1,2 --size tiny    # 1 vs 2 image_embed.py processes (ranks)

It writes its own images (256x256 JPEG by default) to a temp folder; figures are items/s. With --processes, each
count N runs N image_embed.py processes at once as the parts of one store (--num_shards N, as ranks do), each
with one torch thread (as torchrun sets OMP_NUM_THREADS); items/s = images / the slowest part's encoding time
(from its part file). The counts are run --rounds times in turn and the best of each kept (a shared machine's
busy moments), and the ratio is against the first count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from revision.decode import load_image  # noqa: E402
from revision.encode import embed_images  # noqa: E402
from revision.encoders import load_encoder, resolve_device  # noqa: E402
from revision.inputs import open_inputs  # noqa: E402
from revision.lists import read_images  # noqa: E402
from revision.store_writer import StoreWriter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
from demo.tiny.clip import SIZES, build_tiny_clip  # noqa: E402


def write_images(folder: Path, count: int, size: int, fmt: str, seed: int = 0) -> None:
    """Smooth colour fields plus noise: decodes like a photo, not like pure noise (which JPEG handles badly)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.{fmt}", quality=90)


def forward_only(encoder, pixels: torch.Tensor, batch_size: int) -> float:
    """items/s of encode_pixels over pre-decoded, pre-processed batches (after one warm-up batch)."""
    encoder.encode_pixels(pixels[:batch_size])
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, len(pixels), batch_size):
        encoder.encode_pixels(pixels[lo : lo + batch_size])  # returns CPU tensors: includes the sync + copy
    return len(pixels) / (time.perf_counter() - start)


def full_pipeline(encoder, images: Path, count: int, out: Path, batch_size: int, num_workers: int) -> float:
    writer = StoreWriter(out, "image", encoder.name, encoder.dim, shard_size=max(1, count // 4), overwrite=True)
    start = time.perf_counter()
    summary = embed_images(open_inputs([str(images)], "image"), encoder, writer, batch_size=batch_size, num_workers=num_workers)
    seconds = time.perf_counter() - start
    assert summary["encoded"] == count and summary["skipped"] == 0, summary
    return count / seconds


def processes(encoder_spec: str, images: Path, count: int, out: Path, n: int, batch_size: int, num_workers: int,
              device: str = "cpu") -> float:
    """items/s of n image_embed.py processes writing the parts of one store at once (--num_shards n); `cuda`:
    process i on GPU i (CUDA_VISIBLE_DEVICES), else each on the CPU with one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    base = [sys.executable, str(REPO / "image_embed.py"), "--encoder", encoder_spec, "--images", str(images), "--out",
            str(out), "--device", device, "--batch_size", str(batch_size), "--num_workers", str(num_workers)]
    gpu = (lambda i: {"CUDA_VISIBLE_DEVICES": str(i)}) if device == "cuda" else (lambda i: {})
    procs = [subprocess.Popen(base + (["--num_shards", str(n), "--shard_index", str(i)] if n > 1 else []), env={**env, **gpu(i)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-2000:]
    books = [out / "image" / "manifest.json"] if n == 1 else sorted((out / "image").glob("part-*.json"))
    summaries = [json.loads(p.read_text())["summary"] for p in books]
    assert sum(s["encoded"] for s in summaries) == count, summaries
    return count / max(s["seconds"] for s in summaries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", help="an encoder spec; default: build a random CLIP of --size")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--n_images", type=int, default=1000)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated --num_workers values to run")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--processes", help="e.g. 1,2: image_embed.py processes as parts of one store (first = baseline)")
    parser.add_argument("--rounds", type=int, default=2, help="with --processes: runs of each count (best kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        tmp = Path(tmp)
        encoder_spec = args.encoder or str(build_tiny_clip(tmp / "model", size=args.size))
        write_images(tmp / "images", args.n_images, args.image_size, args.format)
        items = read_images(tmp / "images")
        print(f"# {args.n_images} {args.image_size}x{args.image_size} {args.format} images, batch {args.batch_size}, "
              f"encoder {args.encoder or 'built CLIP ' + args.size}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
        if args.processes:
            counts = [int(n) for n in args.processes.split(",")]
            rates = {n: 0.0 for n in counts}
            for round_ in range(args.rounds):
                for n in counts:
                    rate = processes(encoder_spec, tmp / "images", len(items), tmp / f"procs-{n}-{round_}", n,
                                     args.batch_size, int(args.workers.split(",")[0]))
                    rates[n] = max(rates[n], rate)
            print(f"{'processes':10s} {'items/s':>9s} {'vs 1 process':>13s}")
            for n, rate in rates.items():
                print(f"{n:<10d} {rate:9.1f} {rate / rates[counts[0]]:12.2f}x", flush=True)
            return
        print(f"{'device':8s} {'dtype':10s} {'pipeline':22s} {'items/s':>9s} {'vs forward':>11s}")
        for device in args.devices.split(","):
            encoder = load_encoder(encoder_spec, device=device, dtype=args.dtype, batch_size=args.batch_size)
            dtype = str(encoder.dtype).replace("torch.", "")
            pixels = torch.stack([encoder.preprocess(load_image(it.path)) for it in items])
            if resolve_device(device).type == "cuda":
                pixels = pixels.pin_memory()
            # Forward-only is timed before and after the pipelines and the faster one is the baseline: on a
            # shared machine this keeps a slow moment from flattering the pipeline's ratio.
            before = forward_only(encoder, pixels, args.batch_size)
            rates = {w: full_pipeline(encoder, tmp / "images", len(items), tmp / f"out-{device}-{w}", args.batch_size, w)
                     for w in (int(w) for w in args.workers.split(","))}
            after = forward_only(encoder, pixels, args.batch_size)
            base = max(before, after)
            for label, rate in [("forward only (before)", before), ("forward only (after)", after)] + [
                (f"full, num_workers={w}", r) for w, r in rates.items()
            ]:
                print(f"{device:8s} {dtype:10s} {label:22s} {rate:9.1f} {100 * rate / base:10.1f}%", flush=True)


if __name__ == "__main__":
    main()
