"""The training loss with logits only where there are labels.

A causal LM's head makes a vocabulary-wide row of logits for every position, and HF's loss then ignores every
position without a label: the prompt, the visual block, the padding. In instruction data most positions are
such (SmolLM2 on the toy QA: about 10 answer tokens in 85), and the head is a large layer (a 49k vocabulary for
SmolLM2, 128k x 4096 for Llama-3: its fp32 logits of one 16 x 2048 batch are 17 GB). So the decoder runs as
usual and the head only on the hidden states whose next token is a label: the same loss as HF's
(ForCausalLMLoss: mean over labelled tokens, or sum / num_items_in_batch when the Trainer passes it), less
compute and memory. Models whose head does more than a linear layer (Gemma-2's logit soft-capping, Cohere's
logit_scale) and wrappers without a decoder keep HF's own path.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100  # labels HF's loss skips; revision.model and the data modules take it from here


def labelled_head_supported(llm: nn.Module) -> bool:
    """Whether `llm` is a plain decoder + linear head (its logits are lm_head(decoder(x)), nothing more)."""
    config = getattr(llm, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    try:
        decoder, head = llm.get_decoder(), llm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return isinstance(decoder, nn.Module) and isinstance(head, nn.Linear)


def labelled_causal_lm_loss(llm: nn.Module, inputs_embeds: torch.Tensor, labels: torch.Tensor,
                            attention_mask: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                            **kwargs) -> CausalLMOutputWithPast:
    """HF's causal LM loss for `labels` [B, T] (IGNORE_INDEX where none), the head run only on labelled positions.
    Returns the output with the loss and no logits (training reads only the loss)."""
    hidden = llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    where = targets != IGNORE_INDEX
    logits = llm.get_output_embeddings()(hidden[:, :-1][where]).float()
    loss = nn.functional.cross_entropy(logits, targets[where], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else where.sum()
    if isinstance(count, torch.Tensor):
        count = count.to(loss.device)
    return CausalLMOutputWithPast(loss=loss / count)
