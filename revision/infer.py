"""Answer questions about images with a trained checkpoint: image → encoder → image_map → projector → LLM → text.

    predictor = Predictor("outputs/revision-finetune")          # device/dtype "auto"
    predictor.answer("what colour is it ?", "cat.png")          # greedy by default
    predictor.answer_batch(prompts, visuals, batch_size=8)      # left-padded batches, same answers as one by one
    predictor.loglikelihood(context, " B", "cat.png")           # (sum of log-probs, is greedy): multiple choice

The checkpoint's revision_config.json names the encoder and the alignment statistics, so a raw image goes
through the same encoder and image_map as in training without the caller repeating them. The encoder is
loaded only when a raw image comes. A visual is a PIL image, an image path, a precomputed image embedding
([D], raw from the encoder as image_embed.py stores it: image_map is applied here), or None (text only).

The question is formatted as training formatted it: with the checkpoint's template (`chat` / `vicuna`:
one user turn "<image>\\n{question}", or "{question}\\n<image>" for a checkpoint trained with the image last
(its image_placement), then the assistant cue; `plain`, a stage-1 checkpoint: the image
alone, so the answer is a caption and the question is ignored). A prompt may also be a whole conversation
(LLaVA turns ending with the new question, as revision.serve asks it): the image goes into its first user turn.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from revision.checkpoint import check_loadable
from revision.conversation import Segment, count_images, insert_image, normalise_turns, render_prompt, resolve_template
from revision.data import tokenize
from revision.decode import DEFAULT_MAX_PIXELS, check_size, load_image, upright
from revision.encoders import Encoder, load_encoder, resolve_device, resolve_dtype, to_rgb
from revision.model import CONFIG_FILE, IMAGE_TOKEN, RevisionModel

Visual = Image.Image | str | os.PathLike | np.ndarray | None
Prompt = str | Sequence[dict]  # a question, or a conversation: {"from", "value"} turns ending with a question


class Predictor:
    """A loaded checkpoint that answers questions about images (see the module docstring)."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype = "auto",
                 encoder: str | None = None, base_model: str | None = None, encoder_batch_size: int = 64,
                 trust_remote_code: bool = False, verify: bool = True):
        self.folder = Path(checkpoint)
        # an interrupted save (a mix of two saves) or a file changed since (sha256; verify=False skips it): refused
        check_loadable(self.folder, hashes=verify)
        if not (self.folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{self.folder}: not a ReVision checkpoint: {CONFIG_FILE} is missing "
                                    "(a folder written by train.py / RevisionModel.save_pretrained has one)")
        # The encoder a checkpoint names may be a Hugging Face folder that ships code (its config's auto_map): that
        # code runs only when the user says so (llm2clip: and open_clip: run no repository code, revision/encoders/).
        self.trust_remote_code = trust_remote_code
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = RevisionModel.from_pretrained(self.folder, dtype=self.dtype, base_model=base_model).to(self.device).eval()
        self.config = self.model.revision_config
        self.embed_dim = self.model.projector[0].in_features  # what the projector really takes
        tokenizer_source = self.folder if (self.folder / "tokenizer_config.json").exists() else base_model or self.config.base_model
        if not tokenizer_source:
            raise FileNotFoundError(f"{self.folder}: no tokenizer here and no base_model named to take it from")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, padding_side="left")
        self.template = resolve_template(self.config.template, self.tokenizer)
        self.encoder_spec, self.encoder_batch_size = encoder or self.config.encoder, encoder_batch_size
        self._encoder: Encoder | None = None
        self.stop_token_ids = self._stop_token_ids()

    # ---- the image side ---------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """The checkpoint's encoder, loaded on first use; its dim must be the projector's."""
        if self._encoder is None:
            if not self.encoder_spec:
                raise ValueError(f"{self.folder / CONFIG_FILE} names no encoder: pass one (--encoder) or give "
                                 "precomputed image embeddings")
            encoder = load_encoder(self.encoder_spec, self.device, "auto", self.encoder_batch_size,
                                   trust_remote_code=self.trust_remote_code)
            if encoder.dim != self.embed_dim:
                raise ValueError(f"encoder {self.encoder_spec!r} gives {encoder.dim}-dim embeddings, but the projector in "
                                 f"{self.folder} takes {self.embed_dim} (the checkpoint was trained on another encoder)")
            self._encoder = encoder
        return self._encoder

    def prepare(self, visual: Visual) -> Image.Image | np.ndarray | None:
        """A visual made ready to embed: a path is opened and decoded, an image turned upright (EXIF) and its size
        capped as image_embed.py caps it, an embedding checked. Raises on bad input."""
        if visual is None:
            return visual
        if isinstance(visual, Image.Image):  # lmms-eval's visuals: decoded by the caller, perhaps still sideways
            check_size(*visual.size, DEFAULT_MAX_PIXELS)
            return upright(visual)
        if isinstance(visual, (str, os.PathLike)):
            path = Path(visual)
            try:
                return load_image(path)
            except Exception as e:  # missing, empty, truncated, not an image: every decoder error reads the same way
                raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
        embedding = np.asarray(visual.detach().cpu() if isinstance(visual, torch.Tensor) else visual, dtype=np.float32)
        if embedding.shape != (self.embed_dim,):
            raise ValueError(f"precomputed embedding has shape {embedding.shape}, but the projector takes ({self.embed_dim},)")
        if not np.isfinite(embedding).all() or not embedding.any():
            raise ValueError("precomputed embedding is all zeros or holds NaN/Inf")
        return embedding

    def image_embeddings(self, visuals: Sequence[Visual], mapped: bool = False) -> np.ndarray:
        """[N, D] float32 rows as the projector receives them: image_map of each visual's embedding (zeros for None).
        `mapped`: the embeddings are in the projector's input space already (text embeddings aligned by
        embed_mean.py: synthetic image embeddings, what stage 1 trained on), so image_map is skipped."""
        prepared = [self.prepare(v) for v in visuals]
        if mapped and any(isinstance(v, Image.Image) for v in prepared):
            raise ValueError("mapped embeddings were asked for, but a visual is an image: only embeddings can be mapped")
        raw = np.zeros((len(prepared), self.embed_dim), np.float32)
        images = [(i, v) for i, v in enumerate(prepared) if isinstance(v, Image.Image)]
        if images:
            raw[[i for i, _ in images]] = self.encoder.encode_images([to_rgb(im) for _, im in images]).numpy()
        for i, v in enumerate(prepared):
            if isinstance(v, np.ndarray):
                raw[i] = v
        present = [i for i, v in enumerate(prepared) if v is not None]
        self._check_finite(raw, present, visuals, "the encoder")  # e.g. an fp16 overflow
        if present and not mapped:
            raw[present] = self.model.image_map(raw[present])
        self._check_finite(raw, present, visuals, f"{self.folder}'s image_map")
        return raw

    @staticmethod
    def _check_finite(rows: np.ndarray, present: list[int], visuals: Sequence[Visual], after: str) -> None:
        """Never answer from NaN: name the first visual whose embedding is not finite."""
        bad = [i for i in present if not np.isfinite(rows[i]).all()]
        if bad:
            what = visuals[bad[0]] if isinstance(visuals[bad[0]], (str, os.PathLike)) else f"visual {bad[0]} of the batch"
            raise ValueError(f"{what}: its embedding holds NaN / Inf after {after}")

    # ---- the text side ----------------------------------------------------------------------------

    def format_prompt(self, question: Prompt, has_image: bool) -> str:
        """The prompt text as training rendered it, ending with the cue for the answer."""
        turns = normalise_turns([{"from": "human", "value": question}] if isinstance(question, str) else list(question))
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("a conversation to answer must end with a user turn (the question)")
        if count_images(turns) and not has_image:
            raise ValueError(f"the prompt holds {IMAGE_TOKEN} but no image was given")
        if has_image and not count_images(turns):  # where training put it; a prompt holding it keeps its own place
            turns = insert_image(turns, self.config.image_placement or "first")
        if self.template == "plain" and not has_image:
            raise ValueError(f"{self.folder} is a captioning (plain template) checkpoint: it needs an image")
        return render_prompt(turns, self.template, self.tokenizer, self.config.system_prompt)

    def prompt_ids(self, question: Prompt, has_image: bool) -> torch.Tensor:
        """Token ids of the formatted prompt; the image is num_visual_tokens IMAGE_TOKEN_INDEX positions."""
        prompt = self.format_prompt(question, has_image)
        return tokenize([Segment(prompt, False)], self.tokenizer, self.config.num_visual_tokens, sys.maxsize)[0]

    def _stop_token_ids(self) -> list[int]:
        """EOS, plus the special token the chat template closes an assistant turn with (Llama-3's <|eot_id|>, ...)."""
        ids = self.model.llm.generation_config.eos_token_id
        ids = {*(ids if isinstance(ids, list) else [ids]), self.tokenizer.eos_token_id} - {None}
        if self.template == "chat":
            marker = "ANSWER"
            turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False)
            closing = self.tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False).input_ids
            if closing and closing[0] in self.tokenizer.all_special_ids:
                ids.add(closing[0])
        return sorted(ids)

    # ---- answering --------------------------------------------------------------------------------

    def answer(self, prompt: Prompt, visual: Visual = None, **options) -> str:
        """One answer; options as for answer_batch."""
        return self.answer_batch([prompt], [visual], **options)[0]

    def answer_batch(self, prompts: Sequence[Prompt], visuals: Sequence[Visual] | None = None, batch_size: int = 8,
                     max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1,
                     stop: Sequence[str] = (), mapped: bool = False) -> list[str]:
        """Answers to prompts[i] about visuals[i]. temperature 0 is greedy; `stop` strings end an answer (not kept);
        `mapped`: see image_embeddings."""
        visuals = list(visuals) if visuals is not None else [None] * len(prompts)
        if len(visuals) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(visuals)} visuals")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        options = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=temperature > 0,
                       pad_token_id=pad_id, eos_token_id=self.stop_token_ids)
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p)
        stop = [s for s in stop if s]
        if stop:  # each row stops at its first stop string; the string itself is cut off below
            options.update(stopping_criteria=StoppingCriteriaList([StopOnStrings(stop, self.tokenizer)]))
        answers = []
        for start in range(0, len(prompts), batch_size):
            batch_prompts, batch_visuals = prompts[start:start + batch_size], visuals[start:start + batch_size]
            embeds = torch.from_numpy(self.image_embeddings(batch_visuals, mapped)).to(self.device)
            input_ids, mask = left_pad([self.prompt_ids(p, v is not None) for p, v in zip(batch_prompts, batch_visuals)], pad_id)
            new = self.model.generate(input_ids.to(self.device), embeds, attention_mask=mask.to(self.device), **options)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            answers += [cut_at_stop(text, stop).strip() for text in texts]
        return answers

    def loglikelihood(self, context: str, continuation: str, visual: Visual = None) -> tuple[float, bool]:
        """log P(continuation | image, formatted context), summed over its tokens, and whether greedy decoding
        would produce exactly those tokens."""
        logprobs, greedy = self.token_logprobs(context, continuation, visual)
        return float(logprobs.sum()), greedy

    @torch.no_grad()
    def token_logprobs(self, context: str, continuation: str, visual: Visual = None) -> tuple[np.ndarray, bool]:
        """log-prob of each continuation token after the formatted context (the continuation is tokenized on its
        own, as training tokenized the answer), and whether each is the greedy choice."""
        embeds = torch.from_numpy(self.image_embeddings([visual])).to(self.device)
        prompt = self.prompt_ids(context, visual is not None)
        target = torch.tensor(self.tokenizer(continuation, add_special_tokens=False).input_ids, dtype=torch.long)
        if not len(target):
            return np.zeros(0), True
        input_ids = torch.cat([prompt, target])[None].to(self.device)
        logits = self.model(input_ids=input_ids, image_embeds=embeds).logits[0, len(prompt) - 1:-1].float()
        target = target.to(self.device)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
        return logprobs.cpu().numpy().astype(np.float64), bool((logits.argmax(-1) == target).all())


def left_pad(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences padded on the left (generation appends on the right), with the attention mask."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return input_ids, mask


class StopOnStrings(StoppingCriteria):
    """Done once a row's newest tokens spell a stop string. (HF's own stop_strings cannot read every
    tokenizer's vocabulary, e.g. word-level ones.) Generating from inputs_embeds, input_ids holds only new tokens."""

    def __init__(self, stop: Sequence[str], tokenizer):
        self.stop, self.tokenizer = list(stop), tokenizer
        self.window = max(len(s) for s in self.stop) + 2  # tokens: every token spells at least one character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window:], skip_special_tokens=True)
        return torch.tensor([any(s in tail for s in self.stop) for tail in tails], device=input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text
