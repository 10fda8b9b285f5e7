"""The whole paradigm on the embedded world, end to end, and the table comparing the alignment methods.

    python -m demo.pipeline --out outputs/demo [--seeds 0,1,2] [--preset default|toyllm|toy|mini]

Per seed (into OUT/seed-N/): build the world -> train its CLIP (the MiniLM dual encoder, or the toy CLIP) -> link
the converted SmolLM2 (or pre-train the toy LLM) -> image_embed.py
(unpaired images + unpaired captions, paired images, eval images) -> embed_mean.py per method -> per row:
stage 1 (script/train/pretrain.sh), stage 2 (script/train/finetune_full.sh on instruct.json with the real
image store; projector and align_stats come from the stage-1 folder), then `python -m revision.predict` on
the held-out eval images: questions (scored by revision.evaluate's short-answer scorer) and captions from the
stage-1 checkpoint (scored by attribute: demo.world.parse_caption against the scene; the table's
caption columns are strict: a caption naming the wrong number of objects scores nothing). The launchers and
embed_mean.py run as subprocesses, exactly as a user runs them; image_embed.py's main, prediction and the world's own
steps run in this process (no second import of torch and transformers); every stage's log goes to OUT/seed-N/logs/.

Rows: none, mean_shift, c3 (mean_shift's centring; stage 1 adds the noise its align_stats.json carries, 0.126),
anchor and anchor_trace (the paper's ablations: ReAlign's step 1, steps 1-2), realign, paired (stage 1 on the
paired IMAGE embeddings: the upper bound), no_stage1, and the num_visual_tokens ablation (realign with
--ablation_visual_tokens). Captions are asked of the stage-1 checkpoint (plain template: image in, caption
out) because instruct.json teaches no captioning: they measure what text-only pretraining taught about real
images, before stage 2 can wash it out.
Results (demo/report.py): OUT/results.md and OUT/results.json (mean ± std over seeds, each row's per-seed
difference from none), OUT/seed-N/results.json.
A finished stage is not run again (OUT/seed-N/done/<stage>.json holds its time): rerunning resumes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from demo import add_config_arguments, clip, config_from_arguments, dual_encoder, llm, world as toy_world
from demo.budget import BUDGETS, Budget
from demo.probes import probe_line, probe_store
from demo.report import GAP_KEYS, caption_scores, held_out_examples, qa_binding, results_document
from demo.runner import Runner, repository_root
from revision import gguf, predict
from revision.embed import main as image_embed
from revision.errors import InputError, exit_with
from revision.records import read_records
from revision.store import EmbeddingStore
from revision.store_writer import write_store

ALIGN_METHODS = ("none", "mean_shift", "c3", "anchor", "anchor_trace", "realign")
# row -> (alignment whose text store / align_stats it uses, stage-1 data: "text", "paired" or None)
ROWS = {
    "none": ("none", "text"),
    "mean_shift": ("mean_shift", "text"),
    "c3": ("c3", "text"),
    "realign": ("realign", "text"),
    "anchor": ("anchor", "text"),              # the paper's ablations: ReAlign's step 1 only,
    "anchor_trace": ("anchor_trace", "text"),  # and steps 1-2 without the centroid correction
    "paired": ("none", "paired"),
    "no_stage1": ("none", None),
}



def prepare(run: Runner, seed: int, budget: Budget, methods: Sequence[str] = ALIGN_METHODS,
            paired_store: bool = True, eval_store: bool = True) -> dict[str, Path]:
    """World, CLIP, LLM, embedding stores and one aligned text store per method; returns the paths."""
    py, d = sys.executable, run.run_dir
    paths = {"world": d / "world", "clip": d / "clip", "llm": d / "llm", "embeds": d / "embeds", "align": d / "align"}
    world, emb = str(paths["world"]), paths["embeds"]
    if budget.llm == "smollm2":  # converted once per machine into the GGUF cache, shared by every run and seed: one
        # core for about 15 s, beside the world and the encoder (which leave part of the second core free)
        converted = run.background("smollm2_llm", [py, "-m", "revision.gguf", gguf.SMOLLM2])
        run.overlapped.add("smollm2_llm")
    # the dual encoder draws its own pictures of the paired captions: the world's 8000 are drawn only if a stage reads them
    defer = ["--defer", "paired"] if budget.encoder == "minilm" else []
    run("world", partial(toy_world.main, [world, "--seed", str(seed), "--preset", budget.world, *defer]))
    clip_main = {"toy": clip.main, "minilm": dual_encoder.main}[budget.encoder]
    run(f"{budget.encoder}_clip", partial(clip_main, ["--world", world, "--out", str(paths["clip"]), "--seed", str(seed),
                                                      "--steps", str(budget.clip_steps), "--skip_measure",
                                                      *(["--pretrain_steps", str(budget.clip_pretrain_steps),
                                                           "--cell_weight", str(budget.clip_cell_weight),
                                                           "--convs", budget.clip_convs, "--activation", budget.clip_activation,
                                                           "--pool_hidden", str(budget.clip_pool_hidden),
                                                           "--linear_slots", str(budget.clip_linear_slots),
                                                           "--pool_queries", str(budget.clip_pool_queries),
                                                           "--bf16", str(budget.bf16)]
                                                        if budget.encoder == "minilm" else [])]))
    if budget.llm == "smollm2":
        converted()
        link_smollm2(paths["llm"])
    else:
        run("toy_llm", partial(llm.main, ["--world", world, "--out", str(paths["llm"]), "--seed", str(seed),
                                          "--steps", str(budget.llm_steps)]))
    # image_embed.py's main (revision.embed.main) in this process, as prediction is: a subprocess would import torch
    # and transformers again (about 8 s a store on 2 cores) before embedding a world's few thousand pictures
    def embed(name: str, *args: str) -> None:
        run(name, partial(image_embed, ["--encoder", str(paths["clip"]), "--store_dtype", "float32", "--num_workers", "0", *args]))

    embed("embed_unpaired", "--images", f"{world}/unpaired_images.jsonl", "--texts", f"{world}/unpaired_texts.jsonl",
          "--out", str(emb / "unpaired"))
    if paired_store:
        run("world_paired_pictures", lambda: print("drawn:", toy_world.render_deferred(paths["world"]) or "nothing deferred"))
        embed("embed_paired", "--images", f"{world}/paired.jsonl", "--out", str(emb / "paired"))
    if eval_store:
        embed("embed_eval", "--images", f"{world}/eval_images.jsonl", "--out", str(emb / "eval"))
        run("embed_eval_blind", partial(write_blind_store, emb / "unpaired" / "image", emb / "eval" / "image",
                                        emb / "eval_blind" / "image"))
    run("probes", partial(write_probes, paths["world"], emb / "unpaired", d / "probes.json"))
    held_out_source = eval_store and budget.captions  # the text rows' held-out source: the eval images' reference captions
    if held_out_source:
        embed("embed_eval_captions", "--texts", f"{world}/eval_captions.jsonl", "--out", str(emb / "eval_captions"))
    for method in methods:
        run(f"align_{method}", [py, "embed_mean.py", "--text", str(emb / "unpaired" / "text"), "--image",
                                str(emb / "unpaired" / "image"), "--out", str(paths["align"] / method), "--method", method,
                                "--overwrite", "--quiet", "--seed", str(seed)])
        if held_out_source:  # the same captions through the method's fitted text map (c3: without its training noise)
            run(f"align_eval_captions_{method}", [
                py, "embed_mean.py", "--text", str(emb / "eval_captions" / "text"), "--out", str(d / "align_eval" / method),
                "--apply_stats", str(paths["align"] / method), "--method", method, "--overwrite", "--quiet", "--no_report"])
    return paths


def write_blind_store(unpaired: Path, eval_store: Path, out: Path) -> None:
    """The eval images' store with every embedding replaced by the mean unpaired image embedding: the same
    checkpoint answering from it has no image information (the table's qa_acc_blind)."""
    mean = EmbeddingStore(unpaired).load_all().embeds.astype(np.float64).mean(0)
    store = EmbeddingStore(eval_store)
    shard = store.load_all()
    blind = np.repeat((mean / np.linalg.norm(mean))[None].astype(np.float32), len(shard.ids), axis=0)
    # the image paths too: prediction looks a question's image up by path, and must never fall back to the file
    write_store(out, "image", shard.ids, blind, sources=shard.sources, encoder=store.encoder,
                dtype="float32", overwrite=True)
    print(f"{out}: {len(shard.ids)} eval ids, each with the mean of {unpaired}")


def write_probes(world: Path, stores: Path, out: Path) -> None:
    """Linear probes of what the CLIP's image and caption embeddings carry (demo.probes)."""
    try:
        results = {kind: probe_store(stores / kind, world) for kind in ("image", "text")}
    except ValueError as e:  # a world too small to probe (the mini preset): said, not fatal
        results = {"skipped": str(e)}
    out.write_text(json.dumps(results, indent=1) + "\n")
    for kind, result in results.items():
        print(f"probes ({kind} embeddings): {probe_line(result)}" if kind != "skipped" else f"probes skipped: {result}")


def link_smollm2(link: Path) -> None:
    """RUN/llm -> SmolLM2's converted folder (converting it first if this machine never did: `python -m
    revision.gguf smollm2` does it beside the first stages)."""
    point_at(link, gguf.convert_gguf(gguf.SMOLLM2))


def point_at(link: Path, folder: Path) -> None:
    """Make `link` a symlink to `folder`, replacing one that points elsewhere (a conversion this machine no longer
    has: its cache key changes with the converter's version; a run folder copied from another machine)."""
    target = folder.resolve()
    if link.is_symlink() and link.resolve() != target:
        link.unlink(missing_ok=True)  # another run of the same seed may have replaced it first
    try:
        link.symlink_to(target, target_is_directory=True)
    except FileExistsError:  # another run of the same seed linked it first
        if link.resolve() != target:
            raise
    print(f"{link} -> {target}")


def train_env(budget: Budget, seed: int, visual_tokens: int, epochs: float, lr: float, extra: str = "",
              batch: int = 0) -> dict[str, str]:
    extra = (f"--disable_tqdm true --save_strategy no --logging_steps 25 --dataloader_num_workers 0 --seed {seed} "
             f"--optim adamw_torch_fused {extra}").strip()  # fused AdamW: 0.87x a SmolLM2 stage-2 step on CPU
    extra += " --bf16 true" * budget.bf16 + " --group_by_length true" * budget.group_by_length
    if budget.max_steps > 0:
        extra += f" --max_steps {budget.max_steps}"
    return {"VISUAL_TOKENS": str(visual_tokens), "MAX_LENGTH": str(budget.max_length + visual_tokens),
            "BATCH": str(batch or budget.batch), "GLOBAL_BATCH": str(batch or budget.batch), "EPOCHS": str(epochs), "LR": str(lr),
            "EXTRA": extra}


def write_caption_questions(world: Path, path: Path, by: str = "image") -> None:
    """The eval images as a question file for the captioning (plain template) checkpoint: each names its image
    (by="image") or its embedding's id (by="embedding": the eval caption of that id in an aligned text store)."""
    rows = read_records(world / "eval_captions.jsonl")
    key = {"image": "image", "embedding": "id"}[by]
    path.write_text("".join(json.dumps({"question_id": r["id"], "text": "", by: r[key]}) + "\n" for r in rows))


def gap_metrics(align_dir: Path) -> dict[str, float]:
    report = json.loads((align_dir / "gap_report.json").read_text())
    return {f"{k}_{when}": report[when][k] for when in ("before", "after") for k in ("centroid_distance", "linear_probe_acc")}


def final_loss(output_dir: Path, last: int = 3) -> float:
    """Mean of the last logged training losses of a train.py run (its trainer_state.json); a run too short to
    log any: its mean training loss."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h][-last:]
    return float(np.mean(losses)) if losses else float(history[-1]["train_loss"])


def run_row(run: Runner, name: str, paths: dict[str, Path], budget: Budget, seed: int, visual_tokens: int) -> dict[str, Any]:
    """Stage 1 (unless no_stage1), stage 2 and prediction for one row; its metrics and seconds."""
    method, stage1_data = ROWS[name.split("@")[0]]
    world, align = paths["world"], paths["align"] / method
    out = run.run_dir / "runs" / name
    common = {"MODEL": str(paths["llm"])}
    names = []
    if stage1_data:
        data, store = ((world / "pretrain.json", align) if stage1_data == "text" else
                       (world / "pretrain_paired.json", paths["embeds"] / "paired" / "image"))
        run(f"{name}.stage1", ["bash", "script/train/pretrain.sh"], {
            **common, **train_env(budget, seed, visual_tokens, budget.stage1_epochs, budget.stage1_lr,
                                  f"--mm_projector_tokens {budget.projector_tokens}"),
            "DATA": str(data), "EMBED_FOLDER": str(store), "OUTPUT": str(out / "stage1"), "PROJECTOR": budget.projector,
            # recorded in the stage-1 checkpoint: captioning real images then applies the method's image_map
            **({"ALIGN_STATS": str(align / "align_stats.json")} if stage1_data == "text" else {})})
        names.append(f"{name}.stage1")
    # bf16 weights where the CPU has bf16 units, as the training steps' autocast: the 300 questions in 10.4 s against
    # 19.3 s in fp32 on 2 cores (answers of the demo's checkpoint: 2 of 300 differ, accuracy 0.730 against 0.723)
    predict_args = ["--image_root", str(world), "--embed_folder", str(paths["embeds"] / "eval" / "image"), "--batch_size", "64",
                    *(["--dtype", "bfloat16"] if budget.bf16 else [])]
    result: dict[str, Any] = {}
    if budget.stage2:
        names += run_stage2(run, name, paths, budget, seed, visual_tokens, stage1_data, out, predict_args)
        qa = json.loads((out / "qa_answers.metrics.json").read_text())
        blind = json.loads((out / "qa_answers_blind.metrics.json").read_text())
        result.update(qa_acc=qa["accuracy"], qa_acc_blind=blind["accuracy"],
                      qa_per_category={c: v["accuracy"] for c, v in qa["per_category"].items()},
                      qa_per_category_n={c: v["n"] for c, v in qa["per_category"].items()},
                      qa_per_category_blind={c: v["accuracy"] for c, v in blind["per_category"].items()},
                      stage2_loss=final_loss(out / "stage2"))
        binding = qa_binding(out / "qa_answers.jsonl", world)
        result.update(qa_by_objects=binding["accuracy"], qa_swaps=binding["swaps"])
    if stage1_data and budget.captions:
        # what text-only stage 1 taught about real images, before stage 2: captions of the held-out eval images,
        # and (the row's own held-out source) of their reference captions through the method's text map
        sources = {"": ("image", predict_args, [])}
        if stage1_data == "text":
            sources["source_"] = ("embedding", ["--embed_folder", str(run.run_dir / "align_eval" / method),
                                                "--batch_size", "64"], ["--mapped"])
        for prefix, (by, where, extra) in sources.items():
            questions = run.run_dir / f"eval_caption_questions_by_{by}.jsonl"
            if not questions.is_file():  # one file per run folder, shared by its rows (the world never changes there)
                write_caption_questions(world, questions, by)
            stage = f"{name}.predict_{prefix}captions"
            run(stage, partial(predict.main, [*where, *extra, "--model", str(out / "stage1"), "--questions", str(questions),
                                              "--answers", str(out / f"{prefix}caption_answers.jsonl"),
                                              "--max_new_tokens", str(budget.caption_tokens)]))
            names.append(stage)
            captions = caption_scores(out / f"{prefix}caption_answers.jsonl", world)
            (out / f"{prefix}caption_metrics.json").write_text(json.dumps(captions, indent=1) + "\n")
            named = {"acc": "strict_attribute_acc", "count_acc": "count_acc", "lenient_acc": "attribute_acc",
                     "all_correct": "all_correct", "per_attribute": "strict_per_attribute", "by_objects": "strict_by_objects",
                     "by_objects_attribute": "strict_by_objects_attribute"}
            result.update({f"{prefix}caption_{key}": captions[field] for key, field in named.items()})
            result.update({f"{prefix}caption_{k}": v for k, v in captions["strict_per_attribute"].items()})
    if stage1_data == "text":
        result.update(gap_metrics(align))
    if stage1_data:
        result["stage1_loss"] = final_loss(out / "stage1")
    result["visual_tokens"] = visual_tokens
    result["seconds"] = sum(run.times[n] for n in names)
    return result


def qa_arguments(questions: Path, checkpoint: Path, max_new_tokens: int) -> list[str]:
    """predict.py's flags for short answers to a world's questions file, scored against its own answers."""
    return ["--questions", str(questions), "--references", str(questions), "--task", "short",
            "--max_new_tokens", str(max_new_tokens), "--model", str(checkpoint)]


def stage2_flags(budget: Budget, after_stage1: bool) -> str:
    """train.py flags of stage 2 the budget sets, beyond train_env's (the row's stage-1 folder gives the rest)."""
    return " ".join([
        *([f"--mm_projector_lr {budget.stage2_projector_lr}"] if budget.stage2_projector_lr > 0 else []),
        *([f"--tune_llm_top_layers {budget.stage2_top_layers}"] if budget.stage2_top_layers > 0 else []),
        *(["--split_turns true"] if budget.stage2_split_turns else []),
        *([f"--image_placement {budget.image_placement}"] if budget.image_placement else []),
        *([] if after_stage1 else [f"--mm_projector_tokens {budget.projector_tokens}"]),  # else inherited from stage 1
        *(["--system_prompt ''"] if budget.empty_system_prompt else [])])


def run_stage2(run: Runner, name: str, paths: dict[str, Path], budget: Budget, seed: int, visual_tokens: int,
               stage1_data: str | None, out: Path, predict_args: list[str]) -> list[str]:
    """Stage 2 on the instruction data and the real image store, then the held-out questions, seeing and blind;
    the names of the stages run."""
    method, world = ROWS[name.split("@")[0]][0], paths["world"]
    stage2_env = {"MODEL": str(paths["llm"]), **train_env(budget, seed, visual_tokens, budget.stage2_epochs, budget.stage2_lr,
                                                            stage2_flags(budget, bool(stage1_data)), budget.stage2_batch),
                  "DATA": str(world / "instruct.json"), "EMBED_FOLDER": str(paths["embeds"] / "unpaired" / "image"),
                  "OUTPUT": str(out / "stage2")}
    if stage1_data:  # the short form: projector and alignment come from the stage-1 folder
        stage2_env["PRETRAIN_ADAPTER"] = str(out / "stage1")
    else:
        stage2_env.update(ALIGN_STATS=str(paths["align"] / method / "align_stats.json"), PROJECTOR=budget.projector)
    run(f"{name}.stage2", ["bash", "script/train/finetune_full.sh"], stage2_env)
    questions = qa_arguments(world / "eval_questions.jsonl", out / "stage2", budget.answer_tokens)
    run(f"{name}.predict_qa", partial(predict.main, [*predict_args, *questions, "--answers", str(out / "qa_answers.jsonl")]))
    # the same checkpoint with every image replaced by the mean image embedding: what it answers without seeing;
    # image_root without images: an image missing from the blind store is an error row, never seen
    run(f"{name}.predict_qa_blind", partial(predict.main, [
        "--image_root", str(paths["embeds"] / "eval_blind"), "--embed_folder", str(paths["embeds"] / "eval_blind" / "image"),
        *predict_args[4:], *questions, "--answers", str(out / "qa_answers_blind.jsonl")]))
    return [f"{name}.stage2", f"{name}.predict_qa", f"{name}.predict_qa_blind"]


def run_seed(out: Path, seed: int, budget: Budget, rows: Sequence[str], ablation_visual_tokens: int,
             repo: str | Path | None = None) -> dict[str, Any]:
    run = Runner(out / f"seed-{seed}", seed, budget, repo)
    methods = sorted({ROWS[r][0] for r in rows} | ({"realign"} if ablation_visual_tokens else set()), key=ALIGN_METHODS.index)
    paths = prepare(run, seed, budget, methods, paired_store="paired" in rows)
    results = {name: run_row(run, name, paths, budget, seed, budget.visual_tokens) for name in rows}
    if ablation_visual_tokens:
        name = f"realign@vt{ablation_visual_tokens}"
        results[name] = run_row(run, name, paths, budget, seed, ablation_visual_tokens)
    # the CLIP's gap before alignment, as embed_mean.py measured it on the unpaired stores (revision.gap)
    before = json.loads((paths["align"] / methods[0] / "gap_report.json").read_text())["before"]
    summary = {"seed": seed, "budget": asdict(budget), "rows": results, "stage_seconds": run.times,
               # cached stages count with their recorded time; those run beside others do not count
               "wall_seconds": sum(t for name, t in run.times.items() if name not in run.overlapped),
               "clip": {k: before[k] for k in GAP_KEYS}, "probes": json.loads((run.run_dir / "probes.json").read_text())}
    (run.run_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/toy-demo")
    parser.add_argument("--preset", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--seeds", default="0", help="comma-separated world/model seeds; the table gives mean ± std")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--ablation_visual_tokens", type=int, default=0,
                        help="also run realign with this many visual tokens (0: no ablation row)")
    parser.add_argument("--repo", default=None,
                        help="the ReVision checkout whose scripts the stages run (default: the current directory)")
    add_config_arguments(parser, Budget(), overrides_only=True, skip=("world",))  # the world is the preset's
    args = parser.parse_args(argv)
    try:
        repo = repository_root(args.repo)
    except InputError as e:
        exit_with(e, prog=parser.prog)
    budget = config_from_arguments(args, BUDGETS[args.preset])
    torch.set_num_threads(budget.threads)  # the in-process stages (toy CLIP, toy LLM, prediction)
    out = Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if not budget.stage2 and (not budget.captions or "no_stage1" in rows):
        parser.error("--stage2 false measures stage 1 by its captions: it needs --captions true and no no_stage1 row")
    start = time.perf_counter()
    summaries = [run_seed(out, seed, budget, rows, args.ablation_visual_tokens, repo) for seed in seeds]
    command = "python -m demo.pipeline " + shlex.join(argv if argv is not None else sys.argv[1:])
    text, numbers = results_document(
        summaries, f"Embedded-world results ({args.preset} preset: {budget.encoder} CLIP, {budget.llm} LLM; seeds {args.seeds})",
        command)
    text += f"\nWall time of this invocation: {time.perf_counter() - start:.0f} s\n"
    row = "realign" if "realign" in rows else rows[0]
    if budget.show and budget.stage2:
        text += "\n" + held_out_examples(out / f"seed-{seeds[0]}", row, budget.show) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({**numbers, "seeds": seeds, "budget": asdict(budget), "command": command,
                                                  "per_seed": summaries}, indent=1) + "\n")
    print(text)
    if budget.stage2:
        web = "" if importlib.util.find_spec("gradio") else " (after `make install`: `make demo` installs no Gradio)"
        print(f"Ask it about an image in the browser{web}: {serve_command(out / f'seed-{seeds[0]}' / 'runs' / row / 'stage2')}")


def serve_command(checkpoint: Path) -> str:
    """The command that opens the web demo (revision.serve) on a checkpoint, paths relative to here when inside."""
    def short(path: str | Path) -> str:
        return os.path.relpath(path) if Path(path).absolute().is_relative_to(Path.cwd()) else str(path)

    return shlex.join([short(sys.executable), "-m", "revision.serve", "--model", short(checkpoint)])


if __name__ == "__main__":
    main()
