"""`embed_mean.py` against its I/O floor and against the official `embed_ReAlign.py`, side by side in the same run.

    # the official script is not part of this repository: take it from github Yu-xm/ReVision, e.g.
    git -C ReVision show HEAD:embed_ReAlign.py > /tmp/embed_ReAlign.py
    python bench/realign.py --official /tmp/embed_ReAlign.py                      # 200k + 100k, then 400k + 200k
    python bench/realign.py --official /tmp/embed_ReAlign.py --sizes 40000:20000 --shard 20000   # a quick look
    python bench/realign.py --methods all --layouts records,columnar --sizes 200000:100000       # every method

Per size and input layout it writes synthetic shards with a planted gap (1280-d float16) to a temp folder: the
official record layout (a list of {"id", "caption" | "image_path", "embed"} per pickle, `--shard` records per file)
or our columnar store (manifest + sha256, `--shard` rows per shard). Then it runs, each as a subprocess under
/usr/bin/time -v (wall seconds, CPU seconds, peak RSS):
- the floor: a process that does the job's I/O and nothing else: reads every input shard once through the store
  reader (the allow-list unpickler, sha256 checked where a manifest gives one, rows into columns) and writes the
  output once through the store writer (the same rows as float32: pickled, hashed, fsynced shards); no maths;
- ours, per method (no gap report: the official script draws none), before and after the official script (the
  load of a shared machine drifts over its minutes);
- the official script (record layout, realign only). Both outputs are then compared row by row (cosine; ids).
The table gives ours / floor, speed (official / ours) and peak RSS (ours / official) per size, and ours at the
larger size over ours at the smaller (memory stays flat). Without --official only the floor and ours run.
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
from revision.align import method_names  # noqa: E402
from revision.safe_pickle import safe_load  # noqa: E402
from revision.shards import Shard, write_reference_shard  # noqa: E402
from revision.store import EmbeddingStore  # noqa: E402
from revision.store_writer import write_store  # noqa: E402

TARGET = {"speed": 15.0, "rss": 0.25, "cosine": 0.99999, "floor": 1.5}
LAYOUTS = ("records", "columnar")


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


def make_inputs(folder: Path, pool: Path, kind: str, total: int, shard: int, dim: int, layout: str = "records") -> None:
    """Reference-layout shards kind_embeds_1.pkl... in `folder`, hard links into `pool`: a shard (kind, index,
    rows) is generated once and shared by every size that holds it. `columnar`: one store of ours, same rows."""
    if layout == "columnar":
        if not (folder / "manifest.json").exists():
            shards = [planted_shard(kind, first, min(shard, total - first), dim, seed=index + (0 if kind == "text" else 1000))
                      for index, first in enumerate(range(0, total, shard))]
            write_store(folder, kind, [i for s in shards for i in s.ids], np.concatenate([s.embeds for s in shards]),
                        [x for s in shards for x in s.sources], encoder="bench", shard_size=shard)
        return
    folder.mkdir(parents=True, exist_ok=True)
    pool.mkdir(parents=True, exist_ok=True)
    for index, first in enumerate(range(0, total, shard)):
        rows = min(shard, total - first)
        pooled = pool / f"{kind}_{index + 1}_{rows}.pkl"
        if not pooled.exists():
            write_reference_shard(pooled, planted_shard(kind, first, rows, dim, seed=index + (0 if kind == "text" else 1000)))
        if not (folder / f"{kind}_embeds_{index + 1}.pkl").exists():
            os.link(pooled, folder / f"{kind}_embeds_{index + 1}.pkl")


def measure(cmd: list[str]) -> dict:
    """Run under /usr/bin/time -v: wall seconds and peak RSS of the process (and the load average before)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr).group(1)) for kind in ("User", "System"))
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": rss_kb / 1e6, "load_before": load, "stdout": done.stdout}


FLOOR = """
import json, os, sys, time
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")  # as embed_mean.py sets it
from revision.store import EmbeddingStore
from revision.store_writer import StoreWriter
text, image, out = sys.argv[1:4]
clock = time.perf_counter()
for shard in EmbeddingStore(image).iter_shards():  # read every input shard once
    del shard
kept = list(EmbeddingStore(text).iter_shards())  # the texts as read: written back below, no maths between
read = time.perf_counter() - clock
writer = StoreWriter(out, "text", "floor", kept[0].embeds.shape[1], "float32", 16_384, overwrite=True, drop_page_cache=True)
for shard in kept:  # the output once, as embed_mean.py writes it: float32 16k-row shards, pickled, hashed, fsynced
    for lo in range(0, len(shard), 16_384):
        writer.add(shard.ids[lo:lo + 16_384], shard.embeds[lo:lo + 16_384], shard.sources[lo:lo + 16_384], unit_rows=True)
writer.close()
print(json.dumps({"read_s": read, "write_s": time.perf_counter() - clock - read}))
"""


def floor_cmd(text: Path, image: Path, out: Path) -> list[str]:
    """The job's I/O alone: read every input shard once, write the output store once (see the module docstring)."""
    return [sys.executable, "-c", FLOOR, str(text), str(image), str(out)]


def ours_cmd(text: Path, image: Path, out: Path, method: str = "realign") -> list[str]:
    return [sys.executable, str(ROOT / "embed_mean.py"), "--text", str(text), "--image", str(image), "--out", str(out),
            "--method", method, "--overwrite", "--quiet", "--no_report"]


def official_cmd(script: Path, text: Path, image: Path, out: Path) -> list[str]:
    return [sys.executable, str(script), "--input_dir", str(text), "--img_input_dir", str(image), "--output_dir", str(out),
            "--mean_file_path", str(out / "mean_vector.pkl")]


def compare(ours: Path, official: Path) -> dict:
    """Per-row cosine between our store and the official output folder (official/trace/*_trace.pkl), by id."""
    store = EmbeddingStore(ours).load_all()
    index = {i: row for row, i in enumerate(store.ids)}
    worst, seen = 1.0, 0
    for path in sorted((official / "trace").glob("*.pkl")):
        records = safe_load(path)
        theirs = np.stack([r["embed"] for r in records]).astype(np.float64)
        mine = store.embeds[[index[str(r["id"])] for r in records]].astype(np.float64)
        cosine = np.sum(theirs * mine, axis=1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(mine, axis=1)
        worst, seen = min(worst, float(cosine.min())), seen + len(records)
        del records, theirs, mine
    if seen != len(store.ids):
        raise RuntimeError(f"the official output has {seen} rows, ours {len(store.ids)}")
    return {"min_cosine": worst, "rows": seen}


def best_of(results: list[dict]) -> dict:
    """Fastest wall time (and least CPU time), highest peak RSS of repeated runs."""
    return {"wall_s": min(r["wall_s"] for r in results), "cpu_s": min(r["cpu_s"] for r in results),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in results), "load_before": max(r["load_before"] for r in results)}


def show(name: str, r: dict, extra: str = "") -> None:
    print(f"  {name:10s} {r['wall_s']:7.1f} s wall {r['cpu_s']:7.1f} s CPU {r['peak_rss_gb']:6.2f} GB "
          f"(load avg {r['load_before']:.1f}) {extra}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", help="path to the official embed_ReAlign.py (github Yu-xm/ReVision); not shipped here")
    p.add_argument("--sizes", default="200000:100000,400000:200000", help="TEXTS:IMAGES,... (comma-separated)")
    p.add_argument("--layouts", default="records", help=f"input layouts, comma-separated: {', '.join(LAYOUTS)}")
    p.add_argument("--methods", default="realign", help=f"embed_mean.py methods, comma-separated, or all ({', '.join(method_names())})")
    p.add_argument("--shard", type=int, default=200_000, help="records per input pickle (rows per shard, columnar)")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--tmp", default=None, help="parent folder for the temp data (default: the system temp dir)")
    p.add_argument("--inputs", default=None, help="keep the generated inputs here and reuse them next time")
    p.add_argument("--repeat", type=int, default=2, help="runs of ours (and the floor) per size; the official runs once")
    args = p.parse_args()
    sizes = [tuple(int(x) for x in size.split(":")) for size in args.sizes.split(",")]
    layouts = args.layouts.split(",")
    methods = list(method_names()) if args.methods == "all" else args.methods.split(",")
    if not set(layouts) <= set(LAYOUTS) or not set(methods) <= set(method_names()):
        p.error(f"--layouts from {LAYOUTS}, --methods from {method_names()}")
    official = Path(args.official).resolve() if args.official else None
    if official is not None and not official.is_file():
        p.error(f"--official {official}: no such file")

    table = []
    folder = contextlib.nullcontext(args.inputs) if args.inputs else tempfile.TemporaryDirectory(prefix="realign-bench-", dir=args.tmp)
    with folder as tmp:
        tmp = Path(tmp)
        for (texts, images), layout in ((size, layout) for size in sizes for layout in layouts):
            data = tmp / f"{texts}_{images}" / layout
            t0 = time.perf_counter()
            make_inputs(data / "text", tmp / "pool", "text", texts, args.shard, args.dim, layout)
            make_inputs(data / "image", tmp / "pool", "image", images, args.shard, args.dim, layout)
            os.sync()  # the inputs' write-back must not compete with the timed runs
            print(f"{texts} texts + {images} images, {layout} layout: inputs ready in {time.perf_counter() - t0:.0f} s", flush=True)

            def timed(name: str, cmd: list[str], out: Path) -> dict:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                r = measure(cmd)
                parts = json.loads(r["stdout"]) if name == "floor" else json.loads(r["stdout"])["timings"]
                show(name, r, str({k: round(v, 1) for k, v in parts.items()}))
                return r

            floor = best_of([timed("floor", floor_cmd(data / "text", data / "image", tmp / "floor"), tmp / "floor")
                             for _ in range(args.repeat)])
            shutil.rmtree(tmp / "floor", ignore_errors=True)
            for method in methods:
                row = {"texts": texts, "images": images, "layout": layout, "method": method, "floor": floor}
                cmd = ours_cmd(data / "text", data / "image", tmp / "ours", method)
                compared = official is not None and method == "realign" and layout == "records"
                # ours before and after the official run: the machine's load drifts over its minutes
                runs = [timed(method, cmd, tmp / "ours") for _ in range(max(1, args.repeat // 2) if compared else args.repeat)]
                if compared:
                    shutil.rmtree(tmp / "official", ignore_errors=True)
                    os.sync()
                    row["official"] = measure(official_cmd(official, data / "text", data / "image", tmp / "official"))
                    show("official", row["official"])
                    runs += [timed(method, cmd, tmp / "ours") for _ in range(args.repeat - len(runs))]
                    row["check"] = compare(tmp / "ours", tmp / "official")  # the last run of ours
                    print(f"  outputs: {row['check']['rows']} rows, min cosine {row['check']['min_cosine']:.7f}", flush=True)
                    shutil.rmtree(tmp / "official", ignore_errors=True)
                row["ours"] = best_of(runs)
                shutil.rmtree(tmp / "ours", ignore_errors=True)
                table.append(row)
    report(table, args)


def report(table: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmachine: {os.cpu_count()} CPUs, load avg now {os.getloadavg()[0]:.1f}; {args.dim}-d float16 inputs, "
          f"{args.shard} rows per input shard; ours and the floor: fastest of {args.repeat}, official: one run")
    print(f"{'texts + images':>16s} {'layout':>8s} {'method':>12s} {'floor s':>7s} {'ours s':>7s} {'CPU s':>6s} {'ours GB':>7s} "
          f"{'/floor':>6s} {'official s':>10s} {'CPU s':>6s} {'GB':>6s} {'speed':>6s} {'CPU':>6s} {'RSS':>5s} {'min cosine':>10s}")
    for row in table:
        ours, off, floor = row["ours"], row.get("official"), row["floor"]
        speed = f"{off['wall_s'] / ours['wall_s']:.1f}x" if off else "-"
        cpu = f"{off['cpu_s'] / ours['cpu_s']:.1f}x" if off else "-"
        rss = f"{ours['peak_rss_gb'] / off['peak_rss_gb']:.2f}" if off else "-"
        cosine = f"{row['check']['min_cosine']:.7f}" if off else "-"
        off = off or {"wall_s": float("nan"), "cpu_s": float("nan"), "peak_rss_gb": float("nan")}
        print(f"{row['texts']:>8d} + {row['images']:<6d} {row['layout']:>8s} {row['method']:>12s} {floor['wall_s']:7.1f} "
              f"{ours['wall_s']:7.1f} {ours['cpu_s']:6.1f} {ours['peak_rss_gb']:7.2f} {ours['wall_s'] / floor['wall_s']:5.2f}x "
              f"{off['wall_s']:10.1f} {off['cpu_s']:6.1f} {off['peak_rss_gb']:6.2f} {speed:>6s} {cpu:>6s} {rss:>5s} {cosine:>10s}")
    print("floor: one process reading every input shard once and writing the output store once (no maths); "
          "/floor: ours wall / floor wall")
    print("speed: official wall / ours; CPU: official CPU seconds (user + system) / ours, less sensitive than wall "
          "time to the load of a shared machine")
    print(f"targets: ours / floor <= {TARGET['floor']}, speed (official / ours) >= {TARGET['speed']}x, RSS (ours / "
          f"official) <= {TARGET['rss']}, min cosine >= {TARGET['cosine']}")
    for method in dict.fromkeys(r["method"] for r in table):
        rows = [r for r in table if r["method"] == method and r["layout"] == table[0]["layout"]]
        if len(rows) > 1:
            first, last = rows[0]["ours"], rows[-1]["ours"]
            print(f"{method}, largest / smallest size: wall {last['wall_s'] / first['wall_s']:.2f}, peak RSS "
                  f"{last['peak_rss_gb'] / first['peak_rss_gb']:.2f} (peak = text kept in RAM, at most "
                  "--memory_budget_gb, + one input shard: flat once the texts exceed the budget)")


if __name__ == "__main__":
    main()
