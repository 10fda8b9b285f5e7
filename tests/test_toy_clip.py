"""The toy CLIP trains on the mini world, saves like a real checkpoint and loads through load_encoder."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from demo.clip import REPORT, ToyClipConfig, main, retrieval, train_toy_clip
from demo.world import PRESETS
from revision.encoders import load_encoder

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--projection_dim", "16", "--batch_size", "16",
        "--lr", "3e-3", "--warmup", "2", "--steps", "40"]


@pytest.fixture(scope="module")
def clip_dir(mini_world, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("toy_clip")
    main(["--world", str(mini_world), "--out", str(out), *TINY])
    return out


@pytest.fixture(scope="module")
def report(clip_dir):
    return json.loads((clip_dir / REPORT).read_text())


def test_loss_goes_down(report):
    losses = report["losses"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_saved_checkpoint_loads_through_load_encoder(clip_dir, mini_world, one_thread):
    encoder = load_encoder(str(clip_dir), device="cpu")
    assert encoder.name == f"hf:{clip_dir.resolve()}" and encoder.dim == 16
    first = json.loads((mini_world / "paired.jsonl").read_text().splitlines()[0])
    with Image.open(mini_world / first["image"]) as im:
        image = encoder.encode_images([im.convert("RGB")])
    text = encoder.encode_texts([first["caption"]])
    assert image.shape == text.shape == (1, 16)
    torch.testing.assert_close(torch.cat([image, text]).norm(dim=1), torch.ones(2))
    # the saved tokenizer is the world's: its words have tokens of their own, and texts end in the EOS CLIP pools at
    ids = encoder.tokenizer(first["caption"])["input_ids"]
    assert ids[0] == encoder.tokenizer.bos_token_id and ids[-1] == encoder.tokenizer.eos_token_id
    assert encoder.tokenizer.tokenize("a circle on the left") == ["a</w>", "circle</w>", "on</w>", "the</w>", "left</w>"]


def test_trained_pairs_are_closer_than_unpaired_ones(clip_dir, mini_world, one_thread):
    encoder = load_encoder(str(clip_dir), device="cpu")
    pairs = [json.loads(line) for line in (mini_world / "paired.jsonl").read_text().splitlines()]
    images = []
    for p in pairs:
        with Image.open(mini_world / p["image"]) as im:
            images.append(im.convert("RGB"))
    stats = retrieval(encoder.encode_images(images).numpy(), encoder.encode_texts([p["caption"] for p in pairs]).numpy(),
                      [p["id"] for p in pairs])
    assert stats["paired_cosine"] > stats["unpaired_cosine"] + 0.2
    assert stats["image_to_text_top1"] > 3 * stats["chance_top1"]


def test_report_measures_gap_and_retrieval(report):
    gap, ret = report["gap_unpaired"], report["retrieval_eval"]
    assert gap["rows"] == {"text": PRESETS["mini"].unpaired_texts, "image": PRESETS["mini"].unpaired_images}
    assert 0 < gap["centroid_distance"] < 2 and 0.5 <= gap["linear_probe_acc"] <= 1 and 0 <= gap["knn_mixing"] <= 1
    assert ret["pairs"] == PRESETS["mini"].eval and ret["chance_top1"] == pytest.approx(1 / PRESETS["mini"].eval)
    assert -1 <= ret["paired_cosine"] <= 1 and report["config"]["steps"] == 40 and report["pairs"] == PRESETS["mini"].paired


def test_retrieval_counts_scene_matches():
    images = np.eye(3, dtype=np.float32)
    texts = images[[1, 0, 2]]  # pairs 0 and 1 swapped; they describe equal scenes
    stats = retrieval(images, texts, [("a",), ("a",), ("b",)])
    assert stats["image_to_text_top1"] == pytest.approx(1 / 3) and stats["image_to_text_scene_top1"] == 1.0
    assert stats["chance_scene_top1"] == pytest.approx(5 / 9) and stats["paired_cosine"] == pytest.approx(1 / 3)


def test_captions_longer_than_the_text_window_are_an_error(mini_world, tmp_path):
    with pytest.raises(ValueError, match=r"paired.jsonl: caption of 'paired-\d+' is \d+ tokens, more than max_text_len=8"):
        train_toy_clip(mini_world, tmp_path, ToyClipConfig(max_text_len=8))


def test_too_few_pairs_is_an_error(tmp_path):
    (tmp_path / "paired.jsonl").write_text('{"id": "p", "image": "x.png", "caption": "a red circle on the left."}\n')
    with pytest.raises(ValueError, match="need at least 2 image-caption pairs, found 1"):
        train_toy_clip(tmp_path, tmp_path / "out")
