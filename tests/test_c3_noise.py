"""C3 by itself: its statistics file carries the noise, and stage 1 applies it without being told."""
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from revision.align import C3_NOISE_STD
from revision.data import embed_noise
from revision.train import parse_args, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def aligned(tiny_world, tmp_path_factory):
    """The tiny world aligned with c3 and with mean_shift by embed_mean.py (the CLI, as a user runs it): a folder
    holding one aligned text store a method, c3/ and mean_shift/."""
    root = tmp_path_factory.mktemp("c3")
    for method in ("c3", "mean_shift"):
        done = subprocess.run([sys.executable, str(ROOT / "embed_mean.py"), "--text", tiny_world["text"][0], "--image",
                               tiny_world["image"][0], "--out", str(root / method), "--method", method, "--quiet", "--no_report"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
    return root


def stage1(world, root, method, out, *extra):
    """Stage 1 as pretrain.sh runs it: the aligned text store and its align_stats.json, no noise flag."""
    stats = root / method / "align_stats.json"
    argv = ["--model_name_or_path", world["model"], "--data_path", world["text"][1], "--embed_folder", str(root / method),
            "--align_stats", str(stats), "--output_dir", str(out), "--tune_mm_mlp_adapter", "--version", "plain",
            "--num_visual_tokens", "2", "--model_max_length", "48", "--per_device_train_batch_size", "8", "--max_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0", *extra]
    return train(*parse_args(argv)).train_dataset, stats


def fed_and_stored(dataset, n=8):
    """What the dataset feeds the model for its first n samples, and the aligned store's rows for them."""
    fed = np.stack([dataset[i]["image_embeds"].numpy() for i in range(n)])
    stored = np.stack([dataset.table[int(dataset.rows[i])] for i in range(n)]).astype(np.float32)
    return fed, stored


def test_c3_stage1_is_noisy_by_itself_and_mean_shift_is_not(tiny_world, aligned, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="revision.train"):
        c3, stats = stage1(tiny_world, aligned, "c3", tmp_path / "c3")
    assert c3.embed_noise_std == pytest.approx(C3_NOISE_STD)
    assert f"embedding noise std 0.126491 (from {stats} (c3))" in caplog.text
    fed, stored = fed_and_stored(c3)
    cosine = np.sum(fed * stored, axis=1)
    assert np.allclose(np.linalg.norm(fed, axis=1), 1, atol=1e-5)
    assert cosine.max() < 0.999 and cosine.min() > 0.5  # corrupted, still near the aligned embedding

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="revision.train"):
        mean_shift, stats = stage1(tiny_world, aligned, "mean_shift", tmp_path / "ms")
    assert mean_shift.embed_noise_std == 0 and f"embedding noise std 0 (from {stats} (mean_shift))" in caplog.text
    fed, stored = fed_and_stored(mean_shift)
    np.testing.assert_allclose(fed, stored, atol=1e-6)
    # the two methods' text stores are the same rows: only the noise tells them apart
    np.testing.assert_array_equal(fed, fed_and_stored(c3)[1])


def test_a_passed_flag_overrides_the_file_and_real_images_get_no_noise(tiny_world, aligned, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="revision.train"):
        dataset, _ = stage1(tiny_world, aligned, "c3", tmp_path / "off", "--embed_noise_std", "0")
    assert "embedding noise std 0 (from --embed_noise_std)" in caplog.text
    fed, stored = fed_and_stored(dataset)
    np.testing.assert_allclose(fed, stored, atol=1e-6)
    stats = aligned / "c3" / "align_stats.json"
    assert embed_noise(0.3, stats, "text") == (0.3, "--embed_noise_std")
    assert embed_noise(None, stats, "image") == (0.0, "default: none on real image embeddings")  # stage 2
    assert embed_noise(None, None, "text") == (0.0, "default: none")
