"""The alignment methods: one registered class each (see `revision.align.base` for what a method declares).

x = n(t) are unit text rows, u = n(v) unit image rows, μ_t = mean x and μ_i = mean u over the fitted sets;
all statistics accumulate in float64. docs/design.md "Alignment" writes each map out.
"""
from __future__ import annotations

import math

import numpy as np

from revision.align.base import Alignment, non_negative, positive, register, vector
from revision.align.streams import BadRows, Stream, map_chunks, row_dtype, unit_mean

C3_NOISE_STD = math.sqrt(0.016)  # C3's default corruption (σ ≈ 0.126), added to stage 1's text embeddings


@register
class MeanShift(Alignment):
    """Unicorn's mean shift: each modality minus its own mean, renormalised. text n(x - μ_t), image n(u - μ_i)."""

    method = "mean_shift"
    stats = {"mu_text": vector, "mu_image": vector}
    text_passes = 1

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        # images first, so the image store lets go of the shard it read when opened before the text shards come
        self.mu_image, self.info["image_rows"] = unit_mean(images, bad, self._names[1])
        self.mu_text, self.info["text_rows"] = unit_mean(texts, bad, self._names[0])

    def text_unit(self, x: np.ndarray) -> np.ndarray:
        x -= self.mu_text
        return x

    def image_unit(self, u: np.ndarray) -> np.ndarray:
        u -= self.mu_image
        return u


@register
class C3(MeanShift):
    """C3 = mean shift's centring, then Gaussian corruption at training time: its std is a statistic, so the
    file carries it and stage 1 adds it to the text embeddings by default (revision.data.embed_noise)."""

    method = "c3"
    stats = {**MeanShift.stats, "noise_std": non_negative}

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        super()._fit(texts, images, bad)
        self.noise_std = C3_NOISE_STD


@register
class Anchor(MeanShift):
    """The paper's ablation "anchor only" (ReAlign's step 1): the text set centred and moved onto the image
    anchor, renormalised; no trace scaling, no centroid correction. text n(x - μ_t + μ_i), image n(u)."""

    method = "anchor"

    def text_unit(self, x: np.ndarray) -> np.ndarray:
        x += self.mu_image - self.mu_text
        return x

    image_unit = Alignment.image_unit


@register
class AnchorTrace(Anchor):
    """The paper's ablation "anchor + trace" (ReAlign's steps 1-2 and its spherical projection, no centroid
    correction): text n(μ_i + s·(x - μ_t)) with s = √(τ_i / (τ_t + 1e-10)), τ = mean‖x - μ‖² = 1 - ‖μ‖² for
    unit rows; image n(u)."""

    method = "anchor_trace"
    stats = {**Anchor.stats, "scale": positive}

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        super()._fit(texts, images, bad)
        self.info["trace_text"] = 1.0 - float(self.mu_text @ self.mu_text)
        self.info["trace_image"] = 1.0 - float(self.mu_image @ self.mu_image)
        self.scale = math.sqrt(self.info["trace_image"] / (self.info["trace_text"] + 1e-10))

    def _shift(self) -> np.ndarray:
        """c = μ_i - s·μ_t, so that μ_i + s·(x - μ_t) = s·x + c."""
        return self.mu_image - self.scale * self.mu_text

    def text_unit(self, x: np.ndarray) -> np.ndarray:
        x *= self.scale
        x += self._shift()
        return x


@register
class ReAlign(AnchorTrace):
    """The paper's ReAlign: anchor + trace (y = n(s·x + c)), then the centroid correction n(y - μ̂ + μ_i), with
    μ̂ = mean y over the whole text set (a second pass: y depends on every statistic above); image n(u).

    With ‖x‖ = 1, ‖s·x + c‖² = r² = s² + 2s(x·c) + ‖c‖², and with d = μ_i - μ̂, ‖y + d‖² = 1 + 2(y·d) + ‖d‖².
    So each row needs only two dot products (one small matmul per chunk) and one scaled sum: the same numbers
    as forming every intermediate vector, at a fraction of the cost.
    """

    method = "realign"
    stats = {**AnchorTrace.stats, "mu_hat": vector}
    text_passes = 2

    def _fit(self, texts: Stream, images: Stream, bad: BadRows) -> None:
        super()._fit(texts, images, bad)
        c = self._shift()

        def sums(_, rows: np.ndarray, inv_norm: np.ndarray) -> tuple[np.ndarray, float, int]:
            inv_r = self._inv_r(rows, inv_norm, c)
            weights = (inv_r * inv_norm).astype(rows.dtype)  # the chunk's sum in its rows' dtype, summed up in float64
            return (weights @ rows).astype(np.float64), float(inv_r.sum()), int(np.count_nonzero(inv_norm))

        sum_x_over_r, sum_inv_r, count = np.zeros(self.dim), 0.0, 0
        for shard in texts():
            # in chunk order: the same sums as one thread
            for x_over_r, inv_r, rows in map_chunks(shard, bad, sums, dtype=row_dtype(shard)):
                sum_x_over_r += x_over_r
                sum_inv_r += inv_r
                count += rows
            del shard
        self.mu_hat = (self.scale * sum_x_over_r + sum_inv_r * c) / count

    def _inv_r(self, rows: np.ndarray, inv_norm: np.ndarray, c: np.ndarray) -> np.ndarray:
        """1/‖s·x + c‖ per row (0 for dropped rows)."""
        s = self.scale
        xc = (rows @ c.astype(rows.dtype)) * inv_norm
        r2 = np.maximum(s * s + 2 * s * xc + c @ c, 1e-300)
        return np.where(inv_norm > 0, 1.0 / np.sqrt(r2), 0.0)

    def _text_rows(self, rows: np.ndarray, inv_norm: np.ndarray, out: np.ndarray) -> None:
        s, c, d = self.scale, self._shift(), self.mu_image - self.mu_hat
        cd = np.stack([c, d])
        dots = (rows @ cd.T.astype(rows.dtype)) * inv_norm[:, None]  # x·c, x·d
        inv_r = 1.0 / np.sqrt(np.maximum(s * s + 2 * s * dots[:, 0] + c @ c, 1e-300))
        y_dot_d = (s * dots[:, 1] + c @ d) * inv_r
        inv_q = 1.0 / np.sqrt(np.maximum(1.0 + 2.0 * y_dot_d + d @ d, 1e-300))
        # out = a·row + b·c + e·d: one scaled copy of the chunk, then a rank-2 update (per-row coefficients in float64)
        np.multiply(rows, (s * inv_r * inv_q * inv_norm).astype(rows.dtype)[:, None], out=out, casting="same_kind")
        out += (np.stack([inv_r * inv_q, inv_q], axis=1).astype(out.dtype) @ cd.astype(out.dtype))
