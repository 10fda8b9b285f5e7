"""End-to-end cost of `embed_mean.py --method realign`: wall time and peak RSS of the whole process.

    python bench/realign.py                     # 400k texts + 200k images (1280-d float16), then twice that
    python bench/realign.py --texts 40000 --images 20000 --shard 20000   # a quick look

It writes synthetic shards with a planted gap in the official record layout (a list of {"id", "caption"
| "image_path", "embed"} per pickle, 200k records per shard) to a temp folder, runs embed_mean.py as a
subprocess under /usr/bin/time -v, with and without the gap report, then again on twice the corpus and on
the same corpus in our columnar layout. The baseline measured in the same run is one plain read of every
input shard (the unpickling floor: no statistics, nothing written). The official embed_ReAlign.py took
128 s and 11.6 GB on the 400k + 200k input on this machine (issue 3; not re-run here).
Everything is deleted afterwards, unless --inputs DIR keeps the inputs for the next run (delete DIR yourself).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from revision.store import EmbeddingStore, Shard, StoreWriter, write_reference_shard  # noqa: E402

OFFICIAL = {"wall_s": 128.0, "peak_rss_gb": 11.6}  # issue 3, 400k + 200k, the official script
TARGET = {"wall_s": 13.0, "peak_rss_gb": 2.9}


def planted_shard(kind: str, first: int, rows: int, dim: int, seed: int) -> Shard:
    """Unit rows around a modality-specific direction with a decaying spread: a gap to close."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim, np.float32)
    direction[0 if kind == "text" else 1] = 1.0
    spread = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32) * (1.0 if kind == "text" else 0.6)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    x *= spread
    x += 0.6 * direction
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"{kind}-{i}" for i in range(first, first + rows)]
    key = "caption" if kind == "text" else "image_path"
    return Shard(kind, ids, x.astype(np.float16), [f"{key} {i}" for i in range(first, first + rows)])


def make_inputs(folder: Path, kind: str, total: int, shard: int, dim: int, reuse: Path | None = None) -> None:
    """Reference-layout shards kind_embeds_1.pkl...; shards already in `reuse` are linked, not regenerated."""
    folder.mkdir(parents=True)
    for index, first in enumerate(range(0, total, shard)):
        name = f"{kind}_embeds_{index + 1}.pkl"
        if reuse is not None and (reuse / name).exists():
            os.link(reuse / name, folder / name)
            continue
        rows = min(shard, total - first)
        write_reference_shard(folder / name, planted_shard(kind, first, rows, dim, seed=index + (0 if kind == "text" else 1000)))


def to_columnar(source: Path, folder: Path) -> None:
    store = EmbeddingStore(source)
    writer = StoreWriter(folder, store.kind, "bench", store.dim, "float16", shard_size=200_000)
    for shard in store.iter_shards():
        writer.add(shard.ids, shard.embeds, shard.sources)
    writer.close()


def make_all_inputs(tmp: Path, args: argparse.Namespace) -> None:
    make_inputs(tmp / "x1" / "text", "text", args.texts, args.shard, args.dim)
    make_inputs(tmp / "x1" / "image", "image", args.images, args.shard, args.dim)
    make_inputs(tmp / "x2" / "text", "text", 2 * args.texts, args.shard, args.dim, reuse=tmp / "x1" / "text")
    make_inputs(tmp / "x2" / "image", "image", 2 * args.images, args.shard, args.dim, reuse=tmp / "x1" / "image")
    to_columnar(tmp / "x1" / "text", tmp / "col" / "text")
    to_columnar(tmp / "x1" / "image", tmp / "col" / "image")
    os.sync()  # the inputs' write-back must not compete with the timed runs


def measure(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds and peak RSS of the process."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"wall_s": wall, "peak_rss_gb": rss_kb / 1e6, "load_before": load, "stdout": done.stdout}


def read_once_cmd(*folders: Path) -> list[str]:
    code = ("import sys; from revision.store import EmbeddingStore\n"
            "for f in sys.argv[1:]:\n    for s in EmbeddingStore(f).iter_shards():\n        del s  # not held while the next loads")
    return [sys.executable, "-c", code, *map(str, folders)]


def align_cmd(text: Path, image: Path, out: Path, report: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "embed_mean.py"), "--text", str(text), "--image", str(image), "--out", str(out),
           "--method", "realign", "--overwrite", "--quiet"]
    return cmd + ([] if report else ["--no_report"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=400_000)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--shard", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--tmp", default=None, help="parent folder for the temp data (default: the system temp dir)")
    p.add_argument("--inputs", default=None,
                   help="keep the generated inputs in this folder and reuse them on the next run (default: temp, deleted)")
    p.add_argument("--repeat", type=int, default=2, help="runs per configuration (the table shows the fastest)")
    args = p.parse_args()

    rows = []
    folder = contextlib.nullcontext(args.inputs) if args.inputs else tempfile.TemporaryDirectory(prefix="realign-bench-", dir=args.tmp)
    with folder as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if (tmp / "col" / "image" / "manifest.json").exists():  # --inputs from an earlier run
            print(f"reusing the inputs under {tmp}", flush=True)
        else:
            make_all_inputs(tmp, args)
            print(f"inputs written in {time.perf_counter() - t0:.0f} s under {tmp}", flush=True)

        runs = [
            ("records 1x: read every shard once (baseline)", read_once_cmd(tmp / "x1" / "text", tmp / "x1" / "image"), "x1"),
            ("records 1x: realign, no report", align_cmd(tmp / "x1" / "text", tmp / "x1" / "image", tmp / "out", False), "x1"),
            ("records 1x: realign + gap report", align_cmd(tmp / "x1" / "text", tmp / "x1" / "image", tmp / "out", True), "x1"),
            ("records 2x: realign, no report", align_cmd(tmp / "x2" / "text", tmp / "x2" / "image", tmp / "out", False), "x2"),
            ("records 2x: realign + gap report", align_cmd(tmp / "x2" / "text", tmp / "x2" / "image", tmp / "out", True), "x2"),
            ("columnar 1x: read every shard once", read_once_cmd(tmp / "col" / "text", tmp / "col" / "image"), "x1"),
            ("columnar 1x: realign, no report", align_cmd(tmp / "col" / "text", tmp / "col" / "image", tmp / "out", False), "x1"),
            ("columnar 1x: realign + gap report", align_cmd(tmp / "col" / "text", tmp / "col" / "image", tmp / "out", True), "x1"),
        ]
        for name, cmd, scale in [run for run in runs for _ in range(args.repeat)]:
            result = measure(cmd)
            rows.append((name, scale, result))
            shutil.rmtree(tmp / "out", ignore_errors=True)
            os.sync()
            phases = json.loads(result["stdout"])["timings"] if "realign" in name else {}
            split = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in phases.items() if k != "total_s")
            print(f"{name:40s} {result['wall_s']:7.1f} s {result['peak_rss_gb']:6.2f} GB  (load avg {result['load_before']:.1f})"
                  + (f"  [{split} s]" if split else ""), flush=True)

    print(f"\nmachine: {os.cpu_count()} CPUs; 1x = {args.texts} texts + {args.images} images, {args.dim}-d float16, "
          f"{args.shard} records per shard; 2x = twice that")
    best: dict[str, tuple[str, dict]] = {}  # per configuration: fastest wall, highest peak RSS of its runs
    for name, scale, r in rows:
        if name in best:
            r = {**r, "wall_s": min(r["wall_s"], best[name][1]["wall_s"]),
                 "peak_rss_gb": max(r["peak_rss_gb"], best[name][1]["peak_rss_gb"])}
        best[name] = (scale, r)
    rows = [(name, scale, r) for name, (scale, r) in best.items()]
    floors = {name.split(":")[0]: r for name, _, r in rows if "read every shard once" in name}  # per layout, 1x
    print(f"{'run (fastest of ' + str(args.repeat) + ', highest peak)':40s} {'wall s':>7s} {'peak GB':>8s} {'/ read-once':>11s} "
          f"{'official/ours':>14s}")
    for name, scale, r in rows:
        floor = floors.get(name.split(":")[0])
        ratio = f"{r['wall_s'] / floor['wall_s']:.2f}" if scale == "x1" and "realign" in name else ""
        default_size = (args.texts, args.images, args.dim) == (400_000, 200_000, 1280)
        official = f"{OFFICIAL['wall_s'] / r['wall_s']:.1f}x" if default_size and name.startswith("records 1x: realign") else ""
        print(f"{name:40s} {r['wall_s']:7.1f} {r['peak_rss_gb']:8.2f} {ratio:>11s} {official:>14s}")
    by_name = {name: r for name, _, r in rows}
    print(f"\ntargets on records 1x: wall <= {TARGET['wall_s']} s, peak <= {TARGET['peak_rss_gb']} GB; the official script "
          f"took {OFFICIAL['wall_s']} s / {OFFICIAL['peak_rss_gb']} GB there (issue 3, not re-run)")
    for report in ("no report", "gap report"):
        one = next(r for n, r in by_name.items() if n.startswith("records 1x: realign") and report in n)
        two = next(r for n, r in by_name.items() if n.startswith("records 2x: realign") and report in n)
        print(f"2x / 1x ({report}): wall {two['wall_s'] / one['wall_s']:.2f}, peak RSS {two['peak_rss_gb'] / one['peak_rss_gb']:.2f}"
              " (peak = text kept in RAM, at most --memory_budget_gb, + one shard: bounded once the texts exceed the budget)")


if __name__ == "__main__":
    main()
