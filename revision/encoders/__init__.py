"""CLIP-style encoders behind one interface: images and texts in, L2-normalised float32 embeddings out.

    encoder = load_encoder("hf:openai/clip-vit-large-patch14-336", device="cuda")
    encoder.encode_images([pil_image, ...])   # Tensor [N, D], unit rows, on the CPU
    encoder.encode_texts(["a photo of a cat"])  # Tensor [N, D]
    encoder.name, encoder.dim                  # what a store's manifest records

Image preprocessing is a separate, picklable callable (`encoder.preprocess`: PIL image -> pixel tensor)
so DataLoader workers can decode and preprocess while the main process runs `encode_pixels` on batches.
Hugging Face encoders' workers stop after resize and crop and hand over uint8 pixels; `encode_pixels`
rescales and normalises them on the device. A float32 batch of 336 px images is 4x the bytes to pass
between processes, pin and copy, and that copying, not the model, bounded a GPU's throughput.

Encoder specs accepted by `load_encoder` (PREFIX:REST picks the family registered as PREFIX, in
revision/encoders/families.py; revision/encoders/base.py holds the interface and the registry):
  hf:ORG/NAME or hf:/path, or a bare folder/hub id   Hugging Face CLIP / SigLIP (AutoModel + AutoProcessor)
  open_clip:ARCH/PRETRAINED                            open_clip (extra `openclip`); PRETRAINED is a tag or a
  open_clip:hf-hub:ORG/NAME, open_clip:local-dir:DIR   checkpoint file
  llm2clip:VISION[?text=LLM&processor=CLIP]            LLM2CLIP (the paper's encoder), loaded without its remote code
"""
from __future__ import annotations

from pathlib import Path

import torch

from revision.encoders.base import (  # noqa: F401  (the package's API)
    DTYPES,
    ENCODERS,
    Encoder,
    HFImageTransform,
    RGBTransform,
    encoder_families,
    register_encoder,
    resolve_device,
    resolve_dtype,
    to_rgb,
)
from revision.encoders.families import (  # noqa: F401  (importing them registers the families)
    LLM2CLIP_IMAGE_PROCESSOR,
    LLM2CLIP_TEXT_MODEL,
    TEXT_POOLING,
    HFEncoder,
    LLM2CLIPEncoder,
    OpenCLIPEncoder,
    mean_pool,
    mean_pooled_text_features,
)


def load_encoder(
    spec: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", batch_size: int = 64,
    trust_remote_code: bool = False,
) -> Encoder:
    """Build the encoder a spec names (see the module docstring); a bare path or hub id means Hugging Face.
    Code shipped with a Hugging Face checkpoint (its config's auto_map) runs only with `trust_remote_code`
    (image_embed.py / revision.predict --trust_remote_code); LLM2CLIP and open_clip never need it."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    prefix, sep, rest = spec.partition(":")
    local = Path(spec).expanduser()
    if sep and prefix in ENCODERS:
        return ENCODERS[prefix](rest, device, dtype, batch_size, trust_remote_code)
    if sep and not local.is_dir():  # hub ids hold no colon: an unknown family, unless it is a folder's name
        raise ValueError(f"encoder {spec!r}: unknown encoder family {prefix!r}; choose one of {encoder_families()}, "
                         "or give a folder or a hub id (org/name)")
    if (local / "open_clip_config.json").is_file():
        return ENCODERS["open_clip"](f"local-dir:{local.resolve()}", device, dtype, batch_size, trust_remote_code)
    if not local.is_dir() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise FileNotFoundError(f"encoder {spec!r}: no such folder (and not a hub id like 'org/name')")
    return ENCODERS["hf"](spec, device, dtype, batch_size, trust_remote_code)
