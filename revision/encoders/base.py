"""What an encoder is (`Encoder`: images and texts in, unit float32 rows out), the image transforms its workers run,
and the registry of encoder families (`register_encoder`): a spec `PREFIX:REST` is built by the family registered
as PREFIX. The families themselves: revision/encoders/families.py.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from revision.registry import Registry

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (half precision is slow there and changes the numbers) and bf16 (else fp16) on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited over white; 16/32-bit greyscale is rescaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert() clips these at 255 (a 16-bit scan would turn white); scale the range instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class Encoder:
    """The interface every encoder implements. Subclasses set `model`, `preprocess`, `name` and define
    `_image_features` (pixels already on device/dtype -> raw features) and `_text_features` (strings -> raw features)."""

    name: str
    dim: int
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL image (any mode) -> [C, H, W] pixels
    # (scale, shift) [C] with normalised = pixels * scale + shift, applied in encode_pixels; None: preprocess
    # already returns normalised float pixels
    pixel_affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def _finish_init(self) -> None:
        # The embedding width, read off one forward pass: configs name it differently per family.
        probe = self.preprocess(Image.new("RGB", (16, 16))).unsqueeze(0)
        self.dim = int(self.encode_pixels(probe).shape[1])

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """[N, C, H, W] preprocessed pixels (or chunks of them, joined on the device) -> [N, D] unit float32 rows
        on the CPU."""
        if isinstance(pixels, torch.Tensor):
            pixels = [pixels]
        chunks = [chunk.to(self.device, non_blocking=True) for chunk in pixels]
        pixels = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if self.pixel_affine is not None:
            scale, shift = (t.to(self.device).view(1, -1, 1, 1) for t in self.pixel_affine)
            pixels = pixels.float() * scale + shift
        pixels = pixels.to(self.dtype)
        return F.normalize(self._image_features(pixels).float(), dim=-1).cpu()

    def encode_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> torch.Tensor:
        batch_size = batch_size or self.batch_size
        chunks = [
            self.encode_pixels(torch.stack([self.preprocess(im) for im in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        batch_size = batch_size or self.batch_size
        chunks = [
            F.normalize(self._text_features(list(texts[i : i + batch_size])).float(), dim=-1).cpu()
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device}, dtype={self.dtype})"


# A family's class, built as cls(rest_of_spec, device, dtype, batch_size, trust_remote_code) (see load_encoder).
ENCODERS: Registry[type[Encoder]] = Registry("encoder family")


def register_encoder(prefix: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Class decorator: specs `PREFIX:REST` build this class (image_embed.py --encoder, a checkpoint's encoder)."""
    def add(cls: type[Encoder]) -> type[Encoder]:
        return ENCODERS.add(prefix, cls)

    return add


def encoder_families() -> tuple[str, ...]:
    return ENCODERS.names()


class HFImageTransform:
    """PIL -> resized, cropped pixel tensor (uint8 for PIL-based processors) with a Hugging Face image processor,
    without its rescale and normalise steps (`affine` gives them, for the device); picklable for DataLoader workers."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=to_rgb(image), return_tensors="pt", do_rescale=False,
                                    do_normalize=False)["pixel_values"][0]

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel such that pixels * scale + shift is what the processor itself returns."""
        p = self.image_processor
        scale = torch.full((3,), float(p.rescale_factor) if p.do_rescale else 1.0, dtype=torch.float64)
        shift = torch.zeros(3, dtype=torch.float64)
        if p.do_normalize:
            mean, std = (torch.as_tensor(v, dtype=torch.float64).expand(3) for v in (p.image_mean, p.image_std))
            scale, shift = scale / std, -mean / std
        return scale.float(), shift.float()


class RGBTransform:
    """to_rgb, then a PIL -> tensor transform (open_clip's torchvision pipeline); picklable."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))
