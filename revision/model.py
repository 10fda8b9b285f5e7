"""The multimodal model: any HF causal LM plus a projector, by composition (docs/design.md, "Training").

Each sample carries one global embedding [D]. The projector maps it once to the LLM width d, and that
one vector fills all `num_visual_tokens` positions marked IMAGE_TOKEN_INDEX in `input_ids`. Repeating
a vector and projecting each copy gives the same numbers as projecting once, and costs
`num_visual_tokens` times more: so we project once.

A checkpoint is a folder: the LLM in HF format (or a LoRA adapter, or nothing when only the projector
trained), projector.safetensors, revision_config.json and the tokenizer.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from revision.defaults import NUM_VISUAL_TOKENS, PROJECTOR_TOKENS, PROJECTOR_TYPE, TEMPLATE
from revision.loss import IGNORE_INDEX, labelled_causal_lm_loss, labelled_head_supported  # IGNORE_INDEX: defined once, there
from revision.projector import PROJECTOR_FILE, build_projector, load_projector_state, load_projector_weights, readable_weights

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # marks visual positions in input_ids; never a vocabulary id, so no embedding resize
CONFIG_FILE = "revision_config.json"
logger = logging.getLogger(__name__)


@dataclass
class RevisionConfig:
    """What a checkpoint needs besides the LLM's own config (saved as revision_config.json)."""

    embed_dim: int  # D: the encoder's embedding size
    hidden_size: int  # d: the LLM's width
    projector_type: str = PROJECTOR_TYPE
    # distinct vectors the projector makes of one embedding; they fill the visual positions in turn
    projector_tokens: int = PROJECTOR_TOKENS
    num_visual_tokens: int = NUM_VISUAL_TOKENS
    template: str = TEMPLATE
    system_prompt: str | None = None  # for conversations without one (None: the chat template's own default)
    # where training put the image in the first question, so inference puts it there ("first" / "last"; None: where
    # the data had it; inference puts it first, LLaVA's "<image>\n{question}")
    image_placement: str | None = None
    encoder: str | None = None
    base_model: str | None = None  # the LLM the folder's weights start from (needed when they are not all here)
    llm_weights: str = "full"  # full: HF weights in the folder; lora: an adapter; base: only base_model
    alignment: str | None = None  # file in the folder holding the statistics of the image_map

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder, CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> RevisionConfig:
        path = Path(folder, CONFIG_FILE)
        if not path.exists():
            raise FileNotFoundError(f"{path}: not a ReVision checkpoint (no {CONFIG_FILE})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in fields})


def checkpoint_config(path: str | os.PathLike | None) -> RevisionConfig | None:
    """The RevisionConfig of a checkpoint folder; None for anything else (a projector file, an HF model folder)."""
    return RevisionConfig.load(path) if path and Path(path, CONFIG_FILE).is_file() else None


# On CPU, PyTorch's SDPA runs its flash kernel, whose backward is slow on short rows: a SmolLM2 training step with
# HF's eager attention took 0.82-0.88x as long up to 90 tokens, 0.90-0.94x at 256-512, 1.5-1.6x at 1024 (bf16, 2 cores;
# bench/cpu_bf16.py --sections attention). Inference gained nothing (prefill dominates), so it keeps SDPA.
CPU_EAGER_MAX_LENGTH = 512


def default_attn_implementation(max_length: int | None = None) -> str:
    """flash_attention_2 when flash-attn is installed and CUDA is there; else PyTorch SDPA, except for training on
    CPU with rows of at most CPU_EAGER_MAX_LENGTH tokens (`max_length`, the run's model_max_length): eager there."""
    if torch.cuda.is_available():
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    return "eager" if max_length is not None and max_length <= CPU_EAGER_MAX_LENGTH else "sdpa"


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class RevisionModel(nn.Module):
    """An HF causal LM (`self.llm`, possibly a PeftModel) fed by a projector of one global embedding."""

    main_input_name = "input_ids"

    def __init__(self, llm: PreTrainedModel, config: RevisionConfig, projector: nn.Module | None = None):
        super().__init__()
        self.llm = llm
        self.revision_config = config
        self.projector = projector or build_projector(config.projector_type, config.embed_dim, config.hidden_size,
                                                      config.projector_tokens)
        self.projector.to(dtype=llm.dtype)
        self.alignment = None  # revision.align.Alignment whose image_map real image embeddings need

    @classmethod
    def from_llm(cls, llm_path: str, embed_dim: int, projector_type: str = PROJECTOR_TYPE, num_visual_tokens: int = NUM_VISUAL_TOKENS,
                 template: str = TEMPLATE, encoder: str | None = None, dtype: torch.dtype | None = None,
                 attn_implementation: str | None = None, projector_tokens: int = PROJECTOR_TOKENS) -> RevisionModel:
        """A fresh projector on a pretrained LLM (a folder, hub id, or .gguf file: revision.gguf converts it once)."""
        from revision.gguf import resolve_llm

        llm_path = resolve_llm(llm_path)
        llm = AutoModelForCausalLM.from_pretrained(
            llm_path, dtype=dtype or torch.float32, attn_implementation=attn_implementation or default_attn_implementation())
        config = RevisionConfig(embed_dim=embed_dim, hidden_size=llm.config.hidden_size, projector_type=projector_type,
                                num_visual_tokens=num_visual_tokens, template=template, encoder=encoder,
                                projector_tokens=projector_tokens,
                                base_model=str(Path(llm_path).resolve()) if Path(llm_path).exists() else llm_path)
        return cls(llm, config)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None, base_model: str | None = None) -> RevisionModel:
        """Load a checkpoint folder written by save_pretrained (the LLM, a LoRA adapter on it, or only the projector)."""
        folder = Path(folder)
        config = RevisionConfig.load(folder)
        kwargs = dict(dtype=dtype or torch.float32, attn_implementation=attn_implementation or default_attn_implementation())
        base = base_model or config.base_model
        if config.llm_weights == "full":
            with readable_weights(folder / "model.safetensors" if (folder / "model.safetensors").exists() else folder):
                llm = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        else:
            if not base:
                raise ValueError(f"{folder / CONFIG_FILE}: llm_weights is {config.llm_weights!r} but no base_model is named")
            with readable_weights(base):
                llm = AutoModelForCausalLM.from_pretrained(base, **kwargs)
            if config.llm_weights == "lora":
                from peft import PeftModel

                with readable_weights(folder / "adapter_model.safetensors"):
                    llm = PeftModel.from_pretrained(llm, folder)
        model = cls(llm, config)
        try:
            load_projector_state(model.projector, load_projector_weights(folder))
        except RuntimeError as e:  # names or shapes of another projector
            raise ValueError(f"{folder / PROJECTOR_FILE}: does not fit the {config.projector_type} projector "
                             f"{config.embed_dim} -> {config.hidden_size} of {CONFIG_FILE} ({str(e).splitlines()[0]})") from None
        if config.alignment:
            from revision.align import load_alignment

            model.alignment = load_alignment(folder / config.alignment)
        return model

    # ---- forward ----------------------------------------------------------------------------------

    def check_embed_dim(self, dim: int, where: str = "embeddings") -> None:
        if dim != self.revision_config.embed_dim:
            raise ValueError(f"{where} have dim {dim}, but the projector takes {self.revision_config.embed_dim} "
                             "(embeddings from another encoder than the projector was built for?)")

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_index: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds with each sample's projected embedding at its IMAGE_TOKEN_INDEX positions.

        Without `image_index` row b is sample b; packed rows (revision.packing) hold several samples, and
        image_index [B, L] names the image_embeds row of the sample at each position."""
        is_visual = input_ids == IMAGE_TOKEN_INDEX
        text_embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_visual, 0))
        if image_embeds is None:
            if is_visual.any():
                raise ValueError("input_ids hold <image> positions but no image_embeds were given")
            return text_embeds
        self.check_embed_dim(image_embeds.shape[-1], "image_embeds")
        projected = self.project(image_embeds)  # [B, k, d]: once per sample
        # The LLM's first norm squares each row: NaN, Inf or a square that overflows reaches it as garbage (an empty
        # answer). Refused like a non-finite loss (training: the loss guard stops it).
        if not self.training and not torch.isfinite(projected.float().square().sum(-1)).all():
            raise ValueError("the projector's output holds NaN / Inf, or values too large to normalise (its weights: "
                             "e.g. a bias near 1e38); refusing to answer from it")
        tokens = projected.shape[1]
        # the n-th visual position of a sample takes vector n mod k (k = 1: the one vector fills every position)
        ordinal = is_visual.long().cumsum(1) - 1
        if image_index is not None:  # packed: several samples per row; count from each sample's first visual position
            rows = image_index[is_visual]
            first = torch.full((len(projected),), ordinal.numel(), dtype=ordinal.dtype, device=ordinal.device)
            first = first.scatter_reduce(0, rows, ordinal[is_visual], "amin")
            per_position = projected[rows, (ordinal[is_visual] - first[rows]) % tokens]
            return text_embeds.masked_scatter(is_visual.unsqueeze(-1), per_position.to(text_embeds.dtype))
        if tokens == 1:  # broadcasting [B, 1, d] over the sequence is the repeat; gradients from every position sum into it
            return torch.where(is_visual.unsqueeze(-1), projected.to(text_embeds.dtype), text_embeds)
        chosen = projected.gather(1, (ordinal.clamp(min=0) % tokens).unsqueeze(-1).expand(-1, -1, projected.shape[-1]))
        return torch.where(is_visual.unsqueeze(-1), chosen.to(text_embeds.dtype), text_embeds)

    def project(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, D] embeddings -> [B, k, d]: standardised, then projected to the projector's k vectors."""
        projector = self.projector
        dtype = projector[0].weight.dtype
        x = (image_embeds.to(dtype) - projector.input_mean.to(dtype)) / projector.input_scale.to(dtype)
        return projector(x).view(len(image_embeds), self.revision_config.projector_tokens, -1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None, **kwargs):
        inputs_embeds = self.embed(input_ids, image_embeds, image_index)
        if kwargs.get("position_ids") is not None and attention_mask is None:
            # Packed rows: transformers builds the block-diagonal mask from position_ids only when no KV cache
            # is made, and the LLM's config makes one by default (tests/test_packing.py shows both).
            kwargs["use_cache"] = False
        if labels is not None:
            labels = labels.masked_fill(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
            # training: the head on labelled positions only (revision/loss.py); eval keeps HF's logits
            if self.training and labelled_head_supported(self.llm):
                return labelled_causal_lm_loss(self.llm, inputs_embeds, labels, attention_mask, **kwargs)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Generate from a (left-padded) prompt; returns only the new tokens, as HF does for inputs_embeds."""
        inputs_embeds = self.embed(input_ids, image_embeds)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # ---- what HF Trainer expects of a model ---------------------------------------------------------

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        # Non-reentrant checkpointing lets gradients reach the projector through a frozen LLM (stage 1). A Trainer
        # from before the rename calls gradient_checkpointing_enable(gradient_checkpointing_kwargs=...).
        kwargs_ = {"use_reentrant": False, **(activation_checkpointing_kwargs or gradient_checkpointing_kwargs or {})}
        if hasattr(self.llm, "activation_checkpointing_enable"):
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs_, **kwargs)
        else:  # transformers before the rename (5.4 has only the gradient_checkpointing_* spelling)
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs_)

    gradient_checkpointing_enable = activation_checkpointing_enable

    @property
    def config(self):
        """The LLM's config: Trainer and DeepSpeed read hidden_size, use_cache and special tokens from it."""
        return self.llm.config

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.device

    # ---- save / load ------------------------------------------------------------------------------

    def freeze_llm(self) -> None:
        """Stage 1: only the projector trains."""
        self.llm.requires_grad_(False)
        self.projector.requires_grad_(True)

    def llm_weights(self) -> str:
        """What save_pretrained writes of the LLM: lora (an adapter), full, or base (frozen: nothing)."""
        if hasattr(self.llm, "peft_config"):
            return "lora"
        return "full" if any(p.requires_grad for p in self.llm.parameters()) else "base"

    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                        tokenizer=None, alignment: str | os.PathLike | None = None) -> None:
        """Write the checkpoint folder. `state_dict` (keys as in self.state_dict()) lets DeepSpeed pass gathered weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        projector = _strip_prefix(state_dict, "projector.")
        save_file({k: v.detach().contiguous().cpu() for k, v in projector.items()}, str(folder / PROJECTOR_FILE))
        self.revision_config.llm_weights = self.llm_weights()
        if self.revision_config.llm_weights != "base":
            self.llm.save_pretrained(folder, state_dict=_strip_prefix(state_dict, "llm."))
        if alignment is not None:
            from revision.align import load_alignment

            self.alignment = load_alignment(alignment)
        if self.alignment is not None:  # the image_map's statistics travel with the model
            self.revision_config.alignment = self.alignment.save(folder).name
        self.revision_config.save(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    def image_map(self, image_embeds: np.ndarray) -> np.ndarray:
        """Apply the alignment this model was trained with to real image embeddings [N, D] (n(v) if none)."""
        from revision.align import Alignment

        return (self.alignment or Alignment()).image_map(image_embeds)

    def load_trainable(self, folder: str | os.PathLike) -> None:
        """Load back the weights a checkpoint of this run holds (used when resuming)."""
        folder = Path(folder)
        load_projector_state(self.projector, load_projector_weights(folder))
        saved = RevisionConfig.load(folder).llm_weights
        if saved == "lora":
            from peft import set_peft_model_state_dict

            with readable_weights(folder / "adapter_model.safetensors"):
                set_peft_model_state_dict(self.llm, load_file(str(folder / "adapter_model.safetensors")))
        elif saved == "full":
            from transformers.trainer_utils import load_sharded_checkpoint

            if (folder / "model.safetensors").exists():
                with readable_weights(folder / "model.safetensors"):
                    result = self.llm.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
                tied = {n for n, _ in self.llm.named_parameters(remove_duplicate=False)} - dict(self.llm.named_parameters()).keys()
                if result.unexpected_keys or set(result.missing_keys) - tied:
                    raise ValueError(f"{folder}: LLM weights do not match the model "
                                     f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
            else:
                load_sharded_checkpoint(self.llm, str(folder), strict=False)
