"""The projector: one global embedding [D] -> k vectors of the LLM's width d, built by type from a registry, with its
input standardisation and its weights file (projector.safetensors, or a LLaVA/ReVision mm_projector.bin).

A projector type is one builder function registered with `@register_projector(name)`; a family of types named by a
pattern (mlpNx_gelu: any depth N) registers the pattern, whose groups reach the builder as arguments.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from revision.registry import Registry

PROJECTOR_FILE = "projector.safetensors"

# builder(in_dim, out_dim, tokens, *pattern groups) -> the layers; the last makes `tokens` vectors of out_dim
Builder = Callable[..., list[nn.Module]]


@dataclass(frozen=True)
class ProjectorType:
    pattern: str  # the names this builder answers to (a regular expression, matched whole)
    build: Builder


PROJECTORS: Registry[ProjectorType] = Registry("projector type")


def register_projector(name: str, pattern: str | None = None) -> Callable[[Builder], Builder]:
    """Decorator: `build` makes the projector type `name` (--mm_projector_type, a checkpoint's projector_type); with
    `pattern`, every name it matches (its groups are passed to `build` as strings), `name` being how help shows it."""
    def add(build: Builder) -> Builder:
        PROJECTORS.add(name, ProjectorType(pattern or re.escape(name), build))
        return build

    return add


def projector_types() -> tuple[str, ...]:
    return PROJECTORS.names()


@register_projector("linear")
def linear(in_dim: int, out_dim: int, tokens: int) -> list[nn.Module]:
    return [nn.Linear(in_dim, out_dim * tokens)]


@register_projector("mlpNx_gelu", pattern=r"mlp([1-9][0-9]*)x_gelu")
def mlp_gelu(in_dim: int, out_dim: int, tokens: int, depth: str) -> list[nn.Module]:
    """N Linear layers with GELU between (LLaVA's naming; mlp2x_gelu is the paper's)."""
    n = int(depth)
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim * (tokens if n == 1 else 1))]
    for k in range(n - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim * (tokens if k == n - 2 else 1))]
    return layers


def build_projector(projector_type: str, in_dim: int, out_dim: int, tokens: int = 1) -> nn.Sequential:
    """The registered type `projector_type` (`linear`, `mlpNx_gelu`, ...). Its last layer makes `tokens` vectors of
    out_dim (1: the paper's one vector, repeated over the visual positions).
    The input is standardised first by the buffers input_mean [in_dim] and input_scale [1] (identity until
    set_input_statistics): saved with the weights, so inference standardises as training did."""
    if tokens < 1:
        raise ValueError(f"projector tokens must be at least 1, got {tokens}")
    for kind in PROJECTORS.values():
        if match := re.fullmatch(kind.pattern, projector_type):
            projector = nn.Sequential(*kind.build(in_dim, out_dim, tokens, *match.groups()))
            break
    else:
        raise ValueError(f"unknown projector type {projector_type!r}; choose one of {projector_types()} "
                         "(e.g. mlp2x_gelu)")
    projector.register_buffer("input_mean", torch.zeros(in_dim))
    projector.register_buffer("input_scale", torch.ones(1))
    return projector


def input_statistics(embeds: np.ndarray) -> tuple[np.ndarray, float]:
    """(mean [D], one scalar std) of `embeds` [N, D]: what the projector standardises its input with."""
    x = np.asarray(embeds, dtype=np.float64)
    mean = x.mean(0)
    return mean, float(np.sqrt(((x - mean) ** 2).sum(1).mean() / x.shape[1])) or 1.0


def set_input_statistics(projector: nn.Module, embeds: np.ndarray) -> tuple[float, float]:
    """Standardise the projector's input with the mean and one scalar std of `embeds` [N, D] (the inputs it will
    train on): raw text, aligned text and image embeddings sit at different offsets and spreads on the sphere,
    and a projector fed their small deviations from a large common mean learns slowly (docs/recipe.md).
    Returns (norm of the mean, scalar std)."""
    mean, scale = input_statistics(embeds)
    projector.input_mean.copy_(torch.from_numpy(mean).to(projector.input_mean))
    projector.input_scale.fill_(scale)
    return float(np.linalg.norm(mean)), scale


def load_projector_state(projector: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """load_state_dict, where a projector saved before input standardisation existed keeps the identity."""
    buffers = {"input_mean", "input_scale"}
    result = projector.load_state_dict(weights, strict=False)
    missing = set(result.missing_keys) - (buffers if not buffers & set(weights) else set())
    if missing or result.unexpected_keys:
        raise RuntimeError(f"missing keys {sorted(missing)[:3]}, unexpected keys {result.unexpected_keys[:3]}")


@contextlib.contextmanager
def readable_weights(path: str | os.PathLike) -> Iterator[None]:
    """Turn a weights file (the projector's, or the LLM's in revision/model.py) that is not safetensors (or not a
    plain torch pickle) into one line naming it."""
    try:
        yield
    except (SafetensorError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_projector_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Projector weights from our projector.safetensors (a file or its folder) or a LLaVA/ReVision mm_projector.bin."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no projector weights here")
    with readable_weights(path):
        if path.suffix == ".safetensors":
            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    # LLaVA-style files name keys like model.mm_projector.0.weight; ours are 0.weight.
    return {k.split("mm_projector.")[-1]: v for k, v in weights.items()}
