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

Encoder specs accepted by `load_encoder`:
  hf:ORG/NAME or hf:/path, or a bare folder/hub id   Hugging Face CLIP / SigLIP (AutoModel + AutoProcessor)
  open_clip:ARCH/PRETRAINED                            open_clip (extra `openclip`); PRETRAINED is a tag or a
  open_clip:hf-hub:ORG/NAME, open_clip:local-dir:DIR   checkpoint file
  llm2clip:VISION[?text=LLM&processor=CLIP]            LLM2CLIP (the paper's encoder), loaded without its remote code
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

# LLM2CLIP ships only the vision tower and the projection heads; the image processor and the LLM2Vec
# text model live in other repositories (pairs from the LLM2CLIP model cards).
LLM2CLIP_IMAGE_PROCESSOR = {
    "microsoft/LLM2CLIP-Openai-L-14-336": "openai/clip-vit-large-patch14-336",
    "microsoft/LLM2CLIP-Openai-L-14-224": "openai/clip-vit-large-patch14",
    "microsoft/LLM2CLIP-Openai-B-16": "openai/clip-vit-base-patch16",
}
LLM2CLIP_TEXT_MODEL = "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"


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


def _pooled(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4, remote code) or an output whose pooler_output is the embedding (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


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


TEXT_POOLING = ("model", "mean")  # the config's `text_pooling`: the model's own pooling, or a masked mean


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, T, H] token states -> [N, H]: the mean over each row's real (mask 1) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def mean_pooled_text_features(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """text_projection of the mean-pooled last hidden states of the text tower: how sentence encoders
    (sentence-transformers' MiniLM, LLM2Vec) pool, where BERT's own pooler reads the [CLS] token only."""
    hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.text_projection(mean_pool(hidden, attention_mask))


class HFEncoder(Encoder):
    """Any Hugging Face dual encoder with get_image_features/get_text_features (CLIPModel, SiglipModel,
    VisionTextDualEncoderModel, ...). A config with `text_pooling: "mean"` pools the text tower's tokens by a
    masked mean before the text projection (sentence-encoder text towers such as MiniLM)."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64,
                 trust_remote_code: bool = False):
        from transformers import AutoModel, AutoProcessor

        import revision.conv_tower  # noqa: F401  registers our small CNN tower with AutoModel (dual encoders holding one)

        local = Path(path).expanduser()
        source = str(local.resolve()) if local.is_dir() else path  # a folder, else a hub id
        self.name = f"hf:{source}"
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        # a folder whose config maps to its own Python (auto_map) runs that code only when the user trusts it
        self.model = AutoModel.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
        if not hasattr(self.model, "get_image_features") or not hasattr(self.model, "get_text_features"):
            raise ValueError(f"{path}: {type(self.model).__name__} has no get_image_features/get_text_features")
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        self.tokenizer = processor.tokenizer
        self.preprocess = HFImageTransform(processor.image_processor)
        self.pixel_affine = self.preprocess.affine()
        text_config = self.model.config.text_config
        self.max_text_len = int(text_config.max_position_embeddings)
        # SigLIP was trained on texts padded to a fixed length without a mask; CLIP pools at EOS and takes a mask.
        self.pad_to_max = self.model.config.model_type.startswith("siglip")
        self.text_pooling = getattr(self.model.config, "text_pooling", None) or "model"
        if self.text_pooling not in TEXT_POOLING:
            raise ValueError(f"{path}: config.json's text_pooling is {self.text_pooling!r}; use one of {TEXT_POOLING}")
        self._finish_init()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding="max_length" if self.pad_to_max else True, truncation=True,
            max_length=self.max_text_len, return_tensors="pt",
        )
        if self.pad_to_max:
            tokens = {"input_ids": tokens["input_ids"]}
        if self.text_pooling == "mean":
            return mean_pooled_text_features(self.model, tokens["input_ids"].to(self.device),
                                             tokens["attention_mask"].to(self.device))
        return _pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}))


class OpenCLIPEncoder(Encoder):
    """open_clip models: `ARCH/PRETRAINED` (PRETRAINED a tag or a checkpoint file), `hf-hub:ORG/NAME`, `local-dir:DIR`."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64):
        try:
            import open_clip
        except ImportError as e:  # open_clip drags in torchvision, so it is an optional extra
            raise ImportError(
                f"encoder 'open_clip:{spec}' needs open_clip: pip install 'revision[openclip]' "
                "(it installs torchvision; pick the torchvision build that matches your torch)"
            ) from e
        if spec.startswith(("hf-hub:", "local-dir:")):
            model_name, pretrained = spec, None
        else:
            model_name, _, pretrained = spec.partition("/")
            if pretrained and Path(pretrained).expanduser().is_file():
                pretrained = str(Path(pretrained).expanduser().resolve())
        self.name = f"open_clip:{model_name}/{pretrained}" if pretrained else f"open_clip:{model_name}"
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
        self.preprocess = RGBTransform(transform)
        self.model = model.to(device, dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._finish_init()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class LLM2CLIPEncoder(Encoder):
    """LLM2CLIP: a CLIP vision tower fine-tuned against an LLM2Vec text encoder (the ReVision paper's encoder),
    loaded natively on transformers 5 (revision/llm2clip.py): its weights go into CLIPVisionModelWithProjection,
    LlamaModel and a plain torch adapter; the checkpoints' own Python is never imported or run.

    Image side: the vision tower and its projection, with the matching OpenAI CLIP image processor. Text side:
    the LLM2Vec Llama embeds each caption (bidirectional attention, mean pooling, up to 512 tokens, as LLM2Vec),
    then the checkpoint's text adapter maps it into the shared space.
    Spec: `llm2clip:VISION[?text=LLM&processor=CLIP_PROCESSOR]` (folders or hub ids); defaults follow the
    LLM2CLIP model cards; the processor defaults to VISION's own preprocessor_config.json when it has one.
    Verified on random-weight tiny checkpoints in LLM2CLIP's key layout (tests/test_llm2clip.py), not on the
    real weights (docs/recipe.md).
    """

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64):
        from transformers import AutoImageProcessor

        from revision.llm2clip import LLM2VecText, load_vision, local_folder

        vision, _, query = spec.partition("?")
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        text_model = options.get("text", LLM2CLIP_TEXT_MODEL)
        folder = local_folder(vision)
        processor = options.get("processor") or (str(folder) if (folder / "preprocessor_config.json").is_file()
                                                 else LLM2CLIP_IMAGE_PROCESSOR.get(vision.rstrip("/")))
        if processor is None:
            raise ValueError(f"llm2clip:{spec}: name the image processor, e.g. ?processor=openai/clip-vit-large-patch14-336")
        if Path(text_model).expanduser().is_dir():
            text_model = str(Path(text_model).expanduser().resolve())
        source = str(folder) if Path(vision).expanduser().is_dir() else vision
        self.name = f"llm2clip:{source}?text={text_model}"
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.model, self.adapter = (m.to(device) for m in load_vision(folder, dtype))
        self.text = LLM2VecText(text_model, dtype).to(device).eval()
        self.preprocess = HFImageTransform(AutoImageProcessor.from_pretrained(processor))
        self.pixel_affine = self.preprocess.affine()
        self._finish_init()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).image_embeds

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.adapter(self.text(texts))


def load_encoder(
    spec: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", batch_size: int = 64,
    trust_remote_code: bool = False,
) -> Encoder:
    """Build the encoder a spec names (see the module docstring); a bare path or hub id means Hugging Face.
    Code shipped with a Hugging Face checkpoint (its config's auto_map) runs only with `trust_remote_code`
    (image_embed.py / revision.predict --trust_remote_code); LLM2CLIP and open_clip never need it."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    kind, sep, rest = spec.partition(":")
    if sep and kind == "hf":
        return HFEncoder(rest, device, dtype, batch_size, trust_remote_code)
    if sep and kind == "open_clip":
        return OpenCLIPEncoder(rest, device, dtype, batch_size)
    if sep and kind == "llm2clip":
        return LLM2CLIPEncoder(rest, device, dtype, batch_size)
    local = Path(spec).expanduser()
    if (local / "open_clip_config.json").is_file():
        return OpenCLIPEncoder(f"local-dir:{local.resolve()}", device, dtype, batch_size)
    if not local.is_dir() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise FileNotFoundError(f"encoder {spec!r}: no such folder (and not a hub id like 'org/name')")
    return HFEncoder(spec, device, dtype, batch_size, trust_remote_code)
