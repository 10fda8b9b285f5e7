"""Gap diagnostics on data whose answers are known."""
import json

import numpy as np
import pytest

from revision import gap


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def apart_and_mixed():
    rng = np.random.default_rng(0)
    dim = 64
    text = unit(rng.standard_normal((1500, dim)) + 8 * np.eye(dim)[0])
    image = unit(rng.standard_normal((1500, dim)) + 8 * np.eye(dim)[1])
    same = unit(rng.standard_normal((1500, dim)) + 8 * np.eye(dim)[0])  # a second draw of the text distribution
    return text, image, same


def test_separated_modalities_read_as_a_gap_and_one_distribution_as_none(apart_and_mixed):
    text, image, same = apart_and_mixed
    rng = np.random.default_rng(0)
    apart, _ = gap.modality_gap(text, image, rng)
    mixed, _ = gap.modality_gap(text, same, rng)
    assert apart["linear_probe_acc"] > 0.95 and abs(mixed["linear_probe_acc"] - 0.5) < 0.07
    assert apart["knn_mixing"] < 0.01 and abs(mixed["knn_mixing"] - 0.5) < 0.03
    assert apart["cosine_js"] < 0.05  # same shape of cone: the histograms agree even though the cones are apart
    distances = gap.centroid_and_traces(text, image), gap.centroid_and_traces(text, same)
    assert abs(distances[0]["centroid_distance"] - np.sqrt(2) * 8 / np.sqrt(64 + 64)) < 0.02  # ‖mean‖ ~ 8/‖x‖
    assert distances[1]["centroid_distance"] < 3 * distances[1]["centroid_noise_floor"]
    assert abs(distances[0]["trace_ratio"] - 1) < 0.05


def test_js_divergence_bounds():
    p = np.array([5.0, 5.0, 0.0, 0.0])
    assert gap.js_divergence(p, p) == 0.0
    assert gap.js_divergence(p, p[::-1]) == pytest.approx(1.0)


def test_spectrum_alpha_recovers_a_planted_power_law():
    rng = np.random.default_rng(0)
    dim, alpha = 256, 1.5
    x = rng.standard_normal((2000, dim)) * np.arange(1, dim + 1) ** (-alpha / 2)  # variance k^-alpha
    x = x @ np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    assert gap.spectrum_alpha(x, rng) == pytest.approx(alpha, abs=0.1)


def test_knn_overlap_is_one_for_a_rotation_and_low_for_a_shuffle(apart_and_mixed):
    text = apart_and_mixed[0][:800]
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((64, 64)))[0].astype(np.float32)
    assert gap.knn_overlap(text, text @ rotation) == 1.0
    shuffled = text[np.random.default_rng(2).permutation(len(text))]
    assert gap.knn_overlap(text, shuffled) < 0.1


def test_write_report_json_and_png(tmp_path, apart_and_mixed):
    text, image, _ = apart_and_mixed
    after = (unit(text - text.mean(0)), unit(image - image.mean(0)))  # mean shift
    report = gap.write_report(tmp_path, (text, image), after, method="mean_shift", heavy_rows=500)
    saved = json.loads((tmp_path / gap.REPORT_JSON).read_text())
    assert saved == json.loads(json.dumps(report)) and saved["heavy_rows"] == {"text": 500, "image": 500}
    assert saved["before"]["centroid_distance"] > 0.9 and saved["after"]["centroid_distance"] < 0.01
    assert saved["after"]["knn_overlap_kept"] > 0.5
    png = (tmp_path / gap.REPORT_PNG).read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 50_000
