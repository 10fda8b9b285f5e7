"""What sha256 verification costs when a store is read: one pass over a store (as training's cache build and
alignment's first pass read it) with and without hashing, and a separate full verify() pass, on the same store.

    python bench/store_verify.py                        # 1M x 768 fp16 (1.5 GB) in shards of 200k rows
    python bench/store_verify.py --rows 100000 --dim 512

Each reading pass is timed twice (page cache warm after the write: what a second epoch or run sees) and the
faster run is kept; figures are seconds and GB/s of shard bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from revision.store import EmbeddingStore  # noqa: E402
from revision.store_writer import StoreWriter  # noqa: E402


def read_pass(root: Path, verify: bool) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for shard in EmbeddingStore(root, verify=verify).iter_shards():
            del shard
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shard_size", type=int, default=200_000)
    parser.add_argument("--dir", help="where to write the store (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="store-verify-", dir=args.dir) as tmp:
        root = Path(tmp) / "store"
        writer = StoreWriter(root, "image", "bench", args.dim, "float16", args.shard_size)
        rng = np.random.default_rng(0)
        for lo in range(0, args.rows, 50_000):
            n = min(50_000, args.rows - lo)
            writer.add([f"{i:09d}" for i in range(lo, lo + n)], rng.standard_normal((n, args.dim), np.float32))
        writer.close()
        size = sum(p.stat().st_size for p in root.glob("*.pkl")) / 1e9
        plain, hashed = read_pass(root, verify=False), read_pass(root, verify=True)
        start = time.perf_counter()
        EmbeddingStore(root).verify()
        separate = time.perf_counter() - start
        start = time.perf_counter()
        hashlib.sha256(bytes(1 << 28)).digest()
        sha_rate = 0.268 / (time.perf_counter() - start)
        print(f"# {args.rows} x {args.dim} float16 store, {size:.2f} GB in shards of {args.shard_size} rows; "
              f"sha256 alone: {sha_rate:.2f} GB/s")
        print(f"{'pass':34s} {'seconds':>8s} {'GB/s':>6s} {'vs plain':>9s}")
        for label, seconds in (("read, no verification", plain), ("read, verified (hash, then unpickle)", hashed),
                               ("verify() as a separate pass", separate)):
            print(f"{label:34s} {seconds:8.2f} {size / seconds:6.2f} {seconds / plain:8.2f}x")


if __name__ == "__main__":
    main()
