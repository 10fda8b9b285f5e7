"""Row maths of embedding matrices [N, D]: squared norms, unit rows, and the one rule for an unusable row.

An unusable row holds NaN or Inf, or is all zero (no direction to normalise; the official embed.py writes one for an
image it cannot read). Every reader applies this rule: the writer refuses such rows, alignment drops or refuses
them, training's table lists them, check_embeddings reports them.
"""
from __future__ import annotations

import numpy as np


def squared_norms(x: np.ndarray) -> np.ndarray:
    """Each row's squared L2 norm, in one pass (no [N, D] temporary)."""
    return np.einsum("...i,...i->...", x, x)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32 (float64 input stays float64); zero rows stay zero."""
    x = np.asarray(x)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    norms = np.sqrt(squared_norms(x))[..., None]
    return x / np.where(norms > 0, norms, 1.0)


def bad_rows(embeds: np.ndarray) -> np.ndarray:
    """Indices of rows that hold NaN or Inf or are all zero (no direction to normalise)."""
    embeds = np.asarray(embeds)
    if embeds.dtype in (np.float32, np.float64) and embeds.shape[1]:
        # a NaN, Inf or all-zero row has a non-finite or zero squared norm; only those rows (plus rows whose
        # square overflows or underflows) need the exact element-wise test below
        sq = squared_norms(embeds)
        suspects = np.flatnonzero(~(np.isfinite(sq) & (sq > 0)))
        return suspects[_exact_bad_rows(embeds[suspects])]
    return np.flatnonzero(_exact_bad_rows(embeds))


def _exact_bad_rows(embeds: np.ndarray) -> np.ndarray:
    finite = np.isfinite(embeds).all(axis=1)
    nonzero = np.abs(embeds).max(axis=1, initial=0) > 0 if embeds.shape[1] else np.zeros(len(embeds), bool)
    return ~(finite & nonzero)


def describe_bad_row(vec: np.ndarray) -> str:
    """What makes an unusable row unusable, for messages: NaN, Inf or all-zero vector."""
    if np.isnan(vec).any():
        return "NaN"
    if np.isinf(vec).any():
        return "Inf"
    return "all-zero vector"
