"""The toy LLM: trains on the world's text, saves an HF Llama + word-level tokenizer that load back."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo.llm import ToyLlmConfig, train_toy_llm
from demo.world import build_world


def test_toy_llm_trains_and_loads(tmp_path):
    build_world(tmp_path / "w", sizes="mini")
    log = train_toy_llm(tmp_path / "w", tmp_path / "llm", ToyLlmConfig(hidden=32, heads=2, steps=30, batch_size=8))
    assert log["losses"][-1] < log["losses"][0]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    words = json.loads((tmp_path / "w" / "unpaired_texts.jsonl").read_text().split("\n")[0])["text"]
    assert tokenizer.unk_token_id not in tokenizer(words).input_ids
    assert log["samples"] == 2 * (32 + 32)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "llm").config.hidden_size == 32


def test_toy_llm_refuses_a_world_without_captions(tmp_path):
    build_world(tmp_path / "w", sizes="mini")
    (tmp_path / "w" / "paired.jsonl").write_text("")
    (tmp_path / "w" / "unpaired_texts.jsonl").write_text("")
    with pytest.raises(ValueError, match="need at least one training caption"):
        train_toy_llm(tmp_path / "w", tmp_path / "llm")


def test_pretraining_samples_are_rendered_like_the_two_stages(tmp_path):
    """Each caption twice: after the image slot (stage 1's plain template) and as QA about its scene (stage 2's
    chat template), the slot holding the mean embedding of the caption's keywords."""
    from demo.llm import encode_samples, keywords, pretraining_samples, sample_batches, with_summary
    from demo.tiny.lm import build_tiny_lm, build_tokenizer
    from demo.world import parse_caption, vocabulary
    from revision.conversation import render, resolve_template
    from revision.data import tokenize
    from revision.model import IMAGE_TOKEN_INDEX

    build_world(tmp_path / "w", sizes="mini")
    samples = pretraining_samples(tmp_path / "w", seed=0)
    assert len(samples) == 2 * (32 + 32)  # mini world: 32 paired + 32 unpaired captions
    (plain, _, caption), (chat, template, same) = samples[0], samples[1]
    assert template == "chat" and same == caption and plain[1]["value"] == caption
    scene = parse_caption(caption)[0]
    answers = [turn["value"] for turn in chat[1::2]]
    assert chat[0]["value"].startswith("<image>\n") and any(a in scene.values() or a in ("one", "two", "yes", "no") for a in answers)
    tokenizer = build_tokenizer(vocabulary())
    encoded = encode_samples(samples[:2], tokenizer, 96)
    for (conversation, name, _), (ids, labels, named) in zip(samples[:2], encoded):
        expected, expected_labels, _ = tokenize(render(conversation, resolve_template(name, tokenizer), tokenizer), tokenizer, 1, 96)
        assert torch.equal(ids, expected) and torch.equal(labels, expected_labels) and int((ids == IMAGE_TOKEN_INDEX).sum()) == 1
        assert tokenizer.convert_ids_to_tokens(named.tolist()) == keywords(caption)
    model = build_tiny_lm("llama", tokenizer, tie_word_embeddings=True)
    ids, mask, labels, named, named_mask = next(sample_batches(encoded, 2, 0, tokenizer.pad_token_id))
    out = with_summary(model, ids, mask, labels, named, named_mask)
    embed = model.get_input_embeddings()
    for row in range(2):
        slot = int((ids[row] == IMAGE_TOKEN_INDEX).nonzero())
        keep = named_mask[row].bool()
        assert torch.allclose(out["inputs_embeds"][row, slot], embed(named[row][keep]).mean(0))
        assert torch.allclose(out["inputs_embeds"][row, slot + 1], embed(ids[row, slot + 1]))
    assert torch.equal(out["labels"], labels) and (labels[ids == IMAGE_TOKEN_INDEX] == -100).all()


def test_keywords_are_canonical_attribute_words():
    from demo.llm import keywords

    assert keywords("a big red disk in the upper left and a tiny blue box on the right.") == [
        "two", "red", "circle", "large", "top", "left", "blue", "square", "small", "right"]
    assert keywords("a red circle in the middle.") == ["one", "red", "circle", "middle"]  # no size named
    assert keywords("what colour is the small circle?") == ["circle", "small"]  # a question: no count word
    assert keywords("two") == []
