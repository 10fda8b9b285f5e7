"""The encoder families, one registered class each (see revision/encoders/base.py for the interface): Hugging Face
dual encoders (`hf:`), open_clip (`open_clip:`) and LLM2CLIP (`llm2clip:`). A new family is one class here with
`@register_encoder("prefix")`, whose constructor takes (rest of the spec, device, dtype, batch_size,
trust_remote_code), sets `model`, `preprocess` and `name` and defines `_image_features` and `_text_features`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import torch

from revision.encoders.base import Encoder, HFImageTransform, RGBTransform, register_encoder

# LLM2CLIP ships only the vision tower and the projection heads; the image processor and the LLM2Vec
# text model live in other repositories (pairs from the LLM2CLIP model cards).
LLM2CLIP_IMAGE_PROCESSOR = {
    "microsoft/LLM2CLIP-Openai-L-14-336": "openai/clip-vit-large-patch14-336",
    "microsoft/LLM2CLIP-Openai-L-14-224": "openai/clip-vit-large-patch14",
    "microsoft/LLM2CLIP-Openai-B-16": "openai/clip-vit-base-patch16",
}
LLM2CLIP_TEXT_MODEL = "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"


def _pooled(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4, remote code) or an output whose pooler_output is the embedding (5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


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


@register_encoder("hf")
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


@register_encoder("open_clip")
class OpenCLIPEncoder(Encoder):
    """open_clip models: `ARCH/PRETRAINED` (PRETRAINED a tag or a checkpoint file), `hf-hub:ORG/NAME`, `local-dir:DIR`."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64,
                 trust_remote_code: bool = False):  # runs no repository code: nothing to allow
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


@register_encoder("llm2clip")
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

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, batch_size: int = 64,
                 trust_remote_code: bool = False):  # the checkpoints' own Python is never run: nothing to allow
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
