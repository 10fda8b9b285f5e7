"""The toy LLM: trains on the world's text, saves an HF Llama + word-level tokenizer that load back."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from revision.toy.llm import ToyLlmConfig, train_toy_llm
from revision.toy.world import build_world


def test_toy_llm_trains_and_loads(tmp_path):
    build_world(tmp_path / "w", sizes="mini")
    log = train_toy_llm(tmp_path / "w", tmp_path / "llm", ToyLlmConfig(hidden=32, heads=2, steps=30, batch_size=8))
    assert log["losses"][-1] < log["losses"][0]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    words = (tmp_path / "w" / "corpus.txt").read_text().split("\n")[0]
    assert tokenizer.unk_token_id not in tokenizer(words).input_ids
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "llm").config.hidden_size == 32


def test_toy_llm_refuses_an_empty_corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n")
    with pytest.raises(ValueError, match="corpus.txt: need at least 2 lines"):
        train_toy_llm(tmp_path, tmp_path / "llm")


def test_summary_is_one_extra_untrained_position():
    from revision.tiny.lm import build_tiny_lm, build_tokenizer
    from revision.toy.llm import with_summary

    tokenizer = build_tokenizer(["red", "circle"])
    model = build_tiny_lm("llama", tokenizer)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("red circle", add_special_tokens=False).input_ids, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = with_summary(model, ids, mask, ids.masked_fill(mask == 0, -100))
    assert out["inputs_embeds"].shape[1] == 5 and out["attention_mask"].tolist() == [[1, 1, 1, 1, 0]]
    assert out["labels"][0, 1] == -100 and out["labels"][0, 2] == ids[0, 1]
    words = model.get_input_embeddings()(ids[:, 1:3]).mean(1)  # the mean of "red" and "circle", not <s> or pads
    assert torch.allclose(out["inputs_embeds"][:, 1], words)


def test_keyword_summary_is_the_mean_of_the_keywords_embeddings():
    from revision.tiny.lm import build_tiny_lm, build_tokenizer
    from revision.toy.llm import keywords, with_summary
    from revision.toy.world import vocabulary

    assert keywords("a big red disk in the upper left and a tiny blue box on the right.") == [
        "two", "red", "circle", "large", "top", "left", "blue", "square", "small", "right"]  # canonical words
    assert keywords("what colour is the small circle?") == ["circle", "small"]  # a question: no count word
    assert keywords("two") == []  # names no attribute: the line's own tokens summarise it
    tokenizer = build_tokenizer(vocabulary())
    model = build_tiny_lm("llama", tokenizer, tie_word_embeddings=True)
    lines = ["a red circle in the middle.", "two"]
    rows = [[tokenizer.bos_token_id, *tokenizer(line, add_special_tokens=False).input_ids] for line in lines]
    ids = torch.tensor([rows[0], rows[1] + [tokenizer.pad_token_id] * (len(rows[0]) - len(rows[1]))])
    mask = (ids != tokenizer.pad_token_id).long()
    assert keywords(lines[0]) == ["one", "red", "circle", "middle"]  # no size named
    named = torch.tensor([tokenizer.convert_tokens_to_ids(keywords(lines[0])), [tokenizer.pad_token_id] * 4])
    out = with_summary(model, ids, mask, ids.masked_fill(mask == 0, -100), named, torch.tensor([[1] * 4, [0] * 4]))
    embed = model.get_input_embeddings()
    assert torch.allclose(out["inputs_embeds"][0, 1], embed(named[0]).mean(0))
    assert torch.allclose(out["inputs_embeds"][1, 1], embed(ids[1, 1:2]).mean(0))  # "two": its own token
