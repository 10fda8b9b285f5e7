"""The toy world: procedural 64x64 scenes, template captions and QA, in the file formats the pipeline reads.

A scene holds one or two objects, each a shape x colour x size at one cell of a 3x3 grid, over a textured
or noisy background. Captions name every attribute of every object (several templates and synonyms), so
the caption text alone determines the scene; `parse_caption` reads the attributes back (for tests and to
score generated captions). QA answers are short canonical words ("red", "top left", "two", "yes").

    python -m demo.world OUT_DIR [--seed 0] [--preset default|mini]

Files written under OUT_DIR (ids are unique across the whole world; image paths are relative to OUT_DIR):
  images/{paired,unpaired,eval}/<id>.png
  paired.jsonl            {"id", "image", "caption"}   trains the toy CLIP; an image list for image_embed.py too
  unpaired_images.jsonl   {"id", "image"}              image_embed.py --images
  unpaired_texts.jsonl    {"id", "text"}               image_embed.py --texts (scenes drawn apart from the images)
  pretrain.json           LLaVA pretraining samples keyed by the unpaired text ids
  pretrain_paired.json    the same keyed by paired image ids (the paired-pretraining upper bound), as many as
                          pretrain.json holds (the first paired items): the upper bound sees as many samples
  instruct.json           LLaVA multi-turn QA on unpaired images ("id" and "image" name the image), plus
                          a few image-free samples
  eval_images.jsonl       {"id", "image"}              held-out images
  eval_captions.jsonl     {"id", "image", "caption", "attributes"}
  eval_questions.jsonl    {"question_id", "image", "image_id", "text", "answer", "category"}
  scenes.jsonl            {"id", "split", "attributes"} for every image and caption id
  vocab.txt               every word any template can produce
  world.json              seed, sizes, counts; written last, so its presence means the world is complete; with
                          `--defer SPLIT`, "deferred" names the splits whose pictures are drawn when first read
                          (render_deferred: the demo's dual encoder draws its own and never opens the 8000 paired ones)

Everything is a function of (seed, sizes); each split draws from its own random stream, so changing one
split's size leaves the others as they were.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

# the world's parts, importable from here as before
from demo.captions import COUNT_WORDS, binding_questions, caption, parse_caption, qa_conversation, questions, text_only_turn, vocabulary  # noqa: F401
from demo.scenes import COLOURS, IMAGE_SIZE, POSITIONS, QUESTION_CATEGORIES, SHAPES, SIZES, Scene, render, sample_scene  # noqa: F401

WORLD_VERSION = 3  # 2: pretrain_paired.json holds as many samples as pretrain.json; 3: conversations never ask what they said

# ------------------------------------------------------------------------------------------------ splits


@dataclass(frozen=True)
class WorldSizes:
    paired: int = 8000           # image-caption pairs: train the toy CLIP (and the paired-pretraining upper bound)
    unpaired_images: int = 4000  # images without captions
    unpaired_texts: int = 8000   # captions of other scenes (pretraining text)
    instruct: int = 2000         # QA conversations on unpaired images (at most one per image)
    text_only: int = 50          # image-free instruction samples
    eval: int = 500              # held-out images, each with a reference caption and questions
    eval_questions_per_image: int = 2
    max_turns: int = 3           # QA turns per instruction conversation (1..max_turns)


PRESETS = {"default": WorldSizes(), "mini": WorldSizes(32, 24, 32, 16, 4, 12, 2, 3),
           # the demo on real parts (docs/results.md, "Shape: more pairs, more images"): a 135M LLM and a 6-layer text
           # tower cost far more CPU per sample than the toys. 8000 pairs: from 2000 the vision tower memorised their
           # scenes (shape of a two-object scene's second object 0.71 on fresh scenes; 0.82 from 8000). Instruction QA
           # on every unpaired image, up to one question of each category, none whose answer an earlier turn said
           # (3.2 a conversation on average; 3.4 before that rule, docs/results.md "A code by object"): 300
           # conversations of 1-3 turns were memorised by stage 2 (loss 0.002) before it learned to read; 2000 images
           # with 1-2 questions each read no better (QA 0.67-0.71, colour 0.64-0.70) and cost 17 s more
           "real": WorldSizes(8000, 1000, 1000, 1000, 20, 150, 2, 6)}
SPLITS = ("paired", "unpaired_images", "unpaired_texts", "instruct", "eval")
ID_PREFIX = {"paired": "paired", "unpaired_images": "image", "unpaired_texts": "caption", "eval": "eval"}
IMAGE_DIR = {"paired": "paired", "unpaired_images": "unpaired", "eval": "eval"}


@dataclass
class Item:
    id: str
    split: str
    scene: Scene
    caption: str | None = None
    image: str | None = None  # path relative to the world folder


@dataclass
class World:
    seed: int
    sizes: WorldSizes
    paired: list[Item] = field(default_factory=list)
    unpaired_images: list[Item] = field(default_factory=list)
    unpaired_texts: list[Item] = field(default_factory=list)
    instruct: list[dict] = field(default_factory=list)
    eval: list[Item] = field(default_factory=list)
    eval_questions: list[dict] = field(default_factory=list)

    def image_items(self) -> list[Item]:
        return self.paired + self.unpaired_images + self.eval


def _rng(seed: int, split: str, stream: int, *more: int) -> np.random.Generator:
    """An independent random stream per (seed, split, purpose[, item])."""
    return np.random.default_rng([seed, SPLITS.index(split), stream, *more])


def _items(seed: int, split: str, count: int, captioned: bool, with_image: bool) -> list[Item]:
    scenes, words = _rng(seed, split, 0), _rng(seed, split, 1)
    items = []
    for i in range(count):
        item_id = f"{ID_PREFIX[split]}-{i:06d}"
        scene = sample_scene(scenes)
        items.append(Item(item_id, split, scene, caption(scene, words) if captioned else None,
                          f"images/{IMAGE_DIR[split]}/{item_id}.png" if with_image else None))
    return items


def make_world(seed: int = 0, sizes: WorldSizes | None = None) -> World:
    """Every scene, caption and question of the world (no images rendered): a pure function of (seed, sizes)."""
    sizes = sizes or PRESETS["default"]
    bad = {k: v for k, v in asdict(sizes).items() if not isinstance(v, int) or v < (1 if k == "max_turns" else 0)}
    if bad:
        raise ValueError(f"world sizes must be non-negative integers (max_turns at least 1), got {bad}")
    if sizes.instruct > sizes.unpaired_images:
        raise ValueError(f"instruct ({sizes.instruct}) must not exceed unpaired_images ({sizes.unpaired_images}): "
                         "each conversation is about a different unpaired image")
    world = World(seed, sizes)
    world.paired = _items(seed, "paired", sizes.paired, captioned=True, with_image=True)
    world.unpaired_images = _items(seed, "unpaired_images", sizes.unpaired_images, captioned=False, with_image=True)
    world.unpaired_texts = _items(seed, "unpaired_texts", sizes.unpaired_texts, captioned=True, with_image=False)
    world.eval = _items(seed, "eval", sizes.eval, captioned=True, with_image=True)

    rng = _rng(seed, "instruct", 3)
    for item in world.unpaired_images[: sizes.instruct]:
        world.instruct.append({"id": item.id, "image": item.image, "conversations": qa_conversation(item.scene, rng, sizes.max_turns)})
    for i in range(sizes.text_only):
        q, a = text_only_turn(rng)
        world.instruct.append({"id": f"chat-{i:06d}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})

    rng = _rng(seed, "eval", 3)
    per = sizes.eval_questions_per_image
    for i, item in enumerate(world.eval):
        cats = [QUESTION_CATEGORIES[(i * per + j) % len(QUESTION_CATEGORIES)] for j in range(per)]
        for j, (cat, q, a) in enumerate(questions(item.scene, cats, rng)):
            world.eval_questions.append({"question_id": f"{item.id}-q{j}", "image": item.image, "image_id": item.id,
                                         "text": q, "answer": a, "category": cat})
    return world


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _pretrain_sample(item: Item) -> dict:
    return {"id": item.id, "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": item.caption}]}


def _manifest(world: World) -> dict:
    return {"version": WORLD_VERSION, "seed": world.seed, "sizes": asdict(world.sizes)}


def _render_to_file(job: tuple[Scene, int, str, int, str]) -> None:
    scene, seed, split, index, path = job
    staged = f"{path}.tmp"  # a killed or concurrent run never leaves a half-written picture under its name
    render(scene, _rng(seed, split, 2, index)).save(staged, format="PNG", compress_level=1)
    os.replace(staged, path)


def _render(jobs: list[tuple[Scene, int, str, int, str]], workers: int = 0) -> None:
    """Draw and write the pictures of `jobs` in `workers` processes (0: one per CPU, none for a handful)."""
    workers = workers or min(os.cpu_count() or 1, len(jobs) // 256 + 1)
    if workers > 1:  # each image has its own random stream, so the bytes do not depend on the worker count
        # fork where there is one: a spawned worker imports the caller's main module again (demo.pipeline's torch and
        # transformers: about 9 s of the pipeline's world stage on 2 cores); the workers only draw with numpy and PIL
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            pool.map(_render_to_file, jobs, chunksize=min(256, len(jobs) // workers + 1))
    else:
        for job in jobs:
            _render_to_file(job)


def _jobs(world: World, out: Path, splits: Sequence[str]) -> list[tuple[Scene, int, str, int, str]]:
    return [(item.scene, world.seed, item.split, int(item.id.rsplit("-", 1)[1]), str(out / item.image))
            for item in world.image_items() if item.split in splits]


def render_deferred(out_dir: str | Path, workers: int = 0) -> list[str]:
    """Draw the pictures of the splits a world was built without (`--defer`), the same bytes as building would
    have written, and mark them drawn; returns those splits (none: nothing to do). Readers of a world's pictures
    call it first."""
    manifest_path = Path(out_dir) / "world.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{out_dir}: no world.json (build the world first: python -m demo.world {out_dir})")
    manifest = json.loads(manifest_path.read_text())
    deferred = manifest.get("deferred", [])
    if deferred:
        world = make_world(manifest["seed"], WorldSizes(**manifest["sizes"]))
        _render(_jobs(world, Path(out_dir), deferred), workers)
        staged = manifest_path.with_suffix(".json.tmp")
        staged.write_text(json.dumps({k: v for k, v in manifest.items() if k != "deferred"}, indent=1) + "\n")
        os.replace(staged, manifest_path)
    return deferred


def build_world(out_dir: str | Path, seed: int = 0, sizes: WorldSizes | str = "default", force: bool = False,
                workers: int = 0, defer: Sequence[str] = ()) -> World:
    """Generate the world, render its images (in `workers` processes; 0 = one per CPU) and write every file
    (module docstring); the pictures of the splits in `defer` are drawn later, by render_deferred. A folder that
    already holds a complete world of the same seed and sizes is left as it is unless `force`."""
    unknown = [s for s in defer if s not in IMAGE_DIR]
    if unknown:
        raise ValueError(f"--defer {unknown}: only the pictures of {', '.join(IMAGE_DIR)} can be deferred")
    if isinstance(sizes, str):
        if sizes not in PRESETS:
            raise ValueError(f"unknown world preset {sizes!r}; choose from {sorted(PRESETS)}")
        sizes = PRESETS[sizes]
    out = Path(out_dir)
    world = make_world(seed, sizes)
    manifest_path = out / "world.json"
    if not force and manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if {k: existing.get(k) for k in ("version", "seed", "sizes")} == _manifest(world):
            if set(existing.get("deferred", [])) - set(defer):  # pictures asked for now that an earlier build deferred
                render_deferred(out, workers)
            return world
    manifest_path.unlink(missing_ok=True)
    for folder in IMAGE_DIR.values():
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
    _render(_jobs(world, out, [s for s in IMAGE_DIR if s not in defer]), workers)

    _write_jsonl(out / "paired.jsonl", [{"id": it.id, "image": it.image, "caption": it.caption} for it in world.paired])
    _write_jsonl(out / "unpaired_images.jsonl", [{"id": it.id, "image": it.image} for it in world.unpaired_images])
    _write_jsonl(out / "unpaired_texts.jsonl", [{"id": it.id, "text": it.caption} for it in world.unpaired_texts])
    _write_jsonl(out / "eval_images.jsonl", [{"id": it.id, "image": it.image} for it in world.eval])
    _write_jsonl(out / "eval_captions.jsonl", [{"id": it.id, "image": it.image, "caption": it.caption,
                                                "attributes": it.scene.attributes()} for it in world.eval])
    _write_jsonl(out / "eval_questions.jsonl", world.eval_questions)
    _write_jsonl(out / "scenes.jsonl", [{"id": it.id, "split": it.split, "attributes": it.scene.attributes()}
                                        for it in world.paired + world.unpaired_images + world.unpaired_texts + world.eval])
    (out / "pretrain.json").write_text(json.dumps([_pretrain_sample(it) for it in world.unpaired_texts]))
    (out / "pretrain_paired.json").write_text(json.dumps([_pretrain_sample(it) for it in world.paired[: sizes.unpaired_texts]]))
    (out / "instruct.json").write_text(json.dumps(world.instruct))
    (out / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    counts = {"paired": len(world.paired), "unpaired_images": len(world.unpaired_images),
              "unpaired_texts": len(world.unpaired_texts), "instruct": len(world.instruct),
              "eval": len(world.eval), "eval_questions": len(world.eval_questions)}
    deferred = {"deferred": [s for s in IMAGE_DIR if s in defer]} if defer else {}
    manifest_path.write_text(json.dumps({**_manifest(world), "counts": counts, **deferred}, indent=1) + "\n")
    return world


def _built(world_dir: Path) -> tuple[int, WorldSizes]:
    """(seed, sizes) of a built world, whose streams a caller draws further with make_world. A world of another
    generator version is refused; each caller checks that its split's prefix is the world's own."""
    manifest = json.loads((world_dir / "world.json").read_text())
    if manifest.get("version") != WORLD_VERSION:
        raise ValueError(f"{world_dir} was written by world generator {manifest.get('version')}, this is {WORLD_VERSION}")
    return manifest["seed"], WorldSizes(**manifest["sizes"])


def write_more_eval(world_dir: str | Path, images: int, out_dir: str | Path) -> int:
    """`images` more held-out images of a built world, with their questions: its eval streams drawn further (the
    world's own eval images and questions are their first), written to out_dir as a world's eval files (images/eval/,
    eval_images.jsonl, eval_questions.jsonl, scenes.jsonl; world.json last). Returns the number of questions. A
    world its generator no longer draws the same way (another version, edited files) is refused."""
    world_dir, out = Path(world_dir), Path(out_dir)
    seed, sizes = _built(world_dir)
    world = make_world(seed, replace(sizes, eval=sizes.eval + images))
    own = [json.loads(line) for line in (world_dir / "eval_questions.jsonl").read_text().splitlines()]
    if world.eval_questions[: len(own)] != own:
        raise ValueError(f"{world_dir}/eval_questions.jsonl is not what its seed and sizes draw: not this world's streams")
    more = world.eval[sizes.eval:]
    ids = {item.id for item in more}
    (out / "images" / IMAGE_DIR["eval"]).mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)
    _render([job for job in _jobs(world, out, ["eval"]) if Path(job[4]).stem in ids])
    questions = [q for q in world.eval_questions if q["image_id"] in ids]
    _write_jsonl(out / "eval_images.jsonl", [{"id": it.id, "image": it.image} for it in more])
    _write_jsonl(out / "eval_questions.jsonl", questions)
    _write_jsonl(out / "scenes.jsonl", [{"id": it.id, "split": it.split, "attributes": it.scene.attributes()} for it in more])
    (out / "world.json").write_text(json.dumps({**_manifest(world), "more_eval_of": str(world_dir.resolve()),
                                                "counts": {"eval": len(more), "eval_questions": len(questions)}}, indent=1) + "\n")
    return len(questions)


def write_binding(world_dir: str | Path, images: int, out_dir: str | Path) -> int:
    """The built world's unpaired images drawn on to `images` in all (its own are the first, checked against its
    scenes.jsonl) and written to out_dir (images/unpaired/, unpaired_images.jsonl; scenes.jsonl, with the world's
    eval scenes), with binding.json: every conditional colour or shape question (demo.captions.binding_questions)
    about each two-object scene among them, one a LLaVA conversation, shuffled: stage-2 data for binding, which the
    world's own conversations ask about 600 times where a learner needs thousands (docs/results.md, "Binding is
    slow to learn"). world.json last. Returns the number of questions."""
    world_dir, out = Path(world_dir), Path(out_dir)
    seed, sizes = _built(world_dir)
    if images < sizes.unpaired_images:
        raise ValueError(f"{images} images: the world has {sizes.unpaired_images} unpaired images of its own; ask for more")
    world = make_world(seed, replace(sizes, unpaired_images=images))
    scenes = [json.loads(line) for line in (world_dir / "scenes.jsonl").read_text().splitlines()]
    own = {r["id"]: r["attributes"] for r in scenes if r["split"] == "unpaired_images"}
    if [own.get(it.id) for it in world.unpaired_images[: len(own)]] != [it.scene.attributes() for it in world.unpaired_images[: len(own)]]:
        raise ValueError(f"{world_dir}/scenes.jsonl is not what its seed and sizes draw: not this world's streams")
    (out / "images" / IMAGE_DIR["unpaired_images"]).mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)
    _render(_jobs(world, out, ["unpaired_images"]))
    rng = _rng(world.seed, "unpaired_images", 4)
    samples = [{"id": it.id, "image": it.image, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                                  {"from": "gpt", "value": a}]}
               for it in world.unpaired_images for _, q, a in binding_questions(it.scene, rng)]
    samples = [samples[i] for i in rng.permutation(len(samples))]
    _write_jsonl(out / "unpaired_images.jsonl", [{"id": it.id, "image": it.image} for it in world.unpaired_images])
    _write_jsonl(out / "scenes.jsonl", [{"id": it.id, "split": it.split, "attributes": it.scene.attributes()}
                                        for it in world.unpaired_images] + [r for r in scenes if r["split"] == "eval"])
    (out / "binding.json").write_text(json.dumps(samples))
    (out / "world.json").write_text(json.dumps({**_manifest(world), "binding_of": str(world_dir.resolve()), "counts": {
        "unpaired_images": images, "binding_questions": len(samples)}}, indent=1) + "\n")
    return len(samples)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR holds this world already")
    parser.add_argument("--workers", type=int, default=0, help="rendering processes (0: one per CPU)")
    parser.add_argument("--defer", nargs="*", default=[], choices=list(IMAGE_DIR),
                        help="splits whose pictures are drawn when first read (demo.world.render_deferred), not now")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    world = build_world(args.out_dir, args.seed, args.preset, args.force, args.workers, args.defer)
    print(f"world (seed {args.seed}, {args.preset}): {len(world.image_items())} images, {len(world.unpaired_texts)} unpaired "
          f"captions, {len(world.instruct)} instruction samples, {len(world.eval_questions)} eval questions "
          f"in {args.out_dir} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
