"""bench/train_step.py's samples: the throughput tables build batches as training does, image-free samples too."""
import importlib.util
from pathlib import Path

import torch

from revision.data import DataCollator
from revision.model import IMAGE_TOKEN_INDEX

_spec = importlib.util.spec_from_file_location("train_step", Path(__file__).resolve().parents[1] / "bench" / "train_step.py")
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


def test_stage2_samples_with_a_long_visual_block_keep_image_free_chats_whole():
    # the toy world's stage 2 mixes image-free chats in; with 64 visual tokens (576 on the GPU) some are shorter than
    # the block, which must not be cut from them (it once raised "negative dimension" on the H200)
    tokens, estimates, visuals = train_step.toy_lengths(2, 64, 80, 2048)
    free = [i for i, v in enumerate(visuals) if v == 0]
    assert free and any(tokens[i] < 64 for i in free), "the toy world has no short image-free chat to test with"
    samples = train_step.caption_samples(tokens, visuals, 500)
    for i, sample in enumerate(samples):
        assert len(sample["input_ids"]) == tokens[i]
        assert int((sample["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == visuals[i]
        assert (sample["image_embeds"] is None) == (visuals[i] == 0)
    batch = DataCollator(0, train_step.EMBED_DIM)([samples[i] for i in (free[0], visuals.index(64))])
    assert batch["image_embeds"].shape == (2, train_step.EMBED_DIM)
    assert torch.all(batch["image_embeds"][0] == 0)  # the image-free sample's row: zeros, as in training


def test_pretrain_like_samples_all_carry_the_block():
    tokens, estimates, visuals = train_step.llava_pretrain_lengths(576, 16)
    assert visuals == [576] * 16 and min(tokens) > 576
    samples = train_step.caption_samples(tokens, visuals, 500)
    assert all(int((s["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 576 for s in samples)
