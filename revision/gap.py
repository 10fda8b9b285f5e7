"""How big is the modality gap? Diagnostics of docs/design.md "Gap diagnostics", before and after alignment.

All numbers come from samples of unit rows (the caller draws them; embed_mean.py takes up to 10k per
side). The quadratic ones (kNN, pairwise cosines, linear probe, spectrum) use a smaller subsample of
the same rows, identical before and after, so that "kNN overlap kept" compares like with like.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from revision.embedding_rows import normalize_rows
from revision.nofollow import open_nofollow, write_bytes

KNN_MIXING_K = 20
KNN_OVERLAP_K = 10
COSINE_BINS = np.linspace(-1.0, 1.0, 201)
REPORT_JSON, REPORT_PNG = "gap_report.json", "gap_report.png"


def _unit(x: np.ndarray) -> np.ndarray:
    return normalize_rows(np.asarray(x, np.float32))


def centroid_and_traces(text: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """‖mu_text - mu_image‖, each modality's trace (mean ‖x - mu‖² = 1 - ‖mu‖² for unit rows) and the noise floor:
    the centroid distance two samples of these sizes drawn from one distribution would show anyway."""
    mu_text, mu_image = (np.mean(x, axis=0, dtype=np.float64) for x in (text, image))
    trace_text, trace_image = 1.0 - mu_text @ mu_text, 1.0 - mu_image @ mu_image
    return {
        "centroid_distance": float(np.linalg.norm(mu_text - mu_image)),
        "centroid_noise_floor": float(np.sqrt(trace_text / len(text) + trace_image / len(image))),
        "trace_text": float(trace_text),
        "trace_image": float(trace_image),
        "trace_ratio": float(trace_text / max(trace_image, 1e-12)),
    }


def linear_probe_accuracy(text: np.ndarray, image: np.ndarray, rng: np.random.Generator, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a linear classifier telling text from image (0.5 = indistinguishable).

    A ridge least-squares probe (closed form, deterministic) on a random 80/20 split per modality."""
    splits = []
    for label, x in ((1.0, text), (-1.0, image)):
        order = rng.permutation(len(x))
        cut = int(0.8 * len(x))
        splits.append((x[order[:cut]], x[order[cut:]], label))
    train = np.concatenate([s[0] for s in splits]).astype(np.float64)
    labels = np.concatenate([np.full(len(s[0]), s[2]) for s in splits])
    centre = train.mean(axis=0)
    train -= centre
    w = np.linalg.solve(train.T @ train + ridge * len(train) * np.eye(train.shape[1]), train.T @ labels)
    bias = labels.mean()
    correct = sum(int(np.sum(np.sign((test - centre) @ w + bias) == label)) for _, test, label in splits)
    return correct / sum(len(s[1]) for s in splits)


def nearest(gram: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k most similar columns in a square similarity matrix, the point itself excluded."""
    k = min(k, len(gram) - 1)  # a sample under k + 1 rows: every other row
    gram = gram.copy()
    np.fill_diagonal(gram, -np.inf)
    return np.argpartition(gram, -k, axis=1)[:, -k:] if k > 0 else np.zeros((len(gram), 0), np.int64)


def knn_mixing(text: np.ndarray, image: np.ndarray, k: int = KNN_MIXING_K, gram: np.ndarray | None = None) -> float:
    """Share of each point's k nearest neighbours (cosine) from the other modality, on a balanced sample:
    about 0.5 when the modalities are mixed, 0 when they are apart. `gram`: [text; image] @ [text; image].T."""
    if gram is None or len(text) != len(image):
        n = min(len(text), len(image))
        text, image = text[:n], image[:n]
        both = np.concatenate([text, image])
        gram = both @ both.T
    modality = np.arange(2 * len(text)) >= len(text)
    return float(np.mean(modality[nearest(gram, k)] != modality[:, None]))


def knn_overlap(before: np.ndarray, after: np.ndarray, k: int = KNN_OVERLAP_K) -> float:
    """Share of each text's k nearest text neighbours before alignment that are still among them after."""
    return knn_overlap_of_grams(before @ before.T, after @ after.T, k)


def knn_overlap_of_grams(before: np.ndarray, after: np.ndarray, k: int = KNN_OVERLAP_K) -> float:
    """knn_overlap from the texts' cosine matrices before and after."""
    old, new = (np.sort(nearest(g, k), axis=1) for g in (before, after))
    if not old.shape[1]:
        return 1.0  # one row: no neighbours to lose
    # rows are sorted sets of k distinct indices: count the common ones by merging each pair of rows
    both = np.sort(np.concatenate([old, new], axis=1), axis=1)
    return float(np.mean(np.sum(both[:, 1:] == both[:, :-1], axis=1)) / old.shape[1])


def cosine_histogram(gram: np.ndarray, within: bool, bins: np.ndarray = COSINE_BINS) -> np.ndarray:
    """Histogram (counts) of a cosine matrix's entries; `within` (a square matrix of one set): distinct pairs only."""
    if within:
        gram = gram.copy()
        np.fill_diagonal(gram, -2.0)  # outside the bins: a point is not its own pair
    return np.histogram(gram, bins)[0]


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, 0..1) between two histograms (counts over the same bins)."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return (kl(p) + kl(q)) / 2


def _top_subspace(centred: np.ndarray, width: int, rng: np.random.Generator, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Leading eigenpairs of centred.T @ centred / n by randomized subspace iteration (never forms D x D):
    (eigenvalues descending, eigenvectors as columns)."""
    basis = np.linalg.qr(rng.standard_normal((centred.shape[1], width)))[0]
    for _ in range(iters):
        basis = np.linalg.qr(centred.T @ (centred @ basis))[0]
    ritz = centred @ basis
    values, vectors = np.linalg.eigh(ritz.T @ ritz / len(centred))
    return values[::-1], basis @ vectors[:, ::-1]


def top_eigenvalues(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 5) -> np.ndarray:
    """The k largest eigenvalues of x's covariance (32 extra directions keep the k-th accurate)."""
    x = np.asarray(x, np.float64)
    return _top_subspace(x - x.mean(axis=0), min(k + 32, *x.shape), rng, iters)[0][:k]


def spectrum_alpha(x: np.ndarray, rng: np.random.Generator) -> float:
    """Power-law exponent alpha of the covariance spectrum (lambda_k ~ k^-alpha), a least-squares line in log-log
    over ranks 1..K, K = min(100, rank / 4): the tail of a sample's spectrum is noise."""
    k = max(2, min(100, min(x.shape) // 4))
    eig = top_eigenvalues(x, k, rng)
    eig = eig[eig > 0]
    return float(-np.polyfit(np.log(np.arange(1, len(eig) + 1)), np.log(eig), 1)[0])


def modality_gap(text: np.ndarray, image: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, Any], dict]:
    """The quadratic diagnostics for one (text, image) pair of unit-row samples (equal sizes), the cosine
    histograms and the texts' cosine matrix; one cosine matrix of both modalities serves all of them."""
    both = np.concatenate([text, image])
    gram = both @ both.T
    n = len(text)
    hists = {"text-text": cosine_histogram(gram[:n, :n], True), "image-image": cosine_histogram(gram[n:, n:], True),
             "text-image": cosine_histogram(gram[:n, n:], False)}
    stats = {
        "linear_probe_acc": linear_probe_accuracy(text, image, rng),
        "knn_mixing": knn_mixing(text, image, gram=gram),
        "cosine_js": js_divergence(hists["text-text"], hists["image-image"]),
        "alpha_text": spectrum_alpha(text, rng),
        "alpha_image": spectrum_alpha(image, rng),
    }
    return stats, {"hists": hists, "text_gram": gram[:n, :n]}


def gap_report(
    before: tuple[np.ndarray, np.ndarray],
    after: tuple[np.ndarray, np.ndarray],
    seed: int = 0,
    heavy_rows: int = 1000,
) -> tuple[dict[str, Any], dict]:
    """Diagnostics before and after alignment. `before`/`after` are (text, image) samples whose rows correspond
    (after = the maps applied to before). Centroid and traces use every row given; the quadratic parts (kNN,
    probe, cosine histograms, spectra) the same `heavy_rows` per side before and after.
    Returns (report, extras for plotting: the heavy subsamples and their cosine histograms)."""
    rng = np.random.default_rng(seed)
    heavy_rows = min(heavy_rows, *(len(x) for x in before))  # balanced: as many texts as images
    picks = [np.sort(rng.permutation(len(x))[:heavy_rows]) for x in before]
    report: dict[str, Any] = {"rows": {"text": len(before[0]), "image": len(before[1])},
                              "heavy_rows": {"text": len(picks[0]), "image": len(picks[1])}}
    extras: dict[str, Any] = {}
    for name, pair in (("before", before), ("after", after)):
        text, image = (_unit(x) for x in pair)
        heavy = (text[picks[0]], image[picks[1]])
        stats, extra = modality_gap(*heavy, np.random.default_rng(seed))
        report[name] = {**centroid_and_traces(text, image), **stats}
        extras[name] = {"sample": heavy, **extra}
    report["after"]["knn_overlap_kept"] = knn_overlap_of_grams(extras["before"]["text_gram"], extras["after"]["text_gram"])
    return report, extras


def _pca_axes(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-2 principal axes."""
    mean = x.mean(axis=0)
    return mean, _top_subspace(x - mean, 8, rng, iters=12)[1][:, :2]


def plot_report(report: dict, extras: dict, path: str | os.PathLike, method: str = "", seed: int = 0) -> None:
    """2-D PCA scatter before/after (same axes: those of the data before) and pairwise-cosine histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    mean, axes = _pca_axes(np.concatenate(extras["before"]["sample"]).astype(np.float64), rng)
    projected = {name: [(x - mean) @ axes for x in extras[name]["sample"]] for name in ("before", "after")}
    everything = np.concatenate([p for pair in projected.values() for p in pair])
    lo, hi = everything.min(axis=0), everything.max(axis=0)
    pad = 0.05 * (hi - lo)
    colours = {"text-text": "tab:blue", "image-image": "tab:orange", "text-image": "tab:gray"}
    centres = COSINE_BINS[:-1] + np.diff(COSINE_BINS) / 2

    fig, grid = plt.subplots(2, 2, figsize=(13, 10.5))
    for col, name in enumerate(("before", "after")):
        ax, stats = grid[0, col], report[name]
        for label, colour, points in zip(("text", "image"), ("tab:blue", "tab:orange"), projected[name]):
            ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.35, color=colour, label=f"{label} ({len(points)} shown)")
            ax.scatter(*points.mean(axis=0), s=220, marker="X", color=colour, edgecolor="black", linewidth=1.2, zorder=5)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_title(f"{name.capitalize()} alignment: PCA of the embeddings (axes fitted before)\n"
                     f"centroid distance {stats['centroid_distance']:.3f}, linear probe {stats['linear_probe_acc']:.2f}, "
                     f"kNN mixing {stats['knn_mixing']:.2f}", fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(loc="upper right", markerscale=3, fontsize=9, title="X = centroid", title_fontsize=8)

        ax = grid[1, col]
        for label, counts in extras[name]["hists"].items():
            density = counts / max(counts.sum(), 1) / np.diff(COSINE_BINS)
            ax.plot(centres, density, linewidth=1.8, color=colours[label], label=f"{label} pairs")
        ax.set_title(f"{name.capitalize()}: pairwise cosine similarity\n"
                     f"JS(text-text, image-image) = {stats['cosine_js']:.3f} bits", fontsize=10)
        ax.set_xlabel("cosine")
        ax.set_ylabel("density")
        ax.legend(fontsize=9)

    rows = [("centroid distance", "centroid_distance", ".4f"), ("  (noise floor of this sample)", "centroid_noise_floor", ".4f"),
            ("trace ratio text/image", "trace_ratio", ".3f"), ("linear probe acc. (0.5 = mixed)", "linear_probe_acc", ".3f"),
            ("kNN mixing k=20 (0.5 = mixed)", "knn_mixing", ".3f"), ("JS of cosine histograms", "cosine_js", ".3f"),
            ("spectrum alpha text", "alpha_text", ".2f"), ("spectrum alpha image", "alpha_image", ".2f")]
    lines = [f"{'':34s}{'before':>10s}{'after':>10s}"]
    lines += [f"{label:34s}{report['before'][key]:>10{fmt}}{report['after'][key]:>10{fmt}}" for label, key, fmt in rows]
    lines.append(f"{'kNN overlap kept k=10':34s}{'':>10s}{report['after']['knn_overlap_kept']:>10.3f}")
    fig.text(0.5, 0.01, "\n".join(lines), family="monospace", fontsize=9, ha="center", va="bottom")
    fig.suptitle(f"Modality gap, {method or 'alignment'}: {report['rows']['text']} texts and {report['rows']['image']} "
                 f"images sampled; kNN, probe, spectra and plots on {report['heavy_rows']['text']} + "
                 f"{report['heavy_rows']['image']} of them", fontsize=12)
    fig.tight_layout(rect=(0, 0.18, 1, 0.97))
    with open_nofollow(path, "wb") as f:  # the report goes into a store folder: never through a link
        fig.savefig(f, dpi=90, format="png")
    plt.close(fig)


def write_report(
    out_dir: str | os.PathLike, before, after, method: str = "", seed: int = 0, heavy_rows: int = 1000, plot: bool = True
) -> dict:
    """gap_report.json (+ gap_report.png) in out_dir; returns the report."""
    out_dir = Path(out_dir)
    report, extras = gap_report(before, after, seed, heavy_rows)
    report = {"method": method, **report}
    write_bytes(out_dir / REPORT_JSON, (json.dumps(report, indent=1) + "\n").encode())
    if plot:
        plot_report(report, extras, out_dir / REPORT_PNG, method, seed)
    return report
