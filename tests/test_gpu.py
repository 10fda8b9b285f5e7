"""The GPU paths: bf16 + SDPA (flash-attn 2 when installed), the `deepspeed` launcher with ZeRO-2 and ZeRO-3,
encoding and prediction on CUDA. Skipped on a machine without CUDA (CI has none); run them where one is:
`pytest -q tests/test_gpu.py`."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo.tiny.clip import build_tiny_clip
from demo.tiny.lm import make_tiny_training_world
from revision.encoders import load_encoder
from revision.infer import Predictor
from revision.model import RevisionModel, default_attn_implementation
from revision.store import EmbeddingStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = Path(__file__).resolve().parents[1]
VISUAL = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_tiny_training_world(tmp_path_factory.mktemp("gpu_world"), hidden_size=64, num_layers=2, n=128)


def test_bf16_sdpa_loss_matches_fp32_eager_on_cpu(world):
    batch = {"input_ids": torch.tensor([[1, -200, -200, -200, -200, 5, 6, 7, 8, 9, 2]] * 4)}
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] < 0, -100)
    batch["image_embeds"] = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    reference = RevisionModel.from_llm(world["model"], 16, num_visual_tokens=VISUAL, attn_implementation="eager")
    with torch.no_grad():
        expected = reference(**batch).loss.item()
    model = RevisionModel.from_llm(world["model"], 16, num_visual_tokens=VISUAL, dtype=torch.bfloat16,
                                   attn_implementation=default_attn_implementation()).cuda()
    model.projector.load_state_dict(reference.projector.state_dict())
    loss = model(**{k: v.cuda() for k, v in batch.items()}).loss
    loss.backward()
    assert loss.dtype == torch.float32 or loss.dtype == torch.bfloat16
    assert abs(loss.item() - expected) / expected < 0.02, (loss.item(), expected)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def launcher(script: str, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    full = {**os.environ, "GPUS": "1", "BATCH": "8", "GLOBAL_BATCH": "16", "VISUAL_TOKENS": str(VISUAL),
            "MAX_LENGTH": "48", "MASTER_PORT": "29561", **env}
    return subprocess.run(["bash", str(REPO / "script" / "train" / script)], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_deepspeed_launchers_zero2_then_zero3_bf16(world, tmp_path):
    """pretrain.sh (ZeRO-2) then finetune_full.sh (ZeRO-3) through the `deepspeed` launcher, bf16 on the GPU."""
    store, data = world["text"]
    stage1 = launcher("pretrain.sh", {"MODEL": world["model"], "DATA": str(data), "EMBED_FOLDER": str(store),
                                      "OUTPUT": str(tmp_path / "s1"), "LR": "1e-2",
                                      "EXTRA": "--max_steps 6 --disable_tqdm true --save_strategy no"}, tmp_path)
    assert stage1.returncode == 0, stage1.stderr[-4000:]
    state = json.loads((tmp_path / "s1" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)

    store, data = world["image"]
    stage2 = launcher("finetune_full.sh", {"MODEL": world["model"], "DATA": str(data), "EMBED_FOLDER": str(store),
                                           "OUTPUT": str(tmp_path / "s2"), "PRETRAIN_ADAPTER": str(tmp_path / "s1"),
                                           "DEEPSPEED": "script/deepspeed/zero3.json", "LR": "1e-3",
                                           "EXTRA": "--max_steps 4 --disable_tqdm true --save_strategy no"}, tmp_path)
    assert stage2.returncode == 0, stage2.stderr[-4000:]
    trained = RevisionModel.from_pretrained(tmp_path / "s2")
    base = RevisionModel.from_llm(world["model"], 16)
    assert not torch.equal(trained.llm.lm_head.weight.float(), base.llm.lm_head.weight.float())  # ZeRO-3 gathered real weights
    assert trained.llm.lm_head.weight.shape == base.llm.lm_head.weight.shape

    predictor = Predictor(tmp_path / "s2", device="cuda")  # bf16 on the GPU
    assert predictor.device.type == "cuda" and predictor.dtype in (torch.bfloat16, torch.float16)
    embeds = EmbeddingStore(store).load_all().embeds[:3]
    answers = predictor.answer_batch(["what colour is it ?"] * 3, list(embeds), max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_encoder_bf16_on_cuda_matches_fp32_on_cpu(tmp_path):
    folder = build_tiny_clip(tmp_path / "clip", seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(8)]
    texts = ["a red circle", "a blue square", "two shapes", "a photo"]
    cpu = load_encoder(str(folder), device="cpu")
    gpu = load_encoder(str(folder), device="cuda")
    assert gpu.device.type == "cuda"
    for a, b in ((cpu.encode_images(images), gpu.encode_images(images)), (cpu.encode_texts(texts), gpu.encode_texts(texts))):
        cosine = torch.nn.functional.cosine_similarity(a.float(), b.float().cpu(), dim=-1)
        assert cosine.min() > 0.99, cosine
