"""Packing (revision/packing.py): packed rows give every sample the loss, logits and gradients it gets alone;
rows never split a visual block; training with --packing matches padded training and resumes exactly."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from demo.tiny.lm import build_tiny_lm
from revision.data import DataCollator, EmbeddingTable, SupervisedDataset
from revision.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, RevisionConfig, RevisionModel
from revision.packing import EpochLengthGroupedSampler, PackingCollator, pack_rows, padding_share, row_layout
from test_train import REPO, flags, losses, run

VISUAL, DIM = 3, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(attn: str = "sdpa") -> RevisionModel:
    llm = build_tiny_lm(hidden_size=32, num_layers=2)
    llm.config._attn_implementation = attn
    torch.manual_seed(1)
    return RevisionModel(llm, RevisionConfig(embed_dim=DIM, hidden_size=32, num_visual_tokens=VISUAL))


def sample(seed: int, text: int, image: bool = True) -> dict:
    """bos, the visual block, `text` trained tokens (the plain template's shape); image-free: text only, all
    trained (so packing must mask its first label, which a padded row never predicts)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(10, 30, (text,), generator=g)
    if not image:
        return {"input_ids": words, "labels": words.clone(), "image_embeds": None}
    ids = torch.cat([torch.tensor([2]), torch.full((VISUAL,), IMAGE_TOKEN_INDEX), words])
    labels = torch.where(torch.arange(len(ids)) > VISUAL, ids, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "image_embeds": torch.randn(DIM, generator=g) if image else None}


FEATURES = [sample(0, 9), sample(1, 4), sample(2, 13, image=False), sample(3, 6), sample(4, 2)]


def positions(batch: dict, i: int) -> torch.Tensor:
    """Where sample i is: by image_index in packed rows, row i up to its length in padded ones."""
    if "image_index" in batch:
        return batch["image_index"] == i
    return (torch.arange(len(batch["input_ids"]))[:, None] == i) & batch["attention_mask"]


def per_sample_losses(logits: torch.Tensor, batch: dict, count: int) -> torch.Tensor:
    """Mean next-token loss of each sample."""
    out = []
    for i in range(count):
        where = positions(batch, i)
        out.append(F.cross_entropy(logits[where][:-1], batch["labels"][where][1:], ignore_index=IGNORE_INDEX))
    return torch.stack(out)


def test_pack_rows_and_layout():
    rows = pack_rows([5, 3, 4, 2, 6], capacity=8)
    assert rows == [[4, 3], [0, 1], [2]]  # longest first, first fit
    assert all(sum([5, 3, 4, 2, 6][i] for i in row) <= 8 for row in rows)
    with pytest.raises(ValueError, match="sample 1 of the batch has 9 tokens, more than a packed row holds"):
        pack_rows([3, 9], capacity=8)
    # eight 600-token samples pack 3+3+2 into rows of 2048 (11% padding); one a row pads nothing
    assert row_layout([600] * 8, 2048) == [[i] for i in range(8)]
    assert padding_share([600] * 8, 8, capacity=2048) == 0.0
    assert padding_share([10, 20, 30, 40], 4) == pytest.approx(1 - 100 / 160)
    assert padding_share([10, 20, 30, 40], 4, capacity=64) == pytest.approx(1 - 100 / 120)  # rows 40+20, 30+10


def test_transformers_block_mask_needs_no_cache():
    """What RevisionModel.forward relies on: given restarting position_ids and no attention mask, transformers'
    SDPA/eager path masks attention across samples, but only when no KV cache is made (use_cache=False)."""
    llm = build_tiny_lm(hidden_size=32, num_layers=2).eval()
    a, a2, b = torch.randint(10, 30, (3, 1, 5)).unbind(0)
    b = torch.cat([b, torch.randint(10, 30, (1, 3))], 1)
    position_ids = torch.cat([torch.arange(5), torch.arange(8)])[None]
    with torch.no_grad():
        alone = llm(input_ids=b).logits
        for use_cache, separate in ((None, False), (False, True)):
            packed = llm(input_ids=torch.cat([a, b], 1), position_ids=position_ids, use_cache=use_cache).logits
            other = llm(input_ids=torch.cat([a2, b], 1), position_ids=position_ids, use_cache=use_cache).logits
            assert torch.allclose(packed[:, 5:], alone, atol=1e-5) is separate
            assert torch.allclose(packed[:, 5:], other[:, 5:], atol=1e-6) is separate


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_give_the_same_losses_and_projector_gradients(attn):
    model = tiny_model(attn).train()
    padded = DataCollator(0, DIM)(FEATURES)
    packed = PackingCollator(0, DIM, max_length=30)(FEATURES)
    assert packed["input_ids"].shape == (2, 26) and "attention_mask" not in packed  # 5 samples in 2 rows
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.projector.parameters()])
        with torch.no_grad():  # training computes no logits (revision/loss.py): the same weights in eval mode do
            logits = model.eval()(**batch).logits
        model.train()
        batch["per_sample"] = per_sample_losses(logits, batch, len(FEATURES))
        batch["loss"] = out.loss.detach()
    assert torch.allclose(packed["per_sample"], padded["per_sample"], atol=1e-5), (packed["per_sample"], padded["per_sample"])
    assert torch.allclose(packed["loss"], padded["loss"], atol=1e-5)
    for g_padded, g_packed in zip(*grads):
        assert g_padded.abs().sum() > 0 and torch.allclose(g_packed, g_padded, atol=1e-6, rtol=1e-5)


def test_changing_one_sample_leaves_the_others_alone():
    model = tiny_model().eval()
    changed = list(FEATURES)
    changed[1] = {**sample(9, 4), "image_embeds": -FEATURES[1]["image_embeds"]}  # same length: same layout
    collate = PackingCollator(0, DIM, max_length=64)
    batch, other = collate(FEATURES), collate(changed)
    assert batch["input_ids"].shape[0] == 1  # every sample in one row
    with torch.no_grad():
        logits, other_logits = model(**batch).logits, model(**other).logits
    mine = batch["image_index"] == 1
    assert not torch.allclose(logits[mine], other_logits[mine], atol=1e-3)
    assert torch.allclose(logits[~mine], other_logits[~mine], atol=1e-6)


def test_rows_hold_whole_samples_and_visual_blocks(tiny_world):
    store, data = tiny_world["image"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["model"])
    visual, max_length = 16, 40
    dataset = SupervisedDataset(data, tokenizer, EmbeddingTable(store, None), "chat", visual, max_length)
    collate = PackingCollator(tokenizer.pad_token_id, 16, max_length)
    features = [dataset[i] for i in range(len(dataset))]
    for start in range(0, len(features), 8):
        chunk = features[start: start + 8]
        batch = collate(chunk)
        assert batch["input_ids"].shape[1] <= max_length
        visual_rows = 0
        for r in range(len(batch["input_ids"])):
            ids, index, positions = batch["input_ids"][r], batch["image_index"][r], batch["position_ids"][r]
            is_visual = (ids == IMAGE_TOKEN_INDEX).int()
            starts = (is_visual.diff(prepend=torch.tensor([0])) == 1).nonzero().flatten()
            for s in starts.tolist():  # each block: `visual` positions of one sample, inside that sample
                assert is_visual[s: s + visual].all() and (s + visual == len(ids) or not is_visual[s + visual])
                assert (index[s: s + visual] == index[s]).all() and positions[s] > 0
            visual_rows += len(starts)
            for i in index[index >= 0].unique().tolist():  # a sample's positions: one run restarting at 0
                where = (index == i).nonzero().flatten()
                assert where.diff().eq(1).all() and positions[where].tolist() == list(range(len(chunk[i]["input_ids"])))
                assert batch["labels"][r, where[0]] == IGNORE_INDEX
        assert visual_rows == sum(f["image_embeds"] is not None for f in chunk)


def test_flattened_rows_give_flash_varlen_kwargs():
    batch = PackingCollator(0, DIM, max_length=30, flatten=True)(FEATURES)
    lengths = [len(f["input_ids"]) for f in FEATURES]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == max(lengths)
    # transformers derives the same boundaries from our position_ids (its fallback when the kwargs are absent)
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.tolist() == batch["cu_seq_lens_q"].tolist() and int(max_q) == max(lengths)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_training_with_packing_matches_padded_training(tiny_world, tmp_path, stage):
    common = ["--max_steps", "4", "--learning_rate", "1e-2", "--per_device_train_batch_size", "12"]
    torch.manual_seed(0)  # the projector is drawn before the Trainer seeds: the same one in both runs
    padded = run(tiny_world, tmp_path / "padded", stage, *common)
    torch.manual_seed(0)
    packed = run(tiny_world, tmp_path / "packed", stage, *common, "--packing", "--gradient_checkpointing")
    batch = packed.data_collator([packed.train_dataset[i] for i in range(12)])
    assert len(batch["input_ids"]) < 12  # several samples a row
    assert type(packed.data_collator).__name__ == "PackingCollator"
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-5)
    for a, b in zip(packed.model.projector.parameters(), padded.model.projector.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_with_packing_gives_the_same_losses(tiny_world, tmp_path):
    common = ["--max_steps", "8", "--learning_rate", "1e-2", "--embed_noise_std", "0.05", "--packing"]
    full = run(tiny_world, tmp_path / "full", "finetune", *common, "--save_strategy", "steps", "--save_steps", "4")
    resumed = run(tiny_world, tmp_path / "resumed", "finetune", *common,
                  "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-4"))
    assert len(losses(resumed, after_step=4)) == 4
    assert losses(resumed, after_step=4) == pytest.approx(losses(full, after_step=4), rel=1e-5)


def test_deepspeed_zero3_with_packing_matches_plain_training(tiny_world, tmp_path, free_port):
    run(tiny_world, tmp_path / "s1", "pretrain", "--max_steps", "1")
    common = ["--max_steps", "3", "--learning_rate", "1e-2", "--packing", "--pretrain_mm_mlp_adapter", str(tmp_path / "s1")]
    plain = run(tiny_world, tmp_path / "plain", "finetune", *common)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": free_port, "OMP_NUM_THREADS": "1"}
    # as in test_train: skip the shared-memory allreduce DeepSpeed's CPU backend would compile for one process
    child = ("import importlib, sys; importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None\n"
             "from revision.train import main; main(sys.argv[1:])")
    args = flags(tiny_world, tmp_path / "ds", "finetune", *common,
                 "--deepspeed", str(REPO / "script" / "deepspeed" / "zero3.json"))
    done = subprocess.run([sys.executable, "-c", child, *args], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "ds" / "trainer_state.json").read_text())["log_history"]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx(losses(plain), rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs CUDA and flash-attn")
def test_flash_varlen_packing_matches_padded_on_gpu():
    model = tiny_model("flash_attention_2").to("cuda", torch.bfloat16).eval()
    to_gpu = lambda batch: {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    padded = DataCollator(0, DIM)(FEATURES)
    packed = PackingCollator(0, DIM, max_length=30, flatten=True)(FEATURES)
    with torch.no_grad():
        losses_padded = per_sample_losses(model(**to_gpu(padded)).logits.float().cpu(), padded, len(FEATURES))
        losses_packed = per_sample_losses(model(**to_gpu(packed)).logits.float().cpu(), packed, len(FEATURES))
    assert torch.allclose(losses_packed, losses_padded, atol=2e-2)


def test_length_grouped_resume_in_a_later_epoch_gives_the_same_losses(tiny_world, tmp_path):
    """68 samples, batches of 8: 9 steps an epoch; resuming at step 11 replays epoch 2's length-grouped order."""
    common = ["--max_steps", "14", "--learning_rate", "1e-2", "--group_by_length", "--packing"]
    full = run(tiny_world, tmp_path / "full", "finetune", *common, "--save_strategy", "steps", "--save_steps", "11")
    resumed = run(tiny_world, tmp_path / "resumed", "finetune", *common,
                  "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-11"))
    assert losses(resumed, after_step=11) == pytest.approx(losses(full, after_step=11), rel=1e-5)
    assert full._get_train_sampler().lengths == full.train_dataset.lengths  # the estimates: no tokenizing


def test_length_grouped_sampler_orders_by_seed_and_epoch():
    lengths = torch.randint(1, 100, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = EpochLengthGroupedSampler(8, lengths, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and list(sampler) == first
    assert list(EpochLengthGroupedSampler(8, lengths, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert padding_share([lengths[i] for i in first], 8) < 0.1 < 0.4 < padding_share(lengths, 8)
